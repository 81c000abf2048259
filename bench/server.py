"""The hosted API served locally (`openpipe-lab serve`): two figures, each a comparison inside one run.

    python bench/server.py [--seconds 4] [--concurrency 32] [--rounds 3] [--calls 400]

1. `/report` throughput with every report durable when its answer arrives (the endpoint waits for the commit
   that holds its log; concurrent reports share one transaction: group commit), as a ratio to a no-op endpoint of
   the same server in the same run. The no-op endpoint goes through the same guard (bearer key, body limit),
   JSON parsing and schema check as `/report`, then answers without storing, so the ratio is the price of
   storage. Goal (issue 12): >= 50%. Afterwards the database must hold exactly as many logs as were answered "ok".
2. `/chat/completions` added latency: the same sequential calls with the `openai` SDK, interleaved call by call,
   (a) straight to the loopback fake upstream and (b) through our server (guard, parsing, the lab client's routing
   and logging, a second HTTP hop to the same upstream). Added p50 = p50(b) - p50(a). Goal: <= 1 ms. Measured twice:
   on the quiescent server before the throughput windows (the goal's figure: one call at a time, nothing else
   running) and again after them, when the server holds the windows' tens of thousands of logs.
3. Where that time goes (`upstream_call_breakdown_ms`, see `breakdown`): the server's own upstream call, layer by
   layer, in this process. On the 2-core machine of 2026-12-02 (openai 3.57) a raw loopback POST takes ~0.6 ms and
   the plain `AsyncOpenAI` call ~3.3 ms; `sdk_post` (the SDK's `post` without its request transform) ~2.8 ms. The lab
   client (`lab`, what the server uses) posts a plain request over its own keep-alive connection (`_lean_post`):
   ~1.1-1.3 ms with routing and logging. Its CPU with the upstream stubbed is ~70 µs; the rest is the round trip.

The server runs in its own process (this script re-invoked with `--serve`), the fake upstream in another, the load
generator here: each has its own interpreter, so none takes the GIL from another. Absolute figures change with the
machine (see `lscpu`); compare only the ratio and the difference, which are measured in one run.
"""
import argparse, asyncio, json, os, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{'role': 'system', 'content': 'You are a concise assistant.'}, {'role': 'user', 'content': 'What is six times seven?'}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def serve(port: int, labdir: str):
    "The server process: the real app plus a no-op endpoint behind the same guard, parsing and schema check."
    import uvicorn
    from openpipe_lab.logstore import LogStore
    from openpipe_lab.server import create_app, freeze_heap, _endpoint, API_PREFIX
    lab = LogStore(f"{labdir}/lab.db")
    app = create_app(lab)

    @_endpoint('report', blocking=False)
    async def _noop(lab, body, request):
        "Parse and check a /report body, store nothing."
        return {'status': 'ok'}
    app.add_api_route(API_PREFIX + '/noop', _noop, methods=['POST'], include_in_schema=False)
    freeze_heap()  # as `openpipe-lab serve` does once its app is built
    uvicorn.run(app, host='127.0.0.1', port=port, log_level='warning', access_log=False, lifespan='off')


def start(cmd, env=None):
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def wait_http(url, timeout=60):
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1); return
        except httpx.HTTPError: time.sleep(0.1)
    raise SystemExit(f"no answer from {url}")


def report_body(i: int) -> dict:
    return {'requestedAt': 1_700_000_000_000 + i, 'receivedAt': 1_700_000_000_300 + i, 'statusCode': 200,
            'reqPayload': {'model': 'gpt-4o-mini', 'messages': MESSAGES, 'metadata': {'prompt_id': 'bench', 'i': str(i)}},
            'respPayload': {'id': f'chatcmpl-{i}', 'object': 'chat.completion', 'created': 1, 'model': 'gpt-4o-mini',
                            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': 'The answer is 42.'}}],
                            'usage': {'prompt_tokens': 20, 'completion_tokens': 6, 'total_tokens': 26}},
            'tags': {'$sdk': 'python', '$sdk.version': '5.0.0'}}


async def hammer(url: str, path: str, key: str, seconds: float, concurrency: int, start_i: int) -> tuple:
    """(answered ok, sent, requests/s) of `concurrency` keep-alive connections posting /report bodies to `path` for `seconds`.
    A minimal HTTP/1.1 client on asyncio streams: request bytes are built by hand and only the status line, the
    Content-Length and the body are read, so the load generator costs far less than the server it measures."""
    import httpx
    u = httpx.URL(url)
    counter, ok = [0], [0]
    head = (f"POST {u.path}{path} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: ").encode()
    t_end = time.monotonic() + seconds
    async def worker():
        reader, writer = await asyncio.open_connection(u.host, u.port)
        try:
            while time.monotonic() < t_end:
                i = counter[0]; counter[0] += 1
                body = json.dumps(report_body(start_i + i)).encode()
                writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line[:15].lower() == b"content-length:": length = int(line[15:])
                answer = await reader.readexactly(length)
                if status == 200 and answer == b'{"status":"ok"}': ok[0] += 1
        finally:
            writer.close()
    t0 = time.monotonic()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return ok[0], counter[0], ok[0] / (time.monotonic() - t0)


def latency(upstream: str, server: str, key: str, calls: int) -> dict:
    "p50/p90/p99 (ms) of sequential chat completions straight to the upstream and through the server, interleaved."
    import openai
    direct = openai.OpenAI(base_url=upstream, api_key='sk-fake', max_retries=0)
    proxied = openai.OpenAI(base_url=server, api_key=key, max_retries=0)
    times = {'direct': [], 'server': []}
    for i in range(calls + 20):
        for name, client in (('direct', direct), ('server', proxied)) if i % 2 else (('server', proxied), ('direct', direct)):
            t0 = time.perf_counter()
            r = client.chat.completions.create(model='gpt-4o-mini', messages=MESSAGES, metadata={'prompt_id': 'bench-chat'})
            dt = time.perf_counter() - t0
            assert r.choices[0].message.content
            if i >= 20: times[name].append(dt * 1000)   # the first 20 warm connections and caches
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]
    out = {name: {'p50_ms': round(statistics.median(xs), 3), 'p90_ms': round(q(xs, 90), 3), 'p99_ms': round(q(xs, 99), 3)} for name, xs in times.items()}
    out['added_p50_ms'] = round(out['server']['p50_ms'] - out['direct']['p50_ms'], 3)
    return out


def breakdown(upstream: str, labdir: str, calls: int) -> dict:
    """Where the server's added time goes: median ms of one call to the upstream, in this process, by each layer the
    server's own upstream call passes through (interleaved call by call, asyncio as in the server).
    raw: a hand-written HTTP/1.1 POST on one keep-alive asyncio connection (the floor: upstream + loopback);
    openai: `openai.AsyncOpenAI` (request transform, httpx, response parsing); lab: the lab `AsyncOpenAI` the server
    uses (routing, logging enqueue, on top of the same SDK call); sdk_post: the SDK's `_post` with the body as a dict,
    i.e. the SDK call without its request-params transform."""
    import httpx, openai
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openpipe_lab.logstore import LogStore
    import openpipe_lab.client
    body = json.dumps({'model': 'gpt-4o-mini', 'messages': MESSAGES}).encode()
    u = httpx.URL(upstream)
    async def run():
        lab = LogStore(f"{labdir}/breakdown.db")
        plain = openai.AsyncOpenAI(base_url=upstream, api_key='sk-fake', max_retries=0)
        labc = lab.async_openai(max_retries=0, base_url=upstream, api_key='sk-fake')
        reader, writer = await asyncio.open_connection(u.host, u.port)
        head = (f"POST {u.path}/chat/completions HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        async def raw():
            writer.write(head + body)
            await reader.readline(); length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:": length = int(line[15:])
            return await reader.readexactly(length)
        async def sdk_post():
            return await plain.chat.completions._post('/chat/completions', body={'model': 'gpt-4o-mini', 'messages': MESSAGES},
                cast_to=ChatCompletion, options={}, stream=False, stream_cls=openai.AsyncStream[ChatCompletionChunk])
        fns = {'raw': raw, 'openai': lambda: plain.chat.completions.create(model='gpt-4o-mini', messages=MESSAGES),
               'lab': lambda: labc.chat.completions.create(model='gpt-4o-mini', messages=MESSAGES, metadata={'prompt_id': 'bench-breakdown'}),
               'sdk_post': sdk_post}
        times = {k: [] for k in fns}
        for i in range(calls + 20):
            for name, f in fns.items():
                t0 = time.perf_counter(); await f(); dt = time.perf_counter() - t0
                if i >= 20: times[name].append(dt * 1000)
        writer.close(); await plain.close(); await labc.close(); lab.close()
        return {k: round(statistics.median(v), 3) for k, v in times.items()}
    return asyncio.run(run())


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--seconds', type=float, default=3.0, help='length of each throughput window')
    p.add_argument('--concurrency', type=int, default=32)
    p.add_argument('--rounds', type=int, default=6, help='noop/report windows, alternated')
    p.add_argument('--calls', type=int, default=400, help='chat completions per path for the latency figure')
    p.add_argument('--serve', nargs=2, metavar=('PORT', 'LABDIR'), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve: return serve(int(a.serve[0]), a.serve[1])

    labdir = tempfile.mkdtemp(prefix='bench-server-')
    fake = start([sys.executable, '-c', 'import sys; sys.path.insert(0, %r); from fakes import FakeUpstream, Reply\n'
                  'up = FakeUpstream(default=Reply(text="The answer is 42.")).start(); print(up.openai_url, flush=True)\n'
                  'sys.stdin.read()' % str(ROOT / 'tests')])
    upstream = fake.stdout.readline().strip()
    from openpipe_lab.logstore import LogStore
    from openpipe_lab.server import create_api_key
    lab = LogStore(f"{labdir}/lab.db")
    key = create_api_key('bench', store=lab)
    port = free_port()
    srv = start([sys.executable, __file__, '--serve', str(port), labdir],
                env={'OPENAI_BASE_URL': upstream, 'OPENAI_API_KEY': 'sk-fake', 'OPENPIPE_LAB_DIR': labdir})
    url = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_http(url + '/openapi.json')
        lat = latency(upstream, url, key, a.calls)  # quiescent server
        rates, answered, i0 = {'noop': [], 'report': []}, 0, 0
        for r in range(a.rounds):
            for name in ('noop', 'report') if r % 2 == 0 else ('report', 'noop'):
                ok, sent, rate = asyncio.run(hammer(url, '/' + name, key, a.seconds, a.concurrency, i0))
                i0 += sent
                rates[name].append(rate)
                if name == 'report': answered += ok
        stored = len(lab.filter(prompt_id='bench'))
        noop, report = statistics.median(rates['noop']), statistics.median(rates['report'])
        lat_after = latency(upstream, url, key, a.calls)
        parts = breakdown(upstream, labdir, a.calls)
        import openai, fastapi, uvicorn
        per_round = [round(r / n, 3) for r, n in zip(rates['report'], rates['noop'])]   # each round measures both, back to back
        result = {'report_per_s': round(report), 'noop_per_s': round(noop), 'report_over_noop': round(report / noop, 3),
                  'report_over_noop_by_round': per_round,
                  'reports_answered_ok': answered, 'reports_in_database': stored, 'chat_completions': lat, 'chat_completions_after_load': lat_after, 'upstream_call_breakdown_ms': parts,
                  'concurrency': a.concurrency, 'seconds_per_window': a.seconds, 'rounds': a.rounds,
                  'versions': {'openai': openai.__version__, 'fastapi': fastapi.__version__, 'uvicorn': uvicorn.__version__},
                  'cpus': os.cpu_count()}
        print(json.dumps(result, indent=1))
        assert stored == answered, f"{answered} reports answered ok but {stored} in the database"
        out = ROOT / 'bench' / 'results'
        out.mkdir(exist_ok=True)
        (out / 'server.json').write_text(json.dumps(result, indent=1))
    finally:
        srv.terminate(); srv.wait(30)
        fake.stdin.close(); fake.wait(10)
        lab.close()


if __name__ == '__main__':
    main()
