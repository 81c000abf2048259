"""Dataset import/export through files, processes and the real client: nasty JSONL fixtures, round trips with tools and
rejected messages, HF interop, request-log import over the real openai SDK, scripts, and Postgres."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest
from fakes import Reply, fake_upstream  # noqa: F401  (fixture)
from openpipe_lab.core import AlreadyExistsError, ConfigError, NotFoundError, ValidationError
from openpipe_lab.formats import functions_to_tools
from openpipe_lab.logstore import LogStore
from openpipe_lab.dataset import Dataset, ROW_FIELDS

FIXTURES = Path(__file__).parent / 'fixtures' / 'datasets'
EXPECTED = json.loads((FIXTURES / 'expected.json').read_text())


def _raw_lines(path: Path) -> dict:
    "line number -> parsed object, for the lines a strict reader accepts (independent of the importer)."
    out = {}
    for n, raw in enumerate(path.read_bytes().split(b'\n'), 1):
        if n == 1: raw = raw.removeprefix(b'\xef\xbb\xbf')
        if not raw.strip(): continue
        try: out[n] = json.loads(raw.decode('utf-8'))
        except (UnicodeDecodeError, ValueError): pass
    return out


@pytest.mark.parametrize('parallel', [False, True], ids=['here', 'worker'])
@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_nasty_fixture(lab, name, parallel, monkeypatch):
    "Every bad line is reported with its line and field; every good line is imported exactly as written (read here or by a worker process)."
    from openpipe_lab import formats
    monkeypatch.setattr(formats, '_HEAD_LINES', 1)  # the worker reads every line after the first
    path, exp = FIXTURES / name, EXPECTED[name]
    want = sorted((p[0] or 0, p[1]) for p in exp['problems'])
    if exp['valid'] == 0:
        with pytest.raises(ValidationError) as e:
            Dataset.from_jsonl(path, 'nasty', store=lab, parallel=parallel)
        assert sorted((p.line or 0, p.path) for p in e.value.problems) == want
        assert Dataset.list(store=lab).empty  # nothing left behind
        return
    ds = Dataset.from_jsonl(path, 'nasty', store=lab, parallel=parallel)
    assert sorted((p.line or 0, p.path) for p in ds.errors) == want, [str(p) for p in ds.errors]
    assert all(p.message for p in ds.errors)
    bad_lines = {p.line for p in ds.errors}
    good = [obj for n, obj in sorted(_raw_lines(path).items()) if n not in bad_lines]
    assert len(ds) == exp['valid'] == len(good)
    for obj, row in zip(good, ds.rows(split=None, apply_pruning=False)):
        obj = functions_to_tools(obj)
        for k in ('messages', 'tools', 'tool_choice', 'response_format', 'rejected_message'):
            assert row[k] == obj.get(k), (name, k)
        assert row['metadata'] == (obj.get('metadata') or {})
        if 'split' in obj: assert row['split'] == obj['split']
        assert row['split'] in ('TRAIN', 'TEST')


def test_deprecated_functions_become_tools(lab):
    ds = Dataset.from_jsonl(FIXTURES / 'deprecated_functions.jsonl', 'fn', store=lab)
    first, second = ds.rows(split=None, apply_pruning=False)
    assert first['tools'] == [{'type': 'function', 'function': json.loads((FIXTURES / 'deprecated_functions.jsonl').read_text().splitlines()[0])['functions'][0]}]
    assert first['tool_choice'] == {'type': 'function', 'function': {'name': 'identify_capital'}}
    out = first['messages'][-1]
    assert 'function_call' not in out and out['tool_calls'][0]['function']['arguments'] == '{"capital": "Santiago"}'
    tool_msg = second['messages'][2]
    assert tool_msg['role'] == 'tool' and tool_msg['tool_call_id'] == second['messages'][1]['tool_calls'][0]['id']


def test_export_import_round_trip_with_tools_and_rejected(lab, tmp_path):
    ds = Dataset.from_jsonl(FIXTURES / 'mixed.jsonl', 'mixed', store=lab)
    ds.add_entries([{'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}],
                     'rejected_message': {'role': 'assistant', 'content': None, 'tool_calls': [
                         {'id': 'r1', 'type': 'function', 'function': {'name': 'identify_capital', 'arguments': '{}'}}]}}])
    ds.set_output(ds.df.id[1], 'Stockholm, Sweden')
    ds.split(test_fraction=0.5, seed=3)
    out = ds.to_jsonl(tmp_path / 'export.jsonl')
    lines = [json.loads(l) for l in out.read_text(encoding='utf-8').splitlines()]
    assert len(lines) == len(ds) == 6
    assert all(set(l) <= set(ROW_FIELDS) and 'split' in l and 'messages' in l for l in lines)
    assert lines[0]['tools'][0]['function']['name'] == 'identify_capital' and 'tool_choice' in lines[0]
    assert lines[1]['rejected_message'] == {'role': 'assistant', 'content': 'London'}
    back = Dataset.from_jsonl(out, 'mixed-back', store=lab)
    assert back.errors == []
    assert list(back.rows(None, apply_pruning=False)) == list(ds.rows(None, apply_pruning=False))
    assert back.snapshot() == ds.snapshot() and back.test.snapshot() == ds.test.snapshot()
    # pruning rules: part of the snapshot, applied to inputs on request, never to outputs
    ds.add_pruning_rule('You are a helpful assistant')
    assert back.snapshot() != ds.snapshot()
    pruned = [json.loads(l) for l in ds.to_jsonl(tmp_path / 'pruned.jsonl', apply_pruning=True).read_text().splitlines()]
    assert pruned[1]['messages'][0]['content'] == '' and pruned[1]['messages'][-1]['content'] == 'Stockholm, Sweden'
    assert pruned[1]['messages'][1:] == lines[1]['messages'][1:]


def test_hf_round_trip(lab):
    pytest.importorskip('datasets')
    ds = Dataset.from_jsonl(FIXTURES / 'mixed.jsonl', 'mixed', store=lab)
    ds.add_entries([{'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}], 'split': 'TEST'} for i in range(3)])
    with pytest.warns(UserWarning, match='messages stored as JSON text'):  # string and list contents in one column
        hf = ds.to_hf()
    assert set(hf) == {'train', 'test'} and hf['train'].num_rows + hf['test'].num_rows == len(ds)
    back = Dataset.from_hf(hf, 'mixed-hf', store=lab)
    assert back.errors == [] and back.train.snapshot() == ds.train.snapshot() and back.test.snapshot() == ds.test.snapshot()
    # uniform chats stay native (TRL's conversational format) and still round-trip, tool calls included
    plain = Dataset.from_jsonl(FIXTURES / 'bad_tool_args.jsonl', 'tc', store=lab)
    plain.add_entries([{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}], 'split': 'TRAIN'}])
    train = plain.to_hf(split='TRAIN')
    assert isinstance(train[0]['messages'], list) and json.loads(train[0]['tools'])[0]['type'] == 'function'
    again = Dataset.from_hf(train, 'tc-hf', store=lab)
    assert again.snapshot() == plain.train.snapshot()


def test_from_hf_reports_bad_rows(lab):
    rows = [{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': 'user', 'content': 'no output'}]}]
    ds = Dataset.from_hf(rows, 'from-list', store=lab)
    assert len(ds) == 1 and [str(p) for p in ds.errors] == ["[1].messages: must end with an assistant message (the output); the last one is 'user'"]


def test_add_entries_api_shape(lab):
    ds = Dataset.create('api', store=lab)
    ok = {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}
    r = ds.add_entries([ok, {'messages': 'nope'}, {**ok, 'split': 'DEV'}])
    assert r['object'] == 'dataset.entries.creation' and r['entries_created'] == 1
    assert [(e['object'], e['entry_index']) for e in r['errors']['data']] == [('dataset.entries.creation.error', 1), ('dataset.entries.creation.error', 2)]
    assert "split: must be 'TRAIN', 'TEST' or absent" in r['errors']['data'][1]['message']
    assert ds.add_entries([ok] * 100)['entries_created'] == 100
    with pytest.raises(ConfigError, match='at most 100'): ds.add_entries([ok] * 101)
    with pytest.raises(ConfigError, match='non-empty list'): ds.add_entries([])


def test_names_list_delete(lab):
    ds = Dataset.create('a-set', store=lab)
    with pytest.raises(AlreadyExistsError, match="'a-set' already exists"): Dataset.create('a-set', store=lab)
    with pytest.raises(AlreadyExistsError): Dataset.from_jsonl(FIXTURES / 'mixed.jsonl', 'a-set', store=lab)
    assert len(Dataset.open('a-set', store=lab)) == 0  # the refused import added nothing
    Dataset.from_jsonl(FIXTURES / 'mixed.jsonl', 'b-set', store=lab)
    df = Dataset.list(store=lab)
    assert df.name.tolist() == ['a-set', 'b-set'] and df.dataset_entry_count.tolist() == [0, 5] and df.fine_tune_count.tolist() == [0, 0]
    assert ds.delete() == {'id': ds.id, 'object': 'dataset', 'deleted': True}
    with pytest.raises(NotFoundError, match="no dataset named 'a-set'.*b-set"): Dataset.open('a-set', store=lab)
    with pytest.raises(NotFoundError, match='no longer exists'): ds.add_entries([{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}])
    assert lab.dataset('b-set').name == 'b-set'  # LogStore.dataset opens by name


def test_default_lab_and_views(lab):
    "store=None means the default lab (the `lab` fixture sets it); train/test views follow edits."
    ds = Dataset.from_jsonl(FIXTURES / 'bad_split.jsonl', 'views')
    assert ds.store is lab
    n_test = len(ds.test)
    ds.set_split([e['id'] for e in ds.entries(limit=None)], 'TEST')
    assert len(ds.test) == 2 and len(ds.train) == 0 and n_test >= 1
    assert [r['split'] for r in ds.test] == ['TEST', 'TEST']


def test_from_logs_through_the_real_client(lab, fake_upstream):
    up = fake_upstream
    client = lab.openai(api_key='sk-test', base_url=up.openai_url, max_retries=0)
    tool = {'type': 'function', 'function': {'name': 'identify_capital', 'parameters': {'type': 'object', 'properties': {'capital': {'type': 'string'}}}}}
    q = lambda t: [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': t}]
    up.script(Reply(text='Hobart'), Reply(tool_calls=[{'name': 'identify_capital', 'arguments': {'capital': 'Stockholm'}}]), Reply(status=500))
    client.chat.completions.create(model='gpt-4o-mini', messages=q('Tasmania?'), metadata={'prompt_id': 'caps'})
    client.chat.completions.create(model='gpt-4o-mini', messages=q('Sweden?'), tools=[tool], tool_choice='required', metadata={'prompt_id': 'caps'})
    with pytest.raises(Exception): client.chat.completions.create(model='gpt-4o-mini', messages=q('Chad?'), metadata={'prompt_id': 'caps'})
    client.chat.completions.create(model='gpt-4o-mini', messages=q('other'), metadata={'prompt_id': 'other'})
    lab.flush()
    ds = lab.filter(prompt_id='caps').to_dataset('caps')
    assert (len(ds), ds.skipped_, ds.errors) == (2, 1, [])
    first, second = ds.entries(limit=None)
    assert first['messages'] == q('Tasmania?') + [{'role': 'assistant', 'content': 'Hobart'}]
    assert (first['provenance'], first['metadata']) == ('REQUEST_LOG', {'prompt_id': 'caps'})
    out = second['messages'][-1]
    assert out['role'] == 'assistant' and json.loads(out['tool_calls'][0]['function']['arguments']) == {'capital': 'Stockholm'}
    assert (second['tools'], second['tool_choice']) == ([tool], 'required')
    logged = {r['id']: r for r in lab.filter(prompt_id='caps')}
    assert logged[first['log_id']]['resp_payload']['choices'][0]['message']['content'] == 'Hobart'


def test_works_from_a_script_and_across_processes(lab, tmp_path):
    "A script imports into the lab; this process sees the dataset, edits it, and the script's view agrees."
    script = tmp_path / 'make.py'
    script.write_text(textwrap.dedent(f'''
        from openpipe_lab.dataset import Dataset
        ds = Dataset.from_jsonl({str(FIXTURES / 'mixed.jsonl')!r}, 'scripted')
        ds.add_pruning_rule('You are a helpful assistant')
        print(len(ds), len(ds.errors), ds.snapshot())
    '''))
    env = {**os.environ, 'OPENPIPE_LAB_DIR': str(tmp_path), 'OPENPIPE_LAB_DB': str(tmp_path / 'lab.db')}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    n, n_err, snap = r.stdout.split()
    ds = Dataset.open('scripted', store=lab)
    assert (len(ds), len(ds.errors), ds.snapshot()) == (int(n), 0, snap) and n_err == '3'
    assert ds.pruning_rules == ['You are a helpful assistant']


def test_postgres(pg_url, tmp_path, lab):
    "The same import, edits and export on Postgres, with snapshots equal to SQLite's (they hash content only)."
    pg = LogStore(pg_url, dir=tmp_path / 'pg')
    try:
        ds = Dataset.from_jsonl(FIXTURES / 'mixed.jsonl', 'pg-mixed', store=pg)
        ref = Dataset.from_jsonl(FIXTURES / 'mixed.jsonl', 'pg-mixed', store=lab)
        assert len(ds) == 5 and [str(p) for p in ds.errors] == [str(p) for p in ref.errors]
        assert ds.snapshot() == ref.snapshot()
        assert [e['messages'][-1] for e in ds.entries(metadata={'prompt_id': 'capitals'})] == [e['messages'][-1] for e in ref.entries(metadata={'prompt_id': 'capitals'})]
        ds.set_output(ds.df.id[1], 'Stockholm!'); ref.set_output(ref.df.id[1], 'Stockholm!')
        ds.split(0.4, seed=2); ref.split(0.4, seed=2)
        assert ds.snapshot() == ref.snapshot()
        back = Dataset.from_jsonl(ds.to_jsonl(tmp_path / 'pg.jsonl'), 'pg-back', store=pg)
        assert back.snapshot() == ds.snapshot()
        assert Dataset.list(store=pg).name.tolist() == ['pg-back', 'pg-mixed']
    finally:
        pg.close(); pg.db.dispose()


# -- the common-shape fast path of the JSONL import (formats._plain_entry) ------------------------------------------
from hypothesis import given, settings, strategies as st, HealthCheck
from openpipe_lab import formats
from openpipe_lab.formats import validate_entry, _plain_entry, _plain_hash, _plain_texts, json_text
from openpipe_lab.dataset import _prepare, _entry_hash, CONTENT_FIELDS

_MISSING = object()
def _opt(*values):  # a field that is absent or one of these values
    return st.sampled_from([_MISSING, *values])

def _obj(**fields):  # a dict strategy whose fields may be absent
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not _MISSING})

_call = _obj(id=_opt('c1', 'c2', '', 7), type=_opt('function', 'tool'),
             function=_opt({'name': 'f', 'arguments': '{"a": 1}'}, {'name': 'g', 'arguments': '{}'}, {'name': '', 'arguments': '{}'},
                           {'name': 'f', 'arguments': '[1]'}, {'name': 'f', 'arguments': 'nope'}, {'name': 'f', 'arguments': ' {} '},
                           {'name': 'f', 'arguments': '{"n": NaN}'}, {'name': 'f', 'arguments': 1}, {'name': 'f'},
                           {'name': 'f', 'arguments': '{}', 'x': 1}, None))
_said = _obj(role=st.sampled_from(['system', 'developer', 'user']), content=_opt('hi', '', None, 3, [{'type': 'text', 'text': 't'}]),
             name=_opt('bob', None, 1))
_assistant = _obj(role=st.just('assistant'), content=_opt('ok', '', None, ['x']), tool_calls=_opt(None, [], st.lists(_call, max_size=2)),
                  refusal=_opt('no', '', None, 1), name=_opt('a', 2), reasoning_content=_opt('think', None, 3),
                  function_call=_opt({'name': 'f', 'arguments': '{}'}), audio=_opt({'id': 'a1'}), weird=_opt(1))
_assistant = _assistant.flatmap(lambda m: st.just(m) if not isinstance(m.get('tool_calls'), st.SearchStrategy)
                                else m['tool_calls'].map(lambda tcs: {**m, 'tool_calls': tcs}))
_tool_msg = _obj(role=st.just('tool'), content=_opt('r', None, 5), tool_call_id=_opt('c1', 'c2', 'zz', 3))
_odd_msg = st.sampled_from([{'role': 'function', 'name': 'f', 'content': 'r'}, {'role': 'robot', 'content': 'x'}, {'content': 'x'}, 'text', None])
_message = st.one_of(_said, _assistant, _tool_msg, _odd_msg)
_tool_def = _obj(type=_opt('function', 'other'),
                 function=st.sampled_from([{'name': 'f'}, {'name': 'g', 'description': 'd', 'parameters': {'type': 'object'}, 'strict': True},
                                           {'name': 'f', 'parameters': None}, {'name': 'bad name'}, {'name': 'x' * 65}, {'name': 'f\n'},
                                           {'name': 'f', 'strict': 'yes'}, {'name': 'f', 'description': 1}, {'name': 'f', 'extra': 1},
                                           {'name': 'f', 'parameters': {'maximum': 1.5}}, {}, None]))
_entry = _obj(messages=st.lists(_message, max_size=4) | st.sampled_from([None, {}, 'x']),
              tools=_opt(None, [], st.lists(_tool_def, min_size=1, max_size=3)),
              tool_choice=_opt(None, 'none', 'auto', 'required', 'any', {'type': 'function', 'function': {'name': 'f'}}),
              response_format=_opt(None, {'type': 'text'}, {'type': 'json_object'}, {'type': 'text', 'x': 1}, {'type': 'yaml'},
                                   {'type': 'json_schema', 'json_schema': {'name': 's', 'schema': {'type': 'object'}}}),
              rejected_message=_opt(None, {'role': 'assistant', 'content': 'b'}, {'content': 'b'}, {'role': 'user', 'content': 'b'},
                                    {'role': 'assistant', 'content': None}),
              metadata=_opt(None, {}, {'k': 'v', 'ü': 'é'}, {'k': 1}, ['k']),
              split=_opt(None, 'TRAIN', 'TEST', 'VALID'), temperature=_opt(0.5, 1), functions=_opt([{'name': 'f'}]),
              function_call=_opt('auto'), extra=_opt('x'))
_entry = _entry.flatmap(lambda e: st.just(e) if not isinstance(e.get('tools'), st.SearchStrategy)
                        else e['tools'].map(lambda ts: {**e, 'tools': ts}))
_entry = _entry.flatmap(lambda e: st.just(e) if not isinstance(e.get('messages'), st.SearchStrategy)
                        else e['messages'].map(lambda ms: {**e, 'messages': ms}))


def _general(obj) -> tuple | None:
    "What the general path makes of an entry: (content fields, split) or None when it has problems."
    entry, problems = _prepare(obj)
    return None if problems else ({k: entry[k] for k in CONTENT_FIELDS}, entry['split'])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(_entry, st.booleans())
def test_plain_entry_takes_only_what_validation_accepts_unchanged(obj, compact):
    "Whatever the fast path takes has no problem in `validate_entry` and gives the general path's entry, hash and texts."
    line = json.dumps(obj, separators=(',', ':') if compact else None, ensure_ascii=not compact).encode()
    fast = _plain_entry(line)
    if fast is None: return
    general = _general(json.loads(line))
    assert general is not None, (line, validate_entry(json.loads(line)))
    assert json.dumps(fast) == json.dumps(general)  # same values, types and key order
    content = fast[0]
    assert _plain_hash(content) == _entry_hash(content) == _entry_hash(general[0])
    assert _plain_texts(content) == [json_text(v, escape_surrogates=False) or '' for v in general[0].values()]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(['system', 'developer', 'user']), st.text(max_size=20), st.text(max_size=20), st.booleans(),
       st.sampled_from([None, {'k': 'v'}, {}]), st.sampled_from([None, 'TRAIN', 'TEST']))
def test_plain_entry_takes_the_common_shapes(role, text, output, with_call, metadata, split):
    "The shapes real datasets have do take the fast path (so the test above is not vacuous)."
    out = ({'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"q": 1}'}}]}
           if with_call else {'role': 'assistant', 'content': output})
    msgs = [{'role': role, 'content': text}, {'role': 'user', 'content': text}, out]
    if with_call: msgs += [{'role': 'tool', 'tool_call_id': 'c1', 'content': 'r'}, {'role': 'assistant', 'content': output}]
    obj = {'messages': msgs, 'tools': [{'type': 'function', 'function': {'name': 'f', 'parameters': {'type': 'object'}}}] if with_call else None,
           'metadata': metadata, 'split': split}
    line = json.dumps(obj).encode()
    if formats.msgspec is None: assert _plain_entry(line) is None; return
    assert _plain_entry(line) is not None
    assert json.dumps(_plain_entry(line)) == json.dumps(_general(obj))


def test_plain_entry_leaves_lone_surrogates_and_floats_to_the_general_path():
    ok = {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}
    assert _plain_entry(json.dumps(ok).encode()) is not None or formats.msgspec is None
    assert _plain_entry(json.dumps({**ok, 'messages': [{'role': 'user', 'content': '\ud800'}, ok['messages'][1]]}).encode()) is None
    assert _plain_entry(json.dumps({**ok, 'temperature': 1.0}).encode()) is None          # a float anywhere
    assert _plain_entry(json.dumps({**ok, 'metadata': {'k': 'v'}}).encode() + b' x') is None  # not one JSON value


def test_import_through_the_fast_path_equals_the_general_path(lab, tmp_path, monkeypatch):
    "A file of generated lines (valid and not) imported with and without the fast path: same rows, texts, errors."
    import random
    rnd = random.Random(5)
    objs = []
    for i in range(400):
        tcs = [{'id': f'c{i}', 'type': 'function', 'function': {'name': 'f', 'arguments': rnd.choice(['{"a": 1}', '[1]', '{}'])}}]
        out = rnd.choice([{'role': 'assistant', 'content': f'a{i} é'}, {'role': 'assistant', 'content': None, 'tool_calls': tcs},
                          {'role': 'assistant', 'content': None}, {'role': 'user', 'content': 'no output'}])
        obj = {'messages': [{'role': 'system', 'content': 'sys'}, {'role': 'user', 'content': f'q{i}'}, out]}
        for k, vals in (('tools', [[{'type': 'function', 'function': {'name': 'f'}}], [], None]), ('metadata', [{'k': str(i)}, {}, {'k': i}]),
                        ('split', ['TRAIN', 'TEST', 'VALID']), ('tool_choice', ['auto', 'required']), ('temperature', [0.2]),
                        ('rejected_message', [{'role': 'assistant', 'content': 'b'}, {'content': 'b'}])):
            if rnd.random() < 0.3: obj[k] = rnd.choice(vals)
        objs.append(obj)
    src = tmp_path / 'mixed.jsonl'
    src.write_text('\n'.join(json.dumps(o) for o in objs) + '\n{not json\n')
    def rows(ds):
        cols = ('position', 'split', 'entry_hash', 'provenance') + CONTENT_FIELDS
        with ds.db.connect() as c:
            return c.exec_driver_sql(f"SELECT {', '.join(cols)} FROM dataset_entries WHERE dataset_id = ? ORDER BY position",
                                     (ds.id,)).fetchall()
    taken = []
    monkeypatch.setattr(formats, '_plain_entry', lambda raw: taken.append(_plain_entry(raw)) or taken[-1])
    fast = Dataset.from_jsonl(src, 'fast', store=lab, parallel=False)
    assert formats.msgspec is None or sum(t is not None for t in taken) > 40  # the fast path really was taken
    monkeypatch.setattr(formats, '_plain_entry', lambda raw: None)
    slow = Dataset.from_jsonl(src, 'slow', store=lab, parallel=False)
    assert rows(fast) == rows(slow) and len(rows(fast)) > 60  # column text byte for byte
    assert [(p.line, p.path, p.message) for p in fast.errors] == [(p.line, p.path, p.message) for p in slow.errors]
    assert len(fast.errors) > 50
    assert fast.snapshot() == slow.snapshot()
    ids = [e['id'] for e in fast.entries(limit=None)]
    assert len(set(ids)) == len(ids) and all(len(i) == len('dse_') + 13 + 1 + 12 for i in ids)  # new_id's format


def _children(name: str) -> list:
    "Pids of this process's children whose command line holds `name` (from /proc)."
    out = []
    for d in Path('/proc').iterdir():
        try:
            if d.name.isdigit() and int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == os.getpid() \
               and name.encode() in (d / 'cmdline').read_bytes(): out.append(int(d.name))
        except (OSError, ValueError, IndexError): pass
    return out


def _mixed_file(path: Path, n: int = 3000) -> Path:
    "Lines of every kind: the common shape, the general path (floats, deprecated fields), invalid ones, odd bytes."
    import random
    rnd = random.Random(7)
    good = lambda i: {'messages': [{'role': 'user', 'content': f'q{i} \u00e9\u4e2d\U0001f600'}, {'role': 'assistant', 'content': f'a{i}'}]}
    odd = [b'{not json', b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', b'[1, 2]',
           b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',  # lone surrogate escape
           b'{"messages": [{"role": "user", "content": "nul \\u0000"}, {"role": "assistant", "content": "x"}], "metadata": {"n": "1"}}',
           json.dumps({**good(0), 'tools': [{'type': 'function', 'function': {'name': 'f', 'parameters': {'maximum': 1.5}}}]}).encode(),
           json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': None,
                       'function_call': {'name': 'f', 'arguments': '{}'}}], 'functions': [{'name': 'f'}]}).encode(),
           json.dumps({**good(1), 'split': 'VALID'}).encode(), json.dumps({**good(2), 'temperature': 0.5}).encode(), b'', b'   ']
    lines = [rnd.choice(odd) if rnd.random() < 0.2 else json.dumps({**good(i), **({'split': 'TEST'} if i % 7 == 0 else {})}).encode()
             for i in range(n)]
    path.write_bytes(b'\xef\xbb\xbf' + b'\n'.join(lines) + b'\n')
    return path


def _stored(ds) -> list:
    cols = ('position', 'split', 'entry_hash', 'provenance') + CONTENT_FIELDS
    with ds.db.connect() as c:
        return c.exec_driver_sql(f"SELECT {', '.join(cols)} FROM dataset_entries WHERE dataset_id = ? ORDER BY position", (ds.id,)).fetchall()


@pytest.mark.skipif(formats.msgspec is None, reason='the worker needs msgspec (a dependency of the package)')
def test_import_in_a_worker_process_equals_import_here(lab, tmp_path, monkeypatch):
    "A file parsed by a worker process imports byte for byte as one read here: rows, texts, hashes, splits, errors; the worker is gone after."
    src = _mixed_file(tmp_path / 'mixed.jsonl')
    monkeypatch.setattr(formats, '_HEAD_LINES', 10)
    started = []
    monkeypatch.setattr(formats, '_start_worker', lambda path, f=formats._start_worker: started.append(f(path)) or started[-1])
    here = Dataset.from_jsonl(src, 'here', store=lab, parallel=False)
    there = Dataset.from_jsonl(src, 'there', store=lab, parallel=True)
    assert len(started) == 1 and started[0].returncode == 0  # the worker ran to its end and was waited for
    assert _stored(there) == _stored(here) and len(_stored(here)) > 2000
    assert [(p.line, p.path, p.message) for p in there.errors] == [(p.line, p.path, p.message) for p in here.errors]
    lines, said = [p.line for p in here.errors], ' '.join(p.message for p in here.errors)
    assert len(lines) > 200 and min(lines) <= 10 < max(lines)  # bad lines in the head (read here) and after it (the worker's)
    assert all(k in said for k in ('not valid UTF-8', 'not valid JSON', 'lone UTF-16 surrogate', 'must be a JSON object'))
    assert there.snapshot() == here.snapshot()
    assert _children('_plain_worker') == []


@pytest.mark.skipif(formats.msgspec is None, reason='the worker needs msgspec')
def test_a_killed_worker_loses_no_line(lab, tmp_path, monkeypatch):
    "The worker killed part way (SIGKILL): a warning names the last line it delivered and this process reads the rest."
    src = _mixed_file(tmp_path / 'mixed.jsonl')
    monkeypatch.setattr(formats, '_HEAD_LINES', 10)
    monkeypatch.setattr(formats, '_WORKER', textwrap.dedent("""
        import os, signal
        from openpipe_lab import formats
        formats._FRAME_LINES, plain_row, seen = 100, formats._plain_row, []
        def killed(raw):  # its 1,001st line: the worker is killed, ten messages of 100 lines sent
            seen.append(raw)
            if len(seen) > 1000: formats.sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return plain_row(raw)
        formats._plain_row = killed
        formats._plain_worker()"""))
    here = Dataset.from_jsonl(src, 'here', store=lab, parallel=False)
    last = [n for n, _ in formats._jsonl_lines(src) if n > 10][999]  # the 1,000th line the worker parsed
    with pytest.warns(RuntimeWarning, match=rf'stopped after line {last} \(exit status -9\); reading the rest in this process'):
        there = Dataset.from_jsonl(src, 'there', store=lab, parallel=True)
    assert _stored(there) == _stored(here)
    assert [(p.line, p.path, p.message) for p in there.errors] == [(p.line, p.path, p.message) for p in here.errors]
    monkeypatch.setattr(formats, '_WORKER', 'raise SystemExit("no worker today")')
    with pytest.warns(RuntimeWarning, match='stopped after line 10 .no worker today.'):
        again = Dataset.from_jsonl(src, 'again', store=lab, parallel=True)
    assert _stored(again) == _stored(here)


@pytest.mark.skipif(formats.msgspec is None, reason='the worker needs msgspec')
def test_the_worker_is_stopped_when_the_import_fails(lab, tmp_path, monkeypatch):
    "An error while writing (here: the second transaction fails) stops and reaps the worker; the new dataset is removed."
    from openpipe_lab import dataset as dataset_module
    src = _mixed_file(tmp_path / 'mixed.jsonl', n=20_000)  # more than the pipe holds: the worker is still running
    monkeypatch.setattr(formats, '_HEAD_LINES', 10)
    started, flush, calls = [], dataset_module._Writer.flush, []
    monkeypatch.setattr(formats, '_start_worker', lambda path, f=formats._start_worker: started.append(f(path)) or started[-1])
    def failing(self):
        calls.append(1)
        if len(calls) == 2: raise OSError('disk full (simulated)')
        flush(self)
    monkeypatch.setattr(dataset_module._Writer, 'flush', failing)
    with pytest.raises(OSError, match='simulated'):
        Dataset.from_jsonl(src, 'fails', store=lab, parallel=True)
    assert started[0].returncode == -9  # killed (it had lines left to send), and waited for
    assert _children('_plain_worker') == [] and Dataset.list(store=lab).empty


def test_a_long_import_shows_a_progress_bar_a_short_one_nothing(lab, tmp_path, monkeypatch, capsys):
    "The bar counts the file's bytes to 100%, read here or by a worker; under `_PROGRESS_AFTER_S` nothing is printed at all."
    from openpipe_lab import dataset as dataset_module
    src = _mixed_file(tmp_path / 'mixed.jsonl')
    Dataset.from_jsonl(src, 'quiet', store=lab)
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(dataset_module, '_PROGRESS_AFTER_S', 0.0)
    monkeypatch.setattr(formats, '_HEAD_LINES', 10)
    for parallel in (False, True):
        Dataset.from_jsonl(src, f'shown-{parallel}'.lower(), store=lab, parallel=parallel)
        err = capsys.readouterr().err
        assert 'import mixed.jsonl: 100%' in err and f'{src.stat().st_size / 1024:.0f}' in err, err
    Dataset.from_jsonl(src, 'off', store=lab, progress=False)
    assert capsys.readouterr().err == ''


def _base_entry(with_call, with_tools, extras):
    call = {'id': 'c1', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"q": 1}'}}
    msgs = [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'u'}]
    msgs += ([{'role': 'assistant', 'content': None, 'tool_calls': [call]}, {'role': 'tool', 'tool_call_id': 'c1', 'content': 'r'},
              {'role': 'assistant', 'content': 'done'}] if with_call else [{'role': 'assistant', 'content': 'a'}])
    e = {'messages': msgs}
    if with_tools: e['tools'] = [{'type': 'function', 'function': {'name': 'f', 'description': 'd', 'parameters': {'type': 'object'}}}]
    e.update(extras)
    return e

# one change each, at the edge of the fast path's shape: (what it does, the change)
_NEAR_MISSES = [
    ('tool result answering no call', lambda e: e['messages'].insert(2, {'role': 'tool', 'tool_call_id': 'zz', 'content': 'r'})),
    ('tool result before its call', lambda e: e['messages'].insert(1, {'role': 'tool', 'tool_call_id': 'c1', 'content': 'r'})),
    ("'required' without tools", lambda e: (e.pop('tools', None), e.update(tool_choice='required'))),
    ("'required' with empty tools", lambda e: e.update(tools=[], tool_choice='required')),
    ("'required' with tools", lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f'}}], tool_choice='required')),
    ('duplicate tool name', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f'}}] * 2)),
    ('bad tool name', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f g'}}])),
    ('tool name with a newline', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f\n'}}])),
    ('tool name of 65', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f' * 65}}])),
    ('tool name of 64', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f' * 64}}])),
    ('duplicate call id', lambda e: e['messages'][-1].update(content=None, tool_calls=[
        {'id': 'd', 'type': 'function', 'function': {'name': 'f', 'arguments': '{}'}}] * 2)),
    ('duplicate empty call id', lambda e: e['messages'][-1].update(content=None, tool_calls=[
        {'id': '', 'type': 'function', 'function': {'name': 'f', 'arguments': '{}'}}] * 2)),
    ('arguments an array', lambda e: e['messages'][-1].update(tool_calls=[{'id': 'x', 'type': 'function', 'function': {'name': 'f', 'arguments': '[]'}}])),
    ('arguments NaN', lambda e: e['messages'][-1].update(tool_calls=[{'id': 'x', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"a": NaN}'}}])),
    ('arguments with spaces', lambda e: e['messages'][-1].update(tool_calls=[{'id': 'x', 'type': 'function', 'function': {'name': 'f', 'arguments': ' {} '}}])),
    ('arguments not JSON', lambda e: e['messages'][-1].update(tool_calls=[{'id': 'x', 'type': 'function', 'function': {'name': 'f', 'arguments': '{a}'}}])),
    ('empty function name', lambda e: e['messages'][-1].update(tool_calls=[{'id': 'x', 'type': 'function', 'function': {'name': '', 'arguments': '{}'}}])),
    ('output says nothing', lambda e: e['messages'][-1].update(content=None)),
    ('output with empty calls', lambda e: e['messages'][-1].update(content=None, tool_calls=[])),
    ('output with a refusal', lambda e: e['messages'][-1].update(content=None, refusal='no')),
    ('output with an empty refusal', lambda e: e['messages'][-1].update(content=None, refusal='')),
    ('output with empty content', lambda e: e['messages'][-1].update(content='')),
    ('output content missing', lambda e: e['messages'][-1].pop('content')),
    ('last message a user', lambda e: e['messages'].append({'role': 'user', 'content': 'more'})),
    ('a middle assistant says nothing', lambda e: e['messages'].insert(1, {'role': 'assistant', 'content': None})),
    ('user name null', lambda e: e['messages'][1].update(name=None)),
    ('user content null', lambda e: e['messages'][1].update(content=None)),
    ('rejected without role', lambda e: e.update(rejected_message={'content': 'b'})),
    ('rejected says nothing', lambda e: e.update(rejected_message={'role': 'assistant', 'content': None})),
    ('rejected as a user', lambda e: e.update(rejected_message={'role': 'user', 'content': 'b'})),
    ('rejected ok', lambda e: e.update(rejected_message={'role': 'assistant', 'content': 'b'})),
    ('rejected with duplicate calls', lambda e: e.update(rejected_message={'role': 'assistant', 'tool_calls': [
        {'id': 'd', 'type': 'function', 'function': {'name': 'f', 'arguments': '{}'}}] * 2})),
    ('metadata a number', lambda e: e.update(metadata={'k': 1})),
    ('metadata empty', lambda e: e.update(metadata={})),
    ('split lower case', lambda e: e.update(split='test')),
    ('tool_choice a function', lambda e: e.update(tool_choice={'type': 'function', 'function': {'name': 'f'}})),
    ('response_format json_schema', lambda e: e.update(response_format={'type': 'json_schema', 'json_schema': {'name': 's'}})),
    ('response_format with extra', lambda e: e.update(response_format={'type': 'text', 'x': 1})),
    ('strict a string', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f', 'strict': 'yes'}}])),
    ('parameters null', lambda e: e.update(tools=[{'type': 'function', 'function': {'name': 'f', 'parameters': None}}])),
    ('tool without type', lambda e: e.update(tools=[{'function': {'name': 'f'}}])),
    ('deprecated functions', lambda e: e.update(functions=[{'name': 'g'}])),
    ('an ignored field', lambda e: e.update(model='m')),
    ('no change', lambda e: None),
]


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(_NEAR_MISSES), st.booleans(), st.booleans(),
       st.fixed_dictionaries({}, optional={'metadata': st.sampled_from([None, {'k': 'v'}]), 'split': st.sampled_from([None, 'TRAIN', 'TEST']),
                                           'tool_choice': st.sampled_from([None, 'auto', 'none']),
                                           'response_format': st.sampled_from([None, {'type': 'json_object'}, {'type': 'text'}])}),
       st.booleans())
def test_plain_entry_on_near_misses(change, with_call, with_tools, extras, compact):
    "Each edge of the fast path's shape, one at a time: the fast path agrees with `validate_entry` + `_prepare`."
    obj = _base_entry(with_call, with_tools, extras)
    change[1](obj)
    line = json.dumps(obj, separators=(',', ':') if compact else None, ensure_ascii=not compact).encode()
    fast, general = _plain_entry(line), _general(json.loads(line))
    if fast is not None: assert json.dumps(fast) == json.dumps(general), change[0]
    elif general is not None and formats.msgspec is not None:  # valid but outside the shape: fine, but say which
        assert change[0] in _OUTSIDE_THE_SHAPE, (change[0], line)

_OUTSIDE_THE_SHAPE = {'tool_choice a function', 'response_format json_schema', 'deprecated functions', 'an ignored field'}
