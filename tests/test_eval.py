"""Eval through the real lab client (openai SDK over loopback): generations are recorded, tagged and cached;
a Dataset's TEST split is what gets evaluated; grader isolation holds with a live client in the process."""
import pytest
from fakes import Reply, fake_upstream  # noqa: F401  (fixture)
from openpipe_lab.dataset import Dataset
from openpipe_lab.eval import Eval, exact_match, argument_comparison


def _entries(n):
    return [{'messages': [{'role': 'user', 'content': f'Call me at 555-01{i:02d}'},
                          {'role': 'assistant', 'content': f'echo: Call me at 555-01{i:02d}' if i % 2 else 'Call me at [PHONE]'}],
             'metadata': {'i': str(i)}} for i in range(n)]


@pytest.fixture
def ds(lab):
    ds = Dataset.create('pii-eval', store=lab)
    ds.add_entries(_entries(10))
    return ds.split(test_fraction=0.4)


@pytest.fixture
def fake_model(lab, fake_upstream, monkeypatch):
    monkeypatch.setenv('FAKE_KEY', 'k')
    lab.add_provider('fake', base_url=fake_upstream.openai_url, api_key_env='FAKE_KEY')
    return 'openpipe:fake/echo-1'


def test_eval_on_test_split_is_recorded_and_cached(ds, lab, fake_upstream, fake_model):
    ev = Eval(ds, models=[fake_model], name='pii-eval-1', progress=False).code(exact_match).run()
    test_ids = [e['id'] for e in ds.test.entries(0, None)]
    assert len(test_ids) == 4 and sorted(ev.results_.entry.unique()) == sorted(test_ids)
    assert len(fake_upstream.requests) == 4
    got = ev.outputs_[ev.outputs_.model == fake_model].set_index('entry')
    for e in ds.test.entries(0, None):
        assert got.loc[e['id'], 'content'] == 'echo: ' + e['messages'][0]['content']
    # the fake echoes, so it matches exactly the odd entries (whose dataset output is the echo)
    expected = sum(e['messages'][-1]['content'].startswith('echo') for e in ds.test.entries(0, None)) / 4
    s = ev.scores_.set_index(['model', 'grader'])['mean']
    assert s[(fake_model, 'exact_match')] == pytest.approx(expected) and s[('dataset', 'exact_match')] == 1.0
    lab.flush()
    assert len(lab.filter(eval='pii-eval-1')) == 4
    # a second run (e.g. after adding a grader) is served from the cache: no new upstream request
    ev2 = Eval(ds.test, models=[fake_model], name='pii-eval-1', progress=False).code('exact_match').code(lambda **k: 0.5, name='half').run()
    assert len(fake_upstream.requests) == 4
    assert ev2.results_[ev2.results_.grader == 'exact_match'].score.tolist() == ev.results_.score.tolist()


def test_failed_generation_is_an_error_row(ds, lab, fake_upstream, fake_model):
    fake_upstream.script(Reply(status=500), Reply(status=500), Reply(status=500), Reply(status=500))
    ev = Eval(ds.test, models=[fake_model], progress=False, cache=False,
              client=lab.openai(api_key='k', max_retries=0)).code('exact_match').run()
    rows = ev.results_[ev.results_.model == fake_model]
    assert rows.score.isna().all() and rows.error.str.startswith('generation failed:').all()
    assert ev.scores_.set_index('model').loc[fake_model, 'errors'] == 4


def test_tool_call_graders_through_the_client(lab, fake_upstream, fake_model):
    tool = {'type': 'function', 'function': {'name': 'judge', 'parameters': {'type': 'object', 'properties': {'score': {'type': 'number'}}}}}
    ref = {'role': 'assistant', 'content': None,
           'tool_calls': [{'id': 'c', 'type': 'function', 'function': {'name': 'judge', 'arguments': '{"score": 1, "why": "ok"}'}}]}
    data = [{'messages': [{'role': 'user', 'content': 'rate it'}, ref], 'tools': [tool], 'tool_choice': 'auto'}]
    fake_upstream.script(Reply(tool_calls=[{'name': 'judge', 'arguments': {'why': 'ok', 'score': 1}}]))
    ev = Eval(data, models=[fake_model], progress=False).code(exact_match).code(argument_comparison).run()
    assert fake_upstream.requests[-1].json['tools'] == [tool]
    s = ev.results_[ev.results_.model == fake_model].set_index('grader').score
    assert s['argument_comparison'] == 1.0        # same arguments, parsed
    assert s['exact_match'] in (0.0, 1.0)         # depends on the fake's JSON spacing; must be a clean score either way


def test_an_openai_model_without_a_key_is_an_error_on_its_rows_only(lab, monkeypatch):
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    data = [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]}]
    ev = Eval(data, models=['gpt-4o-mini'], store=lab, progress=False).code('exact_match').run()
    err = ev.results_.set_index('model').loc['gpt-4o-mini', 'error']
    assert err.startswith('generation failed: MissingAPIKeyError') and 'OPENAI_API_KEY' in err
    assert ev.scores_.set_index('model').loc['dataset', 'mean'] == 1.0
