"""LogStore benchmarks: ingest rate through the background writer (SQLite, Postgres) and tag filters on 1M logs.

    python bench/logstore.py [--n 100000] [--big 1000000] [--pg URL]

Goals (issue 2): >= 50k logs/s into SQLite; a tag filter on 1M logs <= 200 ms; `import openpipe_lab` <= 0.5 s.
Each log is realistic: ~2 KB of request + response JSON and 3 metadata tags. Figures print as a table; the ratios
compare against a baseline measured in the same run (raw sqlite3 executemany of the same rows, no tags).
"""
import argparse, json, os, sqlite3, statistics, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openpipe_lab.logstore import LogStore

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

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=100_000)
    ap.add_argument('--big', type=int, default=1_000_000)
    ap.add_argument('--pg', default=os.environ.get('OPENPIPE_LAB_TEST_PG'))
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix='oplab-bench-'))
    rows = []
    base = raw_baseline(str(d / 'raw.db'), a.n)
    rate, enq_us, size = ingest(LogStore(str(d / 'ingest.db')), a.n)
    rows += [('raw sqlite3 executemany (baseline, no tags)', f'{base:,.0f} logs/s', ''),
             (f'LogStore -> SQLite ({size} B/log, 3 tags)', f'{rate:,.0f} logs/s', f'{rate / base:.2f}x baseline'),
             ('  caller-thread cost per record()', f'{enq_us:.1f} µs', '')]
    if a.pg:
        import sqlalchemy as sa
        from openpipe_lab.store import metadata
        eng = sa.create_engine(a.pg)
        with eng.begin() as c: metadata.drop_all(c)
        eng.dispose()
        prate, _, _ = ingest(LogStore(a.pg, dir=d), min(a.n, 50_000))
        rows.append(('LogStore -> Postgres', f'{prate:,.0f} logs/s', f'{prate / base:.2f}x baseline'))
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
