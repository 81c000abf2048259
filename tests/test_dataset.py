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


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_nasty_fixture(lab, name):
    "Every bad line is reported with its line and field; every good line is imported exactly as written."
    path, exp = FIXTURES / name, EXPECTED[name]
    want = sorted((p[0] or 0, p[1]) for p in exp['problems'])
    if exp['valid'] == 0:
        with pytest.raises(ValidationError) as e:
            Dataset.from_jsonl(path, 'nasty', store=lab)
        assert sorted((p.line or 0, p.path) for p in e.value.problems) == want
        assert Dataset.list(store=lab).empty  # nothing left behind
        return
    ds = Dataset.from_jsonl(path, 'nasty', store=lab)
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
