"""The faster import path (issue 15: msgspec decoding, hashing and column encoding) gives the same results as before.

Two kinds of checks:
- before/after: the same JSONL file imported by the package as it was before the speed work (git revision
  `BEFORE`, extracted with `git archive`) and by the working tree, each in its own process; the exports
  (`to_jsonl`), snapshots, entry hashes, splits, reported problems and stored values must be identical;
- properties (hypothesis): each fast path equals the standard-library path it replaces, on generated JSON.
"""
import json, math, subprocess, sys
from pathlib import Path
import pytest
from conftest import package_at
from hypothesis import given, settings, strategies as st

from openpipe_lab import formats
from openpipe_lab.formats import canonical_json, content_hash, read_jsonl, _json_content_hash, _STRICT_DECODER
from openpipe_lab.store import dumps

ROOT = Path(__file__).resolve().parents[1]
BEFORE = '86f4ac1'  # the last commit before the speed work on the import path

pytestmark = pytest.mark.skipif(formats.msgspec is None, reason='the fast paths need msgspec')  # without it nothing changed

CHILD = r'''
import json, sys
import openpipe_lab
from openpipe_lab.logstore import LogStore
from openpipe_lab.dataset import Dataset
src, db, out, mode = sys.argv[1:5]
kw = {}
if mode == 'worker':  # a worker process parses every line after the fifth; its failure would be an error here
    import warnings
    from openpipe_lab import formats
    warnings.simplefilter('error', RuntimeWarning)
    formats._HEAD_LINES, kw = 5, {'parallel': True}
ds = Dataset.from_jsonl(src, 'eq', store=LogStore(db), **kw)
ds.to_jsonl(out)
entries = [{k: e[k] for k in ('split', 'provenance', 'entry_hash', 'position', 'messages', 'tools', 'tool_choice',
                               'response_format', 'rejected_message', 'metadata')} for e in ds.entries(limit=None)]
print(json.dumps({'package': openpipe_lab.__file__, 'snapshot': ds.snapshot(), 'test': ds.test.snapshot(),
                  'errors': [[p.line, p.path, p.message] for p in ds.errors], 'entries': entries}))
'''

def tricky_lines() -> list[bytes]:
    "JSONL lines that exercise every fast path's edge: floats, escapes, non-ASCII, big ints, bad lines."
    ok = lambda **kw: {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}], **kw}
    objs = [ok(metadata={'k': 'v'}),
            ok(metadata={}),  # empty metadata is stored as none
            {'messages': [{'role': 'system', 'content': 'é ü 漢字 😀 \u2028 \u0000 \t "quoted" \\ back'},
                          {'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y\ny'}]},
            ok(response_format={'type': 'json_schema', 'json_schema': {'name': 's', 'schema': {
                'type': 'number', 'minimum': 1e-07, 'maximum': 2.5, 'multipleOf': 1.0, 'exclusiveMaximum': 1e16,
                'default': 123456789012345678901234567890, 'examples': [-0.0, 0.1, 5e-324, 1.7976931348623157e308]}}}),
            ok(tools=[{'type': 'function', 'function': {'name': 'f', 'parameters': {
                'type': 'object', 'properties': {'z': {'type': 'integer', 'maximum': 3.0}, 'a': {'type': 'string'}}}}}],
               split='TEST'),
            {'messages': [{'role': 'user', 'content': 'call f'}, {'role': 'assistant', 'content': None,
                          'function_call': {'name': 'f', 'arguments': '{"x": 1}'}}],
             'functions': [{'name': 'f', 'parameters': {'type': 'object', 'properties': {}}}]},
            ok(split='TRAIN', metadata={'ü': 'é', 'a': '1'}),
            # the shapes at the edge of the plain-message fast path in validation and in the deprecated-field conversion
            {'messages': [{'role': 'tool', 'content': 'x'}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': ['user'], 'content': 'x'}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': 'user', 'content': 'x', 'name': 'bob'}, {'role': 'assistant', 'content': ''}]},
            {'messages': [{'role': 'function', 'content': 'x'}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': 'user', 'content': None}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}, {'role': 'assistant', 'content': 'a'}]},
            {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': None, 'function_call': {'name': 'f', 'arguments': '{}'}},
                          {'role': 'function', 'name': 'f', 'content': 'r'}, {'role': 'assistant', 'content': 'done'}]},
            {'messages': [{'role': 'user', 'content': 'q'}, {'content': 'a', 'role': 'assistant'}], 'rejected_message': {'role': 'assistant', 'content': 'b'}}]
    lines = [json.dumps(o, ensure_ascii=i % 2 == 0).encode() for i, o in enumerate(objs)]
    lines += [b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',  # lone surrogate
              b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 pair"}, {"role": "assistant", "content": "a"}]}',
              b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "metadata": {"n": NaN}}',
              b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": 1e400}',
              b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "split": "TRAIN", "split": "TEST"}',
              b'{"messages": [{"role": "user", "content": "bad \xff byte"}, {"role": "assistant", "content": "a"}]}',
              b'{"messages": [{"role": "user", "content": "ctl \x01"}, {"role": "assistant", "content": "a"}]}',
              b'[1, 2]', b'{not json', b'   ', b'{"messages": []}',
              b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} trailing']
    return [b'\xef\xbb\xbf' + lines[0]] + lines[1:]

def run_import(src: Path, tmp: Path, tag: str, pythonpath: str, mode: str = 'here') -> tuple[dict, bytes]:
    out = tmp / f'{tag}.jsonl'
    r = subprocess.run([sys.executable, '-c', CHILD, str(src), str(tmp / f'{tag}.db'), str(out), mode], capture_output=True,
                       text=True, cwd=tmp, env={'PYTHONPATH': pythonpath, 'PATH': '/usr/bin:/bin', 'HF_HUB_OFFLINE': '1'}, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), out.read_bytes()

@pytest.fixture(scope='module')
def before_pkg(tmp_path_factory) -> str:
    return package_at(BEFORE, tmp_path_factory)

@pytest.mark.parametrize('mode', ['here', 'worker'])  # after: read in the importing process, or by a worker process
@pytest.mark.parametrize('which', ['tricky', 'bench'])
def test_import_identical_before_and_after(tmp_path, before_pkg, which, mode):
    src = tmp_path / 'src.jsonl'
    if which == 'tricky': src.write_bytes(b'\n'.join(tricky_lines()) + b'\n')
    else:
        sys.path.insert(0, str(ROOT / 'bench'))
        from dataset_import import make_file
        make_file(src, 3000, seed=7)
    old, old_export = run_import(src, tmp_path, 'before', before_pkg)
    new, new_export = run_import(src, tmp_path, 'after', str(ROOT), mode)
    assert old.pop('package').startswith(before_pkg) and new.pop('package').startswith(str(ROOT))
    assert new_export == old_export  # byte for byte
    assert new['entries'] == old['entries'] and new['snapshot'] == old['snapshot'] and new['test'] == old['test']
    assert new['errors'] == old['errors']
    if which == 'tricky':
        assert len(new['entries']) >= 10 and len(new['errors']) >= 8  # both kinds of line really were in the file
        assert any(e['response_format'] for e in new['entries'])  # the float-bearing entry was imported, not refused

# -- properties: each fast path equals the path it replaces --------------------------------------------------------
text = st.text(st.characters(codec='utf-8'), max_size=12) | st.sampled_from(['', 'é', '😀', '\x00', '\u2028', '"\\/'])
floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1.0, -0.0, 1e16, 1e-07, 2.0 ** 53, 1e22])
scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | floats | text
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4), max_leaves=25)

def stdlib_hash(obj) -> str:
    "The hash as the standard library alone computes it (what content_hash did before)."
    import hashlib
    return hashlib.sha256(canonical_json(obj).encode('utf-8', 'surrogatepass')).hexdigest()

@settings(max_examples=400, deadline=None)
@given(json_values)
def test_content_hash_fast_paths_equal_stdlib(obj):
    expected = stdlib_hash(obj)
    assert content_hash(obj) == expected
    assert _json_content_hash(obj) == expected

@settings(max_examples=400, deadline=None)
@given(json_values)
def test_jsonl_decoding_equals_stdlib(tmp_path_factory, obj):
    line = json.dumps({'v': obj}, ensure_ascii=False).encode()
    p = tmp_path_factory.mktemp('l') / 'x.jsonl'
    p.write_bytes(line + b'\n')
    [(n, got)] = list(read_jsonl(p))
    want = _STRICT_DECODER.decode(line.decode())
    assert n == 1 and got == want and json.dumps(got) == json.dumps(want)  # json.dumps tells -0.0 from 0, 1 from 1.0

@settings(max_examples=300, deadline=None)
@given(json_values)
def test_column_text_reads_back_as_before(obj):
    from openpipe_lab.formats import json_text  # what dataset writes its content columns with (was dataset._col_json)
    col_json = lambda v: json_text(v, escape_surrogates=False)
    if obj is None: assert col_json(obj) is None and dumps(obj) is None; return  # SQL NULL, as before
    got, want = json.loads(col_json(obj)), json.loads(dumps(obj))
    assert json.dumps(got) == json.dumps(want)  # same values, types, key order (exports re-serialise these)

def test_content_hash_keeps_non_plain_inputs_on_the_stdlib_path():
    # int keys sort numerically in the standard library; msgspec would sort their text: the fast path must not take them
    assert content_hash({2: 'a', 10: 'b'}) == stdlib_hash({2: 'a', 10: 'b'})
    assert content_hash((1, 2.0)) == content_hash([1, 2])  # tuples and integral floats, as before
    assert content_hash({'x': 1.0}) == content_hash({'x': 1})
    assert content_hash({'s': '\ud800'}) == stdlib_hash({'s': '\ud800'})  # a lone surrogate: msgspec refuses it
    with pytest.raises(formats.ValidationError): content_hash({'x': math.nan})
    import datetime
    with pytest.raises(formats.ValidationError): content_hash({'when': datetime.date(2026, 1, 1)})  # msgspec would encode it

any_floats = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf])  # record() stores NaN as before: `NaN`
log_values = st.recursive(scalars | any_floats, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4), max_leaves=25)

@settings(max_examples=300, deadline=None)
@given(log_values)
def test_log_payload_text_reads_back_as_before(obj):
    from openpipe_lab.logstore import _payload_text, _storable
    got = _payload_text({'v': obj})
    want = _storable(dumps({'v': obj}))  # what record() stored before
    assert json.dumps(json.loads(got)) == json.dumps(json.loads(want))
    got.encode('utf-8')  # storable text

def test_logs_store_the_same_values_as_before(lab):
    "Payloads msgspec refuses (lone surrogates, SDK objects) take the old path; the others read back unchanged."
    from openai.types.chat import ChatCompletion
    resp = ChatCompletion.model_validate({'id': 'c1', 'object': 'chat.completion', 'created': 1, 'model': 'm', 'choices': [
        {'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': 'é 😀'}, 'logprobs': None}]})
    reqs = [{'model': 'm', 'messages': [{'role': 'user', 'content': 'hi é 😀 \u2028'}], 'temperature': 0.7, 'top_p': 1e-07},
            {'model': 'm', 'messages': [{'role': 'user', 'content': 'lone \ud800'}], 'n': 2 ** 70},
            {'model': 'm', 'messages': [{'role': 'user', 'content': 'x'}], 'logit_bias': {1: -100}}]
    ids = [lab.record(model='m', req_payload=r, resp_payload=resp, tags={'k': 'v é'}) for r in reqs]
    lab.flush()
    got = {r['id']: r for r in lab.filter()}
    expect_resp = json.loads(json.dumps(resp.model_dump(mode='json', exclude_unset=True)))
    for i, r in zip(ids, reqs):
        assert got[i]['req_payload'] == json.loads(json.dumps(r))  # int keys become strings, as json.dumps writes them
        assert got[i]['resp_payload'] == expect_resp and got[i]['tags'] == {'k': 'v é'}

def test_a_log_with_a_lone_surrogate_does_not_take_its_batch_down(lab):
    "msgspec refuses lone surrogates: the old path stores them as JSON escapes, and the good logs of the batch are kept."
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        good = [lab.record(model='m', req_payload={'model': 'm', 'messages': [{'role': 'user', 'content': f'ok {i}'}]}) for i in range(5)]
        bad = lab.record(model='m', req_payload={'model': 'm', 'messages': [{'role': 'user', 'content': 'bad \ud800'}]},
                         resp_payload={'choices': [{'message': {'role': 'assistant', 'content': 'x\udc80'}}]}, tags={'t': 'v\ud800'})
        lab.flush()
    assert sorted(lab.filter().ids()) == sorted(good + [bad])  # all six stored
    (row,) = [r for r in lab.filter() if r['id'] == bad]
    assert row['req_payload']['messages'][0]['content'] == 'bad \ud800'  # losslessly: JSON keeps the escape
    assert row['resp_payload']['choices'][0]['message']['content'] == 'x\udc80'
    assert not (lab.dir / 'unwritten-logs.jsonl').exists() and not [w for w in caught if 'unwritten' in str(w.message)]
