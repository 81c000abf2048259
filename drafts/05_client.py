# %%
#| default_exp client

# %% [md]
# # Client
#
# > Drop-in `openai.OpenAI` / `openai.AsyncOpenAI` subclasses that route every model id (OpenAI, Anthropic, Gemini,
# > custom providers, your fine-tuned deployments), record each call in the lab, and add caching and fallback.

# %%
#| export
from __future__ import annotations
import json, os, time
from functools import cached_property
import openai
from openai.resources.chat import Chat as _SDKChat, AsyncChat as _SDKAsyncChat
from openai.resources.chat.completions import Completions as _SDKCompletions, AsyncCompletions as _SDKAsyncCompletions
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from fastcore.meta import delegates
import httpx2
import sqlalchemy as sa
from openpipe_lab import __version__
from openpipe_lab.core import *
from openpipe_lab.store import tables, dumps, loads
from openpipe_lab.logstore import _check_tags
from openpipe_lab.formats import content_hash, apply_pruning_rules
from openpipe_lab.providers import resolve, backend, assemble_chunks, completion_chunks

# %%
#| hide
from fastcore.test import *

# %% [md]
# ## What the client does
#
# `OpenAI(store=None, openpipe=None, fallback_client=None, **openai_kwargs)` is an `openai.OpenAI`: every argument
# of the SDK works unchanged, and so does every method we don't touch. Only `chat.completions.create` changes:
#
# 1. it accepts `openpipe={"cache": ..., "fallback": ..., "store": ..., "tags": ...}` (also as constructor defaults);
# 2. the `model` is routed by `resolve` (notebook 04): bare names use this client's own connection, exactly as the
#    SDK would; `anthropic:`/`gemini:` are translated; `openpipe:` goes to your providers and deployments;
# 3. the call — success, HTTP error, timeout, streamed or not — is recorded in the lab through `LogStore.record`,
#    which only enqueues: the database write happens on a background thread, never on the caller's path;
# 4. the caller gets the SDK's own types back: `ChatCompletion`, or an `openai.Stream` of `ChatCompletionChunk`.
#
# Metadata tags come from the request's `metadata` (as in the spec's examples) merged over `openpipe["tags"]` and the
# constructor's tags. `metadata` is not forwarded upstream unless the request also sets OpenAI's own `store=True`
# (OpenAI rejects `metadata` without it). `openpipe={"store": False}` records nothing. The cache modes the options
# accept are `CACHE_MODES`; cached answers live for `CACHE_TTL_MS` (one week, as the spec says).

# %%
#| export
CACHE_MODES = ('readWrite', 'readOnly', 'writeOnly')
CACHE_TTL_MS = 7 * 24 * 3600 * 1000  # cached responses expire after one week (spec: Caching)
_OPTION_KEYS = {'cache', 'fallback', 'store', 'tags'}
_IGNORED_KEYS = {'api_key', 'base_url'}  # the hosted SDK's settings; a local lab needs neither
_TRANSPORT = ('extra_headers', 'extra_query', 'extra_body', 'timeout')
# request fields that do not change the output: left out of the cache key
_NOT_OUTPUT = {'stream', 'stream_options', 'metadata', 'store', 'user', 'safety_identifier', 'service_tier',
               'prompt_cache_key', 'prompt_cache_retention', 'prompt_cache_options'} | set(_TRANSPORT)

def _check_options(options, where: str) -> dict:
    "Validated `openpipe={...}` options."
    if options is None: return {}
    if not isinstance(options, dict): raise ConfigError(f"{where}: openpipe= must be a dict, got {type(options).__name__}")
    unknown = set(options) - _OPTION_KEYS - _IGNORED_KEYS - {'fallback_client'}
    if unknown: raise ConfigError(f"{where}: unknown openpipe option(s) {sorted(unknown)}; valid: {sorted(_OPTION_KEYS)}")
    out = {k: v for k, v in options.items() if k in _OPTION_KEYS}
    if out.get('cache') not in (None, False) + CACHE_MODES:
        raise ConfigError(f"{where}: openpipe['cache'] must be one of {list(CACHE_MODES)}, got {out['cache']!r}")
    fb = out.get('fallback')
    if fb is not None and not (isinstance(fb, dict) and isinstance(fb.get('model'), str) and fb['model']):
        raise ConfigError(f"{where}: openpipe['fallback'] must be a dict like {{'model': 'gpt-4o-mini', 'timeout': 20}}, got {fb!r}")
    if out.get('tags') is not None and not isinstance(out['tags'], dict):
        raise ConfigError(f"{where}: openpipe['tags'] must be a dict of strings, got {type(out['tags']).__name__}")
    return out

# %%
test_eq(_check_options({'cache': 'readWrite', 'api_key': 'x'}, 'create'), {'cache': 'readWrite'})
test_fail(lambda: _check_options({'cache': 'always'}, 'create'), contains="openpipe['cache'] must be one of ['readWrite'")
test_fail(lambda: _check_options({'fallback': 'gpt-4o'}, 'create'), contains="must be a dict like {'model'")
test_fail(lambda: _check_options({'cahce': 'readWrite'}, 'create'), contains="unknown openpipe option(s) ['cahce']")

# %% [md]
# ## One call, from request to log
#
# `_Call` holds everything about one `create` call that the sync and async clients share: the request as the caller
# wrote it (what the log's `input` shows), the merged options and tags, the cache key, and the bookkeeping of each
# attempt. The two clients differ only in how they wait on I/O.
#
# Messages may be SDK objects (a `ChatCompletionMessage` passed back into the next turn is common): they are turned
# into plain dicts once, here, so the log, the cache key and the translators all see the same JSON.

# %%
#| export
_OMITTED = (openai.NotGiven, openai.Omit)

def _plain(value):
    "A JSON-ready copy of a request value (SDK objects become dicts; omitted values disappear)."
    if isinstance(value, dict): return {k: _plain(v) for k, v in value.items() if not isinstance(v, (openai.NotGiven, openai.Omit))}
    if isinstance(value, (list, tuple)): return [_plain(v) for v in value]
    if hasattr(value, 'model_dump'): return value.model_dump(mode='json', exclude_none=True)
    return value

def _status_of(exc) -> tuple[int | None, str, object]:
    "(status code, error message, response body) of an exception from an attempt."
    if isinstance(exc, openai.APIStatusError): return exc.status_code, str(exc), exc.body
    if isinstance(exc, openai.APITimeoutError): return None, f"timeout: {exc}", None
    return None, f"{type(exc).__name__}: {exc}", None

def _seconds(timeout) -> float | None:
    if timeout is None or isinstance(timeout, (openai.NotGiven, openai.Omit)): return None
    if isinstance(timeout, (int, float)): return float(timeout)
    return getattr(timeout, 'read', None) or getattr(timeout, 'connect', None)

class _Call:
    "The state of one `chat.completions.create` call: request, options, attempts and their logs."
    def __init__(self, client, kwargs: dict, openpipe):
        opts = client.openpipe_options
        if openpipe is not None:
            call_opts = _check_options(openpipe, 'chat.completions.create')
            if opts.get('tags') and call_opts.get('tags'): call_opts['tags'] = {**opts['tags'], **call_opts['tags']}
            opts = {**opts, **call_opts}
        self.client, self.opts = client, opts
        self.transport = {k: kwargs.pop(k) for k in _TRANSPORT if k in kwargs}
        req = kwargs  # a fresh dict (**kwargs): ours to change
        for k in [k for k, v in req.items() if isinstance(v, _OMITTED)]: del req[k]
        msgs = req.get('messages')
        if msgs is not None: req['messages'] = [m if type(m) is dict else _plain(m) for m in msgs]
        if 'tools' in req: req['tools'] = [t if type(t) is dict else _plain(t) for t in req['tools']]
        for k in ('response_format', 'tool_choice', 'stream_options'):
            if k in req and not isinstance(req[k], (str, dict, type(None))): req[k] = _plain(req[k])
        self.request, self.stream = req, bool(req.get('stream'))
        self.include_usage = bool((req.get('stream_options') or {}).get('include_usage'))
        self.record_on = opts.get('store') is not False
        if self.record_on:
            tags = req.get('metadata') or {}
            if opts.get('tags'): tags = {**opts['tags'], **tags}
            if any(type(v) is not str for v in tags.values()): tags = _check_tags(tags, 'metadata')
            self.tags = {**tags, **_SDK_TAGS}
        self.cache = opts.get('cache') or None
        self.parent_id = self.route = None

    # -- the store -------------------------------------------------------------------------------------------
    @property
    def store(self): return self.client.store

    def log(self, *, model, result=None, error=None, requested_at, stream=False, cache_hit=False, resp=None,
            completion_id=None, usage=None, provider=None) -> str | None:
        "Record one attempt (enqueue only) and return its log id."
        if not self.record_on: return None
        received = now_ms()
        status, message, body = (200, None, None) if error is None else _status_of(error)
        if error is not None and isinstance(error, _StreamClosed): status, message = 200, str(error)
        payload = resp if resp is not None else (result if result is not None else body)
        request = self.request if model == self.request.get('model') else {**self.request, 'model': model}
        fields = dict(model=model, resp_payload=payload, status_code=status, error_message=message, requested_at=requested_at,
                      received_at=received, tags=self.tags, completion_id=completion_id, provider=provider,
                      cache_hit=cache_hit, stream=stream, parent_id=self.parent_id, source='client',
                      prompt_tokens=usage[0] if usage else None, completion_tokens=usage[1] if usage else None,
                      duration_ms=received - requested_at)
        try: return self.store.record(req_payload=request, **fields)
        except TypeError:  # an SDK object nested inside a dict message: deep-convert, then log
            return self.store.record(req_payload=_plain(request), **fields)

    # -- the cache -------------------------------------------------------------------------------------------
    @cached_property
    def cache_key(self) -> str:
        "Hash of the model and every request field that can change the output."
        fields = {k: v for k, v in self.request.items() if k not in _NOT_OUTPUT}
        if self.transport.get('extra_body'): fields['extra_body'] = self.transport['extra_body']  # e.g. vLLM's top_k
        return content_hash(fields)

    def cache_get(self) -> dict | None:
        "The cached completion for this request, if any and not expired (counts the hit)."
        if self.cache not in ('readWrite', 'readOnly'): return None
        t = tables.cache
        with self.store.db.begin() as c:
            text = c.execute(sa.select(t.c.response).where(t.c.key == self.cache_key, t.c.expires_at > now_ms())).scalar()
            if text is None: return None
            c.execute(t.update().where(t.c.key == self.cache_key).values(hits=t.c.hits + 1))
        return loads(text)

    def cache_put(self, completion: dict):
        "Store a completion under this request's key for one week."
        if self.cache not in ('readWrite', 'writeOnly'): return
        t, now = tables.cache, now_ms()
        with self.store.db.begin() as c:
            c.execute(t.delete().where(t.c.key == self.cache_key))
            c.execute(t.insert().values(key=self.cache_key, model=self.request.get('model'), created_at=now,
                                        expires_at=now + CACHE_TTL_MS, response=dumps(completion), hits=0))

    # -- preparing an attempt --------------------------------------------------------------------------------
    def prepare(self, model: str):
        "(route, upstream body, transport kwargs) for an attempt on `model`."
        route = resolve(model, self.client._store)
        body = {**self.request, 'model': route.name}
        if 'metadata' in body and not body.get('store'): del body['metadata']
        if route.pruning_rules: body['messages'] = apply_pruning_rules(body['messages'], list(route.pruning_rules))
        if self.stream and not route.translated and not self.include_usage:
            body['stream_options'] = {**(body.get('stream_options') or {}), 'include_usage': True}
        return route, body

    def fallback_timeout(self):
        fb = self.opts['fallback']
        return fb['timeout'] if fb.get('timeout') is not None else self.transport.get('timeout', openai.NOT_GIVEN)

    def fallback_client_call(self, fb_client, timeout):
        "(route, kwargs) for the fallback attempt made by a `fallback_client`."
        from openpipe_lab.providers import Route
        model = self.opts['fallback']['model']
        body = {**self.request, 'model': model, **self.transport, 'timeout': timeout}
        if 'metadata' in body and not body.get('store'): del body['metadata']
        if isinstance(fb_client, (OpenAI, AsyncOpenAI)): body['openpipe'] = {'store': False}  # we log it, linked
        return Route(model, 'fallback_client', 'openai', model, base_url=str(fb_client.base_url)), body

    # -- failures --------------------------------------------------------------------------------------------
    def first_failed(self, error, requested_at) -> bool:
        "Log the failed first attempt; True when a fallback is configured."
        model = self.request.get('model')
        self.parent_id = self.log(model=model, error=error, requested_at=requested_at, provider=_provider_of(model))
        return bool(self.opts.get('fallback'))

    def fallback_failed(self, error, requested_at):
        "Log the failed fallback attempt (linked to the first)."
        model = self.opts['fallback']['model']
        self.log(model=model, error=error, requested_at=requested_at, provider=_provider_of(model))

    # -- finishing -------------------------------------------------------------------------------------------
    def cached_answer(self, stream_cls):
        "The cached answer (a completion, or a replayed stream), logged as a hit; None on a miss."
        cached = self.cache_get() if self.cache else None
        if cached is None: return None
        self.replay(cached, now_ms())
        if self.stream: return stream_cls(completion_chunks(cached, self.include_usage), self.client)
        return ChatCompletion.model_validate(cached)

    def done(self, route, result, requested_at):
        "Record a successful non-streamed completion and cache it; returns it."
        if not route.uses_client: result.model = route.model
        u = result.usage
        self.log(model=route.model, result=result, requested_at=requested_at, completion_id=result.id,
                 usage=(u.prompt_tokens, u.completion_tokens) if u else None, provider=route.provider)
        if self.cache: self.cache_put(result.model_dump(mode='json', exclude_unset=True))
        return result

    def stream_done(self, route, chunks, error, requested_at):
        "Record (and cache) a stream once it has ended, failed or been closed."
        if error is None and self.cache and chunks: self.cache_put(assemble_chunks([c.model_dump(mode='json', exclude_unset=True) for c in chunks]))
        usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
        self.log(model=route.model, result=_Assembled(chunks) if chunks else None, error=error, requested_at=requested_at,
                 stream=True, completion_id=chunks[0].id if chunks else None, provider=route.provider,
                 usage=(usage.prompt_tokens, usage.completion_tokens) if usage else None)

    def replay(self, cached: dict, requested_at):
        "The cached completion as the caller asked for it (a completion or a stream), logged as a cache hit."
        u = cached.get('usage') or {}
        self.log(model=self.request.get('model'), resp=cached, requested_at=requested_at, cache_hit=True, stream=self.stream,
                 completion_id=cached.get('id'), usage=(u.get('prompt_tokens'), u.get('completion_tokens')), provider='cache')
        return cached

class _StreamClosed(Exception):
    "The caller closed a stream before it ended."

class _Assembled:
    "A stream's chunks, assembled into a completion only when the log writer serialises them (off the caller's thread)."
    __slots__ = ('chunks',)
    def __init__(self, chunks): self.chunks = chunks
    def model_dump(self, **kw): return assemble_chunks([c.model_dump(mode='json', exclude_unset=True) for c in self.chunks])

_SDK_TAGS = {'$sdk': 'python', '$sdk.version': f'openpipe_lab-{__version__}'}

# %% [md]
# ## Streams
#
# A streamed call is logged when the stream ends (or fails, or the caller closes it), with the completion it
# added up to. We keep the SDK's own `openai.Stream` object and only wrap its chunk iterator (and give it a
# `close()` that also logs, by switching it to a subclass), so `isinstance`, `with stream:` and `stream.close()`
# behave as usual. Translated and replayed streams are `openai.Stream`s too
# (a small subclass fed with chunk dicts instead of server-sent events).
#
# For usage to reach the log, OpenAI-compatible streams are requested with `stream_options.include_usage`; when the
# caller did not ask for it, the extra usage-only chunk is swallowed, so they see exactly what OpenAI would send.

# %%
#| exporti
def _hidden(chunk, include_usage) -> bool:
    return not include_usage and not chunk.choices and chunk.usage is not None

class _StreamLog:
    "Logs a stream exactly once: when it ends, fails, or is closed (even if it was never iterated)."
    __slots__ = ('call', 'route', 'requested_at', 'got', 'logged')
    def __init__(self, call, route, requested_at): self.call, self.route, self.requested_at, self.got, self.logged = call, route, requested_at, [], False
    def end(self, error=None):
        if self.logged: return
        self.logged = True
        self.call.stream_done(self.route, self.got, error, self.requested_at)
    def closed(self): self.end(_StreamClosed(f"the caller closed the stream after {len(self.got)} chunks"))

def _wrap_stream(call, route, stream, requested_at):
    inner, rewrite, log = stream._iterator, None if route.uses_client else route.model, _StreamLog(call, route, requested_at)
    def chunks():
        try:
            for c in inner:
                if rewrite: c.model = rewrite
                log.got.append(c)
                if not _hidden(c, call.include_usage): yield c
        except GeneratorExit: log.closed(); raise
        except Exception as e: log.end(e); raise
        log.end()
    stream._iterator, stream._lab_log = chunks(), log
    if type(stream) is openai.Stream: stream.__class__ = LoggedStream  # same object, a close() that also logs
    return stream

def _wrap_async_stream(call, route, stream, requested_at):
    inner, rewrite, log = stream._iterator, None if route.uses_client else route.model, _StreamLog(call, route, requested_at)
    async def chunks():
        try:
            async for c in inner:
                if rewrite: c.model = rewrite
                log.got.append(c)
                if not _hidden(c, call.include_usage): yield c
        except GeneratorExit: log.closed(); raise
        except Exception as e: log.end(e); raise
        log.end()
    stream._iterator, stream._lab_log = chunks(), log
    if type(stream) is openai.AsyncStream: stream.__class__ = AsyncLoggedStream
    return stream

class LoggedStream(openai.Stream):
    "An `openai.Stream` whose `close()` also logs the call (with the chunks received so far)."
    def close(self):
        log = getattr(self, '_lab_log', None)
        if log is not None: self._iterator.close(); log.closed()
        super().close()

class AsyncLoggedStream(openai.AsyncStream):
    "An `openai.AsyncStream` whose `close()` also logs the call."
    async def close(self):
        log = getattr(self, '_lab_log', None)
        if log is not None: await self._iterator.aclose(); log.closed()
        await super().close()

def _fake_response(url: str) -> httpx2.Response:
    return httpx2.Response(200, request=httpx2.Request('POST', url or 'http://openpipe-lab.local'))

class ChunkStream(LoggedStream):
    "An `openai.Stream` of `ChatCompletionChunk` fed from chunk dicts (translated providers, cache replays)."
    def __init__(self, chunks, client, url: str | None = None):
        self.response, self._cast_to, self._client, self._options = _fake_response(url), ChatCompletionChunk, client, None
        self._source = chunks
        self._iterator = (ChatCompletionChunk.model_validate(c) for c in chunks)
    def close(self):
        if hasattr(self._source, 'close'): self._source.close()
        super().close()

class AsyncChunkStream(AsyncLoggedStream):
    "An `openai.AsyncStream` of `ChatCompletionChunk` fed from chunk dicts (sync or async iterables)."
    def __init__(self, chunks, client, url: str | None = None):
        self.response, self._cast_to, self._client, self._options = _fake_response(url), ChatCompletionChunk, client, None
        self._source = chunks
        async def gen():
            if hasattr(chunks, '__aiter__'):
                async for c in chunks: yield ChatCompletionChunk.model_validate(c)
            else:
                for c in chunks: yield ChatCompletionChunk.model_validate(c)
        self._iterator = gen()
    async def close(self):
        if hasattr(self._source, 'aclose'): await self._source.aclose()
        await super().close()

# %% [md]
# ## The sync client
#
# `_create` is the whole algorithm: cache lookup, first attempt, on failure a logged fallback attempt linked to the
# first by `parent_id`, then logging (and caching) of the answer. An attempt goes through `_attempt`, which picks
# the path by route: this client's own connection for OpenAI ids, a plain SDK client for OpenAI-compatible
# providers and deployments, or a translating backend for Anthropic and Gemini.

# %%
#| export
def _unreachable(e, route):
    "A connection error that names the model id, the URL and (for deployments) what to check."
    if isinstance(e, openai.APITimeoutError): return e
    hint = (f"; is deployment {route.deployment_id} still running? Deployment.list() shows it, "
            f"Deployment([...]).start() starts a new one" if route.deployment_id else '')
    return openai.APIConnectionError(message=f"{route.model}: cannot connect to {route.base_url} ({e}){hint}", request=e.request)

_NO_KEY = 'openpipe-lab-no-openai-key'

def _default_key(kwargs: dict) -> dict:
    "Let a client be built without OPENAI_API_KEY: only calls that really go to OpenAI need it (checked per call)."
    if kwargs.get('api_key') is None and not os.environ.get('OPENAI_API_KEY'): kwargs['api_key'] = _NO_KEY
    return kwargs

def _check_openai_key(client, model):
    if client.api_key == _NO_KEY and 'api.openai.com' in str(client.base_url):
        raise MissingAPIKeyError(f"model {model!r} is sent to OpenAI, but OPENAI_API_KEY is not set: export OPENAI_API_KEY=sk-... "
                                 "(or pass api_key=, or base_url= for an OpenAI-compatible server)")

def _attempt(comp, call, model, timeout):
    "One upstream call for `model`: returns (route, ChatCompletion or Stream)."
    route, body = call.prepare(model)
    extra = {**call.transport, 'timeout': timeout}
    client = comp._client
    if route.uses_client:
        _check_openai_key(client, model)
        return route, _SDKCompletions.create(comp, **body, **extra)
    if not route.translated:
        sdk = backend(route, client._backends, max_retries=client.max_retries)
        try: return route, sdk.chat.completions.create(**body, **extra)
        except openai.APIConnectionError as e: raise _unreachable(e, route) from e
    out = backend(route, client._backends, max_retries=client.max_retries).create(body, call.stream, _seconds(timeout) or _seconds(client.timeout))
    return route, (ChunkStream(out, client, route.base_url) if call.stream else ChatCompletion.model_validate(out))

def _fallback_attempt(comp, call, timeout):
    fb_client = comp._client.fallback_client
    if fb_client is None: return _attempt(comp, call, call.opts['fallback']['model'], timeout)
    route, body = call.fallback_client_call(fb_client, timeout)
    return route, fb_client.chat.completions.create(**body)

def _raw_split(result, stream_type):
    "(raw response or None, parsed result): `with_raw_response` hands us the raw wrapper; we log what it parses to."
    if isinstance(result, (ChatCompletion, stream_type)) or not hasattr(result, 'parse'): return None, result
    return result, result.parse()

def _create(comp, kwargs, openpipe):
    call = _Call(comp._client, kwargs, openpipe)
    hit = call.cached_answer(ChunkStream)
    if hit is not None: return hit
    requested_at = now_ms()
    try: route, result = _attempt(comp, call, call.request.get('model'), call.transport.get('timeout', openai.NOT_GIVEN))
    except Exception as e:
        if not call.first_failed(e, requested_at): raise
        requested_at = now_ms()
        try: route, result = _fallback_attempt(comp, call, call.fallback_timeout())
        except Exception as e2: call.fallback_failed(e2, requested_at); raise
    raw, result = _raw_split(result, openai.Stream)
    out = _wrap_stream(call, route, result, requested_at) if call.stream else call.done(route, result, requested_at)
    return out if raw is None else raw

def _provider_of(model) -> str | None:
    if not isinstance(model, str): return None
    prefix, sep, _ = model.partition(':')
    return prefix if sep else 'openai'

# %% [md]
# The SDK classes are subclassed, not patched: `OpenAI.chat` returns our `Chat`, whose `completions` is our
# `Completions`; everything else (`models`, `embeddings`, `files`, ...) is the SDK's, untouched. `copy()` /
# `with_options()` keep the store and options. `chat.completions.with_raw_response.create(...)` works for models
# routed through this client's own connection (bare and `openai:` ids): the raw response comes back, the parsed
# completion is logged.

# %%
#| export
class Completions(_SDKCompletions):
    "`chat.completions` with routing, logging, `openpipe={...}` options, caching and fallback."
    def __init__(self, client  # the lab `OpenAI` client
                ): super().__init__(client)

    @delegates(_SDKCompletions.create)
    def create(self, *, openpipe: dict | None = None,  # {'cache', 'fallback', 'store', 'tags'} for this call
               **kwargs):
        "Create a chat completion (any routed model id); the SDK's `ChatCompletion` or `Stream` comes back."
        return _create(self, kwargs, openpipe)

class Chat(_SDKChat):
    "`client.chat`: the SDK's chat resource with our `completions`."
    def __init__(self, client  # the lab `OpenAI` client
                ): super().__init__(client)

    @cached_property
    def completions(self) -> Completions: return Completions(self._client)

class _LabClient:
    "What our sync and async clients add to the SDK's: the lab store, openpipe defaults and the fallback client."
    def _lab_init(self, store, openpipe, fallback_client):
        opts = dict(openpipe or {})
        self.fallback_client = fallback_client if fallback_client is not None else opts.get('fallback_client')
        self.openpipe_options = _check_options(opts, type(self).__name__)
        if store is not None:
            from openpipe_lab.logstore import LogStore
            if not isinstance(store, LogStore): raise ConfigError(f"store= must be a LogStore (or None for the default lab), got {type(store).__name__}")
        self._store, self._backends = store, {}

    @property
    def store(self):
        "The `LogStore` calls are recorded in (the default lab unless one was given)."
        if self._store is None:
            from openpipe_lab.logstore import get_store
            self._store = get_store()
        return self._store

    def _lab_copy_kwargs(self, kw):
        kw['_extra_kwargs'] = {'store': self._store, 'openpipe': self.openpipe_options, 'fallback_client': self.fallback_client,
                               **(kw.get('_extra_kwargs') or {})}
        return kw

class OpenAI(_LabClient, openai.OpenAI):
    "A drop-in `openai.OpenAI` that routes model ids, records every chat completion in the lab, caches and falls back."
    @delegates(openai.OpenAI.__init__)
    def __init__(self, *, store=None,  # LogStore to record in; None: the default lab
                 openpipe: dict | None = None,  # default options for every call: cache, fallback, store, tags
                 fallback_client=None,  # an OpenAI-compatible client for fallback attempts
                 **kwargs):
        super().__init__(**_default_key(kwargs))
        self._lab_init(store, openpipe, fallback_client)

    @cached_property
    def chat(self) -> Chat: return Chat(self)

    def copy(self, **kwargs): return super().copy(**self._lab_copy_kwargs(kwargs))
    with_options = copy

# %% [md]
# In the notebook we talk to an in-process fake of the OpenAI API (an `httpx2.MockTransport`, no port, no
# network); `tests/` does the same over loopback HTTP with the real SDKs of all three providers.

# %%
import tempfile
from openpipe_lab.logstore import LogStore

def fake_openai(request: httpx2.Request) -> httpx2.Response:
    "A tiny OpenAI: echoes the last user message; 'fail:<code>' answers that HTTP error."
    body = json.loads(request.content)
    text = body['messages'][-1]['content']
    if text.startswith('fail:'):
        return httpx2.Response(int(text[5:]), json={'error': {'message': f'failed with {text[5:]}', 'type': 'server_error'}})
    n = body.get('n') or 1
    return httpx2.Response(200, json={
        'id': f'chatcmpl-{len(text)}', 'object': 'chat.completion', 'created': 1700000000, 'model': body['model'],
        'choices': [{'index': i, 'message': {'role': 'assistant', 'content': f'echo: {text}'}, 'finish_reason': 'stop'} for i in range(n)],
        'usage': {'prompt_tokens': 5, 'completion_tokens': 3, 'total_tokens': 8}})

lab = LogStore(tempfile.mkdtemp() + '/lab.db')
client = OpenAI(store=lab, api_key='sk-test', base_url='http://fake/v1', max_retries=0,  # same as lab.openai(...)
                http_client=httpx2.Client(transport=httpx2.MockTransport(fake_openai)))
completion = client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'count to 3'}],
                                            metadata={'prompt_id': 'counting'})
assert isinstance(completion, ChatCompletion) and isinstance(client, openai.OpenAI)
completion.choices[0].message.content

# %% [md]
# The log holds the request as written, the response, the tags, the token counts and the completion id, and the
# spec's export format (`{input, output, tags}`) comes out of it:

# %%
lab.flush()
log = next(iter(lab.filter(prompt_id='counting')))
test_eq((log['model'], log['status_code'], log['completion_id'], log['prompt_tokens'], log['cache_hit']),
        ('gpt-4o-mini', 200, 'chatcmpl-10', 5, False))
test_eq(log['req_payload'], {'model': 'gpt-4o-mini', 'messages': [{'role': 'user', 'content': 'count to 3'}], 'metadata': {'prompt_id': 'counting'}})
test_eq(log['resp_payload']['choices'][0]['message']['content'], 'echo: count to 3')
test_eq(log['tags'], {'prompt_id': 'counting', '$sdk': 'python', '$sdk.version': 'openpipe_lab-0.1.0'})
path = tempfile.mkdtemp() + '/logs.jsonl'
lab.filter(prompt_id='counting').export(path)
sorted(json.loads(open(path).readline()))

# %% [md]
# `metadata` went into the log's tags, not upstream; HTTP errors are recorded with their status code and then
# raised as the SDK's own exception; `store: False` records nothing.

# %%
seen = []
client2 = OpenAI(store=lab, api_key='sk-test', base_url='http://fake/v1', max_retries=0,
                 http_client=httpx2.Client(transport=httpx2.MockTransport(lambda r: seen.append(json.loads(r.content)) or fake_openai(r))))
client2.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}], metadata={'prompt_id': 'p'})
assert 'metadata' not in seen[-1]
test_fail(lambda: client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'fail:429'}],
                                                 metadata={'prompt_id': 'errors'}), contains='failed with 429')
client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'secret'}],
                               metadata={'prompt_id': 'private'}, openpipe={'store': False})
lab.flush()
err = next(iter(lab.filter(prompt_id='errors')))
test_eq((err['status_code'], 'failed with 429' in err['error_message']), (429, True))
test_eq(len(lab.filter(prompt_id='private')), 0)

# %% [md]
# ## Caching
#
# With `openpipe={"cache": "readWrite"}` a request identical in every output-affecting field (model, messages,
# tools, temperature, `n`, ... but not `metadata`, `stream` or `user`) is answered from the lab's `cache` table
# for a week. The key is `content_hash` (notebook 01) of those fields, so a notebook and a script share entries.
# `readOnly` reads without writing and `writeOnly` refreshes entries without reading them. Hits are logged with
# `cache_hit=True`; a streamed request is answered by replaying the cached completion as a stream.
#
# Cache reads and writes are synchronous database calls on the caller's thread (the point of `readOnly` is to
# see what an earlier call wrote); with caching off, the default, none happen.

# %%
msgs = [{'role': 'user', 'content': 'cache me'}]
first = client.chat.completions.create(model='gpt-4o-mini', messages=msgs, openpipe={'cache': 'readWrite'}, metadata={'prompt_id': 'c'})
again = client2.chat.completions.create(model='gpt-4o-mini', messages=msgs, openpipe={'cache': 'readOnly'}, metadata={'prompt_id': 'c'})
calls = len(seen)
test_eq(again.choices[0].message.content, first.choices[0].message.content)
streamed = client2.chat.completions.create(model='gpt-4o-mini', messages=msgs, stream=True, openpipe={'cache': 'readOnly'})
test_eq(''.join(c.choices[0].delta.content or '' for c in streamed), 'echo: cache me')
test_eq(len(seen), calls)  # neither call reached the upstream
lab.flush()
test_eq([r['cache_hit'] for r in sorted(lab.filter(prompt_id='c'), key=lambda r: r['id'])], [False, True])
with lab.db.begin() as c: c.execute(tables.cache.update().values(expires_at=now_ms() - 1))   # a week later
client2.chat.completions.create(model='gpt-4o-mini', messages=msgs, openpipe={'cache': 'readOnly'})
test_eq(len(seen), calls + 1)

# %% [md]
# ## Fallback
#
# `openpipe={"fallback": {"model": ..., "timeout": ...}}` retries a failed call (HTTP error, timeout, connection
# error, or a route that cannot be served, e.g. a fine-tuned model with no running deployment) on another model,
# through the same routing and translation, so a fallback from `openpipe:my-ft` to `anthropic:claude-3-5-sonnet`
# carries the tools across. The first attempt runs under the client's (or the request's) `timeout`, the fallback
# under its own `timeout` (default: the same). A `fallback_client` given to the constructor (or in its `openpipe`
# options, as in the hosted SDK) makes the fallback call instead. Both attempts are logged, the second with
# `parent_id` pointing at the first.

# %%
ok = client.chat.completions.create(model='openpipe:not-deployed', messages=[{'role': 'user', 'content': 'hello'}],
                                    metadata={'prompt_id': 'fb'}, openpipe={'fallback': {'model': 'gpt-4o-mini'}})
test_eq(ok.choices[0].message.content, 'echo: hello')
lab.flush()
first_try, second_try = sorted(lab.filter(prompt_id='fb'), key=lambda r: r['id'])
test_eq((first_try['model'], second_try['model'], second_try['parent_id']), ('openpipe:not-deployed', 'gpt-4o-mini', first_try['id']))
assert 'no running deployment for slug' in first_try['error_message']
first_try['error_message']

# %% [md]
# ## The async client
#
# `AsyncOpenAI` is the same algorithm awaiting I/O: the same `_Call`, the same routes (async SDK clients for the
# providers), `openai.AsyncStream` for streams. Route lookups for `openpipe:` ids and cache reads/writes are short
# synchronous database calls.

# %%
#| export
async def _aattempt(comp, call, model, timeout):
    "One async upstream call for `model`: returns (route, ChatCompletion or AsyncStream)."
    route, body = call.prepare(model)
    extra = {**call.transport, 'timeout': timeout}
    client = comp._client
    if route.uses_client:
        _check_openai_key(client, model)
        return route, await _SDKAsyncCompletions.create(comp, **body, **extra)
    if not route.translated:
        sdk = backend(route, client._backends, async_=True, max_retries=client.max_retries)
        try: return route, await sdk.chat.completions.create(**body, **extra)
        except openai.APIConnectionError as e: raise _unreachable(e, route) from e
    out = await backend(route, client._backends, async_=True, max_retries=client.max_retries).acreate(
        body, call.stream, _seconds(timeout) or _seconds(client.timeout))
    return route, (AsyncChunkStream(out, client, route.base_url) if call.stream else ChatCompletion.model_validate(out))

async def _afallback_attempt(comp, call, timeout):
    fb_client = comp._client.fallback_client
    if fb_client is None: return await _aattempt(comp, call, call.opts['fallback']['model'], timeout)
    route, body = call.fallback_client_call(fb_client, timeout)
    result = fb_client.chat.completions.create(**body)
    return route, (await result if hasattr(result, '__await__') else result)

async def _acreate(comp, kwargs, openpipe):
    call = _Call(comp._client, kwargs, openpipe)
    hit = call.cached_answer(AsyncChunkStream)
    if hit is not None: return hit
    requested_at = now_ms()
    try: route, result = await _aattempt(comp, call, call.request.get('model'), call.transport.get('timeout', openai.NOT_GIVEN))
    except Exception as e:
        if not call.first_failed(e, requested_at): raise
        requested_at = now_ms()
        try: route, result = await _afallback_attempt(comp, call, call.fallback_timeout())
        except Exception as e2: call.fallback_failed(e2, requested_at); raise
    raw, result = _raw_split(result, openai.AsyncStream)
    if raw is not None and hasattr(result, '__await__'): result = await result  # async `with_streaming_response`
    out = _wrap_async_stream(call, route, result, requested_at) if call.stream else call.done(route, result, requested_at)
    return out if raw is None else raw

class AsyncCompletions(_SDKAsyncCompletions):
    "Async `chat.completions` with routing, logging, `openpipe={...}` options, caching and fallback."
    def __init__(self, client  # the lab `AsyncOpenAI` client
                ): super().__init__(client)

    @delegates(_SDKAsyncCompletions.create)
    async def create(self, *, openpipe: dict | None = None,  # {'cache', 'fallback', 'store', 'tags'} for this call
                     **kwargs):
        "Create a chat completion (any routed model id); the SDK's `ChatCompletion` or `AsyncStream` comes back."
        return await _acreate(self, kwargs, openpipe)

class AsyncChat(_SDKAsyncChat):
    "`client.chat` of the async client, with our `completions`."
    def __init__(self, client  # the lab `AsyncOpenAI` client
                ): super().__init__(client)

    @cached_property
    def completions(self) -> AsyncCompletions: return AsyncCompletions(self._client)

class AsyncOpenAI(_LabClient, openai.AsyncOpenAI):
    "A drop-in `openai.AsyncOpenAI` that routes model ids, records every chat completion in the lab, caches and falls back."
    @delegates(openai.AsyncOpenAI.__init__)
    def __init__(self, *, store=None,  # LogStore to record in; None: the default lab
                 openpipe: dict | None = None,  # default options for every call: cache, fallback, store, tags
                 fallback_client=None,  # an OpenAI-compatible (async) client for fallback attempts
                 **kwargs):
        super().__init__(**_default_key(kwargs))
        self._lab_init(store, openpipe, fallback_client)

    @cached_property
    def chat(self) -> AsyncChat: return AsyncChat(self)

    def copy(self, **kwargs): return super().copy(**self._lab_copy_kwargs(kwargs))
    with_options = copy

# %%
async def demo():
    aclient = AsyncOpenAI(store=lab, api_key='sk-test', base_url='http://fake/v1', max_retries=0,  # lab.async_openai(...)
                          http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(fake_openai)))
    c = await aclient.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'async hi'}],
                                              metadata={'prompt_id': 'async'})
    copy = aclient.with_options(timeout=5)
    assert copy.store is lab and isinstance(copy, AsyncOpenAI)
    return c.choices[0].message.content

test_eq(await demo(), 'echo: async hi')
lab.flush()
test_eq(len(lab.filter(prompt_id='async')), 1)

# %% [md]
# ### No OpenAI key needed for local models
#
# A lab client is often used only for `openpipe:<slug>` deployments, Anthropic or Gemini, so it can be built
# without `OPENAI_API_KEY`; only a call that really goes to api.openai.com needs the key, and says so:

# %%
saved = os.environ.pop('OPENAI_API_KEY', None)
try:
    keyless = lab.openai()
    test_fail(lambda: keyless.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}]),
              contains='OPENAI_API_KEY is not set')
finally:
    if saved is not None: os.environ['OPENAI_API_KEY'] = saved

# %% [md]
# ## What logging costs
#
# `bench/client_overhead.py` calls the plain `openai` client, this client and LiteLLM's `completion` with a logging
# callback side by side (interleaved call by call, shuffled) against a local fake upstream, and measures wall
# latency and the CPU time of the calling thread per call. On the 2-core development machine (load average ~5
# from other work, so figures move by ±30 µs between runs; openai 3.57, litellm 1.110.2, 3000 calls per client):
#
# | | added caller-thread CPU p50 | added wall p50 | calls/s over loopback |
# |---|---:|---:|---:|
# | this client: our layer alone (SDK request stubbed, warm caches) | 16 µs | | |
# | this client, end to end (in-process transport / loopback HTTP) | 61 µs / 64 µs | +159 µs / −70 µs | 256 (plain 253) |
# | LiteLLM `completion` + callback (in-process / loopback) | 2351 µs / 2647 µs | +2994 µs / +2847 µs | 122 |
#
# End to end our layer runs with caches cold from the SDK's ~1 ms of work per call, which is why it costs more than
# alone; about 24 µs of it is `LogStore.record` serialising the request and enqueueing the row. The plain `openai`
# client spends ~1 ms of CPU per call, so logging is a few percent of a call and ~40× cheaper than LiteLLM's path.
# The database write itself happens on the log writer's thread; in one Python process it still shares the GIL and
# the cores with the caller, which is part of what the wall figures show.
