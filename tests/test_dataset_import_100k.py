"""A 100k-row JSONL import in a fresh process: every row arrives, bad rows are reported by line, and peak memory stays
bounded (it does not grow with the file: the file is streamed and written in batches; what grows is SQLite's
page cache, which the store caps per connection). Throughput is reported, never asserted (see bench/)."""
import json, subprocess, sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'bench'))
from dataset_import import make_file  # noqa: E402  (the benchmark's generator: one source of test data)

CHILD = r'''
import json, sys, time
from openpipe_lab.logstore import LogStore
from openpipe_lab.dataset import Dataset
def mib(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) / 1024
path, db = sys.argv[1], sys.argv[2]
store = LogStore(db)
with store.db.connect() as c: cache_kib = -c.exec_driver_sql('PRAGMA cache_size').scalar()
# ru_maxrss is inherited from the parent across fork+exec: reset the high-water mark to measure this import alone
open('/proc/self/clear_refs', 'w').write('5')
before = mib('VmRSS')
t = time.perf_counter()
ds = Dataset.from_jsonl(path, 'big', store=store)
dt = time.perf_counter() - t
print(json.dumps({'rows': len(ds), 'errors': [[p.line, p.path] for p in ds.errors], 'seconds': dt,
                  'test': len(ds.test), 'rss_before_mb': before, 'peak_mb': mib('VmHWM'), 'cache_mb': cache_kib / 1024}))
'''


def test_100k_rows_import_in_bounded_memory(tmp_path):
    n = 100_000
    path = tmp_path / 'big.jsonl'
    make_file(path, n)
    with open(path, 'a') as f:  # three bad lines at the end: they must be reported, the rest imported
        f.write('{"messages": [{"role": "user", "content": "no output"}]}\n{not json\n')
        f.write(json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}], 'split': 'DEV'}) + '\n')
    size_mb = path.stat().st_size / 2 ** 20
    r = subprocess.run([sys.executable, '-c', CHILD, str(path), str(tmp_path / 'lab.db')], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m['rows'] == n and m['errors'] == [[n + 1, 'messages'], [n + 2, ''], [n + 3, 'split']]
    assert m['test'] >= n // 10  # every 10th generated row says TEST; the others get ~10% more from the hash split
    growth_mb, cache_mb = m['peak_mb'] - m['rss_before_mb'], m['cache_mb']
    print(f"\n100k-row import: {size_mb:.0f} MB file, {m['seconds']:.1f} s ({n / m['seconds']:,.0f} rows/s), "
          f"peak RSS {m['peak_mb']:.0f} MB, {growth_mb:.0f} MB above the {m['rss_before_mb']:.0f} MB before the import "
          f"(SQLite page cache cap {cache_mb:.0f} MB)")
    # bounded: the growth is at most the page cache plus a fixed allowance, whatever the file's size
    # (bench/dataset_import.py shows the plateau: the same peak at 100k and 200k rows)
    assert growth_mb < cache_mb + 48, (growth_mb, cache_mb)
