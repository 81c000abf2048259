# %%
#| default_exp formats

# %% [md]
# Formats

> The OpenAI chat schema as the spec defines it, validated with exact paths; one JSONL reader; one canonical JSON hash; pruning rules.

# %%
#| export
from __future__ import annotations
import json, re, hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator
from openpipe_lab.core import ConfigError, ValidationError

# %%
#| hide
from fastcore.test import *
import tempfile

# %% [md]
## Problems

Every validator here returns a list of `Problem`s instead of raising at the first one: a dataset import wants
*all* the problems of *all* the rows, each pointing at the exact place (`messages[3].tool_calls[0].function.arguments`)
and, for a file, the line. Callers that want an exception wrap the list in `ValidationError`. An empty list
means valid.

# %%
#| export
@dataclass
class Problem:
    "One thing wrong with an input: where it is (`path`, and `line` in a file) and what is wrong."
    path: str  # e.g. 'messages[3].tool_calls[0].function.arguments'; '' for the whole value
    message: str  # what is wrong, e.g. 'not valid JSON (Expecting value at char 0)'
    line: int | None = None  # 1-based line in a JSONL file, when the value came from one

    def __str__(self):
        s = f"{self.path}: {self.message}" if self.path else self.message
        return s if self.line is None else f"line {self.line}: {s}"

# %%
p = Problem('messages[3].tool_calls[0].function.arguments', 'not valid JSON (Expecting value at char 0)', line=7)
print(p)
test_eq(str(p), "line 7: messages[3].tool_calls[0].function.arguments: not valid JSON (Expecting value at char 0)")
test_eq(str(Problem('messages', 'must not be empty')), 'messages: must not be empty')
test_eq(str(Problem('', 'not valid JSON (Expecting value at char 0)', 2)), 'line 2: not valid JSON (Expecting value at char 0)')

# %% [md]
## Messages

The spec's `/chat/completions` request schema has six message roles (`ROLES`). Each accepts a fixed set of fields
(`additionalProperties: false`), so an unknown field is reported: it is usually a typo (`tool_call_ids`) or a
field from another provider's format. Assistant messages also accept the fields a chat completion *response*
carries (`refusal`, `annotations`, `audio`, `reasoning_content`), because a logged response becomes a dataset
entry's output as it is.

| role | content | other fields |
|---|---|---|
| `system`, `developer` | string or text parts | `name` |
| `user` | string or text / `image_url` / `input_audio` parts | `name` |
| `assistant` | string, text / `refusal` parts, or null | `tool_calls`, `function_call` (deprecated), `refusal`, `name`, ... |
| `tool` | string or text parts | `tool_call_id` (required) |
| `function` (deprecated) | string or null (required) | `name` (required) |

Beyond types, three rules the OpenAI API enforces are checked: an assistant message must say something
(content, tool calls, a function call or a refusal), tool-call `arguments` must be a string holding a JSON
object, and a `tool` message must answer a tool call made earlier in the conversation.

# %%
#| export
ROLES = ('system', 'developer', 'user', 'assistant', 'tool', 'function')
_MISSING = object()
_JSON_TYPES = {str: 'string', int: 'number', float: 'number', bool: 'boolean', type(None): 'null',
               list: 'array', tuple: 'array', dict: 'object'}
_ARRAY = (list, tuple)  # a JSON array, as Python code may write it
def _kind(v) -> str: return _JSON_TYPES.get(type(v)) or type(v).__name__

_FIELDS = {
    'system': frozenset({'role', 'content', 'name'}),
    'developer': frozenset({'role', 'content', 'name'}),
    'user': frozenset({'role', 'content', 'name'}),
    'assistant': frozenset({'role', 'content', 'name', 'tool_calls', 'function_call', 'refusal', 'audio',
                            'annotations', 'reasoning_content', 'reasoning'}),
    'tool': frozenset({'role', 'content', 'tool_call_id'}),
    'function': frozenset({'role', 'name', 'content'}),
}
_PART_TYPES = {'system': ('text',), 'developer': ('text',), 'tool': ('text',),
               'user': ('text', 'image_url', 'input_audio'), 'assistant': ('text', 'refusal')}
_NAME_RE = re.compile(r'[a-zA-Z0-9_-]{1,64}\Z')
_JSON_DECODER = json.JSONDecoder()

_IDENT = re.compile(r'[A-Za-z_][\w-]*\Z')
def _field(path: str, key) -> str:
    "`path.key`, or `path[\"odd key\"]` when the key is not a plain name (metadata keys like `$sdk.version`)."
    if isinstance(key, str) and _IDENT.match(key): return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False) if isinstance(key, str) else key}]"

def _unknown(d, allowed, path, what, out):
    for k in sorted(d.keys() - allowed, key=str):
        out.append(Problem(_field(path, k), f"unknown field for {what} (allowed: {', '.join(sorted(allowed))})"))

def _string(d, key, path, out, required=False, nullable=False, nonempty=False, what=''):
    "Check `d[key]` is a string; return it (or None)."
    v = d.get(key, _MISSING)
    if v is _MISSING:
        if required: out.append(Problem(f"{path}.{key}", f"is required{what}"))
        return None
    if v.__class__ is str:
        if nonempty and not v: out.append(Problem(f"{path}.{key}", "must not be empty"))
        return v
    if v is None and nullable: return None
    out.append(Problem(f"{path}.{key}", f"must be a string{' or null' if nullable else ''}, got {_kind(v)}"))
    return None

def _boolean(d, key, path, out, nullable=False):
    v = d.get(key, _MISSING)
    if v is _MISSING or v.__class__ is bool or (v is None and nullable): return
    out.append(Problem(f"{path}.{key}", f"must be a boolean{' or null' if nullable else ''}, got {_kind(v)}"))

def _object(d, key, path, out, required=False, nullable=False):
    "Check `d[key]` is an object; return it (or None)."
    v = d.get(key, _MISSING)
    if v is _MISSING:
        if required: out.append(Problem(f"{path}.{key}", "is required"))
        return None
    if isinstance(v, dict): return v
    if not (v is None and nullable):
        out.append(Problem(f"{path}.{key}", f"must be an object{' or null' if nullable else ''}, got {_kind(v)}"))
    return None

def _arguments(a, path, out):
    "Tool/function-call arguments: a string holding a JSON object."
    if a.__class__ is not str:
        out.append(Problem(path, f"must be a string containing JSON, got {_kind(a)}")); return
    try: v = _JSON_DECODER.decode(a)
    except json.JSONDecodeError as e:
        out.append(Problem(path, f"not valid JSON ({e.msg} at char {e.pos})")); return
    if v.__class__ is not dict: out.append(Problem(path, f"must be a JSON object, got {_kind(v)}"))

# %% [md]
Content is a string or a list of typed parts; which part types are allowed depends on the role.

# %%
#| export
def _part(part, role, path, out):
    if not isinstance(part, dict):
        out.append(Problem(path, f"must be a content part object, got {_kind(part)}")); return
    t = part.get('type', _MISSING)
    allowed = _PART_TYPES[role]
    if t not in allowed:
        if t is _MISSING: out.append(Problem(f"{path}.type", f"is required (one of {', '.join(allowed)})"))
        else: out.append(Problem(f"{path}.type", f"unknown content part type {t!r} for a {role} message "
                                               f"(allowed: {', '.join(allowed)})"))
        return
    if t == 'text' or t == 'refusal': _string(part, t, path, out, required=True)
    elif t == 'image_url':
        iu = _object(part, 'image_url', path, out, required=True)
        if iu is not None:
            q = f"{path}.image_url"
            _string(iu, 'url', q, out, required=True, nonempty=True)
            if 'detail' in iu and iu['detail'] not in ('auto', 'low', 'high'):
                out.append(Problem(f"{q}.detail", f"must be 'auto', 'low' or 'high', got {iu['detail']!r}"))
            _unknown(iu, {'url', 'detail'}, q, 'image_url', out)
    elif t == 'input_audio':
        ia = _object(part, 'input_audio', path, out, required=True)
        if ia is not None:
            q = f"{path}.input_audio"
            _string(ia, 'data', q, out, required=True)
            if 'format' not in ia: out.append(Problem(f"{q}.format", "is required ('wav' or 'mp3')"))
            elif ia['format'] not in ('wav', 'mp3'):
                out.append(Problem(f"{q}.format", f"must be 'wav' or 'mp3', got {ia['format']!r}"))
            _unknown(ia, {'data', 'format'}, q, 'input_audio', out)
    if len(part) > 2: _unknown(part, {'type', t}, path, f'a {t} content part', out)

def _content(m, role, path, out):
    c = m.get('content', _MISSING)
    if c.__class__ is str or c is _MISSING: return
    q = f"{path}.content"
    if c is None:
        if role != 'assistant' and role != 'function':
            out.append(Problem(q, "must be a string or a list of content parts, got null"))
        return
    if role == 'function':
        out.append(Problem(q, f"must be a string or null, got {_kind(c)}")); return
    if not isinstance(c, _ARRAY):
        out.append(Problem(q, f"must be a string or a list of content parts, got {_kind(c)}")); return
    for j, part in enumerate(c): _part(part, role, f"{q}[{j}]", out)

# %% [md]
Tool calls (and the deprecated single `function_call`) carry `arguments` as a *string* of JSON, exactly as the
model produced it. A model that emits broken JSON produced a broken call, so it is a problem of the entry, and
the path points at the arguments.

# %%
#| export
def _tool_calls(tcs, path, out, ids):
    if tcs is None: return
    if not isinstance(tcs, _ARRAY):
        out.append(Problem(path, f"must be an array of tool calls, got {_kind(tcs)}")); return
    seen = set()
    for j, tc in enumerate(tcs):
        q = f"{path}[{j}]"
        if not isinstance(tc, dict):
            out.append(Problem(q, f"must be a tool call object, got {_kind(tc)}")); continue
        cid = _string(tc, 'id', q, out, required=True)
        if cid is not None:
            if cid and cid in seen: out.append(Problem(f"{q}.id", f"duplicate tool call id {cid!r}"))
            seen.add(cid); ids.add(cid)
        t = tc.get('type', _MISSING)
        if t is _MISSING: out.append(Problem(f"{q}.type", "is required ('function')"))
        elif t != 'function': out.append(Problem(f"{q}.type", f"must be 'function', got {t!r}"))
        fn = _object(tc, 'function', q, out, required=True)
        if fn is not None:
            fq = f"{q}.function"
            _string(fn, 'name', fq, out, required=True, nonempty=True)
            if 'arguments' in fn: _arguments(fn['arguments'], f"{fq}.arguments", out)
            else: out.append(Problem(f"{fq}.arguments", "is required (a string holding a JSON object, e.g. '{}')"))
            if len(fn) > 2: _unknown(fn, {'name', 'arguments'}, fq, 'a tool call function', out)
        if len(tc) > 3: _unknown(tc, {'id', 'type', 'function'}, q, 'a tool call', out)

def _function_call(m, path, out):
    fc = m.get('function_call')
    if fc is None: return
    q = f"{path}.function_call"
    if not isinstance(fc, dict):
        out.append(Problem(q, f"must be an object with name and arguments, got {_kind(fc)}")); return
    _string(fc, 'name', q, out, nonempty=True)
    if 'arguments' in fc: _arguments(fc['arguments'], f"{q}.arguments", out)
    _unknown(fc, {'name', 'arguments'}, q, 'a function_call', out)

# %% [md]
One function checks one message; `validate_messages` walks the conversation, carrying the tool-call ids seen so
far so that each `tool` message can be matched to the call it answers.

# %%
#| export
def _message(m, path, out, ids):
    "Append the problems of one message to `out`; `ids` collects tool call ids seen so far."
    if not isinstance(m, dict):
        out.append(Problem(path, f"must be a message object, got {_kind(m)}")); return
    role = m.get('role', _MISSING)
    fields = _FIELDS.get(role) if role.__class__ is str else None
    if fields is None:
        if role is _MISSING: out.append(Problem(f"{path}.role", f"is required (one of {', '.join(ROLES)})"))
        elif role.__class__ is not str: out.append(Problem(f"{path}.role", f"must be a string, got {_kind(role)}"))
        else: out.append(Problem(f"{path}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})"))
        return
    if not (m.keys() <= fields): _unknown(m, fields, path, f'a {role} message', out)
    _content(m, role, path, out)
    if role == 'assistant':
        if 'name' in m: _string(m, 'name', path, out)
        if 'refusal' in m: _string(m, 'refusal', path, out, nullable=True)
        if 'reasoning_content' in m: _string(m, 'reasoning_content', path, out, nullable=True)
        if 'audio' in m:
            a = _object(m, 'audio', path, out, nullable=True)
            if a is not None: _string(a, 'id', f"{path}.audio", out, required=True)
        if 'annotations' in m and m['annotations'] is not None and not isinstance(m['annotations'], _ARRAY):
            out.append(Problem(f"{path}.annotations", f"must be an array, got {_kind(m['annotations'])}"))
        tcs = m.get('tool_calls')
        if tcs is not None: _tool_calls(tcs, f"{path}.tool_calls", out, ids)
        if 'function_call' in m: _function_call(m, path, out)
        if m.get('content') is None and not tcs and not m.get('function_call') and not m.get('refusal') \
                and not m.get('audio'):
            out.append(Problem(path, "an assistant message needs content, tool_calls or function_call"))
    elif role == 'tool':
        cid = _string(m, 'tool_call_id', path, out, required=True, what=' (the id of the tool call this answers)')
        if cid is not None and cid not in ids:
            out.append(Problem(f"{path}.tool_call_id", f"{cid!r} does not answer any earlier assistant tool call"
                               + (f" (ids: {', '.join(repr(i) for i in sorted(ids))})" if ids else '')))
    elif role == 'function':
        _string(m, 'name', path, out, required=True)
        if 'content' not in m: out.append(Problem(f"{path}.content", "is required (a string or null)"))
    elif 'name' in m: _string(m, 'name', path, out)

def validate_messages(messages,  # a list of chat messages
                      path: str = 'messages'  # prefix for problem paths
                     ) -> list[Problem]:
    "Every problem in a chat conversation, each with its path (`messages[3].tool_calls[0].function.arguments`)."
    if not isinstance(messages, _ARRAY):
        return [Problem(path, f"must be an array of messages, got {_kind(messages)}")]
    if not messages: return [Problem(path, "must contain at least one message")]
    out, ids = [], set()
    for i, m in enumerate(messages): _message(m, f"{path}[{i}]", out, ids)
    return out

# %% [md]
A valid conversation has no problems; each broken one below lists exactly the paths we expect. The table is the
test: add a row when a new kind of bad input turns up.

# %%
def paths(problems): return [p.path for p in problems]
call = lambda args='{"city": "Paris"}', id='call_1': {'id': id, 'type': 'function', 'function': {'name': 'weather', 'arguments': args}}
sys_, usr = {'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Weather in Paris?'}
good = [sys_, usr, {'role': 'assistant', 'content': None, 'tool_calls': [call()]},
        {'role': 'tool', 'tool_call_id': 'call_1', 'content': '18C'},
        {'role': 'assistant', 'content': [{'type': 'text', 'text': 'It is 18C.'}]}]
test_eq(validate_messages(good), [])
test_eq(validate_messages([{'role': 'developer', 'content': [{'type': 'text', 'text': 'x'}], 'name': 'dev'},
    {'role': 'user', 'content': [{'type': 'text', 'text': 'look'}, {'type': 'image_url', 'image_url': {'url': 'https://x/y.png', 'detail': 'low'}},
                                 {'type': 'input_audio', 'input_audio': {'data': 'AAAA', 'format': 'wav'}}]},
    {'role': 'assistant', 'content': None, 'function_call': {'name': 'f', 'arguments': '{}'}},
    {'role': 'function', 'name': 'f', 'content': None},
    {'role': 'assistant', 'content': None, 'refusal': 'I cannot help with that.'},
    {'role': 'assistant', 'content': [{'type': 'refusal', 'refusal': 'No.'}], 'tool_calls': [], 'annotations': []}]), [])

bad = [  # (messages, expected problem paths)
    ('not a list', ['messages']),
    ([], ['messages']),
    ([42], ['messages[0]']),
    ([{'content': 'hi'}], ['messages[0].role']),
    ([{'role': 'robot', 'content': 'hi'}], ['messages[0].role']),
    ([{'role': 7, 'content': 'hi'}], ['messages[0].role']),
    ([{'role': 'user', 'content': 3}], ['messages[0].content']),
    ([{'role': 'user', 'content': None}], ['messages[0].content']),
    ([{'role': 'user', 'content': 'hi', 'tool_call_ids': 'x'}], ['messages[0].tool_call_ids']),
    ([{'role': 'user', 'content': 'hi', 'name': 5}], ['messages[0].name']),
    ([{'role': 'user', 'content': [{'type': 'text'}]}], ['messages[0].content[0].text']),
    ([{'role': 'user', 'content': [{'text': 'hi'}]}], ['messages[0].content[0].type']),
    ([{'role': 'user', 'content': ['hi']}], ['messages[0].content[0]']),
    ([{'role': 'user', 'content': [{'type': 'video', 'video': 'x'}]}], ['messages[0].content[0].type']),
    ([{'role': 'system', 'content': [{'type': 'image_url', 'image_url': {'url': 'u'}}]}], ['messages[0].content[0].type']),
    ([{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'detail': 'max'}}]}],
     ['messages[0].content[0].image_url.url', 'messages[0].content[0].image_url.detail']),
    ([{'role': 'user', 'content': [{'type': 'image_url', 'image_url': 'https://x'}]}], ['messages[0].content[0].image_url']),
    ([{'role': 'user', 'content': [{'type': 'input_audio', 'input_audio': {'data': 'AA', 'format': 'ogg'}}]}],
     ['messages[0].content[0].input_audio.format']),
    ([{'role': 'user', 'content': [{'type': 'text', 'text': 'hi', 'cache_control': {}}]}], ['messages[0].content[0].cache_control']),
    ([usr, {'role': 'assistant'}], ['messages[1]']),
    ([usr, {'role': 'assistant', 'content': None, 'tool_calls': [call('')]}], ['messages[1].tool_calls[0].function.arguments']),
    ([usr, {'role': 'assistant', 'tool_calls': [call('{"city": ')]}], ['messages[1].tool_calls[0].function.arguments']),
    ([usr, {'role': 'assistant', 'tool_calls': [call('[1, 2]')]}], ['messages[1].tool_calls[0].function.arguments']),
    ([usr, {'role': 'assistant', 'tool_calls': [call({'city': 'Paris'})]}], ['messages[1].tool_calls[0].function.arguments']),
    ([usr, {'role': 'assistant', 'tool_calls': {'id': 'x'}}], ['messages[1].tool_calls']),
    ([usr, {'role': 'assistant', 'tool_calls': [{'function': {'name': 'f'}}]}],
     ['messages[1].tool_calls[0].id', 'messages[1].tool_calls[0].type', 'messages[1].tool_calls[0].function.arguments']),
    ([usr, {'role': 'assistant', 'tool_calls': [{'id': 'a', 'type': 'fn', 'function': {'name': '', 'arguments': '{}'}}]}],
     ['messages[1].tool_calls[0].type', 'messages[1].tool_calls[0].function.name']),
    ([usr, {'role': 'assistant', 'tool_calls': [call(), call()]}], ['messages[1].tool_calls[1].id']),
    ([usr, {'role': 'assistant', 'function_call': {'name': 'f', 'arguments': 'nope'}}], ['messages[1].function_call.arguments']),
    ([usr, {'role': 'assistant', 'content': 'x', 'refusal': 3, 'audio': {}}], ['messages[1].refusal', 'messages[1].audio.id']),
    ([usr, {'role': 'tool', 'content': '18C'}], ['messages[1].tool_call_id']),
    ([usr, {'role': 'tool', 'tool_call_id': 'call_9', 'content': '18C'}], ['messages[1].tool_call_id']),
    ([usr, {'role': 'assistant', 'tool_calls': [call()]}, {'role': 'tool', 'tool_call_id': 'call_2', 'content': 'x'}],
     ['messages[2].tool_call_id']),
    ([usr, {'role': 'function', 'content': 'x'}], ['messages[1].name']),
    ([usr, {'role': 'function', 'name': 'f'}], ['messages[1].content']),
    ([usr, {'role': 'function', 'name': 'f', 'content': ['x']}], ['messages[1].content']),
    ([{'role': 'robot'}, {'role': 'user', 'content': 1}, {'role': 'assistant', 'tool_calls': [call('{')]}],
     ['messages[0].role', 'messages[1].content', 'messages[2].tool_calls[0].function.arguments']),
]
for msgs, want in bad: test_eq(paths(validate_messages(msgs)), want)

# %% [md]
The messages say what is wrong and what was expected:

# %%
for p in validate_messages([{'role': 'robot'}, usr, {'role': 'assistant', 'tool_calls': [call('')]},
                            {'role': 'tool', 'content': '18C'}]): print(p)

# %%
msgs = [usr, {'role': 'assistant', 'tool_calls': [call('')]}]
test_eq(str(validate_messages(msgs)[0]), "messages[1].tool_calls[0].function.arguments: not valid JSON (Expecting value at char 0)")
test_eq(validate_messages([{'role': 'robot'}])[0].message, "unknown role 'robot' (expected one of system, developer, user, assistant, tool, function)")
test_eq(paths(validate_messages([usr], path='rejected')), [])
test_eq(validate_messages((usr, {'role': 'assistant', 'content': 'ok'})), [])  # a tuple is an array too
test_eq(paths(validate_messages([{'role': 'x'}], path='input.messages')), ['input.messages[0].role'])

# %% [md]
## Tools, tool choice and response format

Tool (and deprecated function) names follow the OpenAI rule `^[a-zA-Z0-9_-]{1,64}$`, since every provider we route to
accepts that alphabet. When the tools are known, `validate_tool_choice` also checks that a forced tool exists.

# %%
#| export
def _function_def(f, path, out, names, what):
    if not isinstance(f, dict):
        out.append(Problem(path, f"must be a {what} object, got {_kind(f)}")); return
    name = _string(f, 'name', path, out, required=True)
    if name is not None:
        if not _NAME_RE.match(name):
            out.append(Problem(f"{path}.name", f"{name!r} must be 1-64 letters, digits, '_' or '-'"))
        elif name in names: out.append(Problem(f"{path}.name", f"duplicate name {name!r}"))
        names.add(name)
    if 'description' in f: _string(f, 'description', path, out)
    _object(f, 'parameters', path, out)
    _boolean(f, 'strict', path, out, nullable=True)
    _unknown(f, {'name', 'description', 'parameters', 'strict'}, path, what, out)

def validate_tools(tools,  # the `tools` array of a request or entry; None means no tools
                   path: str = 'tools') -> list[Problem]:
    "Every problem in a `tools` array (`[{type: 'function', function: {name, description, parameters, strict}}]`)."
    if tools is None: return []
    if not isinstance(tools, _ARRAY): return [Problem(path, f"must be an array of tools, got {_kind(tools)}")]
    out, names = [], set()
    for i, t in enumerate(tools):
        q = f"{path}[{i}]"
        if not isinstance(t, dict):
            out.append(Problem(q, f"must be a tool object, got {_kind(t)}")); continue
        if t.get('type', _MISSING) is _MISSING: out.append(Problem(f"{q}.type", "is required ('function')"))
        elif t['type'] != 'function': out.append(Problem(f"{q}.type", f"must be 'function', got {t['type']!r}"))
        fn = _object(t, 'function', q, out, required=True)
        if fn is not None: _function_def(fn, f"{q}.function", out, names, 'a function definition')
        _unknown(t, {'type', 'function'}, q, 'a tool', out)
    return out

def _functions(functions, path, out):
    if functions is None: return
    if not isinstance(functions, _ARRAY):
        out.append(Problem(path, f"must be an array of functions, got {_kind(functions)}")); return
    names = set()
    for i, f in enumerate(functions): _function_def(f, f"{path}[{i}]", out, names, 'a function')

def _tool_names(tools) -> set | None:
    if not isinstance(tools, _ARRAY): return None
    return {t['function'].get('name') for t in tools if isinstance(t, dict) and isinstance(t.get('function'), dict)}

def validate_tool_choice(tool_choice,  # 'none' | 'auto' | 'required' | {type: 'function', function: {name}}; None: absent
                         tools=None,  # the tools it refers to; when given, a named tool must be one of them
                         path: str = 'tool_choice') -> list[Problem]:
    "Every problem in a `tool_choice` value (checked against `tools` when they are given)."
    if tool_choice is None: return []
    out = []
    if tool_choice.__class__ is str:
        if tool_choice not in ('none', 'auto', 'required'):
            out.append(Problem(path, f"must be 'none', 'auto', 'required' or a function object, got {tool_choice!r}"))
        elif tool_choice == 'required' and tools is not None and not tools:
            out.append(Problem(path, "'required' needs a non-empty tools array"))
        return out
    if not isinstance(tool_choice, dict):
        return [Problem(path, f"must be 'none', 'auto', 'required' or a function object, got {_kind(tool_choice)}")]
    if 'type' in tool_choice and tool_choice['type'] != 'function':
        out.append(Problem(f"{path}.type", f"must be 'function', got {tool_choice['type']!r}"))
    fn = _object(tool_choice, 'function', path, out, required=True)
    if fn is not None:
        name = _string(fn, 'name', f"{path}.function", out, required=True)
        _unknown(fn, {'name'}, f"{path}.function", 'tool_choice.function', out)
        names = _tool_names(tools)
        if name is not None and names is not None and name not in names:
            out.append(Problem(f"{path}.function.name", f"{name!r} is not among the tools"
                               + (f" ({', '.join(sorted(map(str, names)))})" if names else " (there are none)")))
    _unknown(tool_choice, {'type', 'function'}, path, 'tool_choice', out)
    return out

def _deprecated_function_call(fc, functions, path, out):
    if fc is None: return
    if fc.__class__ is str:
        if fc not in ('none', 'auto'): out.append(Problem(path, f"must be 'none', 'auto' or {{name}}, got {fc!r}"))
        return
    if not isinstance(fc, dict):
        out.append(Problem(path, f"must be 'none', 'auto' or {{name}}, got {_kind(fc)}")); return
    name = _string(fc, 'name', path, out, required=True)
    _unknown(fc, {'name'}, path, 'function_call', out)
    if name is not None and isinstance(functions, _ARRAY):
        names = {f.get('name') for f in functions if isinstance(f, dict)}
        if name not in names: out.append(Problem(f"{path}.name", f"{name!r} is not among the functions"))

def validate_response_format(response_format,  # {type: 'text' | 'json_object' | 'json_schema', json_schema: {...}}; None: absent
                             path: str = 'response_format') -> list[Problem]:
    "Every problem in a `response_format` value."
    rf = response_format
    if rf is None: return []
    if not isinstance(rf, dict): return [Problem(path, f"must be an object like {{'type': 'json_object'}}, got {_kind(rf)}")]
    out = []
    t = rf.get('type', _MISSING)
    if t is _MISSING: out.append(Problem(f"{path}.type", "is required ('text', 'json_object' or 'json_schema')"))
    elif t not in ('text', 'json_object', 'json_schema'):
        out.append(Problem(f"{path}.type", f"must be 'text', 'json_object' or 'json_schema', got {t!r}"))
    if t == 'json_schema':
        js = _object(rf, 'json_schema', path, out, required=True)
        if js is not None:
            q = f"{path}.json_schema"
            name = _string(js, 'name', q, out, required=True)
            if name is not None and not _NAME_RE.match(name):
                out.append(Problem(f"{q}.name", f"{name!r} must be 1-64 letters, digits, '_' or '-'"))
            _string(js, 'description', q, out)
            _object(js, 'schema', q, out)
            _boolean(js, 'strict', q, out, nullable=True)
            _unknown(js, {'name', 'description', 'schema', 'strict'}, q, 'json_schema', out)
        _unknown(rf, {'type', 'json_schema'}, path, 'a json_schema response_format', out)
    elif t is not _MISSING:
        _unknown(rf, {'type'}, path, f'a {t} response_format', out)
    return out

# %%
weather = {'type': 'function', 'function': {'name': 'weather', 'description': 'Current weather',
           'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}}, 'strict': None}}
test_eq(validate_tools([weather]), [])
test_eq(validate_tools(None), [])
for tools, want in [
    ({'type': 'function'}, ['tools']),
    (['weather'], ['tools[0]']),
    ([{'function': {'name': 'f'}}], ['tools[0].type']),
    ([{'type': 'function'}], ['tools[0].function']),
    ([{'type': 'function', 'function': {'name': 'get weather!', 'parameters': 'x', 'strict': 'yes'}}],
     ['tools[0].function.name', 'tools[0].function.parameters', 'tools[0].function.strict']),
    ([{'type': 'function', 'function': {'description': 'd'}}], ['tools[0].function.name']),
    ([weather, weather], ['tools[1].function.name']),
    ([{'type': 'function', 'function': {'name': 'f', 'params': {}}, 'extra': 1}], ['tools[0].function.params', 'tools[0].extra']),
]: test_eq(paths(validate_tools(tools)), want)

for choice, tools, want in [
    ('auto', None, []), ('none', [], []), ('required', [weather], []),
    ({'type': 'function', 'function': {'name': 'weather'}}, [weather], []),
    ({'function': {'name': 'weather'}}, None, []),
    ('always', None, ['tool_choice']), (3, None, ['tool_choice']),
    ('required', [], ['tool_choice']),
    ({'type': 'function', 'function': {'name': 'forecast'}}, [weather], ['tool_choice.function.name']),
    ({'type': 'tool', 'function': {}}, None, ['tool_choice.type', 'tool_choice.function.name']),
]: test_eq(paths(validate_tool_choice(choice, tools)), want)

for rf, want in [
    ({'type': 'text'}, []), ({'type': 'json_object'}, []),
    ({'type': 'json_schema', 'json_schema': {'name': 'person', 'schema': {'type': 'object'}, 'strict': True}}, []),
    ('json', ['response_format']), ({}, ['response_format.type']), ({'type': 'xml'}, ['response_format.type']),
    ({'type': 'json_schema'}, ['response_format.json_schema']),
    ({'type': 'json_schema', 'json_schema': {'schema': []}}, ['response_format.json_schema.name', 'response_format.json_schema.schema']),
    ({'type': 'json_object', 'schema': {}}, ['response_format.schema']),
]: test_eq(paths(validate_response_format(rf)), want)
print(validate_tool_choice({'type': 'function', 'function': {'name': 'forecast'}}, [weather])[0])

# %% [md]
## Requests

`validate_request` checks a `/chat/completions` request body the way the spec's OpenAPI schema does: `model` and
`messages` are required, known parameters have their types and ranges, and unknown extra fields are allowed
(`additionalProperties: true`), since providers add their own.

# %%
#| export
def _number(body, key, out, lo=None, hi=None, integer=False, nullable=False, path=''):
    v = body.get(key, _MISSING)
    if v is _MISSING or (v is None and nullable): return
    q = f"{path}{key}"
    if v.__class__ is bool or not isinstance(v, (int, float)):
        out.append(Problem(q, f"must be a{'n integer' if integer else ' number'}{' or null' if nullable else ''}, got {_kind(v)}"))
    elif integer and v != int(v): out.append(Problem(q, f"must be an integer, got {v!r}"))
    elif (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        out.append(Problem(q, f"must be {rng}, got {v!r}"))

def _metadata(v, path, out):
    "metadata: an object mapping strings to strings (or null)."
    if v is None: return
    if not isinstance(v, dict):
        out.append(Problem(path, f"must be an object mapping names to strings, got {_kind(v)}")); return
    for k, x in v.items():
        if x.__class__ is not str:
            out.append(Problem(_field(path, k), f"must be a string, got {_kind(x)}"
                               + (f" (write it as {json.dumps(str(x) if not isinstance(x, bool) else str(x).lower())})"
                                  if isinstance(x, (int, float)) else '')))

def _tooling(obj: dict, out: list):
    "The fields a request and an entry share: tools, tool_choice, response_format, functions, function_call."
    tools = obj.get('tools')
    out += validate_tools(tools)
    out += validate_tool_choice(obj.get('tool_choice'), tools if tools is not None else [])
    out += validate_response_format(obj.get('response_format'))
    _functions(obj.get('functions'), 'functions', out)
    _deprecated_function_call(obj.get('function_call'), obj.get('functions') or [], 'function_call', out)

def validate_request(body: dict  # a chat.completions request body
                    ) -> list[Problem]:
    "Every problem in a chat-completion request body (unknown extra fields are allowed)."
    if not isinstance(body, dict): return [Problem('', f"a request must be a JSON object, got {_kind(body)}")]
    out = []
    model = _string(body, 'model', '', out, required=True, nonempty=True)
    if 'messages' not in body: out.append(Problem('messages', "is required"))
    else: out += validate_messages(body['messages'])
    _tooling(body, out)
    _number(body, 'n', out, lo=1, integer=True)
    _number(body, 'temperature', out, lo=0, hi=2, nullable=True)
    _number(body, 'top_p', out, lo=0, hi=1, nullable=True)
    _number(body, 'max_tokens', out, lo=1, integer=True, nullable=True)
    _number(body, 'max_completion_tokens', out, lo=1, integer=True, nullable=True)
    _number(body, 'presence_penalty', out, lo=-2, hi=2, nullable=True)
    _number(body, 'frequency_penalty', out, lo=-2, hi=2, nullable=True)
    _number(body, 'top_logprobs', out, lo=0, hi=20, integer=True, nullable=True)
    _number(body, 'seed', out, integer=True, nullable=True)
    for k in ('stream', 'logprobs', 'store', 'parallel_tool_calls'): _boolean(body, k, '', out, nullable=k != 'stream')
    if 'user' in body: _string(body, 'user', '', out)
    stop = body.get('stop')
    if stop is not None and stop.__class__ is not str and not (isinstance(stop, _ARRAY) and all(s.__class__ is str for s in stop)):
        out.append(Problem('stop', f"must be a string or an array of strings, got {_kind(stop)}"))
    so = _object(body, 'stream_options', '', out, nullable=True)
    if so is not None:
        if 'include_usage' not in so: out.append(Problem('stream_options.include_usage', "is required (a boolean)"))
        else: _boolean(so, 'include_usage', 'stream_options', out)
        _unknown(so, {'include_usage'}, 'stream_options', 'stream_options', out)
        if not body.get('stream'): out.append(Problem('stream_options', "is only allowed when stream is true"))
    audio = _object(body, 'audio', '', out, nullable=True)
    if audio is not None:
        for k, allowed in (('format', ('wav', 'mp3', 'flac', 'opus', 'pcm16')),
                           ('voice', ('alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', 'verse'))):
            if k not in audio: out.append(Problem(f"audio.{k}", f"is required (one of {', '.join(allowed)})"))
            elif audio[k] not in allowed: out.append(Problem(f"audio.{k}", f"must be one of {', '.join(allowed)}, got {audio[k]!r}"))
    if 'metadata' in body: _metadata(body['metadata'], 'metadata', out)
    return [replace(p, path=p.path.lstrip('.')) if p.path.startswith('.') else p for p in out]

# %%
req = {'model': 'gpt-4o-mini', 'messages': [usr], 'temperature': 0, 'max_tokens': 100, 'stream': True,
       'stream_options': {'include_usage': True}, 'tools': [weather], 'tool_choice': 'auto',
       'metadata': {'prompt_id': 'weather'}, 'openpipe_extra': {'anything': 'goes'}}
test_eq(validate_request(req), [])
for body, want in [
    ([], ['']),
    ({}, ['model', 'messages']),
    ({'model': '', 'messages': []}, ['model', 'messages']),
    ({'model': 'm', 'messages': [usr], 'temperature': 3, 'n': 0, 'max_tokens': 1.5, 'top_p': '1', 'stream': 'yes'},
     ['n', 'temperature', 'top_p', 'max_tokens', 'stream']),
    ({'model': 'm', 'messages': [usr], 'metadata': {'prompt_id': 7, 'ok': 'y'}}, ['metadata.prompt_id']),
    ({'model': 'm', 'messages': [usr], 'metadata': ['x']}, ['metadata']),
    ({'model': 'm', 'messages': [usr], 'tool_choice': {'type': 'function', 'function': {'name': 'weather'}}}, ['tool_choice.function.name']),
    ({'model': 'm', 'messages': [usr], 'tool_choice': 'required'}, ['tool_choice']),
    ({'model': 'm', 'messages': [usr], 'functions': [{'name': 'f'}], 'function_call': {'name': 'g'}}, ['function_call.name']),
    ({'model': 'm', 'messages': [usr], 'function_call': 'always'}, ['function_call']),
    ({'model': 'm', 'messages': [usr], 'stop': ['a', 1], 'stream_options': {'include_usage': True}}, ['stop', 'stream_options']),
    ({'model': 'm', 'messages': [usr], 'audio': {'format': 'wav', 'voice': 'bob'}}, ['audio.voice']),
    ({'model': 'm', 'messages': [usr], 'response_format': {'type': 'json'}}, ['response_format.type']),
]: test_eq(paths(validate_request(body)), want)
test_eq(str(validate_request({'model': 'm', 'messages': [usr], 'metadata': {'n': 7}})[0]), 'metadata.n: must be a string, got number (write it as "7")')
test_eq(paths(validate_request({'model': 'm', 'messages': [usr], 'metadata': {'$sdk.version': 4, 'ok': True}})), ['metadata["$sdk.version"]', 'metadata.ok'])

# %% [md]
## Dataset entries

A dataset (fine-tuning) entry is one JSONL line in the format of the spec's "Uploading Data" page: the OpenAI
chat fine-tuning format (`messages` ending with the assistant output, `tools`, `tool_choice`, `response_format`,
deprecated `functions`/`function_call`) plus `split` (`TRAIN`/`TEST`), `rejected_message` (for preference
tuning) and `metadata` (string to string). Other request parameters such as `temperature` may be present and
are ignored. `require_output=False` accepts entries whose output has not been generated yet.

# %%
#| export
def validate_entry(obj,  # one parsed JSONL line
                   require_output: bool = True,  # the messages must end with an assistant message (the output)
                   line: int | None = None  # stamped on each problem, for problems found in a file
                  ) -> list[Problem]:
    "Every problem in a dataset / fine-tuning entry (`messages`, `tools`, `split`, `rejected_message`, `metadata`, ...)."
    if not isinstance(obj, dict): out = [Problem('', f"an entry must be a JSON object, got {_kind(obj)}")]
    else:
        msgs = obj.get('messages', _MISSING)
        if msgs is _MISSING: out = [Problem('messages', "is required (a list of chat messages ending with the assistant output)")]
        else:
            out = validate_messages(msgs)
            if require_output and isinstance(msgs, _ARRAY) and msgs:
                last = msgs[-1]
                if not isinstance(last, dict) or last.get('role') != 'assistant':
                    got = last.get('role') if isinstance(last, dict) else _kind(last)
                    out.append(Problem('messages', f"must end with an assistant message (the output); the last one is {got!r}"))
        if len(obj) > 1 or msgs is _MISSING:
            _tooling(obj, out)
            split = obj.get('split')
            if split is not None and split not in ('TRAIN', 'TEST'):
                out.append(Problem('split', f"must be 'TRAIN', 'TEST' or absent, got {split!r}"))
            rm = obj.get('rejected_message')
            if rm is not None:
                if isinstance(rm, dict) and rm.get('role') != 'assistant':
                    out.append(Problem('rejected_message.role', f"must be 'assistant', got {rm.get('role')!r}"))
                else:
                    ids = set()
                    _message(rm, 'rejected_message', out, ids)
            if 'metadata' in obj: _metadata(obj['metadata'], 'metadata', out)
    if line is not None: out = [replace(p, line=line) for p in out]
    return out

# %%
entry = {'messages': [sys_, {'role': 'user', 'content': 'Capital of Tasmania?'}, {'role': 'assistant', 'content': 'Hobart'}],
         'rejected_message': {'role': 'assistant', 'content': 'Paris'}, 'split': 'TRAIN',
         'metadata': {'prompt_id': 'capital_cities'}, 'temperature': 0.2}
test_eq(validate_entry(entry), [])
test_eq(validate_entry({'messages': [usr]}, require_output=False), [])
for obj, want in [
    ('x', ['']),
    ({}, ['messages']),
    ({'messages': [usr]}, ['messages']),
    ({'messages': [usr, {'role': 'assistant', 'content': 'a'}], 'split': 'train'}, ['split']),
    ({'messages': [usr, {'role': 'assistant', 'content': 'a'}], 'rejected_message': {'role': 'user', 'content': 'b'}}, ['rejected_message.role']),
    ({'messages': [usr, {'role': 'assistant', 'content': 'a'}], 'rejected_message': {'role': 'assistant'}}, ['rejected_message']),
    ({'messages': [usr, {'role': 'assistant', 'content': 'a'}], 'rejected_message': 'b'}, ['rejected_message']),
    ({'messages': [usr, {'role': 'assistant', 'content': 'a'}], 'metadata': {'score': 0.9}}, ['metadata.score']),
    ({'messages': [usr, {'role': 'assistant', 'tool_calls': [call()]}], 'tools': [weather], 'tool_choice': {'type': 'function', 'function': {'name': 'x'}}},
     ['tool_choice.function.name']),
    ({'messages': [usr, {'role': 'assistant', 'content': None, 'tool_calls': [call('{"city": "Paris"')]}]}, ['messages[1].tool_calls[0].function.arguments']),
]: test_eq(paths(validate_entry(obj)), want)
test_eq([str(p) for p in validate_entry({'messages': [usr]}, line=7)],
        ["line 7: messages: must end with an assistant message (the output); the last one is 'user'"])

# %% [md]
The spec's own examples (uploading data, exporting data) validate as they are:

# %%
spec_lines = [
    '{"messages":[{"role":"system","content":"You are a helpful assistant"},{"role":"user","content":"What is the capital of Tasmania?"},{"role":"assistant","content":null,"tool_calls":[{"id":"","type":"function","function":{"name":"identify_capital","arguments":"{\\"capital\\":\\"Hobart\\"}"}}]}],"tools":[{"type":"function","function":{"name":"identify_capital","parameters":{"type":"object","properties":{"capital":{"type":"string"}}}}}]}',
    '{"messages":[{"role":"system","content":"You are a helpful assistant"},{"role":"user","content":"What is the capital of Sweden?"},{"role":"assistant","content":"Stockholm"}], "rejected_message":{"role": "assistant", "content": "London"}, "split": "TEST", "metadata": {"prompt_id": "capital_cities", "any_key": "any_value"}}',
]
for l in spec_lines: test_eq(validate_entry(json.loads(l)), [])

# %% [md]
Validation runs on every row of every import, so it is written for speed: no schema library, and the common case
(string content, known fields) takes a handful of dictionary lookups per message (`bench/` has the figures).

# %% [md]
## From functions to tools

OpenAI deprecated `functions`/`function_call` in favour of `tools`/`tool_choice`/`tool_calls`. Old datasets still
use them, so `functions_to_tools` converts an entry or request (or a bare message list) to the current form:
`functions` become `tools`, `function_call` becomes `tool_choice`, each assistant `function_call` becomes a
one-element `tool_calls`, and each `function` message becomes a `tool` message answering the latest unanswered
call of that name. Tool call ids are deterministic (`call_<message index>`) so converting twice gives the same
bytes, and the same content hash.

# %%
#| export
def _convert_messages(msgs):
    res, pending = [], {}
    for i, m in enumerate(msgs):
        if isinstance(m, dict):
            role = m.get('role')
            if role == 'assistant' and 'function_call' in m:
                m = dict(m)
                fc = m.pop('function_call')
                if isinstance(fc, dict):
                    cid, name = f"call_{i}", fc.get('name', '')
                    m['tool_calls'] = list(m.get('tool_calls') or []) + [
                        {'id': cid, 'type': 'function', 'function': {'name': name, 'arguments': fc.get('arguments', '')}}]
                    pending.setdefault(name, []).append(cid)
            elif role == 'function':
                q = pending.get(m.get('name'))
                m = {'role': 'tool', 'tool_call_id': q.pop(0) if q else f"call_{i}",
                     'content': m.get('content') if m.get('content') is not None else ''}
        res.append(m)
    return res

def functions_to_tools(obj):
    "A copy of an entry, request or message list with deprecated `functions`/`function_call` turned into tools."
    if isinstance(obj, _ARRAY): return _convert_messages(obj)
    if not isinstance(obj, dict): return obj
    out = dict(obj)
    functions = out.pop('functions', None)
    if isinstance(functions, _ARRAY) and functions:
        tools = list(out.get('tools') or [])
        have = _tool_names(tools) or set()
        tools += [{'type': 'function', 'function': dict(f)} for f in functions
                  if not (isinstance(f, dict) and f.get('name') in have)]
        out['tools'] = tools
    fc = out.pop('function_call', None)
    if fc is not None and out.get('tool_choice') is None:
        if isinstance(fc, dict): out['tool_choice'] = {'type': 'function', 'function': {'name': fc.get('name')}}
        else: out['tool_choice'] = fc
    msgs = out.get('messages')
    if isinstance(msgs, _ARRAY): out['messages'] = _convert_messages(msgs)
    rm = out.get('rejected_message')
    if isinstance(rm, dict) and 'function_call' in rm:
        idx = len(msgs) - 1 if isinstance(msgs, _ARRAY) and msgs else 0
        out['rejected_message'] = _convert_messages([None] * idx + [rm])[-1]
    return out

# %%
old = {'messages': [usr, {'role': 'assistant', 'content': None, 'function_call': {'name': 'weather', 'arguments': '{"city": "Paris"}'}},
                    {'role': 'function', 'name': 'weather', 'content': '18C'},
                    {'role': 'assistant', 'content': None, 'function_call': {'name': 'weather', 'arguments': '{"city": "Lyon"}'}}],
       'functions': [weather['function']], 'function_call': {'name': 'weather'},
       'rejected_message': {'role': 'assistant', 'function_call': {'name': 'weather', 'arguments': '{}'}}}
new = functions_to_tools(old)
new

# %%
test_eq(new['tools'], [weather])
test_eq(new['tool_choice'], {'type': 'function', 'function': {'name': 'weather'}})
test_eq(new['messages'][1]['tool_calls'][0]['id'], 'call_1')
test_eq(new['messages'][2], {'role': 'tool', 'tool_call_id': 'call_1', 'content': '18C'})
test_eq(new['messages'][3]['tool_calls'][0]['function']['arguments'], '{"city": "Lyon"}')
test_eq(new['rejected_message']['tool_calls'][0]['id'], 'call_3')
assert 'functions' not in new and 'function_call' not in new and 'function_call' not in new['messages'][1]
test_eq(validate_entry(old), [])
test_eq(validate_entry(new), [])
test_eq(functions_to_tools(old), new)  # deterministic
assert 'function_call' in old['messages'][1]  # input untouched
test_eq(functions_to_tools({'messages': [usr], 'function_call': 'auto'})['tool_choice'], 'auto')

# %% [md]
## Reading JSONL

One reader for every JSONL file we import (datasets, exported logs, alignment sets). It streams the file line by
line in binary, so a multi-gigabyte file costs one line of memory, and it never stops at a bad line: each line
yields `(line number, object)` or `(line number, Problem)` (not UTF-8, not JSON, not an object). Blank lines are
skipped; a UTF-8 byte-order mark on the first line is tolerated. A missing file fails at once, before iteration.

# %%
#| export
def _not_json_constant(name): raise ValueError(f"{name} is not valid JSON")
_STRICT_DECODER = json.JSONDecoder(parse_constant=_not_json_constant)

def _iter_jsonl(path: Path):
    decode = _STRICT_DECODER.decode
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b'\xef\xbb\xbf'): raw = raw[3:]
            if not raw.strip(): continue
            try: text = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                yield n, Problem('', f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start})", n); continue
            try: obj = decode(text)
            except json.JSONDecodeError as e:
                yield n, Problem('', f"not valid JSON ({e.msg} at char {e.pos})", n); continue
            except (ValueError, RecursionError) as e:
                yield n, Problem('', f"not valid JSON ({e})", n); continue
            if obj.__class__ is not dict:
                yield n, Problem('', f"must be a JSON object, got {_kind(obj)}", n); continue
            yield n, obj

def read_jsonl(path  # a .jsonl file: one JSON object per line
              ) -> Iterator[tuple[int, dict | Problem]]:
    "Yield `(line_number, object)` or `(line_number, Problem)` for each non-blank line of a JSONL file."
    path = Path(path).expanduser()
    if not path.exists(): raise ConfigError(f"JSONL file not found: {path} (relative to {Path.cwd()}). Check the path.")
    if path.is_dir(): raise ConfigError(f"{path} is a directory, not a JSONL file. Pass the path of a .jsonl file.")
    return _iter_jsonl(path)

# %%
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'data.jsonl'
    f.write_bytes(b'\xef\xbb\xbf{"messages": []}\n'
                  b'\n'
                  b'{"a": 1}\r\n'
                  b'not json\n'
                  b'[1, 2]\n'
                  b'{"a": "\xff"}\n'
                  b'{"a": NaN}\n'
                  b'   \n'
                  b'{"last": true}')
    rows = list(read_jsonl(f))
    for n, r in rows: print(n, r)
    test_eq([n for n, _ in rows], [1, 3, 4, 5, 6, 7, 9])
    test_eq(rows[0][1], {'messages': []})
    test_eq(str(rows[2][1]), 'line 4: not valid JSON (Expecting value at char 0)')
    test_eq(str(rows[3][1]), 'line 5: must be a JSON object, got array')
    test_eq(str(rows[4][1]), 'line 6: not valid UTF-8 (byte 0xff at byte 7)')
    test_eq(str(rows[5][1]), 'line 7: not valid JSON (NaN is not valid JSON)')
    test_eq(rows[6], (9, {'last': True}))
    (Path(d) / 'empty.jsonl').write_bytes(b'')
    test_eq(list(read_jsonl(Path(d) / 'empty.jsonl')), [])
    test_fail(lambda: read_jsonl(Path(d) / 'missing.jsonl'), contains='missing.jsonl')
    test_fail(lambda: read_jsonl(d), contains='is a directory')

# %% [md]
A JSONL file's problems combine with each entry's own: the line number goes on every problem.

# %%
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / 'train.jsonl'
    f.write_text(spec_lines[1] + '\n{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    problems = [p for n, o in read_jsonl(f) for p in ([o] if isinstance(o, Problem) else validate_entry(o, line=n))]
    for p in problems: print(p)
    test_eq([(p.line, p.path) for p in problems], [(2, 'messages'), (3, '')])

# %% [md]
## Canonical JSON and content hashes

Cache keys, dataset snapshots and entry de-duplication all need "the same JSON value gives the same bytes".
`canonical_json` sorts keys, drops whitespace, writes UTF-8 (not `\u` escapes) and writes numbers one way:
an integral float is written as an integer (`1.0` and `1` are the same JSON number, as in RFC 8785), other
floats with Python's shortest round-trip repr. NaN and infinities are not JSON and are refused. `content_hash`
is the SHA-256 of those bytes. Everything in openpipe_lab that hashes JSON uses these two functions.

# %%
#| export
_SAFE_INT = 2 ** 53
_CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(',', ':'), allow_nan=False)

def _normalise_numbers(o):
    "`o` with integral floats as ints; containers are copied only where something changes."
    t = o.__class__
    if t is float:
        if o != o or o in (float('inf'), float('-inf')):
            raise ValidationError(f"{o} is not valid JSON: replace NaN/Infinity with null or a number before hashing")
        return int(o) if o.is_integer() and -_SAFE_INT <= o <= _SAFE_INT else o
    if t is dict: items = o.items()
    elif t is list or t is tuple: items = enumerate(o)
    else: return o
    new = None
    for k, v in items:
        c = v.__class__
        if c is str or c is int or c is bool or v is None: continue
        n = _normalise_numbers(v)
        if n is not v:
            if new is None: new = dict(o) if t is dict else list(o)
            new[k] = n
    return o if new is None else new

def canonical_json(obj) -> str:
    "The canonical JSON text of `obj`: sorted keys, no whitespace, UTF-8, one spelling per number."
    try: return _CANONICAL.encode(_normalise_numbers(obj))
    except (TypeError, ValueError) as e:
        if isinstance(e, ValidationError): raise
        raise ValidationError(f"cannot write canonical JSON: {e}. Use only dict, list, str, int, float, bool and None "
                              "(with string keys).") from None

def content_hash(obj) -> str:
    "SHA-256 (hex) of `canonical_json(obj)`: the one content hash used for cache keys and dataset snapshots."
    return hashlib.sha256(canonical_json(obj).encode('utf-8', 'surrogatepass')).hexdigest()

# %%
print(canonical_json({'b': [1.0, 2.5, -0.0], 'a': 'é', 'c': {'z': None, 'y': True}}))
test_eq(canonical_json({'b': [1.0, 2.5, -0.0], 'a': 'é', 'c': {'z': None, 'y': True}}),
        '{"a":"é","b":[1,2.5,0],"c":{"y":true,"z":null}}')
test_eq(content_hash({'temperature': 1, 'x': [1e300]}), content_hash({'x': [1e300], 'temperature': 1.0}))
assert content_hash({'a': 1}) != content_hash({'a': '1'})
test_eq(content_hash({}), hashlib.sha256(b'{}').hexdigest())
test_eq(len(content_hash(entry)), 64)
d = {'t': 1.0}; canonical_json(d); test_eq(d, {'t': 1.0})  # the input is not modified
test_eq(canonical_json(([1.0, {'a': (2.0,)}], 3.5)), '[[1,{"a":[2]}],3.5]')
test_fail(lambda: canonical_json({'x': float('nan')}), contains='NaN')
test_fail(lambda: canonical_json({'x': {1, 2}}), contains='cannot write canonical JSON')

# %% [md]
## Pruning rules

The spec's "Pruning Rules" remove chunks of static text (typically a long system prompt) from a dataset's input
messages before training, and the fine-tuned model inherits them: the same text is removed from every request
sent to it, so training and serving see the same inputs. A rule is an exact string, removed from the content of
system, developer and user messages (plain strings and text parts); the output is never pruned. The input list
is not modified: changed messages are copies.

# %%
#| export
_PRUNED_ROLES = ('system', 'developer', 'user')

def _prune(text: str, rules) -> str:
    for r in rules:
        if r in text: text = text.replace(r, '')
    return text

def apply_pruning_rules(messages,  # chat messages (the input of an entry or request)
                        rules  # strings (or dicts with a 'text' key) to remove, in order
                       ) -> list:
    "A new message list with each rule's exact text removed from system, developer and user contents."
    texts = [r['text'] if isinstance(r, dict) else r for r in rules or []]
    texts = [t for t in texts if isinstance(t, str) and t]
    out = []
    for m in messages:
        if texts and isinstance(m, dict) and m.get('role') in _PRUNED_ROLES:
            c = m.get('content')
            if isinstance(c, str):
                new = _prune(c, texts)
                if new != c: m = {**m, 'content': new}
            elif isinstance(c, _ARRAY):
                parts = [{**p, 'text': _prune(p['text'], texts)}
                         if isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str) else p for p in c]
                if parts != c: m = {**m, 'content': parts}
        out.append(m)
    return out

# %%
long_prompt = 'You are an expert PII redactor. Replace every name, email and phone number with [REDACTED].'
msgs = [{'role': 'system', 'content': long_prompt + '\nBe exact.'},
        {'role': 'user', 'content': [{'type': 'text', 'text': f'{long_prompt} Text: Call Ann.'}, {'type': 'image_url', 'image_url': {'url': 'u'}}]},
        {'role': 'assistant', 'content': long_prompt}]
pruned = apply_pruning_rules(msgs, [long_prompt])
pruned

# %%
test_eq(pruned[0]['content'], '\nBe exact.')
test_eq(pruned[1]['content'][0]['text'], ' Text: Call Ann.')
test_eq(pruned[1]['content'][1], msgs[1]['content'][1])
test_eq(pruned[2]['content'], long_prompt)  # assistant output untouched
assert msgs[0]['content'].startswith(long_prompt)  # input untouched
test_eq(apply_pruning_rules(msgs, [{'text': 'Be exact.'}, ''])[0]['content'], long_prompt + '\n')
test_eq(apply_pruning_rules(msgs, []), msgs)

# %% [md]
## Input and output

A dataset entry stores the conversation with its output as the last message; training, evaluation and
relabeling need the two apart. `split_output` returns the input messages and the final assistant message (or
`None` when the conversation does not end with one, as in a request).

# %%
#| export
def split_output(messages: list  # a conversation
                ) -> tuple[list, dict | None]:
    "`(input_messages, output_message)`: the output is the final message when it is an assistant message, else None."
    if messages and isinstance(messages[-1], dict) and messages[-1].get('role') == 'assistant':
        return list(messages[:-1]), messages[-1]
    return list(messages), None

# %%
inp, output = split_output(entry['messages'])
test_eq(output, {'role': 'assistant', 'content': 'Hobart'})
test_eq(len(inp), 2)
test_eq(split_output([usr]), ([usr], None))
test_eq(split_output([]), ([], None))
