# %%
#| default_exp providers

# %% [md]
# # Providers
#
# > Route a model id (`gpt-4o`, `anthropic:claude-3-5-sonnet`, `gemini:gemini-1.5-flash`, `openpipe:my-ft`,
# > `openpipe:azure/gpt-4o`) to an upstream, and translate OpenAI chat completions to and from the Anthropic
# > Messages API and the Gemini API, streaming included.

# %%
#| export
from __future__ import annotations
import base64, json, os, time, uuid
from dataclasses import dataclass, field, replace
from typing import Iterator, AsyncIterator
import sqlalchemy as sa
from openpipe_lab.core import *
from openpipe_lab.store import tables, loads

# %%
#| hide
from fastcore.test import *

# %% [md]
# ## Model ids and routes
#
# Everything the client needs to know about where a request goes is decided from the model id alone, once, by
# `resolve`, and returned as a `Route`: which wire protocol (`api`), which upstream model name, which base URL and
# which API key. The rest of the library (the client, `Dataset.relabel`, `Eval`, the deployment helper) relies on
# this one function, so a new route kind is added here and nowhere else.
#
# | model id | goes to | key from |
# |---|---|---|
# | `gpt-4o`, `openai:gpt-4o` | the OpenAI client's own connection (`OPENAI_BASE_URL` or api.openai.com) | the client (`OPENAI_API_KEY`) |
# | `anthropic:<model>` | the Messages API through the `anthropic` SDK (`ANTHROPIC_BASE_URL`) | `ANTHROPIC_API_KEY` |
# | `gemini:<model>` | the Gemini API through the `google-genai` SDK (`GOOGLE_GEMINI_BASE_URL`) | `GEMINI_API_KEY` (or `GOOGLE_API_KEY`) |
# | `openpipe:<provider>/<model>` | a provider registered with `LogStore.add_provider` | its `api_key_env` |
# | `openpipe:<slug>` | the running `Deployment` serving fine-tuned model `<slug>` | none (local server) |
#
# Gemini goes through `google-genai`, Google's current SDK: the older `google-generativeai` package is deprecated
# upstream (no new features, end of support announced), so we neither use nor support it.
#
# API keys are read from the environment when the route is resolved and never stored: the `Route` keeps the
# variable's name (for error messages) and the value (hidden from its repr).

# %%
#| export
@dataclass(frozen=True)
class Route:
    "Where a model id goes: the wire protocol, the upstream model name, the base URL and the API key."
    model: str                      # the model id as requested, e.g. 'anthropic:claude-3-5-sonnet'
    provider: str                   # openai | anthropic | gemini | openpipe | <custom provider name>
    api: str                        # openai | azure | anthropic | gemini: the protocol spoken upstream
    name: str                       # the model name sent upstream, e.g. 'claude-3-5-sonnet-20241022'
    base_url: str | None = None     # None: the SDK's default (for bare OpenAI ids: the calling client's own)
    api_key_env: str | None = None  # the environment variable the key came from
    api_key: str | None = field(default=None, repr=False)
    pruning_rules: tuple = ()       # texts removed from messages before sending (fine-tuned models)
    deployment_id: str | None = None
    config: dict = field(default_factory=dict, compare=False, hash=False)  # provider extras (azure api_version)

    @property
    def uses_client(self) -> bool:
        "True when the request goes through the calling OpenAI client's own connection (bare/`openai:` ids)."
        return self.api == 'openai' and self.provider == 'openai' and self.base_url is None

    @property
    def translated(self) -> bool:
        "True when requests and responses are translated (Anthropic, Gemini)."
        return self.api in ('anthropic', 'gemini')

# %% [md]
# The spec lists "abbreviated" model names that always mean the latest version of a family. We map them to the
# dated ids the spec lists (`ANTHROPIC_ALIASES`, `GEMINI_ALIASES`), so a log says exactly which model answered;
# anything else passes through unchanged.

# %%
#| export
ANTHROPIC_ALIASES = {
    'claude-3-7-sonnet': 'claude-3-7-sonnet-20250219', 'claude-3-5-sonnet': 'claude-3-5-sonnet-20241022',
    'claude-3-opus': 'claude-3-opus-20240229', 'claude-3-sonnet': 'claude-3-sonnet-20240229',
    'claude-3-haiku': 'claude-3-haiku-20240307'}
GEMINI_ALIASES = {
    'gemini-1.5-flash': 'gemini-1.5-flash-002', 'gemini-1.5-flash-8b': 'gemini-1.5-flash-8b-001',
    'gemini-1.5-pro': 'gemini-1.5-pro-002', 'gemini-2.0-flash': 'gemini-2.0-flash-001'}

def _key(model: str, env_names: tuple, what: str) -> tuple[str, str]:
    for env in env_names:
        if os.environ.get(env): return env, os.environ[env]
    raise MissingAPIKeyError(f"model {model!r} needs an API key for {what}: set the environment variable {env_names[0]}"
                             + (f" (or {', '.join(env_names[1:])})" if len(env_names) > 1 else ''))

_OPENAI_ROUTES: dict = {}

def resolve(model: str,  # model id, e.g. 'gpt-4o-mini', 'anthropic:claude-3-5-sonnet', 'openpipe:my-ft'
            store=None,  # LogStore to look up `openpipe:` ids in; None: the default lab
           ) -> Route:
    "The `Route` for a model id; raises `ProviderError`/`MissingAPIKeyError` naming the id and the fix."
    if not isinstance(model, str) or not model.strip():
        raise ProviderError(f"model must be a non-empty string like 'gpt-4o-mini' or 'anthropic:claude-3-5-sonnet', got {model!r}")
    prefix, sep, name = model.partition(':')
    if not sep or prefix == 'openai':            # bare ids are OpenAI's (fast path: no lookups)
        route = _OPENAI_ROUTES.get(model)
        if route is None: route = _OPENAI_ROUTES.setdefault(model, Route(model, 'openai', 'openai', name if sep else model))
        return route
    if not name: raise ProviderError(f"model id {model!r} has no model name after '{prefix}:'")
    if prefix == 'anthropic':
        env, key = _key(model, ('ANTHROPIC_API_KEY',), 'Anthropic')
        return Route(model, 'anthropic', 'anthropic', ANTHROPIC_ALIASES.get(name, name),
                     os.environ.get('ANTHROPIC_BASE_URL') or None, env, key)
    if prefix == 'gemini':
        env, key = _key(model, ('GEMINI_API_KEY', 'GOOGLE_API_KEY'), 'Gemini')
        return Route(model, 'gemini', 'gemini', GEMINI_ALIASES.get(name, name),
                     os.environ.get('GOOGLE_GEMINI_BASE_URL') or None, env, key)
    if prefix == 'openpipe':
        from openpipe_lab.logstore import get_store
        store = get_store(store)
        return _custom_route(model, name, store) if '/' in name else _deployment_route(model, name, store)
    raise ProviderError(f"unknown provider prefix {prefix!r} in model id {model!r}: use a bare OpenAI model name, "
                        "'openai:', 'anthropic:', 'gemini:' or 'openpipe:' (a fine-tuned slug or <provider>/<model>)")

# %% [md]
# `openpipe:<provider>/<model>` reads the provider registered with `LogStore.add_provider`; `openpipe:<slug>` finds a
# running deployment that serves the fine-tuned model (table `deployment_models` joined with `deployments`), rewrites
# the model name to the name the server knows it by, and carries the model's inherited pruning rules
# (`models.pruning_rules`) so the client can apply them before sending.

# %%
#| export
def _custom_route(model: str, name: str, store) -> Route:
    provider, _, upstream = name.partition('/')
    if not upstream: raise ProviderError(f"model id {model!r} has no model name after '{provider}/'")
    t = tables.providers
    with store.db.connect() as c:
        row = c.execute(sa.select(t).where(t.c.name == provider)).mappings().first()
    if row is None:
        raise ProviderError(f"model id {model!r}: no provider named {provider!r} in {store!r}. Register it first: "
                            f"store.add_provider({provider!r}, base_url='https://...', api_key_env='MY_KEY', kind='openai')")
    env, key = row['api_key_env'], None
    if env:
        key = os.environ.get(env)
        if not key: raise MissingAPIKeyError(f"model {model!r} needs an API key for provider {provider!r}: "
                                             f"set the environment variable {env}")
    return Route(model, provider, row['kind'], upstream, row['base_url'], env, key, config=loads(row['config']) or {})

def _deployment_route(model: str, slug: str, store) -> Route:
    d, dm, m = tables.deployments, tables.deployment_models, tables.models
    with store.db.connect() as c:
        row = c.execute(sa.select(d.c.id, d.c.url, dm.c.served_name).select_from(dm.join(d, d.c.id == dm.c.deployment_id))
                        .where(dm.c.slug == slug, d.c.status == 'RUNNING').order_by(d.c.updated_at.desc())).first()
        rules = c.execute(sa.select(m.c.pruning_rules).where(m.c.slug == slug)).scalar()
    if row is None:
        raise ProviderError(f"no running deployment for slug {slug!r} (model id {model!r}): start one with "
                            f"FineTune.get({slug!r}).deploy() or Deployment([{slug!r}]).start()")
    return Route(model, 'openpipe', 'openai', row.served_name, row.url, pruning_rules=tuple(loads(rules) or ()),
                 deployment_id=row.id)

# %%
os.environ.pop('ANTHROPIC_API_KEY', None); os.environ.pop('ANTHROPIC_BASE_URL', None)
test_eq(resolve('gpt-4o-mini'), Route('gpt-4o-mini', 'openai', 'openai', 'gpt-4o-mini'))
test_eq(resolve('openai:gpt-4o').name, 'gpt-4o')
assert resolve('gpt-4o').uses_client and resolve('gpt-4o') is resolve('gpt-4o')
test_fail(lambda: resolve('anthropic:claude-3-5-sonnet'), contains='set the environment variable ANTHROPIC_API_KEY')
os.environ['ANTHROPIC_API_KEY'] = 'sk-ant-test'
r = resolve('anthropic:claude-3-5-sonnet')
test_eq((r.api, r.name, r.api_key_env), ('anthropic', 'claude-3-5-sonnet-20241022', 'ANTHROPIC_API_KEY'))
assert 'sk-ant' not in repr(r) and r.translated
os.environ['GOOGLE_API_KEY'] = 'g-test'
test_eq(resolve('gemini:gemini-1.5-flash').name, 'gemini-1.5-flash-002')
test_eq(resolve('gemini:gemini-exp-1206').api_key_env, 'GOOGLE_API_KEY')
test_fail(lambda: resolve('mistral:large'), contains="unknown provider prefix 'mistral'")
test_fail(lambda: resolve('anthropic:'), contains='has no model name')
r

# %% [md]
# The `openpipe:` routes read the lab database. A provider that was never registered, a missing key and a slug
# with no running deployment each name the fix:

# %%
import tempfile
from openpipe_lab.logstore import LogStore
lab = LogStore(tempfile.mkdtemp() + '/lab.db')
test_fail(lambda: resolve('openpipe:azure/gpt-4o', lab), contains="no provider named 'azure'")
lab.add_provider('azure', 'https://example.openai.azure.com', api_key_env='AZURE_KEY', kind='azure', api_version='2024-06-01')
test_fail(lambda: resolve('openpipe:azure/gpt-4o', lab), contains='set the environment variable AZURE_KEY')
os.environ['AZURE_KEY'] = 'az-test'
r = resolve('openpipe:azure/gpt-4o', lab)
test_eq((r.provider, r.api, r.name, r.config), ('azure', 'azure', 'gpt-4o', {'api_version': '2024-06-01'}))
test_fail(lambda: resolve('openpipe:pii-smol', lab), contains="no running deployment for slug 'pii-smol'")
now = int(time.time() * 1000)
with lab.db.begin() as c:
    c.execute(tables.deployments.insert().values(id='dep_1', url='http://127.0.0.1:8123/v1', status='RUNNING', created_at=now, updated_at=now))
    c.execute(tables.deployment_models.insert().values(deployment_id='dep_1', slug='pii-smol', served_name='pii-smol-lora'))
    c.execute(tables.models.insert().values(id='m1', slug='pii-smol', kind='openpipe', base_model='b', status='DEPLOYED',
                                            config='{}', pruning_rules='["You are a helpful assistant."]', created_at=now, updated_at=now))
r = resolve('openpipe:pii-smol', lab)
test_eq((r.api, r.name, r.base_url, r.pruning_rules), ('openai', 'pii-smol-lora', 'http://127.0.0.1:8123/v1', ('You are a helpful assistant.',)))
r

# %% [md]
# ## Translating to Anthropic
#
# The Messages API differs from chat completions in ways that all need a rule:
#
# - system and developer messages become the top-level `system` text (a request made only of a system message, as
#   in the spec's examples, sends it as the user turn instead, since Anthropic needs at least one message);
# - content parts become blocks; `image_url` parts become `image` blocks (base64 for `data:` URLs, `url` otherwise);
# - assistant `tool_calls` become `tool_use` blocks and `tool` messages become `tool_result` blocks in a user turn;
#   consecutive turns of the same role are merged, as Anthropic requires alternating roles;
# - `tool_choice` `auto`/`none`/`required`/named maps to `auto`/`none`/`any`/`tool`; `parallel_tool_calls=False`
#   sets `disable_parallel_tool_use`;
# - `max_tokens` (or `max_completion_tokens`) is required by Anthropic: we default to `ANTHROPIC_MAX_TOKENS` (4096);
# - `temperature` is clamped to Anthropic's range 0–1; `stop` becomes `stop_sequences`;
# - `response_format` (JSON object or schema) has no Anthropic equivalent for these models, so it is emulated the
#   documented way: a forced tool whose input schema is the requested schema, whose input becomes the content;
# - `n` > 1 is not supported by Anthropic: the client makes `n` calls and merges the choices.
#
# Fields with no Anthropic meaning (`seed`, `logprobs`, penalties, `user`, ...) are not sent.

# %%
#| export
ANTHROPIC_MAX_TOKENS = 4096
JSON_TOOL = 'json_output'

def _text_of(content) -> str:
    "The text of an OpenAI message content (a string or a list of parts)."
    if content is None: return ''
    if isinstance(content, str): return content
    return ''.join(p.get('text', '') for p in content if isinstance(p, dict) and p.get('type', 'text') == 'text')

def _parse_data_url(url: str) -> tuple[str, str] | None:
    "(media type, base64 data) of a `data:` URL, else None."
    if not url.startswith('data:'): return None
    head, _, data = url[5:].partition(',')
    return (head.split(';')[0] or 'application/octet-stream'), data

def _anthropic_blocks(content) -> list:
    if content is None: return []
    if isinstance(content, str): return [{'type': 'text', 'text': content}] if content else []
    out = []
    for i, p in enumerate(content):
        kind = p.get('type')
        if kind == 'text': out.append({'type': 'text', 'text': p['text']})
        elif kind == 'image_url':
            url = p['image_url']['url'] if isinstance(p['image_url'], dict) else p['image_url']
            data = _parse_data_url(url)
            out.append({'type': 'image', 'source': {'type': 'base64', 'media_type': data[0], 'data': data[1]} if data
                        else {'type': 'url', 'url': url}})
        else: raise ProviderError(f"content part {i} of type {kind!r} cannot be sent to Anthropic (text and image_url are supported)")
    return out

def _json_args(text: str, where: str):
    try: return json.loads(text) if text else {}
    except ValueError: raise ProviderError(f"{where}: tool call arguments are not valid JSON: {text[:80]!r}") from None

def to_anthropic(request: dict  # an OpenAI chat completions request
                ) -> dict:
    "The `anthropic.messages.create` arguments for an OpenAI chat completions request."
    system, messages = [], []
    def add(role, blocks):
        if messages and messages[-1]['role'] == role: messages[-1]['content'].extend(blocks)
        else: messages.append({'role': role, 'content': list(blocks)})
    for i, m in enumerate(request.get('messages') or []):
        role = m.get('role')
        if role in ('system', 'developer'): system.append(_text_of(m.get('content')))
        elif role == 'user': add('user', _anthropic_blocks(m.get('content')))
        elif role == 'assistant':
            blocks = _anthropic_blocks(m.get('content'))
            for tc in m.get('tool_calls') or []:
                blocks.append({'type': 'tool_use', 'id': tc['id'], 'name': tc['function']['name'],
                               'input': _json_args(tc['function'].get('arguments'), f"messages[{i}]")})
            add('assistant', blocks)
        elif role in ('tool', 'function'):
            add('user', [{'type': 'tool_result', 'tool_use_id': m.get('tool_call_id') or m.get('name'),
                          'content': _text_of(m.get('content'))}])
        else: raise ProviderError(f"messages[{i}]: role {role!r} cannot be sent to Anthropic")
    out = {'model': request['model']}
    if not messages and system: messages, system = [{'role': 'user', 'content': [{'type': 'text', 'text': '\n\n'.join(system)}]}], []
    out['messages'] = messages
    if system: out['system'] = '\n\n'.join(system)
    out['max_tokens'] = request.get('max_completion_tokens') or request.get('max_tokens') or ANTHROPIC_MAX_TOKENS
    if request.get('temperature') is not None: out['temperature'] = min(float(request['temperature']), 1.0)
    if request.get('top_p') is not None: out['top_p'] = request['top_p']
    stop = request.get('stop')
    if stop: out['stop_sequences'] = [stop] if isinstance(stop, str) else list(stop)
    tools = [{'name': t['function']['name'], 'description': t['function'].get('description', ''),
              'input_schema': t['function'].get('parameters') or {'type': 'object', 'properties': {}}}
             for t in request.get('tools') or []]
    choice = request.get('tool_choice')
    rf = request.get('response_format') or {}
    if rf.get('type') in ('json_object', 'json_schema'):
        if tools: raise ProviderError("response_format with tools cannot be sent to Anthropic: drop one of them")
        schema = (rf.get('json_schema') or {}).get('schema') or {'type': 'object'}
        tools, choice = [{'name': JSON_TOOL, 'description': 'Respond with the JSON output.', 'input_schema': schema}], \
                        {'type': 'function', 'function': {'name': JSON_TOOL}}
    if tools:
        out['tools'] = tools
        if choice is not None:
            tc = ({'auto': {'type': 'auto'}, 'none': {'type': 'none'}, 'required': {'type': 'any'}}.get(choice)
                  if isinstance(choice, str) else {'type': 'tool', 'name': choice['function']['name']})
            if tc is None: raise ProviderError(f"tool_choice {choice!r} is not auto, none, required or a named function")
            out['tool_choice'] = tc
        if request.get('parallel_tool_calls') is False:
            out['tool_choice'] = {**out.get('tool_choice', {'type': 'auto'}), 'disable_parallel_tool_use': True}
    return out

# %% [md]
# Table-driven checks: each row is an OpenAI request fragment and the Anthropic arguments it must produce.

# %%
weather = {'type': 'function', 'function': {'name': 'weather', 'description': 'Weather in a city',
           'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}
u = lambda text: {'role': 'user', 'content': text}
cases = [
    ({'messages': [{'role': 'system', 'content': 'count to 10'}]},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'count to 10'}]}], 'max_tokens': 4096}),
    ({'messages': [{'role': 'developer', 'content': 'Be terse.'}, u('hi')], 'max_tokens': 5, 'temperature': 1.5, 'stop': 'END'},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}], 'system': 'Be terse.', 'max_tokens': 5,
      'temperature': 1.0, 'stop_sequences': ['END']}),
    ({'messages': [u([{'type': 'text', 'text': 'what is this?'}, {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,iVBO'}},
                      {'type': 'image_url', 'image_url': {'url': 'https://x.org/cat.jpg'}}])], 'max_completion_tokens': 9},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'what is this?'},
                   {'type': 'image', 'source': {'type': 'base64', 'media_type': 'image/png', 'data': 'iVBO'}},
                   {'type': 'image', 'source': {'type': 'url', 'url': 'https://x.org/cat.jpg'}}]}], 'max_tokens': 9}),
    ({'messages': [u('weather in Paris and Oslo?'),
                   {'role': 'assistant', 'content': None, 'tool_calls': [
                       {'id': 'c1', 'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Paris"}'}},
                       {'id': 'c2', 'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Oslo"}'}}]},
                   {'role': 'tool', 'tool_call_id': 'c1', 'content': '21C'}, {'role': 'tool', 'tool_call_id': 'c2', 'content': '9C'}],
      'tools': [weather], 'tool_choice': 'required', 'parallel_tool_calls': False},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'weather in Paris and Oslo?'}]},
                   {'role': 'assistant', 'content': [{'type': 'tool_use', 'id': 'c1', 'name': 'weather', 'input': {'city': 'Paris'}},
                                                     {'type': 'tool_use', 'id': 'c2', 'name': 'weather', 'input': {'city': 'Oslo'}}]},
                   {'role': 'user', 'content': [{'type': 'tool_result', 'tool_use_id': 'c1', 'content': '21C'},
                                                {'type': 'tool_result', 'tool_use_id': 'c2', 'content': '9C'}]}],
      'max_tokens': 4096, 'tools': [{'name': 'weather', 'description': 'Weather in a city', 'input_schema': weather['function']['parameters']}],
      'tool_choice': {'type': 'any', 'disable_parallel_tool_use': True}}),
    ({'messages': [u('x')], 'tools': [weather], 'tool_choice': {'type': 'function', 'function': {'name': 'weather'}}},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'x'}]}], 'max_tokens': 4096,
      'tools': [{'name': 'weather', 'description': 'Weather in a city', 'input_schema': weather['function']['parameters']}],
      'tool_choice': {'type': 'tool', 'name': 'weather'}}),
    ({'messages': [u('x')], 'tools': [weather], 'tool_choice': 'none', 'seed': 1, 'top_p': 0.5},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'x'}]}], 'max_tokens': 4096, 'top_p': 0.5,
      'tools': [{'name': 'weather', 'description': 'Weather in a city', 'input_schema': weather['function']['parameters']}],
      'tool_choice': {'type': 'none'}}),
    ({'messages': [u('x')], 'response_format': {'type': 'json_schema', 'json_schema': {'name': 'a', 'schema': {'type': 'object', 'properties': {'a': {'type': 'integer'}}}}}},
     {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'x'}]}], 'max_tokens': 4096,
      'tools': [{'name': 'json_output', 'description': 'Respond with the JSON output.', 'input_schema': {'type': 'object', 'properties': {'a': {'type': 'integer'}}}}],
      'tool_choice': {'type': 'tool', 'name': 'json_output'}}),
]
for req, want in cases: test_eq(to_anthropic({'model': 'claude', **req}), {'model': 'claude', **want})
test_fail(lambda: to_anthropic({'model': 'c', 'messages': [u([{'type': 'input_audio', 'input_audio': {}}])]}), contains="content part 0 of type 'input_audio'")
test_fail(lambda: to_anthropic({'model': 'c', 'messages': [{'role': 'assistant', 'tool_calls': [{'id': 'c', 'function': {'name': 'f', 'arguments': '{oops'}}]}]}),
          contains='messages[0]: tool call arguments are not valid JSON')
to_anthropic({'model': 'claude-3-5-sonnet-20241022', **cases[3][0]})['messages'][1:]  # tool calls and their results

# %% [md]
# ### Anthropic responses back to OpenAI
#
# A `Message` becomes one choice: text blocks join into `content`, `tool_use` blocks become `tool_calls` (with the
# input re-serialised as the `arguments` string), the stop reason maps to a finish reason and `input_tokens`/
# `output_tokens` to `usage` (the stop-reason table is `ANTHROPIC_FINISH`). The emulated JSON tool turns back into
# plain content. The completion's `model` is
# the id the caller asked for, as in the spec's log export.

# %%
#| export
ANTHROPIC_FINISH = {'end_turn': 'stop', 'stop_sequence': 'stop', 'max_tokens': 'length', 'tool_use': 'tool_calls',
                    'refusal': 'content_filter', 'pause_turn': 'stop'}

def _usage(prompt, completion) -> dict:
    prompt, completion = prompt or 0, completion or 0
    return {'prompt_tokens': prompt, 'completion_tokens': completion, 'total_tokens': prompt + completion}

def anthropic_choice(message: dict, index: int = 0) -> dict:
    "An OpenAI choice from an Anthropic `Message` (as a dict)."
    texts, calls = [], []
    for b in message.get('content') or []:
        if b['type'] == 'text': texts.append(b['text'])
        elif b['type'] == 'tool_use':
            if b['name'] == JSON_TOOL: texts.append(json.dumps(b['input']))
            else: calls.append({'id': b['id'], 'type': 'function', 'function': {'name': b['name'], 'arguments': json.dumps(b['input'])}})
    finish = ANTHROPIC_FINISH.get(message.get('stop_reason'), 'stop')
    if finish == 'tool_calls' and not calls: finish = 'stop'
    msg = {'role': 'assistant', 'content': ''.join(texts) if texts else None, 'refusal': None}
    if calls: msg['tool_calls'] = calls
    return {'index': index, 'message': msg, 'logprobs': None, 'finish_reason': finish}

def from_anthropic(messages: list[dict],  # one Anthropic Message per choice (n calls when n > 1)
                   model: str,  # the model id to report, e.g. 'anthropic:claude-3-5-sonnet'
                  ) -> dict:
    "An OpenAI `chat.completion` dict from Anthropic `Message` dicts."
    usage = [m.get('usage') or {} for m in messages]
    return {'id': messages[0].get('id') or f"chatcmpl-{uuid.uuid4().hex}", 'object': 'chat.completion',
            'created': int(time.time()), 'model': model,
            'choices': [anthropic_choice(m, i) for i, m in enumerate(messages)],
            'usage': _usage(sum(u.get('input_tokens') or 0 for u in usage), sum(u.get('output_tokens') or 0 for u in usage))}

# %%
msg = {'id': 'msg_1', 'type': 'message', 'role': 'assistant', 'model': 'claude-3-5-sonnet-20241022', 'stop_reason': 'tool_use',
       'content': [{'type': 'text', 'text': 'Checking.'}, {'type': 'tool_use', 'id': 'toolu_1', 'name': 'weather', 'input': {'city': 'Paris'}}],
       'usage': {'input_tokens': 20, 'output_tokens': 8}}
c = from_anthropic([msg], 'anthropic:claude-3-5-sonnet')
test_eq(c['choices'][0], {'index': 0, 'logprobs': None, 'finish_reason': 'tool_calls',
        'message': {'role': 'assistant', 'content': 'Checking.', 'refusal': None,
                    'tool_calls': [{'id': 'toolu_1', 'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Paris"}'}}]}})
test_eq((c['id'], c['model'], c['usage']), ('msg_1', 'anthropic:claude-3-5-sonnet', {'prompt_tokens': 20, 'completion_tokens': 8, 'total_tokens': 28}))
for stop, finish in [('end_turn', 'stop'), ('max_tokens', 'length'), ('stop_sequence', 'stop')]:
    test_eq(anthropic_choice({'content': [{'type': 'text', 'text': 'a'}], 'stop_reason': stop})['finish_reason'], finish)
test_eq(anthropic_choice({'content': [{'type': 'tool_use', 'id': 't', 'name': JSON_TOOL, 'input': {'a': 1}}], 'stop_reason': 'tool_use'})['message'],
        {'role': 'assistant', 'content': '{"a": 1}', 'refusal': None})
test_eq(len(from_anthropic([msg, msg], 'anthropic:x')['choices']), 2)

# %% [md]
# ### Anthropic logs reported after the fact
#
# `LogStore.report_anthropic` records calls an application made with the Anthropic SDK itself. To keep one
# shape in the lab (so such logs filter, export and become datasets like any other), the request and response
# are translated the other way: a Messages API request becomes the equivalent chat-completions request, and the
# `Message` becomes a `chat.completion` (via `from_anthropic`).

# %%
#| export
def _openai_parts(blocks, where: str) -> tuple[list, list, list]:
    "OpenAI content parts, tool calls and tool results from Anthropic content blocks."
    parts, calls, results = [], [], []
    for j, b in enumerate(blocks):
        kind = b.get('type') if isinstance(b, dict) else None
        if kind == 'text': parts.append({'type': 'text', 'text': b.get('text', '')})
        elif kind == 'image':
            src = b.get('source') or {}
            url = src.get('url') if src.get('type') == 'url' else f"data:{src.get('media_type')};base64,{src.get('data')}"
            parts.append({'type': 'image_url', 'image_url': {'url': url}})
        elif kind == 'tool_use':
            calls.append({'id': b.get('id'), 'type': 'function',
                          'function': {'name': b.get('name'), 'arguments': json.dumps(b.get('input') or {})}})
        elif kind == 'tool_result':
            content = b.get('content')
            text = content if isinstance(content, str) else ''.join(c.get('text', '') for c in content or [] if isinstance(c, dict))
            results.append({'role': 'tool', 'tool_call_id': b.get('tool_use_id'), 'content': text})
        elif kind in ('thinking', 'redacted_thinking'): continue
        else: raise ValidationError(f"{where}.content[{j}]: unsupported Anthropic content block {kind!r}")
    return parts, calls, results

def anthropic_request_to_openai(body: dict  # an Anthropic Messages API request
                               ) -> dict:
    "The chat-completions request equivalent to an Anthropic Messages API request."
    messages = []
    system = body.get('system')
    if system:
        text = system if isinstance(system, str) else ''.join(b.get('text', '') for b in system if isinstance(b, dict))
        messages.append({'role': 'system', 'content': text})
    for i, m in enumerate(body.get('messages') or []):
        where = f"req_payload.messages[{i}]"
        if not isinstance(m, dict) or m.get('role') not in ('user', 'assistant'):
            raise ValidationError(f"{where}: an Anthropic message needs role 'user' or 'assistant'")
        content = m.get('content')
        if isinstance(content, str): messages.append({'role': m['role'], 'content': content}); continue
        parts, calls, results = _openai_parts(content or [], where)
        messages.extend(results)  # tool results come first: they answer the previous assistant turn
        if m['role'] == 'assistant':
            msg = {'role': 'assistant', 'content': ''.join(p['text'] for p in parts if p['type'] == 'text') or None}
            if calls: msg['tool_calls'] = calls
            messages.append(msg)
        elif parts:
            only_text = all(p['type'] == 'text' for p in parts)
            messages.append({'role': 'user', 'content': ''.join(p['text'] for p in parts) if only_text else parts})
    out = {'model': body.get('model'), 'messages': messages}
    if body.get('max_tokens') is not None: out['max_tokens'] = body['max_tokens']
    for k in ('temperature', 'top_p', 'stream'):
        if body.get(k) is not None: out[k] = body[k]
    if body.get('stop_sequences'): out['stop'] = list(body['stop_sequences'])
    if body.get('tools'):
        out['tools'] = [{'type': 'function', 'function': {'name': t.get('name'), 'description': t.get('description', ''),
                                                          'parameters': t.get('input_schema') or {'type': 'object', 'properties': {}}}}
                        for t in body['tools']]
    tc = body.get('tool_choice')
    if isinstance(tc, dict):
        out['tool_choice'] = ({'auto': 'auto', 'none': 'none', 'any': 'required'}.get(tc.get('type'))
                              or {'type': 'function', 'function': {'name': tc.get('name')}})
        if tc.get('disable_parallel_tool_use'): out['parallel_tool_calls'] = False
    return out

def anthropic_response_to_openai(message: dict  # an Anthropic `Message` (dict)
                                ) -> dict:
    "The `chat.completion` equivalent to an Anthropic `Message`."
    return from_anthropic([message], message.get('model') or 'anthropic')

# %% [md]
# A round trip through both directions keeps system prompts, tool calls and tool results:

# %%
oa = {'model': 'claude-3-5-sonnet', 'max_tokens': 50, 'stop': ['END'],
      'tools': [{'type': 'function', 'function': {'name': 'lookup', 'description': 'd', 'parameters': {'type': 'object', 'properties': {}}}}],
      'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Weather?'},
                   {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'toolu_1', 'type': 'function', 'function': {'name': 'lookup', 'arguments': '{"q": "sf"}'}}]},
                   {'role': 'tool', 'tool_call_id': 'toolu_1', 'content': 'sunny'}]}
back = anthropic_request_to_openai(to_anthropic(oa))
test_eq(back['messages'], oa['messages'])
test_eq((back['tools'], back['stop'], back['max_tokens']), (oa['tools'], ['END'], 50))
test_eq(anthropic_response_to_openai(msg)['choices'][0], from_anthropic([msg], 'x')['choices'][0])
test_fail(lambda: anthropic_request_to_openai({'messages': [{'role': 'robot', 'content': 'x'}]}), contains='req_payload.messages[0]')

# %% [md]
# ### Anthropic streams
#
# Anthropic streams typed events (`message_start`, `content_block_start`/`_delta`/`_stop`, `message_delta`,
# `message_stop`). `AnthropicStream` turns each into zero or more OpenAI `chat.completion.chunk` dicts: the first
# chunk carries the role, text deltas become `content` deltas, a `tool_use` block opens a tool call (id and name)
# whose `input_json_delta`s stream as `arguments`, and `message_delta` carries the finish reason. A last chunk with
# no choices carries the usage, as OpenAI sends it with `stream_options={"include_usage": true}`.

# %%
#| export
class AnthropicStream:
    "Translate Anthropic stream events (dicts) for choice `index` into OpenAI chunk dicts."
    def __init__(self, model: str, index: int = 0, chunk_id: str | None = None):
        self.model, self.index, self.id = model, index, chunk_id
        self.created, self.tools, self.blocks, self.json_mode = int(time.time()), 0, {}, False
        self.prompt_tokens = self.completion_tokens = 0

    def _chunk(self, delta=None, finish=None, usage=None):
        c = {'id': self.id, 'object': 'chat.completion.chunk', 'created': self.created, 'model': self.model,
             'choices': [] if delta is None else [{'index': self.index, 'delta': delta, 'logprobs': None, 'finish_reason': finish}]}
        if usage: c['usage'] = usage
        return c

    def feed(self, event: dict) -> list[dict]:
        "The OpenAI chunks for one Anthropic event."
        kind = event.get('type')
        if kind == 'message_start':
            m = event['message']
            self.id = self.id or m.get('id')
            self.prompt_tokens = (m.get('usage') or {}).get('input_tokens') or 0
            return [self._chunk({'role': 'assistant', 'content': ''})]
        if kind == 'content_block_start':
            b = event['content_block']
            if b['type'] == 'tool_use':
                if b['name'] == JSON_TOOL: self.blocks[event['index']] = 'json'; return []
                self.blocks[event['index']] = self.tools; self.tools += 1
                return [self._chunk({'tool_calls': [{'index': self.blocks[event['index']], 'id': b['id'], 'type': 'function',
                                                     'function': {'name': b['name'], 'arguments': ''}}]})]
            if b['type'] == 'text' and b.get('text'): return [self._chunk({'content': b['text']})]
            return []
        if kind == 'content_block_delta':
            d = event['delta']
            if d['type'] == 'text_delta': return [self._chunk({'content': d['text']})]
            if d['type'] == 'input_json_delta':
                slot = self.blocks.get(event['index'])
                if slot == 'json': return [self._chunk({'content': d['partial_json']})] if d['partial_json'] else []
                return [self._chunk({'tool_calls': [{'index': slot, 'function': {'arguments': d['partial_json']}}]})]
            return []
        if kind == 'message_delta':
            self.completion_tokens = (event.get('usage') or {}).get('output_tokens') or self.completion_tokens
            finish = ANTHROPIC_FINISH.get((event.get('delta') or {}).get('stop_reason'), 'stop')
            if finish == 'tool_calls' and not self.tools: finish = 'stop'
            return [self._chunk({}, finish)]
        return []

    def usage_chunk(self) -> dict:
        "The final chunk carrying the usage."
        return self._chunk(usage=_usage(self.prompt_tokens, self.completion_tokens))

# %%
events = [{'type': 'message_start', 'message': {'id': 'msg_9', 'usage': {'input_tokens': 12, 'output_tokens': 1}}},
          {'type': 'content_block_start', 'index': 0, 'content_block': {'type': 'text', 'text': ''}},
          {'type': 'content_block_delta', 'index': 0, 'delta': {'type': 'text_delta', 'text': 'Hi'}},
          {'type': 'content_block_stop', 'index': 0},
          {'type': 'content_block_start', 'index': 1, 'content_block': {'type': 'tool_use', 'id': 'toolu_2', 'name': 'weather', 'input': {}}},
          {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'input_json_delta', 'partial_json': '{"city":'}},
          {'type': 'content_block_delta', 'index': 1, 'delta': {'type': 'input_json_delta', 'partial_json': ' "Oslo"}'}},
          {'type': 'message_delta', 'delta': {'stop_reason': 'tool_use'}, 'usage': {'output_tokens': 9}},
          {'type': 'message_stop'}]
st = AnthropicStream('anthropic:claude-3-haiku')
deltas = [(c['choices'][0]['delta'], c['choices'][0]['finish_reason']) for e in events for c in st.feed(e)]
test_eq(deltas, [({'role': 'assistant', 'content': ''}, None), ({'content': 'Hi'}, None),
                 ({'tool_calls': [{'index': 0, 'id': 'toolu_2', 'type': 'function', 'function': {'name': 'weather', 'arguments': ''}}]}, None),
                 ({'tool_calls': [{'index': 0, 'function': {'arguments': '{"city":'}}]}, None),
                 ({'tool_calls': [{'index': 0, 'function': {'arguments': ' "Oslo"}'}}]}, None), ({}, 'tool_calls')])
test_eq(st.usage_chunk()['usage'], {'prompt_tokens': 12, 'completion_tokens': 9, 'total_tokens': 21})
test_eq(st.usage_chunk()['id'], 'msg_9')

# %% [md]
# ## Translating to Gemini
#
# The `google-genai` SDK takes `contents` (turns of `user`/`model` with `parts`) and a config:
#
# - system/developer messages become `system_instruction`;
# - images become `inline_data` (bytes decoded from `data:` URLs) or `file_data` (other URLs);
# - assistant `tool_calls` become `function_call` parts; `tool` results become `function_response` parts, named after
#   the call they answer (Gemini matches results by function name) with the content as `{"result": ...}` unless it
#   is already a JSON object; consecutive turns of one role merge;
# - tools become `function_declarations` with the JSON schema passed as `parameters_json_schema`; `tool_choice`
#   becomes `function_calling_config` (`AUTO`/`NONE`/`ANY`, a named function is `ANY` + `allowed_function_names`);
# - `max_tokens`→`max_output_tokens`, `stop`→`stop_sequences`, `n`→`candidate_count` (Gemini supports several
#   candidates), `seed` and the penalties pass through; `response_format` JSON sets `response_mime_type` and, for
#   a schema, `response_json_schema`.

# %%
#| export
def _gemini_parts(content, where: str) -> list:
    if content is None: return []
    if isinstance(content, str): return [{'text': content}] if content else []
    out = []
    for i, p in enumerate(content):
        kind = p.get('type')
        if kind == 'text': out.append({'text': p['text']})
        elif kind == 'image_url':
            url = p['image_url']['url'] if isinstance(p['image_url'], dict) else p['image_url']
            data = _parse_data_url(url)
            if data: out.append({'inline_data': {'mime_type': data[0], 'data': base64.b64decode(data[1])}})
            else:
                import mimetypes
                out.append({'file_data': {'file_uri': url, 'mime_type': mimetypes.guess_type(url)[0] or 'image/jpeg'}})
        else: raise ProviderError(f"{where}: content part {i} of type {kind!r} cannot be sent to Gemini (text and image_url are supported)")
    return out

def to_gemini(request: dict  # an OpenAI chat completions request
             ) -> dict:
    "`{'model', 'contents', 'config'}` for `google.genai` `models.generate_content` from an OpenAI request."
    system, contents, names = [], [], {}
    def add(role, parts):
        if contents and contents[-1]['role'] == role: contents[-1]['parts'].extend(parts)
        else: contents.append({'role': role, 'parts': list(parts)})
    for i, m in enumerate(request.get('messages') or []):
        role, where = m.get('role'), f"messages[{i}]"
        if role in ('system', 'developer'): system.append(_text_of(m.get('content')))
        elif role == 'user': add('user', _gemini_parts(m.get('content'), where))
        elif role == 'assistant':
            parts = _gemini_parts(m.get('content'), where)
            for tc in m.get('tool_calls') or []:
                names[tc['id']] = tc['function']['name']
                parts.append({'function_call': {'name': tc['function']['name'], 'args': _json_args(tc['function'].get('arguments'), where)}})
            add('model', parts)
        elif role in ('tool', 'function'):
            name = names.get(m.get('tool_call_id')) or m.get('name')
            if not name: raise ProviderError(f"{where}: tool result for unknown tool_call_id {m.get('tool_call_id')!r}; Gemini needs the function name")
            text = _text_of(m.get('content'))
            try: value = json.loads(text)
            except ValueError: value = None
            add('user', [{'function_response': {'name': name, 'response': value if isinstance(value, dict) else {'result': text}}}])
        else: raise ProviderError(f"{where}: role {role!r} cannot be sent to Gemini")
    if not contents and system: contents, system = [{'role': 'user', 'parts': [{'text': '\n\n'.join(system)}]}], []
    config = {}
    if system: config['system_instruction'] = '\n\n'.join(system)
    for ours, theirs in [('temperature', 'temperature'), ('top_p', 'top_p'), ('seed', 'seed'),
                         ('presence_penalty', 'presence_penalty'), ('frequency_penalty', 'frequency_penalty')]:
        if request.get(ours) is not None: config[theirs] = request[ours]
    tokens = request.get('max_completion_tokens') or request.get('max_tokens')
    if tokens: config['max_output_tokens'] = tokens
    if request.get('n') and request['n'] > 1: config['candidate_count'] = request['n']
    stop = request.get('stop')
    if stop: config['stop_sequences'] = [stop] if isinstance(stop, str) else list(stop)
    rf = request.get('response_format') or {}
    if rf.get('type') in ('json_object', 'json_schema'):
        config['response_mime_type'] = 'application/json'
        schema = (rf.get('json_schema') or {}).get('schema')
        if schema: config['response_json_schema'] = schema
    if request.get('tools'):
        config['tools'] = [{'function_declarations': [
            {'name': t['function']['name'], 'description': t['function'].get('description', ''),
             **({'parameters_json_schema': t['function']['parameters']} if t['function'].get('parameters') else {})}
            for t in request['tools']]}]
        choice = request.get('tool_choice')
        if choice is not None:
            if isinstance(choice, str):
                mode = {'auto': 'AUTO', 'none': 'NONE', 'required': 'ANY'}.get(choice)
                if mode is None: raise ProviderError(f"tool_choice {choice!r} is not auto, none, required or a named function")
                fcc = {'mode': mode}
            else: fcc = {'mode': 'ANY', 'allowed_function_names': [choice['function']['name']]}
            config['tool_config'] = {'function_calling_config': fcc}
    return {'model': request['model'], 'contents': contents, 'config': config}

# %%
cases = [
    ({'messages': [{'role': 'system', 'content': 'count to 10'}]},
     {'contents': [{'role': 'user', 'parts': [{'text': 'count to 10'}]}], 'config': {}}),
    ({'messages': [{'role': 'system', 'content': 'Be terse.'}, u('hi')], 'max_tokens': 5, 'temperature': 0.2, 'n': 2, 'stop': ['x'], 'seed': 3},
     {'contents': [{'role': 'user', 'parts': [{'text': 'hi'}]}],
      'config': {'system_instruction': 'Be terse.', 'temperature': 0.2, 'seed': 3, 'max_output_tokens': 5, 'candidate_count': 2, 'stop_sequences': ['x']}}),
    ({'messages': [u([{'type': 'text', 'text': 'what?'}, {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,aGk='}},
                      {'type': 'image_url', 'image_url': {'url': 'https://x.org/cat.png'}}])]},
     {'contents': [{'role': 'user', 'parts': [{'text': 'what?'}, {'inline_data': {'mime_type': 'image/png', 'data': b'hi'}},
                                              {'file_data': {'file_uri': 'https://x.org/cat.png', 'mime_type': 'image/png'}}]}], 'config': {}}),
    ({'messages': [u('weather?'), {'role': 'assistant', 'content': '', 'tool_calls': [
                       {'id': 'c1', 'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Paris"}'}}]},
                   {'role': 'tool', 'tool_call_id': 'c1', 'content': '21C'}],
      'tools': [weather], 'tool_choice': {'type': 'function', 'function': {'name': 'weather'}}},
     {'contents': [{'role': 'user', 'parts': [{'text': 'weather?'}]},
                   {'role': 'model', 'parts': [{'function_call': {'name': 'weather', 'args': {'city': 'Paris'}}}]},
                   {'role': 'user', 'parts': [{'function_response': {'name': 'weather', 'response': {'result': '21C'}}}]}],
      'config': {'tools': [{'function_declarations': [{'name': 'weather', 'description': 'Weather in a city', 'parameters_json_schema': weather['function']['parameters']}]}],
                 'tool_config': {'function_calling_config': {'mode': 'ANY', 'allowed_function_names': ['weather']}}}}),
    ({'messages': [u('x')], 'tools': [weather], 'tool_choice': 'required', 'response_format': {'type': 'json_object'}},
     {'contents': [{'role': 'user', 'parts': [{'text': 'x'}]}],
      'config': {'response_mime_type': 'application/json',
                 'tools': [{'function_declarations': [{'name': 'weather', 'description': 'Weather in a city', 'parameters_json_schema': weather['function']['parameters']}]}],
                 'tool_config': {'function_calling_config': {'mode': 'ANY'}}}}),
]
for req, want in cases: test_eq(to_gemini({'model': 'gemini-1.5-flash-002', **req}), {'model': 'gemini-1.5-flash-002', **want})
test_fail(lambda: to_gemini({'model': 'g', 'messages': [{'role': 'tool', 'tool_call_id': 'zz', 'content': '1'}]}), contains="unknown tool_call_id 'zz'")
to_gemini({'model': 'gemini-1.5-flash-002', **cases[3][0]})['contents'][1:]  # a function call and its response

# %% [md]
# ### Gemini responses back to OpenAI
#
# Each candidate becomes a choice. Gemini function calls carry no id, so we mint `call_<hex>` ids (the assistant
# message that goes back in the next turn carries them, and `to_gemini` maps results back by name). `STOP` is
# `tool_calls` when the candidate called a function; `MAX_TOKENS` is `length`; the safety family is
# `content_filter` (the table is `GEMINI_FINISH`). Usage comes from `usage_metadata`. Responses are handled as the SDK's
# `model_dump(exclude_none=True)` dicts (snake_case).

# %%
#| export
GEMINI_FINISH = {'STOP': 'stop', 'MAX_TOKENS': 'length', 'SAFETY': 'content_filter', 'RECITATION': 'content_filter',
                 'BLOCKLIST': 'content_filter', 'PROHIBITED_CONTENT': 'content_filter', 'SPII': 'content_filter',
                 'IMAGE_SAFETY': 'content_filter'}

def _gemini_message(parts: list) -> tuple[dict, list]:
    texts, calls = [], []
    for p in parts or []:
        if p.get('text') and not p.get('thought'): texts.append(p['text'])
        if p.get('function_call'):
            fc = p['function_call']
            calls.append({'id': fc.get('id') or f"call_{uuid.uuid4().hex[:24]}", 'type': 'function',
                          'function': {'name': fc['name'], 'arguments': json.dumps(fc.get('args') or {})}})
    return texts, calls

def _gemini_usage(response: dict) -> dict:
    u = response.get('usage_metadata') or {}
    return _usage(u.get('prompt_token_count'), u.get('candidates_token_count'))

def from_gemini(response: dict,  # a GenerateContentResponse as a snake_case dict
                model: str,  # the model id to report
               ) -> dict:
    "An OpenAI `chat.completion` dict from a Gemini response."
    choices = []
    for i, cand in enumerate(response.get('candidates') or []):
        texts, calls = _gemini_message((cand.get('content') or {}).get('parts'))
        finish = GEMINI_FINISH.get(cand.get('finish_reason'), 'stop')
        if calls and finish == 'stop': finish = 'tool_calls'
        msg = {'role': 'assistant', 'content': ''.join(texts) if texts else None, 'refusal': None}
        if calls: msg['tool_calls'] = calls
        choices.append({'index': cand.get('index') or i, 'message': msg, 'logprobs': None, 'finish_reason': finish})
    if not choices:
        reason = (response.get('prompt_feedback') or {}).get('block_reason')
        choices = [{'index': 0, 'message': {'role': 'assistant', 'content': None, 'refusal': reason}, 'logprobs': None,
                    'finish_reason': 'content_filter'}]
    return {'id': response.get('response_id') or f"chatcmpl-{uuid.uuid4().hex}", 'object': 'chat.completion',
            'created': int(time.time()), 'model': model, 'choices': choices, 'usage': _gemini_usage(response)}

class GeminiStream:
    "Translate Gemini streamed responses (snake_case dicts) into OpenAI chunk dicts."
    def __init__(self, model: str):
        self.model, self.id, self.created, self.started, self.tools, self.usage = model, None, int(time.time()), set(), {}, None

    def feed(self, response: dict) -> list[dict]:
        "The OpenAI chunks for one streamed Gemini response."
        self.id = self.id or response.get('response_id') or f"chatcmpl-{uuid.uuid4().hex}"
        if response.get('usage_metadata'): self.usage = _gemini_usage(response)
        out = []
        def chunk(index, delta, finish=None):
            out.append({'id': self.id, 'object': 'chat.completion.chunk', 'created': self.created, 'model': self.model,
                        'choices': [{'index': index, 'delta': delta, 'logprobs': None, 'finish_reason': finish}]})
        for cand in response.get('candidates') or []:
            i = cand.get('index') or 0
            if i not in self.started: self.started.add(i); chunk(i, {'role': 'assistant', 'content': ''})
            texts, calls = _gemini_message((cand.get('content') or {}).get('parts'))
            if texts and ''.join(texts): chunk(i, {'content': ''.join(texts)})
            for call in calls:
                k = self.tools.get(i, 0); self.tools[i] = k + 1
                chunk(i, {'tool_calls': [{'index': k, **call}]})
            if cand.get('finish_reason'):
                finish = GEMINI_FINISH.get(cand['finish_reason'], 'stop')
                chunk(i, {}, 'tool_calls' if finish == 'stop' and self.tools.get(i) else finish)
        return out

    def usage_chunk(self) -> dict:
        "The final chunk carrying the usage."
        return {'id': self.id, 'object': 'chat.completion.chunk', 'created': self.created, 'model': self.model,
                'choices': [], 'usage': self.usage or _usage(0, 0)}

# %%
resp = {'response_id': 'r1', 'candidates': [
            {'index': 0, 'finish_reason': 'STOP', 'content': {'role': 'model', 'parts': [{'text': 'Paris: '}, {'function_call': {'name': 'weather', 'args': {'city': 'Paris'}}}]}},
            {'index': 1, 'finish_reason': 'MAX_TOKENS', 'content': {'role': 'model', 'parts': [{'text': 'Hmm'}]}}],
        'usage_metadata': {'prompt_token_count': 5, 'candidates_token_count': 6, 'total_token_count': 11}}
c = from_gemini(resp, 'gemini:gemini-1.5-flash')
test_eq([ch['finish_reason'] for ch in c['choices']], ['tool_calls', 'length'])
call = c['choices'][0]['message']['tool_calls'][0]
assert call['id'].startswith('call_')
test_eq((call['function'], c['choices'][0]['message']['content']), ({'name': 'weather', 'arguments': '{"city": "Paris"}'}, 'Paris: '))
test_eq(c['usage'], {'prompt_tokens': 5, 'completion_tokens': 6, 'total_tokens': 11})
test_eq(from_gemini({'prompt_feedback': {'block_reason': 'SAFETY'}}, 'gemini:x')['choices'][0]['finish_reason'], 'content_filter')
gs = GeminiStream('gemini:x')
chunks = [ch for r in [{'response_id': 'r2', 'candidates': [{'content': {'parts': [{'text': 'He'}]}}]},
                       {'candidates': [{'content': {'parts': [{'text': 'llo'}]}, 'finish_reason': 'STOP'}],
                        'usage_metadata': {'prompt_token_count': 3, 'candidates_token_count': 2}}] for ch in gs.feed(r)]
test_eq([(ch['choices'][0]['delta'], ch['choices'][0]['finish_reason']) for ch in chunks],
        [({'role': 'assistant', 'content': ''}, None), ({'content': 'He'}, None), ({'content': 'llo'}, None), ({}, 'stop')])
test_eq(gs.usage_chunk()['usage']['total_tokens'], 5)

# %% [md]
# ## Streams: reassembly and replay
#
# The log of a streamed call holds the completion the stream added up to, so `assemble_chunks` folds OpenAI
# chunks (dicts) back into a `chat.completion`: content and tool-call arguments concatenate per choice and per
# tool index, the last finish reason and the usage chunk win. `completion_chunks` is the inverse, used to replay a
# cached completion to a caller who asked for a stream.

# %%
#| export
def assemble_chunks(chunks: list[dict],  # OpenAI chat.completion.chunk dicts, in order
                   ) -> dict:
    "The `chat.completion` dict a list of stream chunks adds up to."
    choices, first, usage = {}, (chunks[0] if chunks else {}), None
    for ch in chunks:
        if ch.get('usage'): usage = ch['usage']
        for c in ch.get('choices') or []:
            slot = choices.setdefault(c.get('index', 0), {'role': 'assistant', 'content': [], 'tools': {}, 'finish': None, 'refusal': []})
            d = c.get('delta') or {}
            if d.get('role'): slot['role'] = d['role']
            if d.get('content'): slot['content'].append(d['content'])
            if d.get('refusal'): slot['refusal'].append(d['refusal'])
            for tc in d.get('tool_calls') or []:
                t = slot['tools'].setdefault(tc.get('index', 0), {'id': None, 'type': 'function', 'function': {'name': '', 'arguments': ''}})
                if tc.get('id'): t['id'] = tc['id']
                f = tc.get('function') or {}
                if f.get('name'): t['function']['name'] += f['name']
                if f.get('arguments'): t['function']['arguments'] += f['arguments']
            if c.get('finish_reason'): slot['finish'] = c['finish_reason']
    out_choices = []
    for i in sorted(choices):
        s = choices[i]
        msg = {'role': s['role'], 'content': ''.join(s['content']) if s['content'] else None,
               'refusal': ''.join(s['refusal']) if s['refusal'] else None}
        if s['tools']: msg['tool_calls'] = [s['tools'][k] for k in sorted(s['tools'])]
        out_choices.append({'index': i, 'message': msg, 'logprobs': None, 'finish_reason': s['finish']})
    out = {'id': first.get('id'), 'object': 'chat.completion', 'created': first.get('created'), 'model': first.get('model'),
           'choices': out_choices}
    if first.get('system_fingerprint'): out['system_fingerprint'] = first['system_fingerprint']
    if usage: out['usage'] = usage
    return out

def completion_chunks(completion: dict,  # a chat.completion dict
                      include_usage: bool = False,  # end with a usage chunk
                     ) -> list[dict]:
    "Stream chunks that `assemble_chunks` turns back into `completion` (replaying a cached completion as a stream)."
    base = {'id': completion.get('id'), 'object': 'chat.completion.chunk', 'created': completion.get('created'),
            'model': completion.get('model')}
    out = []
    for c in completion.get('choices') or []:
        m, i = c.get('message') or {}, c.get('index', 0)
        delta = {'role': m.get('role', 'assistant'), 'content': m.get('content')}
        if m.get('refusal'): delta['refusal'] = m['refusal']
        if m.get('tool_calls'): delta['tool_calls'] = [{'index': k, **tc} for k, tc in enumerate(m['tool_calls'])]
        out.append({**base, 'choices': [{'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': None}]})
        out.append({**base, 'choices': [{'index': i, 'delta': {}, 'logprobs': None, 'finish_reason': c.get('finish_reason')}]})
    if include_usage and completion.get('usage'): out.append({**base, 'choices': [], 'usage': completion['usage']})
    return out

# %%
st = AnthropicStream('anthropic:x')
st_chunks = [c for e in events for c in st.feed(e)] + [st.usage_chunk()]
test_eq(assemble_chunks(st_chunks),
        {'id': 'msg_9', 'object': 'chat.completion', 'created': st_chunks[0]['created'], 'model': 'anthropic:x',
         'choices': [{'index': 0, 'logprobs': None, 'finish_reason': 'tool_calls', 'message': {'role': 'assistant', 'content': 'Hi', 'refusal': None,
                      'tool_calls': [{'id': 'toolu_2', 'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Oslo"}'}}]}}],
         'usage': {'prompt_tokens': 12, 'completion_tokens': 9, 'total_tokens': 21}})
for comp in [c, from_anthropic([msg, msg], 'anthropic:x')]:
    test_eq(assemble_chunks(completion_chunks(comp, include_usage=True)), {k: v for k, v in comp.items()})

# %% [md]
# ## Calling the providers
#
# A *backend* wraps one provider SDK client (made once per client, base URL and key, and reused so connections
# are pooled) and returns OpenAI-shaped dicts: `create` gives a `chat.completion` dict, or, with `stream=True`, an
# iterator of chunk dicts ending with a usage chunk. `n` > 1 on Anthropic is a loop of calls. The SDKs' own
# errors become the `openai` SDK's exceptions (`RateLimitError`, `InternalServerError`, `APITimeoutError`...), so a
# caller of our OpenAI client handles one family of errors whatever the route. Both SDKs are imported only when a
# route needs them.

# %%
#| export
def _openai_status_error(status: int, message: str, body, url: str):
    import openai, httpx2
    classes = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
               404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
               429: openai.RateLimitError}
    cls = classes.get(status) or (openai.InternalServerError if status >= 500 else openai.APIStatusError)
    response = httpx2.Response(status, request=httpx2.Request('POST', url), json=body if isinstance(body, (dict, list)) else None)
    return cls(f"Error code: {status} - {message}", response=response, body=body)

def to_openai_error(exc: Exception, route: Route) -> Exception:
    "The `openai` exception matching an Anthropic or google-genai SDK exception (others are returned unchanged)."
    import openai, httpx2
    url = route.base_url or route.api
    mod = type(exc).__module__
    if mod.startswith('anthropic'):
        import anthropic
        if isinstance(exc, anthropic.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {'message': str(exc)}
            msg = ((body.get('error') or {}).get('message') if isinstance(body.get('error'), dict) else None) or str(exc)
            return _openai_status_error(exc.status_code, f"{route.model}: {msg}", body, url)
        if isinstance(exc, anthropic.APITimeoutError): return openai.APITimeoutError(request=httpx2.Request('POST', url))
        if isinstance(exc, anthropic.APIConnectionError):
            return openai.APIConnectionError(message=f"{route.model}: {exc}", request=httpx2.Request('POST', url))
        return exc
    if mod.startswith('google'):
        from google.genai import errors
        if isinstance(exc, errors.APIError):
            return _openai_status_error(exc.code or 500, f"{route.model}: {exc.message or exc.status}", exc.details, url)
    name = type(exc).__name__
    if 'Timeout' in name or isinstance(exc, TimeoutError): return openai.APITimeoutError(request=httpx2.Request('POST', url))
    if mod.startswith(('httpx', 'aiohttp')) and ('Connect' in name or 'Network' in name or 'Protocol' in name):
        return openai.APIConnectionError(message=f"{route.model}: {exc}", request=httpx2.Request('POST', url))
    return exc

# %%
import openai
e = _openai_status_error(429, 'anthropic:x: slow down', {'type': 'error', 'error': {'type': 'rate_limit_error', 'message': 'slow down'}}, 'http://h')
assert isinstance(e, openai.RateLimitError)
test_eq(e.status_code, 429)
assert isinstance(_openai_status_error(503, 'x', None, 'http://h'), openai.InternalServerError)
assert isinstance(to_openai_error(TimeoutError(), Route('m', 'p', 'anthropic', 'm')), openai.APITimeoutError)

# %% [md]
# The backends take the request already translated to OpenAI dicts and a timeout in seconds (`None`: the SDK's
# default). `max_retries` follows the calling client's, so a 429 is retried the same number of times whatever the
# route; google-genai's retries are configured the same way.

# %%
#| export
def _dump(obj) -> dict:
    return obj if isinstance(obj, dict) else obj.model_dump(mode='json', exclude_none=True)

class AnthropicBackend:
    "Calls the Messages API through the `anthropic` SDK and answers in OpenAI dicts."
    def __init__(self, route: Route, max_retries: int = 2, async_: bool = False):
        anthropic = require('anthropic')
        cls = anthropic.AsyncAnthropic if async_ else anthropic.Anthropic
        self.route, self.client = route, cls(api_key=route.api_key, base_url=route.base_url, max_retries=max_retries)

    def _args(self, request, timeout):
        args = to_anthropic({**request, 'model': self.route.name})
        if timeout is not None: args['timeout'] = timeout
        return args

    def create(self, request: dict, stream: bool = False, timeout: float | None = None):
        "A chat.completion dict, or an iterator of chunk dicts when `stream`."
        args, n = self._args(request, timeout), request.get('n') or 1
        try:
            if not stream: return from_anthropic([_dump(self.client.messages.create(**args)) for _ in range(n)], self.route.model)
            streams = [self.client.messages.create(**args, stream=True) for _ in range(n)]
        except Exception as e: raise to_openai_error(e, self.route) from e
        return self._chunks(streams)

    def _chunks(self, streams):
        try:
            first = None
            for i, events in enumerate(streams):
                tr = AnthropicStream(self.route.model, i, first and first.id)
                for ev in events: yield from tr.feed(_dump(ev))
                first = first or tr
                if i: first.prompt_tokens += tr.prompt_tokens; first.completion_tokens += tr.completion_tokens
            yield first.usage_chunk()
        except Exception as e: raise to_openai_error(e, self.route) from e

    async def acreate(self, request: dict, stream: bool = False, timeout: float | None = None):
        "Async `create`: a dict, or an async iterator of chunk dicts."
        args, n = self._args(request, timeout), request.get('n') or 1
        try:
            if not stream: return from_anthropic([_dump(await self.client.messages.create(**args)) for _ in range(n)], self.route.model)
            streams = [await self.client.messages.create(**args, stream=True) for _ in range(n)]
        except Exception as e: raise to_openai_error(e, self.route) from e
        return self._achunks(streams)

    async def _achunks(self, streams):
        try:
            first = None
            for i, events in enumerate(streams):
                tr = AnthropicStream(self.route.model, i, first and first.id)
                async for ev in events:
                    for c in tr.feed(_dump(ev)): yield c
                first = first or tr
                if i: first.prompt_tokens += tr.prompt_tokens; first.completion_tokens += tr.completion_tokens
            yield first.usage_chunk()
        except Exception as e: raise to_openai_error(e, self.route) from e

class GeminiBackend:
    "Calls the Gemini API through the `google-genai` SDK and answers in OpenAI dicts."
    def __init__(self, route: Route, max_retries: int = 2, async_: bool = False):
        genai = require('google.genai')
        http = {'retry_options': {'attempts': max_retries + 1, 'http_status_codes': [408, 429, 500, 502, 503, 504]}}
        if route.base_url: http['base_url'] = route.base_url
        self.route, self.client = route, genai.Client(api_key=route.api_key, http_options=http)

    def _args(self, request, timeout):
        args = to_gemini({**request, 'model': self.route.name})
        if timeout is not None: args['config']['http_options'] = {'timeout': int(timeout * 1000)}
        return args

    def create(self, request: dict, stream: bool = False, timeout: float | None = None):
        "A chat.completion dict, or an iterator of chunk dicts when `stream`."
        args = self._args(request, timeout)
        try:
            if not stream: return from_gemini(_dump(self.client.models.generate_content(**args)), self.route.model)
            responses = self.client.models.generate_content_stream(**args)
        except Exception as e: raise to_openai_error(e, self.route) from e
        return self._chunks(responses)

    def _chunks(self, responses):
        tr = GeminiStream(self.route.model)
        try:
            for r in responses: yield from tr.feed(_dump(r))
        except Exception as e: raise to_openai_error(e, self.route) from e
        yield tr.usage_chunk()

    async def acreate(self, request: dict, stream: bool = False, timeout: float | None = None):
        "Async `create`: a dict, or an async iterator of chunk dicts."
        args = self._args(request, timeout)
        try:
            if not stream: return from_gemini(_dump(await self.client.aio.models.generate_content(**args)), self.route.model)
            responses = await self.client.aio.models.generate_content_stream(**args)
        except Exception as e: raise to_openai_error(e, self.route) from e
        return self._achunks(responses)

    async def _achunks(self, responses):
        tr = GeminiStream(self.route.model)
        try:
            async for r in responses:
                for c in tr.feed(_dump(r)): yield c
        except Exception as e: raise to_openai_error(e, self.route) from e
        yield tr.usage_chunk()

# %% [md]
# `backend` is the one factory the client (and anything else calling a route) uses: OpenAI-compatible routes
# (custom providers, deployments) get a plain `openai.OpenAI`/`AzureOpenAI` client, whose answers are already SDK
# objects; Anthropic and Gemini get the translating backends above. Clients are cached in the dict the caller
# passes, keyed by protocol, URL, key and sync/async, so each calling client owns its connection pools.

# %%
#| export
def backend(route: Route,  # from `resolve`
            cache: dict | None = None,  # where clients are kept between calls (the calling client owns it)
            async_: bool = False,  # an async client
            max_retries: int = 2,  # the SDK's retries on 429/5xx/timeouts
           ):
    "The SDK client or translating backend for a route (cached in `cache`)."
    key = (route.api, route.base_url, route.api_key, async_, max_retries, tuple(sorted(route.config.items())))
    if cache is not None and key in cache: return cache[key]
    if route.api == 'anthropic': made = AnthropicBackend(route, max_retries, async_)
    elif route.api == 'gemini': made = GeminiBackend(route, max_retries, async_)
    else:
        import openai
        key_value = route.api_key or 'EMPTY'  # local servers (vLLM) accept any key
        if route.api == 'azure':
            cls = openai.AsyncAzureOpenAI if async_ else openai.AzureOpenAI
            made = cls(azure_endpoint=route.base_url, api_key=key_value, max_retries=max_retries,
                       api_version=route.config.get('api_version') or '2024-10-21')
        else:
            cls = openai.AsyncOpenAI if async_ else openai.OpenAI
            made = cls(base_url=route.base_url, api_key=key_value, max_retries=max_retries)
    if cache is not None: cache[key] = made
    return made

# %%
cache = {}
b = backend(resolve('anthropic:claude-3-haiku'), cache)
assert backend(resolve('anthropic:claude-3-haiku'), cache) is b and isinstance(b, AnthropicBackend)
az = backend(resolve('openpipe:azure/gpt-4o', lab), cache)
assert isinstance(az, openai.AzureOpenAI)
test_eq(len(cache), 2)
