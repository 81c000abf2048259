"""LogStore benchmarks: ingest rate through the background writer (SQLite, Postgres) and tag filters on 1M logs.

    python bench/logstore.py [--n 100000] [--big 1000000] [--pg URL] [--before 86f4ac1] [--repeat 3]

Goals (issue 2): >= 50k logs/s into SQLite; a tag filter on 1M logs <= 200 ms; `import openpipe_lab` <= 0.5 s.
Each log is realistic: ~2 KB of request + response JSON and 3 metadata tags. Figures print as a table; the ratios
compare against a baseline measured in the same run (raw sqlite3 executemany of the same rows, no tags).
Issue 15's before/after: the same ingest by the package as it was at git revision `--before` (extracted with
`git archive`) and by the working tree, each in a fresh child process, interleaved for `--repeat` rounds (medians).
"""
import argparse, json, os, shutil, sqlite3, statistics, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]

def payloads(i):
    text = ('Please redact the personal data in this support ticket. ' * 9)[:480]
    req = {'model': 'gpt-4o-mini', 'messages': [{'role': 'system', 'content': 'You redact PII. ' * 10},
                                                {'role': 'user', 'content': f'#{i} {text}'}],
           'temperature': 0, 'metadata': {'prompt_id': f'p{i % 10}', 'user': f'u{i % 1000}', 'env': 'prod'}}
    resp = {'id': f'chatcmpl-{i:012d}', 'object': 'chat.completion', 'created': 1_700_000_000, 'model': 'gpt-4o-mini',
            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': text.replace('ticket', '[REDACTED]')}}],
            'usage': {'prompt_tokens': 310, 'completion_tokens': 120, 'total_tokens': 430}}
    return req, resp

def ingest(logs, n, start=0):
    items = [payloads(i) for i in range(start, start + n)]
    size = len(json.dumps(items[0][0])) + len(json.dumps(items[0][1]))
    t = time.perf_counter()
    for i, (req, resp) in enumerate(items):
        logs.record(model='gpt-4o-mini', req_payload=req, resp_payload=resp, status_code=200, completion_id=resp['id'],
                    tags=req['metadata'], requested_at=1_700_000_000_000 + i, received_at=1_700_000_000_500 + i)
    enq = time.perf_counter() - t
    logs.flush(None)
    return n / (time.perf_counter() - t), enq / n * 1e6, size

def raw_baseline(path, n):
    items = [payloads(i) for i in range(n)]
    con = sqlite3.connect(path); con.execute('PRAGMA journal_mode=WAL'); con.execute('PRAGMA synchronous=NORMAL')
    con.execute('CREATE TABLE logs (id TEXT PRIMARY KEY, req TEXT, resp TEXT)')
    t = time.perf_counter()
    rows = [(f'log{i}', json.dumps(r), json.dumps(s)) for i, (r, s) in enumerate(items)]
    with con: con.executemany('INSERT INTO logs VALUES (?,?,?)', rows)
    return n / (time.perf_counter() - t)

def timed(fn, repeat=5):
    out = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out) * 1000

CHILD = r'''
import json, sys
import openpipe_lab
from openpipe_lab.logstore import LogStore
from logstore import ingest, raw_baseline  # this benchmark's own generator and loop
url, n, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = raw_baseline(f"{d}/raw.db", n)  # the baseline, in this process, just before: its ratio is what counts
if '://' in url:  # Postgres: start from empty tables
    import sqlalchemy as sa
    from openpipe_lab.store import metadata
    eng = sa.create_engine(url)
    with eng.begin() as c: metadata.drop_all(c)
    eng.dispose()
rate, enq_us, size = ingest(LogStore(url, dir=d), n)
print(json.dumps({'package': openpipe_lab.__file__, 'rate': rate, 'enq_us': enq_us, 'base': base}))
'''

def ingest_in_child(url, n, pkg, d):
    "`ingest` in a fresh process importing openpipe_lab from `pkg`: (logs/s, caller µs per record(), ratio to the baseline run just before it)."
    r = subprocess.run([sys.executable, '-c', CHILD, url, str(n), d], capture_output=True, text=True, cwd=d,
                       env=dict(os.environ, PYTHONPATH=f"{pkg}:{ROOT / 'bench'}"))
    if r.returncode: raise SystemExit(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['package'].startswith(pkg), out['package']
    return out['rate'], out['enq_us'], out['rate'] / out['base']

def before_after(url_for, n, rev, d, repeat):
    "Median (logs/s, µs, ratio to baseline) of the package at `rev` and of the working tree, interleaved over `repeat` rounds."
    old = tempfile.mkdtemp(dir=d)
    tar = subprocess.run(['git', '-C', str(ROOT), 'archive', rev, 'openpipe_lab'], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', old], input=tar, check=True)
    runs = {'before': [], 'after': []}
    for i in range(repeat):
        for tag, pkg in (('before', old), ('after', str(ROOT))):
            runs[tag].append(ingest_in_child(url_for(f'{tag}{i}'), n, pkg, tempfile.mkdtemp(dir=d)))
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    return {t: (med(v, 0), med(v, 1), med(v, 2)) for t, v in runs.items()}

def main():
    sys.path.insert(0, str(ROOT))
    from openpipe_lab.logstore import LogStore
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=100_000)
    ap.add_argument('--big', type=int, default=1_000_000)
    ap.add_argument('--pg', default=os.environ.get('OPENPIPE_LAB_TEST_PG'))
    ap.add_argument('--before', default='86f4ac1', help='git revision for the before/after rows ("" to skip)')
    ap.add_argument('--repeat', type=int, default=3)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix='oplab-bench-'))
    try: run(a, d, LogStore)
    finally: shutil.rmtree(d, ignore_errors=True)  # the 1M-log lab alone is ~1.5 GB

def run(a, d: Path, LogStore):
    rows = []
    base = raw_baseline(str(d / 'raw.db'), a.n)
    rate, enq_us, size = ingest(LogStore(str(d / 'ingest.db')), a.n)
    rows += [('raw sqlite3 executemany (baseline, no tags)', f'{base:,.0f} logs/s', ''),
             (f'LogStore -> SQLite ({size} B/log, 3 tags)', f'{rate:,.0f} logs/s', f'{rate / base:.2f}x baseline'),
             ('  caller-thread cost per record()', f'{enq_us:.1f} µs', '')]
    if a.before:
        ba = before_after(lambda tag: str(d / f'{tag}.db'), a.n, a.before, d, a.repeat)
        (b_rate, b_us, b_x), (n_rate, n_us, n_x) = ba['before'], ba['after']
        rows += [(f'  before ({a.before}), child process, median of {a.repeat}', f'{b_rate:,.0f} logs/s', f'{b_x:.2f}x its baseline; record() {b_us:.1f} µs'),
                 (f'  after (working tree), child process, median of {a.repeat}', f'{n_rate:,.0f} logs/s',
                  f'{n_x:.2f}x its baseline; record() {n_us:.1f} µs; {n_rate / b_rate:.2f}x before')]
    if a.pg:
        import sqlalchemy as sa
        from openpipe_lab.store import metadata
        eng = sa.create_engine(a.pg)
        with eng.begin() as c: metadata.drop_all(c)
        eng.dispose()
        prate, _, _ = ingest(LogStore(a.pg, dir=d), min(a.n, 50_000))
        rows.append(('LogStore -> Postgres', f'{prate:,.0f} logs/s', f'{prate / base:.2f}x baseline'))
        if a.before:
            ba = before_after(lambda tag: a.pg, min(a.n, 50_000), a.before, d, a.repeat)
            (b_rate, _, _), (n_rate, _, _) = ba['before'], ba['after']
            rows.append((f'  Postgres before -> after ({a.before}, median of {a.repeat})', f'{n_rate:,.0f} logs/s',
                         f'before {b_rate:,.0f} logs/s: {n_rate / b_rate:.2f}x'))
    if a.big:
        big = LogStore(str(d / 'big.db'))
        t = time.perf_counter()
        for s in range(0, a.big, 100_000): ingest(big, min(100_000, a.big - s), start=s)
        build = time.perf_counter() - t
        q = big.filter(prompt_id='p7')
        assert len(q) == a.big // 10
        rows += [(f'build {a.big:,} logs', f'{build:.1f} s', f'{a.big / build:,.0f} logs/s'),
                 (f'count by tag on {a.big:,} logs (1/10 match)', f'{timed(lambda: len(q)):.0f} ms', ''),
                 (f'count by two tags (1/10000 match)', f'{timed(lambda: len(big.filter(prompt_id="p7", user="u7"))):.1f} ms', ''),
                 (f'latest 50 rows by tag', f'{timed(lambda: big.filter(prompt_id="p3").latest(50)):.1f} ms', ''),
                 (f'count by model (indexed field)', f'{timed(lambda: len(big.filter(model="gpt-4o-mini"))):.0f} ms', '')]
    imp = [float(subprocess.run([sys.executable, '-c', 'import time; t=time.perf_counter(); import openpipe_lab.logstore; print(time.perf_counter()-t)'],
                                capture_output=True, text=True, check=True).stdout) for _ in range(3)]
    heavy = subprocess.run([sys.executable, '-c', 'import sys, openpipe_lab, openpipe_lab.logstore; print(sorted(m for m in ("torch","transformers","trl","vllm","peft") if m in sys.modules))'],
                           capture_output=True, text=True, check=True).stdout.strip()
    rows.append(('import openpipe_lab + LogStore (median of 3)', f'{statistics.median(imp) * 1000:.0f} ms', f'heavy modules imported: {heavy}'))
    w = max(len(r[0]) for r in rows)
    for r in rows: print(f'{r[0]:<{w}}  {r[1]:>16}  {r[2]}')

if __name__ == '__main__':
    main()
