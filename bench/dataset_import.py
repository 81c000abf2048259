"""Import throughput and peak memory of `Dataset.from_jsonl` on generated chat JSONL files.

Usage: python bench/dataset_import.py [--sizes 10000 100000 200000] [--before 86f4ac1] [--repeat 3] [--pg URL]
                                     [--out bench/results/dataset_import.json]

Each measurement runs in a fresh child process whose RSS high-water mark is reset just before the work
(`/proc/self/clear_refs`; `ru_maxrss` would include the parent's size, inherited across fork+exec):
  * `baseline`: read + parse the file line by line with the standard library's `json.loads` (a fixed yardstick);
  * `validate`: read + validate every line (`validate_entry`), nothing written;
  * `import`  : `Dataset.from_jsonl` into a fresh SQLite lab (validate, hash, batched inserts); a file of 8 MiB or
                more is parsed by a worker process while the importer writes (`formats._plain_rows`): its peak RSS
                is reported apart (`worker_peak_rss_mb`: its VmHWM, read every 20 ms while it runs; the exec'd
                process's own mark, not `RUSAGE_CHILDREN`, which counts the forked copy of the parent before exec);
  * `before`  : the same import by the package as it was at git revision `--before` (extracted with `git archive`
                to a temporary folder): the before/after comparison of issue 15 in one run, on one machine;
at each of `--sizes` rows (and, at the end, how much two busy processes get done at once against one: the worker's
gain is bounded by it, and on a shared virtual machine it is often well under 2); with `--pg URL`, `before-pg` and `import-pg` too: the same two imports into that Postgres lab
(each child starts from empty tables, dropped with its own package's schema). Memory is *bounded* when the peak RSS stops growing with the file size: the file is
streamed and entries are written in transactions of 1,000, so what grows is SQLite's page cache, capped by the
store at 64 MiB per connection (`PRAGMA cache_size=-65536`). Rows/s are reported next to the parse-only
baseline's, as a ratio, because absolute speed depends on the machine; each figure is the median of `--repeat` interleaved rounds.
"""
import argparse, json, os, random, resource, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

TOOL = {'type': 'function', 'function': {'name': 'extract_entities', 'description': 'Extract named entities.',
        'parameters': {'type': 'object', 'properties': {'people': {'type': 'array', 'items': {'type': 'string'}},
                                                        'places': {'type': 'array', 'items': {'type': 'string'}}}}}}
WORDS = ('alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec '
         'romeo sierra tango uniform victor whiskey xray yankee zulu').split()

def make_file(path: Path, n: int, seed: int = 0):
    "n chat entries (~1 KB each): a system prompt, a user text, and a text or tool-call output; some with metadata."
    rnd = random.Random(seed)
    system = 'You are an assistant that extracts people and places from text. ' * 3
    with open(path, 'w') as f:
        for i in range(n):
            text = ' '.join(rnd.choice(WORDS) for _ in range(60))
            msgs = [{'role': 'system', 'content': system}, {'role': 'user', 'content': f'#{i}: {text}'}]
            entry = {'messages': msgs}
            if i % 3 == 0:
                args = json.dumps({'people': [rnd.choice(WORDS)], 'places': [rnd.choice(WORDS), rnd.choice(WORDS)]})
                msgs.append({'role': 'assistant', 'content': None, 'tool_calls': [
                    {'id': f'call_{i}', 'type': 'function', 'function': {'name': 'extract_entities', 'arguments': args}}]})
                entry['tools'] = [TOOL]
            else:
                msgs.append({'role': 'assistant', 'content': ' '.join(rnd.choice(WORDS) for _ in range(20))})
            if i % 2 == 0: entry['metadata'] = {'prompt_id': 'extract-v1', 'source': rnd.choice(WORDS)}
            if i % 10 == 0: entry['split'] = 'TEST'
            f.write(json.dumps(entry) + '\n')

CHILD = r'''
import sys, time, json, threading
mode, path, lab = sys.argv[1], sys.argv[2], sys.argv[3]
url = sys.argv[4] if len(sys.argv) > 4 else None  # a Postgres lab instead of a fresh SQLite one
from openpipe_lab.formats import read_jsonl, validate_entry
from openpipe_lab.logstore import LogStore
from openpipe_lab.dataset import Dataset
def mib(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) / 1024
if url:  # Postgres: start from empty tables
    import sqlalchemy as sa
    from openpipe_lab.store import metadata
    eng = sa.create_engine(url)
    with eng.begin() as c: metadata.drop_all(c)
    eng.dispose()
store = LogStore(url or lab + '/lab.db')
# ru_maxrss is inherited from the parent across fork+exec: reset the high-water mark (Linux) and read VmHWM
from openpipe_lab import formats
workers, worker_hwm = [], [0.0]
if hasattr(formats, '_start_worker'):  # (not in the `before` package)
    formats._start_worker = (lambda start: lambda path: workers.append(start(path)) or workers[-1])(formats._start_worker)
def watch():  # the worker's own high-water mark (VmHWM starts afresh at exec)
    while True:
        for w in workers:
            try: worker_hwm[0] = max(worker_hwm[0], int(next(l for l in open(f'/proc/{w.pid}/status') if l.startswith('VmHWM')).split()[1]) / 1024)
            except (OSError, StopIteration): pass
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
open('/proc/self/clear_refs', 'w').write('5')
rss0 = mib('VmRSS')
t = time.perf_counter()
if mode == 'baseline':
    with open(path, 'rb') as f: n = sum(1 for raw in f if json.loads(raw) is not None)
elif mode == 'validate': n = sum(1 for line, obj in read_jsonl(path) if not validate_entry(obj, line=line))
else:
    ds = Dataset.from_jsonl(path, 'bench', store=store)
    n = len(ds)
    assert not ds.errors, ds.errors[:3]
dt = time.perf_counter() - t
import openpipe_lab
print(json.dumps({'package': openpipe_lab.__file__, 'mode': mode, 'rows': n, 'seconds': dt, 'rows_per_s': n / dt,
                  'rss_after_imports_mb': rss0, 'peak_rss_mb': mib('VmHWM'),
                  'worker_peak_rss_mb': worker_hwm[0]}))
'''

ROOT = Path(__file__).resolve().parents[1]

BURN = 'import time; t = time.perf_counter(); x = 0\nfor i in range(10_000_000): x += i\nprint(time.perf_counter() - t)'

def parallel_capacity(rounds: int = 5) -> float:
    "How much work two busy processes get done at once, as a multiple of one alone (2.0: two free cores; the worker's gain depends on it)."
    one = lambda: subprocess.Popen([sys.executable, '-c', BURN], stdout=subprocess.PIPE, text=True)
    ratios = []
    for _ in range(rounds):  # one alone, then two at once, interleaved: the median round
        alone = float(one().communicate()[0])
        pair = [one(), one()]
        ratios.append(2 * alone / max(float(p.communicate()[0]) for p in pair))
    return statistics.median(ratios)

def old_package(rev: str, into: str) -> str:
    "A folder holding `openpipe_lab` as it was at git revision `rev` (for PYTHONPATH)."
    tar = subprocess.run(['git', '-C', str(ROOT), 'archive', rev, 'openpipe_lab'], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', into], input=tar, check=True)
    return into

def run(mode, path, lab, old=None, url=None):
    env = dict(os.environ, PYTHONPATH=old if mode.startswith('before') else str(ROOT))
    child_mode = 'import' if mode.startswith(('before', 'import')) else mode
    out = subprocess.run([sys.executable, '-c', CHILD, child_mode, str(path), lab] + ([url] if mode.endswith('-pg') else []),
                         capture_output=True, text=True, env=env, cwd=lab)  # cwd: no ./openpipe_lab shadows PYTHONPATH
    if out.returncode: raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sizes', type=int, nargs='+', default=[10_000, 100_000, 200_000])
    ap.add_argument('--before', default='86f4ac1', help='git revision whose importer is the "before" figure')
    ap.add_argument('--repeat', type=int, default=3, help='rounds per size; each figure is the median round')
    ap.add_argument('--pg', help='also import into this Postgres lab (postgresql+psycopg://...)')
    ap.add_argument('--out', default='bench/results/dataset_import.json')
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        old = old_package(a.before, tempfile.mkdtemp(dir=d))
        for n in a.sizes:
            path = Path(d) / f'chat_{n}.jsonl'
            make_file(path, n)
            size_mb = path.stat().st_size / 2 ** 20
            for rep in range(a.repeat):  # modes interleaved, `--repeat` rounds: load from other processes hits all alike
                for mode in ('baseline', 'validate', 'before', 'import') + (('before-pg', 'import-pg') if a.pg else ()):
                    lab = tempfile.mkdtemp(dir=d)
                    r = run(mode, path, lab, old, a.pg)
                    r['mode'] = mode
                    assert r['package'].startswith(old if mode.startswith('before') else str(ROOT)), (mode, r['package'])
                    r.update(file_rows=n, file_mb=round(size_mb, 1), round=rep)
                    if mode in ('import', 'before'): r['db_mb'] = round(Path(lab, 'lab.db').stat().st_size / 2 ** 20, 1)
                    shutil.rmtree(lab)
                    results.append(r)
                    print(f"{n:>7} rows {size_mb:6.1f} MB  {mode:<9} {r['rows_per_s']:>9,.0f} rows/s  {r['seconds']:6.1f} s  "
                          f"peak RSS {r['peak_rss_mb']:6.0f} MB (after imports {r['rss_after_imports_mb']:.0f} MB)", flush=True)
    by = {}  # (rows, mode) -> the median round's figures (by rows/s)
    for key in {(r['file_rows'], r['mode']) for r in results}:
        runs = sorted((r for r in results if (r['file_rows'], r['mode']) == key), key=lambda r: r['rows_per_s'])
        by[key] = dict(runs[len(runs) // 2], peak_rss_mb=max(r['peak_rss_mb'] for r in runs))
    summary = {f'{n}_rows': {'import_rows_per_s': round(by[(n, 'import')]['rows_per_s']),
                             'before_rows_per_s': round(by[(n, 'before')]['rows_per_s']),
                             'import_vs_before': round(by[(n, 'import')]['rows_per_s'] / by[(n, 'before')]['rows_per_s'], 2),
                             'before_vs_parse_only': round(by[(n, 'before')]['rows_per_s'] / by[(n, 'baseline')]['rows_per_s'], 3),
                             'import_vs_parse_only': round(by[(n, 'import')]['rows_per_s'] / by[(n, 'baseline')]['rows_per_s'], 3),
                             'import_vs_validate_only': round(by[(n, 'import')]['rows_per_s'] / by[(n, 'validate')]['rows_per_s'], 3),
                             'peak_rss_mb': round(by[(n, 'import')]['peak_rss_mb']),
                             'worker_peak_rss_mb': round(max(r['worker_peak_rss_mb'] for r in results
                                                             if (r['file_rows'], r['mode']) == (n, 'import'))),
                             'before_peak_rss_mb': round(by[(n, 'before')]['peak_rss_mb'])} for n in a.sizes}
    if a.pg:
        for n in a.sizes:
            summary[f'{n}_rows'].update(pg_import_rows_per_s=round(by[(n, 'import-pg')]['rows_per_s']),
                                        pg_before_rows_per_s=round(by[(n, 'before-pg')]['rows_per_s']),
                                        pg_import_vs_before=round(by[(n, 'import-pg')]['rows_per_s'] / by[(n, 'before-pg')]['rows_per_s'], 2))
    for n in a.sizes:
        x = summary[f'{n}_rows']
        print(f"{n:>7} rows: import {x['import_rows_per_s']:,} rows/s vs before ({a.before}) {x['before_rows_per_s']:,} rows/s "
              f"= {x['import_vs_before']}x; peak RSS {x['peak_rss_mb']} MB (before {x['before_peak_rss_mb']} MB)"
              + (f", worker process {x['worker_peak_rss_mb']} MB" if x['worker_peak_rss_mb'] else ''))
        if a.pg: print(f"{n:>7} rows into Postgres: import {x['pg_import_rows_per_s']:,} rows/s vs before {x['pg_before_rows_per_s']:,} rows/s "
                       f"= {x['pg_import_vs_before']}x")
    summary['cpu_parallel_capacity'] = round(parallel_capacity(), 2)
    print(f"two busy processes at once do {summary['cpu_parallel_capacity']}x the work of one (2.0: two free cores)")
    print(json.dumps(summary))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({'results': results, 'summary': summary}, indent=1))

if __name__ == '__main__': main()
