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


# -- criterion evaluations, plan(), stored evals, graders that keep failing ---------------------------------------
import json, math, time
from fakes import FakeUpstream
from openpipe_lab.core import NotFoundError
from openpipe_lab.criterion import Criterion
import openpipe_lab.alignment, openpipe_lab.pairwise  # noqa: F401,E402  (add align() to Criterion, head_to_head() to Eval)
from judges import loopback_judge, block  # noqa: F401,E402  (fixture)


def _block(received, tag): return block(received.json['messages'][-1]['content'], tag)


def criterion_or_pairwise_judge(received):
    "Loopback judge: a criterion request FAILs an output holding a digit ('explode': HTTP 400); a head-to-head picks the shorter."
    out = _block(received, 'output')
    if out is not None:
        if 'explode' in out: return Reply(status=400, message='judge refused')
        digit = any(ch.isdigit() for ch in out)
        return Reply(text=json.dumps({'explanation': 'a digit is left' if digit else 'no digit left', 'verdict': 'FAIL' if digit else 'PASS'}))
    if _block(received, 'response_a') is not None:
        a, b = _block(received, 'response_a'), _block(received, 'response_b')
        return Reply(text=json.dumps({'explanation': 'shorter wins', 'verdict': 'A' if len(a) < len(b) else 'B' if len(b) < len(a) else 'tie'}))
    return Reply(text=f"{received.json['model']} says {received.json['messages'][-1]['content']}")   # a generation


@pytest.fixture
def judge(loopback_judge): return loopback_judge(criterion_or_pairwise_judge)


PHONES = ['Call 555-0101', 'Hi from Ann', 'Text 555-0199 now', 'Thanks, Bo', 'Room 12 please', 'explode here']


def echo(messages, tools, tool_choice, response_format): return messages[-1]['content']
def redact(messages, tools, tool_choice, response_format): return ''.join('#' if c.isdigit() else c for c in messages[-1]['content'])


def _alignment_file(tmp_path):
    "13 labeled rows whose confusion against the digit rule is known: tp 6, fp 1, fn 1, tn 5 (FAIL positive)."
    rows = [(f'x {i}', f'kept {i}{i}', 'FAIL') for i in range(6)] + [('y', 'kept 7', 'PASS')] + \
           [(f'z{i}', 'clean text', 'PASS') for i in 'abcde'] + [('w', 'clean but wrong', 'FAIL')]
    p = tmp_path / 'align.jsonl'
    p.write_text('\n'.join(json.dumps({'messages': [{'role': 'user', 'content': u}, {'role': 'assistant', 'content': o}],
                                       'judgement': j}) for u, o, j in rows))
    return p


def test_criterion_eval_pass_rates_corrected_by_alignment(lab, judge, tmp_path):
    crit = Criterion('no-digits', prompt='Fail the output if it still contains a digit.', judge_model='openpipe:judge/j',
                     scoring='verdict', store=lab)
    crit.add_alignment_jsonl(_alignment_file(tmp_path)).align(progress=False)
    assert crit.stats_['confusion'] == {'tp': 6, 'fp': 1, 'fn': 1, 'tn': 5}
    data = [{'messages': [{'role': 'user', 'content': u}, {'role': 'assistant', 'content': redact([{'content': u}], 0, 0, 0)}]} for u in PHONES]
    ev = Eval(data, models=[echo, redact], store=lab, name='crit-eval', progress=False).criterion(crit).run()
    r = ev.results_[ev.results_.grader == crit.version].set_index(['model', 'entry'])
    se, sp = 5 / 6, 6 / 7                       # judge PASS on true PASS, judge FAIL on true FAIL, from the counts above
    for name in ('echo', 'redact', 'dataset'):
        texts = [echo([{'content': u}], 0, 0, 0) if name == 'echo' else redact([{'content': u}], 0, 0, 0) for u in PHONES]
        judged = [t for t in texts if 'explode' not in t]
        passes = sum(not any(c.isdigit() for c in t) for t in judged)
        s = ev.scores_.set_index(['model', 'grader']).loc[(name, crit.version)]
        assert (s['n'], s['errors']) == (len(judged), 1)           # the judge refused one row: marked, not fatal
        assert s['mean'] == pytest.approx(passes / len(judged))
        assert s['ci_low'] <= s['mean'] <= s['ci_high']
        rg = min(1, max(0, (passes / len(judged) + sp - 1) / (se + sp - 1)))
        assert s['corrected'] == pytest.approx(rg)
        assert s['corrected_low'] <= s['corrected'] <= s['corrected_high']
        if 0 < passes < len(judged):   # away from 0 and 1 the judge's measured error widens the interval
            assert s['corrected_high'] - s['corrected_low'] > s['ci_high'] - s['ci_low']
    assert r.loc[('echo', 0), 'explanation'] == 'a digit is left' and r.loc[('redact', 0), 'explanation'] == 'no digit left'
    assert 'judge refused' in r.loc[('echo', 5), 'error']
    assert Eval.get('crit-eval', store=lab).scores_.values.tolist() == ev.scores_.values.tolist()
    # a second eval with one more model only judges that model's outputs (verdicts are cached)
    n = len(judge.requests)
    def upper(messages, tools, tool_choice, response_format): return messages[-1]['content'].upper()
    Eval(data, models=[echo, redact, upper], store=lab, progress=False).criterion('no-digits').run()
    new_texts = {upper([{'content': u}], 0, 0, 0) for u in PHONES} - {echo([{'content': u}], 0, 0, 0) for u in PHONES} \
                - {redact([{'content': u}], 0, 0, 0) for u in PHONES}
    refused = 3   # 'explode here' from echo, redact and dataset: a failed verdict is not cached, so it is asked again
    assert len(judge.requests) - n == len(new_texts) + refused


def test_unknown_criterion_and_duplicate_names_fail_before_any_call(lab, judge):
    with pytest.raises(NotFoundError, match="no criterion 'nope'"):
        Eval([{'messages': [{'role': 'user', 'content': 'x'}]}], models=[echo], store=lab).criterion('nope')
    assert judge.requests == []


def test_plan_counts_new_calls_and_prices_them(lab, monkeypatch):
    "gpt-4o-mini and gpt-4o (list prices $0.15/$0.60 and $2.50/$10 per 1M tokens) against a loopback OpenAI."
    with FakeUpstream(responder=criterion_or_pairwise_judge) as up:
        monkeypatch.setenv('OPENAI_API_KEY', 'sk-test'); monkeypatch.setenv('OPENAI_BASE_URL', up.openai_url)
        lab.add_provider('judge', base_url=up.openai_url, api_key_env='OPENAI_API_KEY')
        data = [{'messages': [{'role': 'user', 'content': u}, {'role': 'assistant', 'content': 'ref'}]} for u in PHONES]
        ev = Eval(data, models=['gpt-4o-mini'], store=lab, max_tokens=20, progress=False).code('exact_match')
        p = ev.plan().set_index('model')
        assert p.loc['gpt-4o-mini', ['calls', 'cached', 'new', 'new_output_tokens']].tolist() == [6, 0, 6, 6 * 20]
        assert p.loc['gpt-4o-mini', 'new_cost_usd'] == pytest.approx(
            (p.loc['gpt-4o-mini', 'new_input_tokens'] * 0.15 + 120 * 0.60) / 1e6)
        assert up.requests == []                                   # planning called nothing
        ev.run()
        assert len(up.requests) == 6
        assert ev.plan().set_index('model').loc['gpt-4o-mini', ['new', 'new_cost_usd']].tolist() == [0, 0.0]
        ev2 = Eval(data, models=['gpt-4o-mini', 'gpt-4o'], store=lab, max_tokens=20, progress=False).head_to_head('openpipe:judge/j')
        # before gpt-4o has generated, judge calls are an upper bound: 2 orders x 6 comparisons
        h = ev2.plan().set_index('stage').loc['head-to-head']
        assert (h['calls'], h['new']) == (12, 12) and 'at most' in h['note']
        assert ev2.plan().set_index('model').loc['gpt-4o', 'new_cost_usd'] == pytest.approx(
            (ev2.plan().set_index('model').loc['gpt-4o', 'new_input_tokens'] * 2.5 + 120 * 10) / 1e6)
        ev2.run()
        assert len(up.requests) == 6 + 6 + 12                      # gpt-4o's generations and the judge; none of gpt-4o-mini's
        h = ev2.plan().set_index('stage').loc['head-to-head']
        assert (h['calls'], h['cached'], h['new']) == (12, 12, 0)  # now exact: every verdict is in the cache
        assert h['note'] == ''


def test_graders_that_keep_timing_out_are_stopped(lab):
    "3 graders that hang on every row x 12 rows: each is called 3 times, not 12; one that hangs on every other row is not stopped."
    data = [{'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}]} for i in range(12)]
    def hang(**kw): time.sleep(60)
    def sometimes(messages, generated_output, **kw):
        if int(messages[-1]['content'][1:]) % 2: time.sleep(60)
        return 1.0
    ev = Eval(data, store=lab, progress=False)
    for i in range(3): ev.code(hang, name=f'hang{i}', timeout=0.3)
    t0 = time.monotonic()
    ev.code(sometimes, timeout=0.3).run()
    took = time.monotonic() - t0
    for i in range(3):
        err = ev.results_[ev.results_.grader == f'hang{i}'].error
        assert err.str.startswith('grader timed out').sum() == 3
        assert err.str.startswith('grader not called: it failed 3 times in a row').sum() == 9
    s = ev.results_[ev.results_.grader == 'sometimes']
    assert s.error.str.startswith('grader timed out').sum() == 6 and (s.score == 1.0).sum() == 6
    print(f"\n3 hanging graders + 1 flaky over 12 rows: {took:.1f} s (each timeout 0.3 s; 42 timeouts would be {42 * 0.3:.1f} s)")
