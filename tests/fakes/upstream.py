"""Loopback fake upstreams that speak the real wire formats of the OpenAI chat completions API (JSON and SSE),
the Anthropic Messages API (JSON and SSE events) and the Gemini `generateContent` / `streamGenerateContent`
REST API, so tests can drive the real `openai`, `anthropic` and `google-genai` SDKs without a network.

One server answers all three APIs on one port:

    with FakeUpstream() as up:                      # or FakeOpenAI() / FakeAnthropic() / FakeGemini()
        client = openai.OpenAI(base_url=up.openai_url, api_key="k")
        up.script(Reply(text="hi"), Reply(status=429), Reply(delay=2))   # consumed in order, then the default
        client.chat.completions.create(model="m", messages=[...])
        up.requests[-1].json                            # what the SDK sent (path, headers, query too)

`Reply` fields: `text`, `tool_calls` ([{"name":..., "arguments": {...}}]), `status` (an HTTP error such as
429/500 with the provider's own error body), `delay` (seconds before answering: timeouts), `finish_reason`
(OpenAI spelling; translated per provider), `usage` ((prompt, completion) tokens), `body` (raw JSON to return
as is), `logprobs` (OpenAI `choice.logprobs.content`). `FakeUpstream(responder=fn)` answers each request with
`fn(received)` when the script is empty (thread-safe per-request replies, e.g. a verdict per judged row). Without a script every call gets the default reply: text "echo: <last user text>".
"""
from __future__ import annotations
import json, re, threading, time, uuid, itertools
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

__all__ = ['Reply', 'Received', 'FakeUpstream', 'FakeOpenAI', 'FakeAnthropic', 'FakeGemini']


@dataclass
class Reply:
    "One scripted answer; `n` choices/candidates are generated from it when the request asks for several."
    text: str | None = None
    tool_calls: list | None = None      # [{"name": "f", "arguments": {...}}]
    status: int = 200                   # >= 400: answer with the provider's error body
    delay: float = 0.0                  # seconds to wait before answering (client timeouts)
    finish_reason: str | None = None    # stop | length | tool_calls (OpenAI spelling)
    usage: tuple = (11, 7)              # (prompt tokens, completion tokens)
    body: dict | None = None            # raw JSON body to send instead of a generated one
    message: str = 'scripted failure'   # error message for status >= 400
    stream_error_after: int | None = None  # OpenAI SSE: send an error event (as OpenAI does) after this many chunks
    logprobs: list | None = None        # OpenAI `choice.logprobs.content` entries, sent as is (non-streaming replies)


@dataclass
class Received:
    "A request the fake received."
    method: str
    path: str
    query: dict
    headers: dict
    json: dict | None
    api: str   # openai | azure | anthropic | gemini


def _last_user_text(messages) -> str:
    for m in reversed(messages or []):
        role = m.get('role')
        if role not in ('user', None): continue
        c = m.get('content', m.get('parts'))
        if isinstance(c, str): return c
        for part in c or []:
            if isinstance(part, dict) and part.get('text'): return part['text']
    return ''


def _pieces(text: str, size: int = 4):
    return [text[i:i + size] for i in range(0, len(text), size)] or ['']


class FakeUpstream:
    "A loopback HTTP server speaking the OpenAI, Anthropic and Gemini wire formats (see module docstring)."
    api = None

    def __init__(self, default: Reply | None = None,
                 responder=None):  # callable(Received) -> Reply | None, asked when the script is empty (per-row verdicts)
        self.default, self.responder = default, responder
        self.requests: list[Received] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server = None

    # lifecycle ---------------------------------------------------------------------------------------------
    def start(self):
        if self._server: return self
        handler = type('Handler', (_Handler,), {'fake': self})
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown(); self._server.server_close(); self._server = None

    __enter__ = start
    def __exit__(self, *exc): self.stop()

    @property
    def port(self) -> int: return self._server.server_address[1]
    @property
    def root(self) -> str: return f"http://127.0.0.1:{self.port}"
    @property
    def openai_url(self) -> str: return self.root + '/v1'
    @property
    def anthropic_url(self) -> str: return self.root
    @property
    def gemini_url(self) -> str: return self.root
    @property
    def base_url(self) -> str:
        return {'anthropic': self.anthropic_url, 'gemini': self.gemini_url}.get(self.api, self.openai_url)

    # scripting ---------------------------------------------------------------------------------------------
    def script(self, *replies: Reply):
        "Queue replies, consumed one per request in order; afterwards the default reply is used."
        with self._lock: self._script.extend(replies)
        return self

    def reset(self):
        with self._lock: self._script.clear(); self.requests.clear()
        return self

    @property
    def last(self) -> Received: return self.requests[-1]

    def _next_reply(self, req: Received) -> Reply:
        with self._lock:
            self.requests.append(req)
            if self._script: return self._script.pop(0)
        if self.responder is not None:
            reply = self.responder(req)
            if reply is not None: return reply
        return self.default or Reply()

    def _new_id(self, prefix): return f"{prefix}{next(self._ids):04d}{uuid.uuid4().hex[:8]}"


def FakeOpenAI(**kw):
    "A `FakeUpstream` whose `.base_url` is the OpenAI-style `http://127.0.0.1:PORT/v1`."
    f = FakeUpstream(**kw); f.api = 'openai'; return f

def FakeAnthropic(**kw):
    "A `FakeUpstream` whose `.base_url` is the Anthropic SDK's base URL."
    f = FakeUpstream(**kw); f.api = 'anthropic'; return f

def FakeGemini(**kw):
    "A `FakeUpstream` whose `.base_url` is the google-genai SDK's base URL (`http_options={'base_url': ...}`)."
    f = FakeUpstream(**kw); f.api = 'gemini'; return f


_GEMINI = re.compile(r'^/(?P<ver>v[^/]+)/models/(?P<model>[^:]+):(?P<method>generateContent|streamGenerateContent)$')
_AZURE = re.compile(r'^/openai/deployments/(?P<dep>[^/]+)/chat/completions$')


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stalls
    fake: FakeUpstream

    def log_message(self, *a): pass

    def do_GET(self):
        if self.path.startswith('/health'): return self._json(200, {'status': 'ok'})
        self._json(404, {'error': {'message': f'no route {self.path}'}})

    def do_POST(self):
        parts = urlsplit(self.path)
        n = int(self.headers.get('content-length') or 0)
        raw = self.rfile.read(n) if n else b''
        try: body = json.loads(raw) if raw else None
        except ValueError: body = None
        path = parts.path
        if path.endswith('/chat/completions'): api = 'azure' if _AZURE.match(path) else 'openai'
        elif path.endswith('/messages'): api = 'anthropic'
        elif _GEMINI.match(path): api = 'gemini'
        else: return self._json(404, {'error': {'message': f'no route {path}'}})
        req = Received('POST', path, {k: v[0] for k, v in parse_qs(parts.query).items()},
                       {k.lower(): v for k, v in self.headers.items()}, body, api)
        reply = self.fake._next_reply(req)
        if reply.delay: time.sleep(reply.delay)
        try: getattr(self, f'_{"openai" if api == "azure" else api}')(req, reply)
        except (BrokenPipeError, ConnectionResetError): pass

    # transport helpers -------------------------------------------------------------------------------------
    def _json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('content-type', 'application/json')
        self.send_header('content-length', str(len(data)))
        for k, v in (headers or {}).items(): self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _sse_start(self):
        self.send_response(200)
        self.send_header('content-type', 'text/event-stream')
        self.send_header('cache-control', 'no-cache')
        self.send_header('connection', 'close')
        self.end_headers()
        self.close_connection = True

    def _sse(self, data, event=None):
        msg = (f"event: {event}\n" if event else '') + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
        self.wfile.write(msg.encode()); self.wfile.flush()

    def _choices(self, req: Received, reply: Reply, n: int, messages):
        text = reply.text if (reply.text is not None or reply.tool_calls) else f"echo: {_last_user_text(messages)}"
        return [(text if n == 1 or text is None else f"{text} [{i}]") for i in range(n)]

    # OpenAI ------------------------------------------------------------------------------------------------
    def _openai(self, req: Received, reply: Reply):
        b = req.json or {}
        if reply.status >= 400:
            kind = {429: 'rate_limit_exceeded', 401: 'invalid_api_key'}.get(reply.status, 'server_error')
            return self._json(reply.status, reply.body or {'error': {'message': reply.message, 'type': kind, 'param': None, 'code': kind}},
                              {'x-should-retry': 'false'})
        if reply.body is not None: return self._json(200, reply.body)
        n, model = b.get('n') or 1, b.get('model') or req.path.split('/')[-3]
        texts = self._choices(req, reply, n, b.get('messages'))
        tcs = [{'id': f"call_{i}_{self.fake._new_id('')}", 'type': 'function',
                'function': {'name': t['name'], 'arguments': json.dumps(t.get('arguments', {}))}}
               for i, t in enumerate(reply.tool_calls or [])]
        finish = reply.finish_reason or ('tool_calls' if tcs else 'stop')
        pt, ct = reply.usage
        cid, created = self.fake._new_id('chatcmpl-'), int(time.time())
        if not b.get('stream'):
            choices = [{'index': i, 'message': {'role': 'assistant', 'content': t, 'refusal': None,
                                                 **({'tool_calls': tcs} if tcs else {})},
                        'logprobs': {'content': reply.logprobs, 'refusal': None} if reply.logprobs is not None else None,
                        'finish_reason': finish} for i, t in enumerate(texts)]
            return self._json(200, {'id': cid, 'object': 'chat.completion', 'created': created, 'model': model,
                                    'choices': choices, 'system_fingerprint': 'fp_fake',
                                    'usage': {'prompt_tokens': pt, 'completion_tokens': ct, 'total_tokens': pt + ct}})
        self._sse_start()
        base = {'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'system_fingerprint': 'fp_fake'}
        sent = 0
        def chunk(i, delta, fin=None):
            nonlocal sent
            if reply.stream_error_after is not None and sent >= reply.stream_error_after:
                self._sse({'error': {'message': reply.message, 'type': 'server_error', 'param': None, 'code': None}})
                raise BrokenPipeError
            self._sse({**base, 'choices': [{'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': fin}]}); sent += 1
        try:
            for i, t in enumerate(texts):
                chunk(i, {'role': 'assistant', 'content': ''})
                if t:
                    for p in _pieces(t): chunk(i, {'content': p})
                for k, tc in enumerate(tcs):
                    chunk(i, {'tool_calls': [{'index': k, 'id': tc['id'], 'type': 'function',
                                              'function': {'name': tc['function']['name'], 'arguments': ''}}]})
                    for p in _pieces(tc['function']['arguments'], 8):
                        chunk(i, {'tool_calls': [{'index': k, 'function': {'arguments': p}}]})
                chunk(i, {}, finish)
            if (b.get('stream_options') or {}).get('include_usage'):
                self._sse({**base, 'choices': [], 'usage': {'prompt_tokens': pt, 'completion_tokens': ct, 'total_tokens': pt + ct}})
            self._sse('[DONE]')
        except BrokenPipeError:
            self.wfile.flush(); self.connection.shutdown(2)

    # Anthropic ---------------------------------------------------------------------------------------------
    def _anthropic(self, req: Received, reply: Reply):
        b = req.json or {}
        if reply.status >= 400:
            kind = {429: 'rate_limit_error', 401: 'authentication_error', 400: 'invalid_request_error',
                    529: 'overloaded_error'}.get(reply.status, 'api_error')
            return self._json(reply.status, reply.body or {'type': 'error', 'error': {'type': kind, 'message': reply.message}},
                              {'x-should-retry': 'false'})
        if reply.body is not None: return self._json(200, reply.body)
        text = self._choices(req, reply, 1, b.get('messages'))[0]
        content = ([{'type': 'text', 'text': text}] if text else []) + [
            {'type': 'tool_use', 'id': self.fake._new_id('toolu_'), 'name': t['name'], 'input': t.get('arguments', {})}
            for t in reply.tool_calls or []]
        stop = {'stop': 'end_turn', 'length': 'max_tokens', 'tool_calls': 'tool_use'}[
            reply.finish_reason or ('tool_calls' if reply.tool_calls else 'stop')]
        pt, ct = reply.usage
        msg = {'id': self.fake._new_id('msg_'), 'type': 'message', 'role': 'assistant', 'model': b.get('model'),
               'content': content, 'stop_reason': stop, 'stop_sequence': None,
               'usage': {'input_tokens': pt, 'output_tokens': ct}}
        if not b.get('stream'): return self._json(200, msg)
        self._sse_start()
        self._sse({'type': 'message_start', 'message': {**msg, 'content': [], 'stop_reason': None,
                                                          'usage': {'input_tokens': pt, 'output_tokens': 1}}}, 'message_start')
        self._sse({'type': 'ping'}, 'ping')
        for i, block in enumerate(content):
            if block['type'] == 'text':
                self._sse({'type': 'content_block_start', 'index': i, 'content_block': {'type': 'text', 'text': ''}}, 'content_block_start')
                for p in _pieces(block['text']):
                    self._sse({'type': 'content_block_delta', 'index': i, 'delta': {'type': 'text_delta', 'text': p}}, 'content_block_delta')
            else:
                self._sse({'type': 'content_block_start', 'index': i, 'content_block': {**block, 'input': {}}}, 'content_block_start')
                for p in _pieces(json.dumps(block['input']), 8):
                    self._sse({'type': 'content_block_delta', 'index': i, 'delta': {'type': 'input_json_delta', 'partial_json': p}}, 'content_block_delta')
            self._sse({'type': 'content_block_stop', 'index': i}, 'content_block_stop')
        self._sse({'type': 'message_delta', 'delta': {'stop_reason': stop, 'stop_sequence': None},
                   'usage': {'output_tokens': ct}}, 'message_delta')
        self._sse({'type': 'message_stop'}, 'message_stop')

    # Gemini ------------------------------------------------------------------------------------------------
    def _gemini(self, req: Received, reply: Reply):
        b = req.json or {}
        m = _GEMINI.match(req.path)
        if reply.status >= 400:
            status = {429: 'RESOURCE_EXHAUSTED', 400: 'INVALID_ARGUMENT', 401: 'UNAUTHENTICATED', 403: 'PERMISSION_DENIED',
                      503: 'UNAVAILABLE'}.get(reply.status, 'INTERNAL')
            return self._json(reply.status, reply.body or {'error': {'code': reply.status, 'message': reply.message, 'status': status}})
        if reply.body is not None: return self._json(200, reply.body)
        n = (b.get('generationConfig') or {}).get('candidateCount') or 1
        texts = self._choices(req, reply, n, b.get('contents'))
        finish = {'stop': 'STOP', 'length': 'MAX_TOKENS', 'tool_calls': 'STOP'}[reply.finish_reason or 'stop']
        calls = [{'functionCall': {'name': t['name'], 'args': t.get('arguments', {})}} for t in reply.tool_calls or []]
        pt, ct = reply.usage
        usage = {'promptTokenCount': pt, 'candidatesTokenCount': ct, 'totalTokenCount': pt + ct}
        rid = self.fake._new_id('')
        common = {'modelVersion': m.group('model'), 'responseId': rid}
        if m.group('method') == 'generateContent':
            cands = [{'content': {'role': 'model', 'parts': ([{'text': t}] if t else []) + calls},
                      'finishReason': finish, 'index': i} for i, t in enumerate(texts)]
            return self._json(200, {'candidates': cands, 'usageMetadata': usage, **common})
        self._sse_start()
        for i, t in enumerate(texts):
            pieces = _pieces(t) if t else []
            for k, p in enumerate(pieces):
                self._sse({'candidates': [{'content': {'role': 'model', 'parts': [{'text': p}]}, 'index': i}],
                           'usageMetadata': {'promptTokenCount': pt, 'totalTokenCount': pt}, **common})
            self._sse({'candidates': [{'content': {'role': 'model', 'parts': calls or [{'text': ''}]}, 'finishReason': finish, 'index': i}],
                       'usageMetadata': usage, **common})
