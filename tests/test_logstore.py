"LogStore across processes (SQLite) and on a real PostgreSQL server."
import json, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import sqlalchemy as sa
from openpipe_lab.core import SchemaVersionError, ValidationError
from openpipe_lab.logstore import LogStore
import openpipe_lab.dataset  # noqa: F401  (LogQuery.to_dataset is defined by the dataset layer)

WRITER = textwrap.dedent('''
    import sys
    from openpipe_lab.logstore import LogStore
    url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logs = LogStore(url)
    for i in range(n):
        req = {"model": "m", "messages": [{"role": "user", "content": f"{who} {i} " + "x" * 500}], "metadata": {"who": who}}
        if i % 2: logs.report(requested_at=1, received_at=2, req_payload=req, resp_payload={"id": f"{who}-{i}"}, status_code=200)
        else: logs.record(model="m", req_payload=req, resp_payload={"id": f"{who}-{i}"}, completion_id=f"{who}-{i}", status_code=200, tags={"who": who, "i": str(i)})
        if i % 1000 == 999: logs.flush()
    # no final flush: interpreter exit must drain the queue
''')

def test_two_processes_write_one_sqlite_lab(tmp_path):
    url, n = str(tmp_path / 'lab.db'), 6000
    LogStore(url).close()  # create the schema first, as a notebook would
    script = tmp_path / 'writer.py'; script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), url, who, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in ('a', 'b')]
    reader = LogStore(url); seen = []
    while any(p.poll() is None for p in procs):  # a third process reads while both write
        seen.append(len(reader.all())); time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert 'locked' not in err and 'Traceback' not in err, err
    assert len(reader.all()) == 2 * n
    for who in 'ab':
        assert len(reader.filter(who=who)) == n
        ids = {r['completion_id'] for r in reader.filter(who=who)}
        assert ids == {f'{who}-{i}' for i in range(n)}
    assert seen == sorted(seen)  # readers only ever see whole, growing batches
    assert not (tmp_path / 'unwritten-logs.jsonl').exists()

def test_exit_drains_queue_and_reopen_keeps_data(tmp_path):
    url = str(tmp_path / 'lab.db')
    code = f"from openpipe_lab.logstore import LogStore\nl = LogStore({url!r})\n" \
           "for i in range(3000): l.record(model='x', req_payload={'i': i}, tags={'k': str(i % 2)})\n"
    subprocess.run([sys.executable, '-c', code], check=True)
    logs = LogStore(url)
    assert len(logs.filter(model='x')) == 3000 and len(logs.filter(k='1')) == 1500

def test_request_is_captured_at_call_time(lab):
    msgs = [{'role': 'user', 'content': 'hi'}]
    lab.record(model='m', req_payload={'model': 'm', 'messages': msgs})
    msgs.append({'role': 'assistant', 'content': 'appended after the call'})
    (row,) = list(lab.filter(model='m'))
    assert row['req_payload']['messages'] == [{'role': 'user', 'content': 'hi'}]

def test_bad_rows_never_reach_the_database(lab):
    lab.report(req_payload={'model': 'ok', 'messages': []})
    with pytest.raises(ValidationError, match=r'req_payload.metadata.n: must be a string'):
        lab.report(req_payload={'model': 'bad', 'messages': [], 'metadata': {'n': [1]}})
    assert [r['model'] for r in lab.all()] == ['ok']

def _exercise(logs):
    "The LogStore API, end to end, on any backend."
    for i in range(30):
        logs.report(requested_at=1000 + i, received_at=1100 + i, status_code=200 if i % 10 else 500,
                    error_message=None if i % 10 else 'upstream error',
                    req_payload={'model': 'gpt-4o-mini' if i % 2 else 'gpt-4o', 'messages': [{'role': 'user', 'content': f'question {i} ünïcode'}],
                                 'metadata': {'prompt_id': 'p1' if i < 20 else 'p2', 'parity': str(i % 2)}},
                    resp_payload=None if i % 10 == 0 else {'id': f'cmpl-{i}', 'choices': [{'message': {'role': 'assistant', 'content': f'answer {i}'}}],
                                                          'usage': {'prompt_tokens': i, 'completion_tokens': 1}})
    assert len(logs.all()) == 30
    assert len(logs.filter(prompt_id='p1')) == 20
    assert len(logs.filter(prompt_id='p1', model='gpt-4o-mini')) == 10
    assert len(logs.filter(status_code=500)) == 3
    assert len(logs.filter(contains='question 1')) == 11  # 1, 10..19
    assert len(logs.filter(contains='ünïcode')) == 30
    assert len(logs.filter(since=1010, until=1020)) == 10
    assert [r['completion_id'] for r in logs.filter(completion_id='cmpl-7')] == ['cmpl-7']
    assert logs.filter(prompt_id='p2').update_metadata(reviewed='yes', parity=None) == 10
    assert len(logs.filter(reviewed='yes')) == 10 and len(logs.filter(parity='1')) == 10
    assert len(logs.filter(**{'metadata.parity': None})) == 10
    df = logs.filter(prompt_id='p2').df
    assert set(df['tag.reviewed']) == {'yes'} and 'tag.parity' not in df
    return logs

def test_logstore_api_on_postgres(pg_url, tmp_path):
    logs = _exercise(LogStore(pg_url, dir=tmp_path))
    n = logs.all().export(tmp_path / 'out.jsonl')
    lines = [json.loads(l) for l in open(tmp_path / 'out.jsonl')]
    assert n == 30 and lines[0]['output']['error']['message'] == 'upstream error'
    logs.add_provider('team', 'http://127.0.0.1:9/v1', api_key_env='TEAM_KEY')
    assert logs.providers()[0]['api_key_env'] == 'TEAM_KEY'
    # a second handle (another process, in practice) sees the same data
    assert len(LogStore(pg_url, dir=tmp_path).filter(reviewed='yes')) == 10
    # a lab from a newer schema is refused, untouched
    with logs.db.begin() as c: c.execute(logs.t.meta.update().values(value='99'))
    with pytest.raises(SchemaVersionError, match='schema version 99'):
        LogStore(pg_url, dir=tmp_path)

def test_logstore_api_on_sqlite(lab):
    _exercise(lab)

def test_report_anthropic_is_stored_in_openai_shape_and_becomes_a_dataset(lab):
    req = {'model': 'claude-3-5-sonnet-20241022', 'max_tokens': 100, 'system': 'Redact names.',
           'metadata': {'user_id': 'u-1'},
           'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'Ann called.'}]}]}
    resp = {'id': 'msg_01', 'type': 'message', 'role': 'assistant', 'model': 'claude-3-5-sonnet-20241022',
            'content': [{'type': 'text', 'text': '[NAME] called.'}], 'stop_reason': 'end_turn',
            'usage': {'input_tokens': 12, 'output_tokens': 4}}
    lab.report_anthropic(requested_at=1, received_at=5, req_payload=req, resp_payload=resp, status_code=200,
                         metadata={'prompt_id': 'redact'})
    (row,) = list(lab.filter(prompt_id='redact'))
    assert row['model'] == 'anthropic:claude-3-5-sonnet-20241022' and row['completion_id'] == 'msg_01'
    assert row['req_payload']['messages'] == [{'role': 'system', 'content': 'Redact names.'}, {'role': 'user', 'content': 'Ann called.'}]
    assert row['resp_payload']['choices'][0]['message']['content'] == '[NAME] called.'
    assert (row['prompt_tokens'], row['completion_tokens'], row['source']) == (12, 4, 'report_anthropic')
    ds = lab.filter(prompt_id='redact').to_dataset('redact-v1')
    assert len(ds) == 1 and not ds.errors
    (entry,) = list(ds.rows())
    assert entry['messages'][-1] == {'role': 'assistant', 'content': '[NAME] called.'}
    with pytest.raises(ValidationError, match=r'req_payload.messages\[0\]'):
        lab.report_anthropic(req_payload={'model': 'c', 'messages': [{'role': 'system', 'content': 'x'}]})

def test_update_metadata_and_filter_store_lone_surrogate_tags_like_record(lab):
    "A tag holding a lone UTF-16 surrogate (valid JSON `\\ud800`) is set, re-set and found, never a driver's UnicodeEncodeError."
    bad_old, bad_new = 'x\ud800', 'y\udc00'  # neither can be encoded as UTF-8
    lab.record(model='m', req_payload={'messages': []}, tags={'a': bad_old})
    lab.record(model='m', req_payload={'messages': []}, tags={'a': 'plain'})
    lab.flush()
    # the surrogate log's stored tags JSON must be re-written: a new tag, then one with a surrogate value
    assert lab.all().filter(a=bad_old).update_metadata(b='1') == 1
    assert lab.all().update_metadata(c=bad_new) == 2
    tags = sorted((r['tags'] for r in lab.all()), key=lambda t: t['a'])
    assert tags == sorted([{'a': bad_old, 'b': '1', 'c': bad_new}, {'a': 'plain', 'c': bad_new}], key=lambda t: t['a'])
    assert len(lab.all().filter(c=bad_new)) == 2 and len(lab.all().filter(a=bad_old, b='1')) == 1
    assert lab.all().filter(a=bad_old).update_metadata(c=None) == 1
    assert len(lab.all().filter(c=bad_new)) == 1

def test_a_raising_when_durable_callback_does_not_stop_the_writer(lab):
    "The callback runs on the writer thread: its exception is a warning, and the logs after it are still written."
    import threading, warnings
    first = lab.record(model='m', req_payload={'messages': []})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        lab.when_durable(lambda err: 1 / 0)
        later = lab.record(model='m', req_payload={'messages': []})
        done, got = threading.Event(), []
        lab.when_durable(lambda err: (got.append(err), done.set()))
        assert done.wait(10) and got == [None]
    assert sorted(lab.all().ids()) == sorted([first, later])
    assert any('when_durable callback raised ZeroDivisionError' in str(w.message) for w in caught)


@pytest.fixture(params=['sqlite', 'postgres'])
def any_lab(request, tmp_path):
    "A fresh lab on SQLite, or on Postgres (skipped without OPENPIPE_LAB_TEST_PG)."
    if request.param == 'sqlite': return LogStore(str(tmp_path / 'lab.db'))
    return LogStore(request.getfixturevalue('pg_url'), dir=tmp_path)


def test_multi_row_inserts_keep_every_value_in_its_column(any_lab):
    "Logs and tag sets go in several to a statement (`_insert_many`): a limit of 63 parameters makes 3 logs a statement, 10 logs 3 statements and a remainder."
    from openpipe_lab.logstore import _LOG_COLS
    lab = any_lab
    lab._params = 3 * len(_LOG_COLS)  # tag sets: 31 a statement, their pairs 21
    ids = [lab.record(model=f'm{i}', req_payload={'i': i}, resp_payload={'id': f'c{i}'}, status_code=200 + i,
                      completion_id=f'c{i}', tags={'i': str(i), 'j': 'x'} if i % 2 else None, cache_hit=i == 4, stream=i == 5,
                      prompt_tokens=i, duration_ms=10 * i) for i in range(10)]
    lab.record(model='many', tags={'k': 'a'}); [lab.record(model='many', tags={'k': str(i % 40), 'n': str(i)}) for i in range(80)]
    lab.flush()
    got = {r['id']: r for r in lab.filter()}
    for i, lid in enumerate(ids):
        r = got[lid]
        assert (r['model'], r['req_payload'], r['resp_payload'], r['status_code'], r['completion_id']) == (f'm{i}', {'i': i}, {'id': f'c{i}'}, 200 + i, f'c{i}')
        assert (r['tags'], r['cache_hit'], r['stream'], r['prompt_tokens'], r['duration_ms']) == ({'i': str(i), 'j': 'x'} if i % 2 else {}, i == 4, i == 5, i, 10 * i)
        assert r['cache_hit'] is (i == 4)  # read back as a bool, though SQLite was given an int
    assert [len(lab.filter(i=str(i))) for i in range(10)] == [0, 1] * 5
    assert [len(lab.filter(k=str(k))) for k in range(40)] == [2] * 40 and len(lab.filter(n='79', k='39')) == 1
    with lab.db.connect() as c:  # 5 + 1 + 80 sets, each pair written once
        assert c.exec_driver_sql('SELECT count(*), count(DISTINCT digest) FROM tag_sets').one() == (86, 86)
        assert c.exec_driver_sql('SELECT count(*) FROM tag_set_tags').scalar() == 5 * 2 + 1 + 80 * 2


def test_rows_per_statement_stays_within_the_drivers_parameter_limit(lab):
    with lab.db.begin() as c:
        limit = c.connection.driver_connection.getlimit(__import__('sqlite3').SQLITE_LIMIT_VARIABLE_NUMBER)
        per = {n: lab._rows_per_statement(c.connection.driver_connection, n) for n in (1, 2, 3, 21)}
    assert all(1 <= k <= 1000 and k * n <= limit for n, k in per.items())


@pytest.mark.parametrize('per', [1, 3, 7, 100, 1000])
def test_slices_cover_every_row_once_in_few_statement_shapes(per):
    "`_slices` cuts n rows into statements of `per` rows plus at most three for the rest, from a fixed set of sizes."
    from openpipe_lab.logstore import _slices
    shapes = set()
    for n in list(range(0, 260)) + [999, 1000, 1001, 4321, 5000]:
        s = list(_slices(n, per))
        assert [i for i, _ in s] == [0] + [j for _, j in s[:-1]] if s else n == 0  # contiguous from 0 ...
        assert (s[-1][1] if s else 0) == n                                          # ... to n
        assert all(0 < j - i <= per for i, j in s) and len(s) <= n // per + 3
        shapes |= {j - i for i, j in s}
    assert len(shapes) <= 1 + 27  # `per`, then hundreds, tens and units: each shape is one prepared statement
