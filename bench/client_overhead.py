"""Client overhead: (a) the plain `openai` client, (b) our logging client, (c) LiteLLM `completion` with a logging
callback, side by side in one process and one run, against a local fake OpenAI upstream.

    python bench/client_overhead.py [--n 2000] [--no-litellm]

Goal (issue 3): our logging adds <= 50 us p50 on the caller's thread and is >= 20x cheaper than LiteLLM's path;
issue 15: <= 30 us. Since 2026-12-02 the lab client posts a plain request through the SDK's `post` without the SDK's
request-params transform (about half of the SDK's CPU per call in openai 3.x), so end to end it costs *less* than the
plain client (a negative "added"); `layer_cost` (the SDK's request stubbed on both sides) is the layer's own cost.

Two measurements, both interleaving the clients call by call (shuffled order) so drift and noise from other
processes hit them alike:
- `loopback`: real HTTP to the fake upstream (tests/fakes), run in a *separate process* so its work does not take
  the GIL from the clients. Reports calls/s and wall latency p50/p99 per call.
- `in-process`: the same calls through an `MockTransport` of openai's HTTP library answering a canned completion (no sockets), which
  removes network noise and isolates what each client adds. Reports wall p50/p99 and, the number the goal is about,
  CPU time of the calling thread per call (`time.thread_time_ns`: the background log writer's work is excluded).
"Added" = the client's figure minus the plain client's figure of the same run.

LiteLLM is never one of our dependencies: on first use the script makes a throwaway venv (/tmp/bench-litellm)
that sees this project's .venv (a .pth line) and pip-installs litellm there, then re-runs itself under it.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = Path(os.environ.get('BENCH_LITELLM_VENV', '/tmp/bench-litellm'))
os.environ.setdefault('LITELLM_LOCAL_MODEL_COST_MAP', 'True')  # no fetch of the cost map at import (no network)


def ensure_litellm_python() -> str:
    "The python of a throwaway venv with litellm that also sees this project's .venv."
    py = BENCH_VENV / 'bin' / 'python'
    if not py.exists():
        subprocess.run([sys.executable, '-m', 'venv', str(BENCH_VENV)], check=True)
        site = subprocess.run([str(py), '-c', 'import site; print(site.getsitepackages()[0])'], check=True,
                              capture_output=True, text=True).stdout.strip()
        ours = subprocess.run([sys.executable, '-c', 'import site; print(site.getsitepackages()[0])'], check=True,
                              capture_output=True, text=True).stdout.strip()
        Path(site, 'openpipe_lab_venv.pth').write_text(f"import site; site.addsitedir({ours!r})\n")
    if subprocess.run([str(py), '-c', 'import litellm'], capture_output=True, env={**os.environ}).returncode != 0:
        print(f'installing litellm into {BENCH_VENV} (throwaway, not a project dependency)...', flush=True)
        subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--disable-pip-version-check', 'litellm'], check=True)
    return str(py)


def start_fake():
    "The fake upstream in its own process; returns (process, base_url)."
    code = ('import sys, time; sys.path.insert(0, %r); from fakes import FakeUpstream, Reply\n'
            'up = FakeUpstream(default=Reply(text="The answer is 42.")).start(); print(up.openai_url, flush=True)\n'
            'sys.stdin.read()') % str(ROOT / 'tests')
    proc = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


CANNED = json.dumps({'id': 'chatcmpl-bench', 'object': 'chat.completion', 'created': 1700000000, 'model': 'gpt-4o-mini',
                     'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': 'The answer is 42.'}, 'finish_reason': 'stop'}],
                     'usage': {'prompt_tokens': 20, 'completion_tokens': 6, 'total_tokens': 26}}).encode()
MESSAGES = [{'role': 'system', 'content': 'You are a concise assistant.'}, {'role': 'user', 'content': 'What is six times seven?'}]


class _Collect:
    "A stand-in log writer that keeps rows in memory."
    def __init__(self): self.rows = []
    def put(self, row): self.rows.append(row)
    def flush(self, timeout=None): pass
    def close(self): pass


def make_callers(base_url, http_client_factory, lab, with_litellm):
    "name -> zero-argument function doing one chat completion."
    import openai
    from openpipe_lab.client import OpenAI
    plain = openai.OpenAI(api_key='sk-bench', base_url=base_url, max_retries=0, http_client=http_client_factory())
    ours = OpenAI(store=lab, api_key='sk-bench', base_url=base_url, max_retries=0, http_client=http_client_factory())
    kw = dict(model='gpt-4o-mini', messages=MESSAGES, temperature=0)
    # the same client on a store whose writer only collects rows: the caller's-thread cost without the background
    # writer competing for the GIL and the CPU caches (the rows are counted, not written)
    from openpipe_lab.logstore import LogStore
    paused = LogStore(lab.url.replace('lab.db', 'paused.db')); paused._writer = _Collect()
    ours_paused = OpenAI(store=paused, api_key='sk-bench', base_url=base_url, max_retries=0, http_client=http_client_factory())
    callers = {'openai (plain)': lambda: plain.chat.completions.create(**kw),
               'openpipe_lab (logging)': lambda: ours.chat.completions.create(**kw, metadata={'prompt_id': 'bench'}),
               'openpipe_lab (enqueue only, writer paused)': lambda: ours_paused.chat.completions.create(**kw, metadata={'prompt_id': 'bench'})}
    if with_litellm:
        import litellm
        litellm.telemetry = False
        logged = []
        def log_callback(kwargs, response, start_time, end_time): logged.append(response.id)
        litellm.success_callback = [log_callback]
        lclient = openai.OpenAI(api_key='sk-bench', base_url=base_url, max_retries=0, http_client=http_client_factory())
        callers['litellm completion + callback'] = lambda: litellm.completion(
            model='openai/gpt-4o-mini', api_base=base_url, api_key='sk-bench', client=lclient, messages=MESSAGES, temperature=0)
        callers['_litellm_logged'] = logged
    return callers


def measure(callers, n):
    "Per-call interleaving (each iteration calls every client once, in a shuffled order): wall and caller-thread CPU (ns)."
    import random
    rng = random.Random(0)
    names = [k for k in callers if not k.startswith('_')]
    wall = {k: [] for k in names}; cpu = {k: [] for k in names}; total = {k: 0.0 for k in names}
    for name in names:  # warm-up: connections, imports, first-call caches
        for _ in range(50): callers[name]()
    order = list(names)
    for i in range(n):
        rng.shuffle(order)  # no client always follows the same one (a heavy predecessor leaves cold caches)
        for name in order:
            a, b = time.perf_counter_ns(), time.thread_time_ns()
            callers[name]()
            c, w = time.thread_time_ns() - b, time.perf_counter_ns() - a
            cpu[name].append(c); wall[name].append(w); total[name] += w / 1e9
    return names, wall, cpu, total


def pct(xs, q):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(title, names, wall, cpu, total):
    base = names[0]
    rows = []
    print(f"\n## {title}\n")
    print("| client | calls/s | wall p50 µs | wall p99 µs | added wall p50 µs | added wall p99 µs | caller CPU p50 µs | added caller CPU p50 µs | added caller CPU p99 µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in names:
        r = dict(client=k, calls_per_s=len(wall[k]) / total[k],
                 wall_p50=pct(wall[k], .5) / 1e3, wall_p99=pct(wall[k], .99) / 1e3,
                 added_wall_p50=(pct(wall[k], .5) - pct(wall[base], .5)) / 1e3,
                 added_wall_p99=(pct(wall[k], .99) - pct(wall[base], .99)) / 1e3,
                 cpu_p50=pct(cpu[k], .5) / 1e3,
                 added_cpu_p50=(pct(cpu[k], .5) - pct(cpu[base], .5)) / 1e3,
                 added_cpu_p99=(pct(cpu[k], .99) - pct(cpu[base], .99)) / 1e3)
        rows.append(r)
        print(f"| {k} | {r['calls_per_s']:.0f} | {r['wall_p50']:.0f} | {r['wall_p99']:.0f} | {r['added_wall_p50']:+.1f} | "
              f"{r['added_wall_p99']:+.1f} | {r['cpu_p50']:.0f} | {r['added_cpu_p50']:+.1f} | {r['added_cpu_p99']:+.1f} |")
    ours = next(r for r in rows if r['client'].startswith('openpipe_lab'))
    lite = next((r for r in rows if r['client'].startswith('litellm')), None)
    if lite:
        ratio = lambda key: (f"{lite[key] / ours[key]:.0f}x" if ours[key] > 0 else "n/a (ours within noise of plain)")
        print(f"\nLiteLLM's added caller CPU p50 / ours: {ratio('added_cpu_p50')}; added wall p50: {ratio('added_wall_p50')}")
    return rows


def layer_cost(n=20000):
    """Our layer alone: the SDK's own request is replaced by a stub returning a prebuilt completion, for both sides
    (the SDK's `create`, and the SDK's `post` that the client calls itself for a plain request)."""
    import openai
    from openai.types.chat import ChatCompletion
    from openai.resources.chat.completions import Completions
    import openpipe_lab.client as client_mod
    from openpipe_lab.logstore import LogStore
    done = ChatCompletion.model_validate(json.loads(CANNED))
    stub = lambda self, **kw: done
    real = client_mod._SDKCompletions.create
    client_mod._SDKCompletions.create = stub
    try:
        store = LogStore(tempfile.mkdtemp(prefix='bench-layer-') + '/lab.db'); store._writer = _Collect()
        ours = client_mod.OpenAI(store=store, api_key='k', base_url='http://bench.invalid/v1')
        ours.chat.completions._post = lambda path, **kw: done  # where the client posts a plain request itself (no SDK transform)
        kw = dict(model='gpt-4o-mini', messages=MESSAGES, temperature=0)
        def p50(f):
            xs = []
            for _ in range(n):
                a = time.thread_time_ns(); f(); xs.append(time.thread_time_ns() - a)
            return pct(xs, .5) / 1e3, pct(xs, .99) / 1e3
        base = p50(lambda: stub(None, **kw)); layer = p50(lambda: ours.chat.completions.create(**kw, metadata={'prompt_id': 'bench'}))
    finally:
        client_mod._SDKCompletions.create = real
    added = (layer[0] - base[0], layer[1] - base[1])
    print(f"\n## our layer alone (SDK request stubbed, {n} calls, caller-thread CPU)\n\nadded p50 {added[0]:.1f} µs, p99 {added[1]:.1f} µs "
          f"(routing, request copy, tags, log row with the request serialised, enqueue)")
    return {'added_p50_us': added[0], 'added_p99_us': added[1]}


def layer_before(rev: str) -> dict:
    "`layer_cost()` measured with the package as it was at git revision `rev` (extracted with `git archive`), in a child."
    with tempfile.TemporaryDirectory() as d:
        tar = subprocess.run(['git', '-C', str(ROOT), 'archive', rev, 'openpipe_lab'], check=True, capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', d], input=tar, check=True)
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--_layer_only'], capture_output=True, text=True,
                             cwd=d, env=dict(os.environ, PYTHONPATH=d), check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r['package'].startswith(d), r['package']  # the old package really was the one measured
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=2000, help='calls per client per measurement')
    ap.add_argument('--no-litellm', action='store_true')
    ap.add_argument('--before', default='86f4ac1', help='git revision whose client layer is measured too (issue 15: before/after in one run); "" to skip')
    ap.add_argument('--_inner', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--_layer_only', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._layer_only:  # run by `layer_before` with PYTHONPATH at an older package: our layer alone, as JSON
        import openpipe_lab
        print(json.dumps(dict(layer_cost(), package=openpipe_lab.__file__))); return
    if not args.no_litellm and not args._inner:
        py = ensure_litellm_python()
        os.execv(py, [py, __file__, '--_inner', '--n', str(args.n), '--before', args.before])
    sys.path.insert(0, str(ROOT))
    import openai
    from openpipe_lab.client import _http as httpx2  # openai's own HTTP library (httpx, or httpx2 for openai 3.x)
    from openpipe_lab.logstore import LogStore
    lab = LogStore(tempfile.mkdtemp(prefix='bench-client-') + '/lab.db')
    with_litellm = not args.no_litellm
    versions = {'python': sys.version.split()[0], 'openai': openai.__version__}
    if with_litellm:
        from importlib.metadata import version
        versions['litellm'] = version('litellm')
    print(f"# client overhead: {args.n} calls per client per measurement, interleaved call by call in shuffled order; {versions}")
    results = {'versions': versions, 'n': args.n}

    mock = lambda: httpx2.Client(transport=httpx2.MockTransport(
        lambda r: httpx2.Response(200, content=CANNED, headers={'content-type': 'application/json'})))
    callers = make_callers('http://bench.invalid/v1', mock, lab, with_litellm)
    results['in_process'] = report('in-process transport (isolates client overhead)', *measure(callers, args.n))

    results['layer'] = layer_cost()
    if args.before:
        before = layer_before(args.before)
        results['layer_before'] = before
        print(f"our layer at {args.before} (before issue 15), same run: added p50 {before['added_p50_us']:.1f} µs, "
              f"p99 {before['added_p99_us']:.1f} µs -> now {results['layer']['added_p50_us'] / before['added_p50_us']:.2f}x of before (p50)")

    proc, url = start_fake()
    try:
        callers = make_callers(url, lambda: httpx2.Client(), lab, with_litellm)
        results['loopback'] = report(f'loopback HTTP to the fake upstream (separate process) at {url}', *measure(callers, args.n))
    finally:
        proc.stdin.close(); proc.wait(10)
    t = time.perf_counter(); lab.flush(None)
    with lab.db.connect() as c: logged = c.exec_driver_sql('SELECT count(*) FROM logs').scalar()
    print(f"\nlogs written by our client: {logged} (writer drained {time.perf_counter() - t:.2f} s after the last call)")
    if with_litellm: print(f"LiteLLM callback invocations: {len(callers['_litellm_logged'])} (loopback run)")
    out = ROOT / 'bench' / 'results' / 'client_overhead.json'
    out.parent.mkdir(exist_ok=True); out.write_text(json.dumps(results, indent=1))
    print(f"results: {out.relative_to(ROOT)}")


if __name__ == '__main__':
    main()
