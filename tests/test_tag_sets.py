"""Tags as interned tag sets (schema 2, issue 15; keys by sorted JSON, schema 3): a schema-1 or schema-2 lab written
by the package as it was before each change upgrades on opening, on SQLite and Postgres, and every filter answers
as the old package answered; a fresh lab
written by the new package answers the same; the writer's tag-set cache survives rolled-back batches and other
writers; the WAL checkpointer keeps the WAL bounded and stops with the writer."""
import json, os, subprocess, sys, threading, warnings
from pathlib import Path
import pytest
from conftest import package_at
import sqlalchemy as sa
from openpipe_lab.logstore import LogStore
from openpipe_lab.store import tables, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
BEFORE = '90ccf7f'  # the last revision with schema 1 (a log_tags row per tag per log)
BEFORE_V3 = '4945f0c'  # the last revision with schema 2 (every tag set keyed by a sha256)

# Runs under either package: writes the same logs, then prints every filter's answer (by completion id) and the rows.
SCRIPT = r'''
import json, sys
from openpipe_lab.logstore import LogStore
url, mode = sys.argv[1], sys.argv[2]
logs = LogStore(url)
if mode == 'write':
    if '://' in url:
        import sqlalchemy as sa
        from openpipe_lab.store import metadata
        eng = sa.create_engine(url)
        with eng.begin() as c: metadata.drop_all(c); c.exec_driver_sql('DROP TABLE IF EXISTS log_tags')
        eng.dispose()
        logs = LogStore(url)
    envs, users = ['prod', 'dev', 'stage'], ['u1', 'u2', 'u3', 'u\ud800', 'ü']
    for i in range(300):
        tags = {'env': envs[i % 3], 'user': users[i % 5]}
        if i % 4 == 0: tags = dict(reversed(list(tags.items())))  # the same set, in the other order
        if i % 7 == 0: tags['only7'] = 'yes'
        if i % 11 == 0: tags = {}
        req = {'model': 'm', 'messages': [{'role': 'user', 'content': f'q{i}'}], 'metadata': tags or None}
        if i % 2: logs.record(model=f'm{i % 2}', req_payload=req, resp_payload={'id': f'L{i}'}, completion_id=f'L{i}', tags=tags)
        else: logs.report(req_payload=req, resp_payload={'id': f'L{i}'}, tags={'n': i % 3, 'flag': i % 6 == 0})
    logs.flush()
    logs.filter(env='dev', user='u2').update_metadata(relabel='true')
    logs.filter(env='stage').update_metadata(user=None)
specs = [{'env': 'prod'}, {'user': 'u1'}, {'env': 'prod', 'user': 'u2'}, {'env': None}, {'user': None},
         {'metadata.env': 'dev'}, {'tags.user': 'u3'}, {'user': 'u\ud800'}, {'user': 'ü'}, {'only7': 'yes'},
         {'n': '1'}, {'n': 2}, {'flag': True}, {'flag': 'false'}, {'relabel': 'true'}, {'missing': None},
         {'model': 'm1', 'env': 'dev'}, {'env': 'nope'}]
answers = [sorted(r['completion_id'] or '' for r in logs.filter(**s)) for s in specs]
rows = sorted((r['completion_id'], r['id'], r['tags']) for r in logs.filter())
print(json.dumps({'answers': answers, 'rows': rows}))
'''


@pytest.fixture(scope='module')
def before_pkg(tmp_path_factory) -> str:
    return package_at(BEFORE, tmp_path_factory)

@pytest.fixture(scope='module')
def v2_pkg(tmp_path_factory) -> str:
    return package_at(BEFORE_V3, tmp_path_factory)


def run(pkg: str, url: str, mode: str, cwd) -> dict:
    r = subprocess.run([sys.executable, '-c', SCRIPT, url, mode], capture_output=True, text=True, cwd=cwd, timeout=300,
                       env={**os.environ, 'PYTHONPATH': pkg})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def schema_of(url: str) -> tuple[str, set]:
    eng = sa.create_engine(url if '://' in url else f'sqlite:///{url}')
    with eng.connect() as c:
        v = c.execute(sa.select(tables.meta.c.value).where(tables.meta.c.key == 'schema_version')).scalar()
        names = set(sa.inspect(c).get_table_names()) | {ix['name'] for ix in sa.inspect(c).get_indexes('dataset_entries')}
    eng.dispose()
    return v, names


def check_upgrade(before_pkg, url, tmp_path):
    old = run(before_pkg, url, 'write', tmp_path)  # a schema-1 lab, and what the schema-1 package answers
    assert schema_of(url)[0] == '1' and {'log_tags', 'ix_dataset_entries_dataset_id'} <= schema_of(url)[1]
    assert len(old['answers'][0]) == sum(1 for i in range(300) if i % 3 == 0 and i % 11)  # env=prod, counted by hand
    assert all(old['answers'][:-1]) and old['answers'][-1] == []  # every kind of filter matches something (but 'nope')
    upgraded = run(str(ROOT), url, 'read', tmp_path)  # the new package opens it: upgrade, then the same filters
    version, names = schema_of(url)
    assert version == str(SCHEMA_VERSION) == '3' and 'log_tags' not in names and 'tag_sets' in names
    assert 'ix_dataset_entries_dataset_id' not in names and 'ix_entries_dataset_position' in names
    assert upgraded == old  # same logs, same ids, same tags, same answer to every filter
    fresh = run(str(ROOT), url + '.fresh' if '://' not in url else url, 'write', tmp_path)  # written by the new package
    assert fresh['answers'] == old['answers'] and [r[::2] for r in fresh['rows']] == [r[::2] for r in old['rows']]


def test_schema1_sqlite_lab_upgrades_and_answers_as_before(before_pkg, tmp_path):
    check_upgrade(before_pkg, str(tmp_path / 'lab.db'), tmp_path)


def test_schema1_postgres_lab_upgrades_and_answers_as_before(before_pkg, pg_url, tmp_path):
    check_upgrade(before_pkg, pg_url, tmp_path)


def keys_of(url: str) -> list:
    eng = sa.create_engine(url if '://' in url else f'sqlite:///{url}')
    with eng.connect() as c: keys = c.exec_driver_sql('SELECT digest FROM tag_sets ORDER BY id').scalars().all()
    eng.dispose()
    return keys


def check_v2_upgrade(v2_pkg, url, tmp_path):
    old = run(v2_pkg, url, 'write', tmp_path)  # a schema-2 lab: every set keyed by a 64-digit sha256
    before = keys_of(url)
    assert schema_of(url)[0] == '2' and len(before) > 10 and all(len(k) == 64 and k.isalnum() for k in before)
    upgraded = run(str(ROOT), url, 'read', tmp_path)
    after = keys_of(url)
    assert schema_of(url)[0] == str(SCHEMA_VERSION) == '3' and upgraded == old  # the same answer to every filter
    assert len(after) == len(before) and all(k.startswith('{') for k in after) and len(set(after)) == len(after)
    logs = LogStore(url)  # tags of an upgraded set again, in either order: the set is found, not made twice
    n = len(logs.filter(env='prod', user='u1'))
    logs.record(model='m', tags={'user': 'u1', 'env': 'prod'}); logs.record(model='m', tags={'env': 'prod', 'user': 'u1'})
    logs.flush()
    assert keys_of(url) == after and len(logs.filter(env='prod', user='u1')) == n + 2 and n > 0
    logs.close(); logs.db.dispose()


def test_schema2_sqlite_lab_upgrades_and_answers_as_before(v2_pkg, tmp_path):
    check_v2_upgrade(v2_pkg, str(tmp_path / 'lab.db'), tmp_path)


def test_schema2_postgres_lab_upgrades_and_answers_as_before(v2_pkg, pg_url, tmp_path):
    check_v2_upgrade(v2_pkg, pg_url, tmp_path)


def test_a_rolled_back_batch_leaves_no_tag_set_id_behind(lab):
    "Two logs with one id in one batch: the batch rolls back (its new tag set with it), the good log is retried alone."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        lab.record(model='m', req_payload={'q': 1}, tags={'fresh': 'set'}, id='log_dup')
        lab.record(model='m', req_payload={'q': 2}, tags={'fresh': 'set'}, id='log_dup')
        lab.flush()
    assert any('unwritten-logs.jsonl' in str(w.message) for w in caught)
    later = lab.record(model='m', req_payload={'q': 3}, tags={'fresh': 'set'})  # reuses the cached set id
    lab.flush()
    assert sorted(lab.filter(fresh='set').ids()) == sorted(['log_dup', later])
    with lab.db.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(tables.tag_sets)).scalar() == 1
        orphans = c.exec_driver_sql('SELECT count(*) FROM logs WHERE tag_set_id NOT IN (SELECT id FROM tag_sets)').scalar()
    assert orphans == 0


def test_two_stores_on_one_lab_share_tag_sets(tmp_path):
    a, b = LogStore(str(tmp_path / 'lab.db')), LogStore(str(tmp_path / 'lab.db'))
    for s in (a, b, a):
        s.record(model='m', req_payload={'q': 1}, tags={'k': 'v', 'z': '1'}); s.flush()
    b.record(model='m', req_payload={'q': 1}, tags={'z': '1', 'k': 'v'}); b.flush()  # same set, other order
    assert a.filter(k='v').filter(z='1').count() == 4
    b.filter(k='v').update_metadata(k='w')  # through b; a's cache still maps the old text to the old set
    a.record(model='m', req_payload={'q': 1}, tags={'k': 'v', 'z': '1'}); a.flush()
    assert (len(a.filter(k='w')), len(a.filter(k='v')), len(b.filter(z='1'))) == (4, 1, 5)
    with a.db.connect() as c: assert c.execute(sa.select(sa.func.count()).select_from(tables.tag_sets)).scalar() == 2


def test_wal_is_checkpointed_off_the_writer_and_the_thread_stops(tmp_path):
    "~40 MB of logs: the checkpointer copies the WAL into the database file long before the connections' own 64 MiB threshold."
    import time
    logs, db = LogStore(str(tmp_path / 'lab.db')), tmp_path / 'lab.db'
    text = 'x' * 4000
    for i in range(10_000):
        logs.record(model='m', req_payload={'q': text}, resp_payload={'id': str(i)}, tags={'b': str(i % 5)})
    logs.flush()
    deadline = time.monotonic() + 30
    while db.stat().st_size < 20 << 20 and time.monotonic() < deadline: time.sleep(0.1)
    assert db.stat().st_size >= 20 << 20, db.stat().st_size  # pages reached the database file while the WAL was below 64 MiB
    assert Path(str(db) + '-wal').stat().st_size <= 64 << 20
    assert any(t.name == 'openpipe-lab-wal-checkpoint' for t in threading.enumerate())
    logs.close()
    assert not any(t.name == 'openpipe-lab-wal-checkpoint' for t in threading.enumerate())
    assert len(logs.filter(b='3')) == 2000


def test_a_second_store_reuses_the_sets_of_the_first(tmp_path):
    "SQLite inserts sets without RETURNING and reads ids back by digest: a store with a cold cache reuses another's sets, writing no pair twice."
    a, b = LogStore(str(tmp_path / 'lab.db')), LogStore(str(tmp_path / 'lab.db'))
    a.record(model='m', req_payload={'q': 1}, tags={'k': 'v', 'z': '1'}); a.flush()
    b.record(model='m', req_payload={'q': 2}, tags={'z': '1', 'k': 'v'}); b.record(model='m', req_payload={'q': 3}, tags={'k': 'x'}); b.flush()
    assert (len(a.filter(k='v')), len(b.filter(z='1')), len(a.filter(k='x')), len(a.filter(k=None))) == (2, 2, 1, 0)
    with a.db.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(tables.tag_sets)).scalar() == 2
        assert c.exec_driver_sql('SELECT count(*) FROM tag_set_tags').scalar() == 3  # k, z of the first set; k of the second


# -- the SQLite writer's one statement per batch (`log_ingest`) ------------------------------------------------------
from hypothesis import given, settings, strategies as st, HealthCheck
from openpipe_lab.store import storable_str

_TRICKY = st.text(alphabet=st.sampled_from(['a', 'é', '\x00', '\ue000', '\ue001', '\ue002', '\ud800', '😀', '"', '\\', '\n']), max_size=6)

@pytest.fixture(scope='module')
def ingest_lab(tmp_path_factory):
    lab = LogStore(str(tmp_path_factory.mktemp('ingest') / 'lab.db'))
    yield lab
    lab.close()

@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tags=st.dictionaries(_TRICKY.filter(bool), _TRICKY, min_size=1, max_size=4))
def test_tag_pairs_written_by_the_trigger_equal_the_strings_given(ingest_lab, tags):
    "NUL, the escape's own characters, lone surrogates, quotes: each pair the trigger unpacks (json_each) is the string bound directly."
    lab = ingest_lab
    lid = lab.record(model='m', req_payload={'q': 1}, tags=tags); lab.flush()
    with lab.db.connect() as c:
        set_id = c.exec_driver_sql('SELECT tag_set_id FROM logs WHERE id = ?', (lid,)).scalar()
        got = c.exec_driver_sql('SELECT key, value FROM tag_set_tags WHERE tag_set_id = ?', (set_id,)).all()
    assert set_id is not None and sorted(got) == sorted((storable_str(k), storable_str(v)) for k, v in tags.items())
    assert lid in lab.filter(**tags).ids()  # the filter (bound parameters) finds what the trigger wrote


def test_a_small_batch_is_one_statement_and_a_large_one_one_transaction(tmp_path):
    "The writer's statements, traced: a batch up to `_ONE_STATEMENT` rows is a lone INSERT into log_ingest (SQLite's own transaction, one GIL hand-back); one over the driver's parameter limit in `_slices` inside BEGIN IMMEDIATE ... COMMIT; a larger batch takes the plain multi-row INSERTs."
    from sqlalchemy import event
    from openpipe_lab.logstore import _ONE_STATEMENT, _INGEST_COLS
    lab, seen = LogStore(str(tmp_path / 'lab.db')), []
    def trace(dbapi_conn, _):  # SQLite reports a statement again at each row's trigger: consecutive repeats are one statement
        def log(sql):
            entry = (threading.current_thread().name, sql.split(None, 3)[:3], hash(sql))
            if not seen or seen[-1] != entry: seen.append(entry)
        dbapi_conn.set_trace_callback(log)
    event.listen(lab.db.engine, 'connect', trace)
    lab.db.engine.dispose()  # connections made from now on are traced
    def writer_statements(count, **tags):
        seen.clear()
        lab._get_writer().linger = 0.5  # let the burst queue up: one batch
        for i in range(count): lab.record(model='m', req_payload={'q': i}, tags={k: v.format(i=i) for k, v in tags.items()})
        lab.flush()
        return [s[0] if s[0] != 'INSERT' else s[2] for t, s, _ in seen if t == 'openpipe-lab-log-writer' and s[0] != 'CREATE']
    assert writer_statements(_ONE_STATEMENT, k='{i}', env='x') == ['log_ingest']
    big = writer_statements(_ONE_STATEMENT + 36, k='{i}')  # throughput-bound: plain multi-row INSERTs, ids resolved in Python
    assert big[0] == 'BEGIN' and big[-1] == 'COMMIT' and 'log_ingest' not in big and {'tag_sets', 'tag_set_tags', 'logs'} <= set(big), big
    lab._params = 10 * len(_INGEST_COLS)  # 10 rows a statement
    assert writer_statements(25, k='{i}') == ['BEGIN', 'log_ingest', 'log_ingest', 'log_ingest', 'COMMIT']  # 10 + 10 + 5
    assert len(lab.filter(k='3')) == 3 and len(lab.filter(env='x')) == _ONE_STATEMENT and len(lab) == 2 * _ONE_STATEMENT + 36 + 25
    lab.close()
