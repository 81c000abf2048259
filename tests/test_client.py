"""The drop-in clients over loopback with the real openai SDK: logging, streams, errors, cache, fallback, async."""
import asyncio, json
import openai, pytest
from openai.types.chat import ChatCompletion
from fakes import FakeUpstream, Reply, fake_upstream, fake_providers  # noqa: F401  (fixtures)
from openpipe_lab.client import OpenAI, AsyncOpenAI
import openpipe_lab.criterion  # noqa: F401  (patches the op-criteria best-of-N hooks onto the client's _Call)
from openpipe_lab.core import ConfigError
from openpipe_lab.store import tables

WEATHER = {'type': 'function', 'function': {'name': 'weather', 'description': 'Weather in a city',
           'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}
HI = [{'role': 'user', 'content': 'hi'}]


@pytest.fixture
def up(fake_providers): return fake_providers


@pytest.fixture
def client(lab, up):
    return lab.openai(api_key='sk-test', base_url=up.openai_url, max_retries=0)


def logs(lab, **kw):
    lab.flush()
    return sorted(lab.filter(**kw), key=lambda r: r['id'])


def test_plain_call_is_recorded_like_the_spec_export(client, up, lab, tmp_path):
    assert isinstance(client, openai.OpenAI) and isinstance(client, OpenAI) and client.store is lab
    r = client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'system', 'content': 'count to 3'}],
                                       temperature=0, metadata={'prompt_id': 'counting', 'any_key': 'any_value'})
    assert type(r) is ChatCompletion and r.choices[0].message.content == 'echo: '  # no user message to echo
    assert 'metadata' not in up.last.json and up.last.json['temperature'] == 0
    (log,) = logs(lab, prompt_id='counting')
    assert (log['model'], log['provider'], log['status_code'], log['completion_id']) == ('gpt-4o-mini', 'openai', 200, r.id)
    assert (log['prompt_tokens'], log['completion_tokens'], log['cache_hit'], log['stream']) == (11, 7, False, False)
    assert log['requested_at'] <= log['received_at'] and log['duration_ms'] >= 0
    assert lab.filter(prompt_id='counting').export(tmp_path / 'x.jsonl') == 1
    line = json.loads((tmp_path / 'x.jsonl').read_text())
    assert line['input'] == {'model': 'gpt-4o-mini', 'messages': [{'role': 'system', 'content': 'count to 3'}], 'temperature': 0,
                             'metadata': {'prompt_id': 'counting', 'any_key': 'any_value'}}
    assert line['output']['object'] == 'chat.completion' and line['output']['usage']['total_tokens'] == 18
    assert line['tags'] == {'prompt_id': 'counting', 'any_key': 'any_value', '$sdk': 'python', '$sdk.version': 'openpipe_lab-0.1.0'}


def test_tools_multiturn_and_n(client, up, lab):
    up.script(Reply(tool_calls=[{'name': 'weather', 'arguments': {'city': 'Paris'}}]))
    msgs = [{'role': 'user', 'content': 'weather in Paris?'}]
    r = client.chat.completions.create(model='openai:gpt-4o', messages=msgs, tools=[WEATHER], tool_choice='auto', metadata={'prompt_id': 't'})
    assert up.last.json['model'] == 'gpt-4o' and up.last.json['tools'] == [WEATHER]
    (call,) = r.choices[0].message.tool_calls
    msgs += [r.choices[0].message, {'role': 'tool', 'tool_call_id': call.id, 'content': '21C'}]
    r2 = client.chat.completions.create(model='openai:gpt-4o', messages=msgs, tools=[WEATHER], n=3, metadata={'prompt_id': 't'})
    assert len(r2.choices) == 3 and up.last.json['messages'][1]['tool_calls'][0]['id'] == call.id
    first, second = logs(lab, prompt_id='t')
    assert first['resp_payload']['choices'][0]['message']['tool_calls'][0]['function']['name'] == 'weather'
    assert second['req_payload']['messages'][1]['tool_calls'][0]['id'] == call.id  # SDK message objects logged as JSON
    assert len(second['resp_payload']['choices']) == 3


def test_raw_response_and_nested_sdk_objects(client, up, lab):
    raw = client.chat.completions.with_raw_response.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'raw'})
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].message.content == 'echo: hi'
    up.script(Reply(tool_calls=[{'name': 'weather', 'arguments': {'city': 'Bern'}}]))
    r = client.chat.completions.create(model='gpt-4o-mini', messages=HI, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    # an SDK tool-call object nested inside a dict message: sent and logged as plain JSON
    msgs = HI + [{'role': 'assistant', 'content': None, 'tool_calls': [call]}, {'role': 'tool', 'tool_call_id': call.id, 'content': '3C'}]
    client.chat.completions.create(model='gpt-4o-mini', messages=msgs, tools=[WEATHER], metadata={'prompt_id': 'raw'})
    first, second = logs(lab, prompt_id='raw')
    assert first['resp_payload']['choices'][0]['message']['content'] == 'echo: hi'
    assert second['req_payload']['messages'][1]['tool_calls'][0]['function'] == {'name': 'weather', 'arguments': '{"city": "Bern"}'}


def test_streaming_logs_the_assembled_completion(client, up, lab):
    up.script(Reply(text='Hello there, streaming world', tool_calls=[{'name': 'weather', 'arguments': {'city': 'Oslo'}}]))
    stream = client.chat.completions.create(model='gpt-4o-mini', messages=HI, tools=[WEATHER], stream=True, metadata={'prompt_id': 's'})
    assert isinstance(stream, openai.Stream)
    with stream:
        chunks = list(stream)
    assert all(c.choices for c in chunks)  # we asked upstream for usage; the caller did not, so it is hidden
    assert up.last.json['stream_options'] == {'include_usage': True}
    (log,) = logs(lab, prompt_id='s')
    msg = log['resp_payload']['choices'][0]['message']
    assert log['stream'] and msg['content'] == 'Hello there, streaming world'
    assert json.loads(msg['tool_calls'][0]['function']['arguments']) == {'city': 'Oslo'}
    assert log['resp_payload']['usage']['total_tokens'] == 18 and log['completion_id'] == chunks[0].id and log['prompt_tokens'] == 11
    chunks = list(client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, stream_options={'include_usage': True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 11


def test_stream_closed_early_and_broken_stream_are_logged(client, up, lab):
    up.script(Reply(text='a long answer in many pieces'))
    stream = client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, metadata={'prompt_id': 'cl'})
    next(stream); next(stream)
    stream.close()
    up.script(Reply(text='this will break', stream_error_after=2))
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, metadata={'prompt_id': 'cl'}))
    closed, broken = logs(lab, prompt_id='cl')
    assert 'closed the stream after 2 chunks' in closed['error_message'] and closed['resp_payload']['choices'][0]['message']['content'] == 'a lo'
    assert broken['error_message'] and broken['stream']


def test_errors_and_timeouts_are_recorded_then_raised(client, up, lab):
    up.script(Reply(status=429, message='rate limited'), Reply(status=500, message='boom'), Reply(delay=1.5))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'err'})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'err'})
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'err'}, timeout=0.3)
    rate, boom, slow = logs(lab, prompt_id='err')
    assert (rate['status_code'], boom['status_code'], slow['status_code']) == (429, 500, None)
    assert 'rate limited' in rate['error_message'] and rate['resp_payload']['message'] == 'rate limited'
    assert slow['error_message'].startswith('timeout') and slow['duration_ms'] >= 250


def test_store_false_and_options_validation(client, up, lab):
    client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'priv'}, openpipe={'store': False})
    quiet = lab.openai(api_key='k', base_url=up.openai_url, openpipe={'store': False})
    quiet.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'priv'})
    assert len(logs(lab, prompt_id='priv')) == 0 and len(up.requests) == 2
    with pytest.raises(ConfigError, match='unknown openpipe option'):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, openpipe={'chache': 'readWrite'})
    with pytest.raises(ConfigError, match="openpipe\\['cache'\\] must be one of"):
        lab.openai(api_key='k', openpipe={'cache': 'yes'})


def test_constructor_defaults_tags_and_copy(lab, up):
    c = lab.openai(api_key='k', base_url=up.openai_url, openpipe={'tags': {'team': 'ml'}, 'cache': 'readWrite'})
    c2 = c.with_options(timeout=5)
    assert isinstance(c2, OpenAI) and c2.store is lab and c2.openpipe_options == c.openpipe_options
    c2.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'd'})
    c2.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'd'}, openpipe={'tags': {'team': 'nlp'}})
    a, b = logs(lab, prompt_id='d')
    assert a['tags']['team'] == 'ml' and b['tags']['team'] == 'nlp' and (a['cache_hit'], b['cache_hit']) == (False, True)


def test_default_store_is_the_default_lab(lab, up):
    c = OpenAI(api_key='k', base_url=up.openai_url)  # store=None: the default lab (the fixture made `lab` the default)
    c.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'default'})
    assert c.store is lab and len(logs(lab, prompt_id='default')) == 1


# -- cache ----------------------------------------------------------------------------------------------------------
def test_cache_modes_expiry_and_stream_replay(client, up, lab):
    kw = dict(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'cache me'}], temperature=0)
    r1 = client.chat.completions.create(**kw, openpipe={'cache': 'readOnly'}, metadata={'prompt_id': 'c'})      # miss, no write
    r2 = client.chat.completions.create(**kw, openpipe={'cache': 'readWrite'}, metadata={'prompt_id': 'c'})     # miss, write
    r3 = client.chat.completions.create(**kw, openpipe={'cache': 'readWrite'}, metadata={'prompt_id': 'c2'})    # hit
    assert len(up.requests) == 2 and r3.id == r2.id != r1.id and type(r3) is ChatCompletion
    client.chat.completions.create(**{**kw, 'temperature': 1}, openpipe={'cache': 'readOnly'})                 # other key
    client.chat.completions.create(**kw, extra_body={'top_k': 5}, openpipe={'cache': 'readOnly'})             # other key
    assert len(up.requests) == 4 and up.last.json['top_k'] == 5
    stream = client.chat.completions.create(**kw, stream=True, openpipe={'cache': 'readOnly'}, metadata={'prompt_id': 'c2'})
    assert isinstance(stream, openai.Stream) and ''.join(c.choices[0].delta.content or '' for c in stream) == 'echo: cache me'
    assert len(up.requests) == 4
    r4 = client.chat.completions.create(**kw, openpipe={'cache': 'writeOnly'})                                  # never reads
    assert len(up.requests) == 5 and r4.id != r2.id
    assert client.chat.completions.create(**kw, openpipe={'cache': 'readOnly'}).id == r4.id                    # ...but wrote
    hits = logs(lab, prompt_id='c2')
    assert [h['cache_hit'] for h in hits] == [True, True] and hits[1]['stream'] and hits[0]['completion_id'] == r2.id
    with lab.db.begin() as c: c.execute(tables.cache.update().values(expires_at=tables.cache.c.created_at + 7 * 24 * 3600 * 1000 - 1))
    with lab.db.connect() as c: assert c.execute(tables.cache.select()).first().hits == 1  # writeOnly replaced the entry
    with lab.db.begin() as c: c.execute(tables.cache.update().values(expires_at=1))   # a week has passed
    client.chat.completions.create(**kw, openpipe={'cache': 'readOnly'})
    assert len(up.requests) == 6


def test_streamed_response_is_cached_for_non_streamed_readers(client, up, lab):
    kw = dict(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'stream to cache'}])
    list(client.chat.completions.create(**kw, stream=True, openpipe={'cache': 'readWrite'}))
    r = client.chat.completions.create(**kw, openpipe={'cache': 'readOnly'})
    assert len(up.requests) == 1 and r.choices[0].message.content == 'echo: stream to cache' and r.usage.total_tokens == 18


# -- fallback -------------------------------------------------------------------------------------------------------
def test_fallback_on_error_logs_both_attempts_linked(client, up, lab):
    up.script(Reply(status=500))
    r = client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'fb'},
                                       openpipe={'fallback': {'model': 'gpt-4-turbo'}})
    assert r.choices[0].message.content == 'echo: hi' and up.last.json['model'] == 'gpt-4-turbo'
    first, second = logs(lab, prompt_id='fb')
    assert (first['model'], first['status_code'], second['model'], second['status_code']) == ('gpt-4o-mini', 500, 'gpt-4-turbo', 200)
    assert second['parent_id'] == first['id'] and first['parent_id'] is None and second['req_payload']['model'] == 'gpt-4-turbo'


def test_timeout_fallback_uses_its_own_timeout(lab, up):
    client = lab.openai(api_key='k', base_url=up.openai_url, max_retries=0, timeout=0.3)
    up.script(Reply(delay=1.0), Reply(delay=0.6))
    r = client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'tf'},
                                       openpipe={'fallback': {'model': 'gpt-4o', 'timeout': 5}})
    assert r.model == 'gpt-4o'
    first, second = logs(lab, prompt_id='tf')
    assert first['error_message'].startswith('timeout') and second['status_code'] == 200 and second['parent_id'] == first['id']
    up.script(Reply(delay=1.0), Reply(delay=1.0))
    with pytest.raises(openai.APITimeoutError):   # default fallback timeout: the client's
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'tf2'}, openpipe={'fallback': {'model': 'gpt-4o'}})
    a, b = logs(lab, prompt_id='tf2')
    assert b['parent_id'] == a['id'] and b['error_message'].startswith('timeout')


def test_fallback_from_undeployed_finetune_to_anthropic_carries_tools(client, up, lab):
    up.script(Reply(tool_calls=[{'name': 'weather', 'arguments': {'city': 'Nice'}}]))
    r = client.chat.completions.create(model='openpipe:my-ft-model', messages=[{'role': 'user', 'content': 'weather?'}], tools=[WEATHER],
                                       tool_choice='required', metadata={'prompt_id': 'fa'},
                                       openpipe={'fallback': {'model': 'anthropic:claude-3-5-sonnet'}})
    assert r.choices[0].message.tool_calls[0].function.name == 'weather' and r.model == 'anthropic:claude-3-5-sonnet'
    assert up.last.api == 'anthropic' and up.last.json['tools'][0]['name'] == 'weather' and up.last.json['tool_choice'] == {'type': 'any'}
    first, second = logs(lab, prompt_id='fa')
    assert 'no running deployment for slug' in first['error_message'] and second['provider'] == 'anthropic'


def test_fallback_client(lab, up):
    with FakeUpstream() as other:
        plain = openai.OpenAI(api_key='k2', base_url=other.openai_url)
        client = lab.openai(api_key='k', base_url=up.openai_url, max_retries=0, fallback_client=plain)
        r = client.chat.completions.create(model='openpipe:my-ft-model', messages=HI, metadata={'prompt_id': 'fc'},
                                           openpipe={'fallback': {'model': 'gpt-4-turbo'}})
        assert other.last.json['model'] == 'gpt-4-turbo' and other.last.headers['authorization'] == 'Bearer k2' and len(up.requests) == 0
        ours = lab.openai(api_key='k3', base_url=other.openai_url)   # one of our clients: recorded once, by the caller
        hosted_style = lab.openai(api_key='k', base_url=up.openai_url, openpipe={'fallback_client': ours})
        up.script(Reply(status=500))
        hosted_style.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'fc'},
                                             openpipe={'fallback': {'model': 'gpt-4o'}}, stream=False)
    a, b, c, d = logs(lab, prompt_id='fc')
    assert (b['parent_id'], b['provider'], b['status_code']) == (a['id'], 'fallback_client', 200) and r.id == b['completion_id']
    assert (c['status_code'], d['parent_id'], d['model']) == (500, c['id'], 'gpt-4o')


def test_streamed_fallback(client, up, lab):
    up.script(Reply(status=500))
    chunks = list(client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, metadata={'prompt_id': 'sf'},
                                                 openpipe={'fallback': {'model': 'anthropic:claude-3-haiku'}}))
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == 'echo: hi'
    first, second = logs(lab, prompt_id='sf')
    assert first['status_code'] == 500 and second['stream'] and second['parent_id'] == first['id']
    assert second['resp_payload']['choices'][0]['message']['content'] == 'echo: hi'


# -- async ----------------------------------------------------------------------------------------------------------
def test_async_client_end_to_end(lab, up):
    async def main():
        c = lab.async_openai(api_key='k', base_url=up.openai_url, max_retries=0)
        assert isinstance(c, openai.AsyncOpenAI) and isinstance(c, AsyncOpenAI)
        r = await c.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'as'})
        s = await c.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, metadata={'prompt_id': 'as'})
        assert isinstance(s, openai.AsyncStream)
        text = ''.join([ch.choices[0].delta.content or '' async for ch in s])
        a = await c.chat.completions.create(model='anthropic:claude-3-haiku', messages=HI, stream=True, metadata={'prompt_id': 'as'})
        atext = ''.join([ch.choices[0].delta.content or '' async for ch in a])
        up.script(Reply(status=429))
        fb = await c.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'as'},
                                             openpipe={'fallback': {'model': 'anthropic:claude-3-haiku'}})
        up.script(Reply(delay=1.0))
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model='gpt-4o-mini', messages=HI, timeout=0.3, metadata={'prompt_id': 'as'})
        cached = [await c.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'acache'}],
                                                  openpipe={'cache': 'readWrite'}) for _ in range(2)]
        gathered = await asyncio.gather(*[c.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': str(i)}],
                                                                    metadata={'prompt_id': 'many'}) for i in range(10)])
        return r, text, atext, fb, cached, gathered
    r, text, atext, fb, cached, gathered = asyncio.run(main())
    assert r.choices[0].message.content == text == atext == 'echo: hi' and fb.model == 'anthropic:claude-3-haiku'
    assert cached[0].id == cached[1].id and sorted(g.choices[0].message.content for g in gathered) == sorted(f'echo: {i}' for i in range(10))
    rows = logs(lab, prompt_id='as')
    assert [r['status_code'] for r in rows] == [200, 200, 200, 429, 200, None]
    assert rows[2]['resp_payload']['choices'][0]['message']['content'] == 'echo: hi' and rows[4]['parent_id'] == rows[3]['id']
    assert len(logs(lab, prompt_id='many')) == 10


# -- the hosted SDK's headers, store: false, best of N (op-criteria) ------------------------------------------------
import math, re
from openpipe_lab.core import NotFoundError
from openpipe_lab.criterion import Criterion

def _tok(t, p, alts=None):
    return {'token': t, 'logprob': math.log(p), 'bytes': None,
            'top_logprobs': [{'token': a, 'logprob': math.log(q), 'bytes': None} for a, q in ({t: p} | (alts or {})).items()]}

def _verdict(v, p_pass=None):
    content = json.dumps({'explanation': f'{v} by the script', 'verdict': v})
    if p_pass is None: return Reply(text=content)
    head, tail = content.rsplit(v, 1)
    other, mine = ('FAIL', p_pass) if v == 'PASS' else ('PASS', 1 - p_pass)
    return Reply(text=content, logprobs=[_tok(head, 1.0), _tok(v, mine, {other: 1 - mine}), _tok(tail, 1.0)])

C1 = {'answer [0]': 0.2, 'answer [1]': 0.9, 'answer [2]': 0.6}           # P(PASS) by criterion c1 (logprobs)
C2 = {'answer [0]': 'PASS', 'answer [1]': 'FAIL', 'answer [2]': 'PASS'}  # verdicts of criterion c2 (verdict scoring)

def best_of_n_responder(broken=()):
    def reply(req):
        body = req.json
        if 'response_format' not in body: return Reply(text='answer')           # the generation: 'answer [i]' per choice
        user = body['messages'][1]['content']
        out = json.loads(re.search(r'<output>\n(.*?)\n</output>', user, re.S).group(1))['content']
        if ('C1' if 'C1' in user else 'C2', out) in broken: return Reply(text='no verdict here')
        if 'C1' in user: return _verdict('PASS' if C1[out] >= 0.5 else 'FAIL', C1[out])
        return _verdict(C2[out])
    return reply

def criteria(lab):
    Criterion('c1', prompt='C1: mark it failed if it is wrong; passed otherwise.', store=lab).version
    Criterion('c2', prompt='C2: an older prompt; mark it failed if rude.', scoring='verdict', store=lab).version
    return Criterion('c2', prompt='C2: mark it failed if rude; passed otherwise.', scoring='verdict', store=lab).version  # c2@v2


def test_best_of_n_judges_every_choice_and_sorts(client, up, lab):
    assert criteria(lab) == 'c2@v2'
    up.responder = best_of_n_responder()
    headers = {'op-criteria': '["c1@v1", "c2"]', 'op-cache': 'readWrite', 'x-keep': 'yes'}
    r = client.chat.completions.create(model='gpt-4o-mini', messages=HI, n=3, extra_headers=headers, metadata={'prompt_id': 'bon'})
    gen = [q for q in up.requests if 'response_format' not in q.json]
    assert len(gen) == 1 and gen[0].headers.get('x-keep') == 'yes'
    assert not any(k.startswith('op-') for q in up.requests for k in q.headers)     # never forwarded upstream
    combined = {o: (C1[o] + (C2[o] == 'PASS')) / 2 for o in C1}                    # the documented rule, computed here
    want = sorted(C1, key=lambda o: -combined[o])
    assert [c.message.content for c in r.choices] == want == ['answer [2]', 'answer [0]', 'answer [1]']
    assert [c.index for c in r.choices] == [0, 1, 2]
    best = r.choices[0].criteria_results
    assert best['c1']['status'] == 'success' and best['c1']['score'] == pytest.approx(0.6) and best['c2'] == \
        {'status': 'success', 'score': 1.0, 'explanation': 'PASS by the script'}
    assert r.usage.criteria == {'c1': {'total_tokens': 54}, 'c2': {'total_tokens': 54}}
    judged = [q for q in up.requests if 'response_format' in q.json]
    assert len(judged) == 6 and sum('C2: mark it failed if rude' in q.json['messages'][1]['content'] for q in judged) == 3   # 'c2' = latest
    n = len(up.requests)
    again = client.chat.completions.create(model='gpt-4o-mini', messages=HI, n=3, extra_headers=headers, metadata={'prompt_id': 'bon'})
    assert len(up.requests) == n and [c.message.content for c in again.choices] == want    # op-cache + the judges' cache
    rows = logs(lab, prompt_id='bon')
    assert [x['cache_hit'] for x in rows] == [False, True]
    assert len(logs(lab, criterion='c1@v1')) == 6 and len(logs(lab, criterion='c2@v2')) == 6


def test_best_of_n_failed_judgement_is_an_error_result_and_left_out(client, up, lab):
    criteria(lab)
    up.responder = best_of_n_responder(broken={('C2', 'answer [1]')})
    r = client.chat.completions.create(model='gpt-4o-mini', messages=HI, n=3, extra_headers={'op-criteria': '["c1", "c2"]'})
    assert [c.message.content for c in r.choices] == ['answer [1]', 'answer [2]', 'answer [0]']   # 0.9 (c1 alone), 0.8, 0.6
    err = r.choices[0].criteria_results['c2']
    assert err['status'] == 'error' and err['errorCode'] == 500 and 'not a PASS/FAIL verdict' in err['errorMessage']


def test_unknown_criterion_fails_before_generating(client, up, lab):
    criteria(lab)
    with pytest.raises(NotFoundError, match=r"no criterion 'tone'.*known criteria: c1@v1, c2 \(v1-v2\)"):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, n=3, extra_headers={'op-criteria': '["c1", "tone"]'})
    with pytest.raises(NotFoundError): client.chat.completions.create(model='gpt-4o-mini', messages=HI, extra_headers={'op-criteria': '["c1@v7"]'})
    with pytest.raises(ConfigError, match='needs a non-streamed request'):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, stream=True, extra_headers={'op-criteria': '["c1"]'})
    with pytest.raises(ConfigError, match='op-criteria must be a JSON list'):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, extra_headers={'op-criteria': 'c1'})
    assert up.requests == []


def test_op_headers_and_store_false_body(client, up, lab):
    client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'h'},
                                   extra_headers={'op-log-request': 'false'})
    client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'h'}, store=False)
    client.chat.completions.create(model='gpt-4o-mini', messages=HI, metadata={'prompt_id': 'h2'},
                                   extra_headers={'op-tags': '{"team": "ml", "prompt_id": "ignored", "$sdk.version": "5.0.0"}',
                                                  'op-log-request': 'true'})
    assert len(logs(lab, prompt_id='h')) == 0 and up.requests[1].json['store'] is False      # store: false still goes upstream
    (tagged,) = logs(lab, prompt_id='h2')
    assert tagged['tags']['team'] == 'ml' and tagged['tags']['prompt_id'] == 'h2'             # metadata wins over op-tags
    assert (tagged['tags']['$sdk'], tagged['tags']['$sdk.version']) == ('python', '5.0.0')    # the caller's SDK tags win over ours
    assert all(not k.startswith('op-') for q in up.requests for k in q.headers)
    client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'c'}], extra_headers={'op-cache': 'readWrite'})
    client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'c'}], extra_headers={'op-cache': 'readOnly'})
    client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'c'}], extra_headers={'op-cache': 'false'})
    assert len(up.requests) == 5                                                                # the readOnly call was a hit
    with pytest.raises(ConfigError, match="header op-log-request must be 'true' or 'false'"):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, extra_headers={'op-log-request': 'no'})
    with pytest.raises(ConfigError, match='header op-tags must be a JSON dict'):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, extra_headers={'op-tags': '["a"]'})


def test_async_best_of_n(lab, up):
    criteria(lab)
    up.responder = best_of_n_responder()
    async def main():
        c = lab.async_openai(api_key='k', base_url=up.openai_url, max_retries=0)
        return await c.chat.completions.create(model='gpt-4o-mini', messages=HI, n=3, extra_headers={'op-criteria': '["c1", "c2"]'})
    r = asyncio.run(main())
    assert [c.message.content for c in r.choices] == ['answer [2]', 'answer [0]', 'answer [1]']
    assert not any(k.startswith('op-') for q in up.requests for k in q.headers)


def test_best_of_n_without_the_criterion_module_says_how_to_load_it():
    "openpipe_lab.client imported alone has no op-criteria hooks: a ConfigError that names the import, before any request."
    import subprocess, sys
    code = ("from openpipe_lab.client import OpenAI\n"
            "c = OpenAI(store=None, api_key='sk', base_url='http://127.0.0.1:9/v1', max_retries=0)\n"
            "try: c.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}], extra_headers={'op-criteria': '[\"c1\"]'})\n"
            "except Exception as e: print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith('ConfigError chat.completions.create: the op-criteria header needs openpipe_lab.criterion: import openpipe_lab.criterion'), out


WIDE = dict(model='gpt-4o-mini', messages=[{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': [{'type': 'text', 'text': 'hi é'}]}],
            tools=[WEATHER], tool_choice={'type': 'function', 'function': {'name': 'weather'}}, temperature=0.25, top_p=1, n=2, seed=7,
            stop='END', logit_bias={'42': -1}, response_format={'type': 'json_schema', 'json_schema': {'name': 's', 'schema': {'type': 'object'}}},
            max_completion_tokens=50, user='u1', parallel_tool_calls=False)


@pytest.mark.parametrize('extra', [{}, {'stream': True, 'stream_options': {'include_usage': True}},
                                   {'extra_body': {'top_k': 3}, 'extra_query': {'q': '1'}, 'extra_headers': {'X-Custom': 'v'}, 'timeout': 9}])
def test_upstream_gets_what_the_plain_sdk_sends(client, up, extra):
    "The lab client posts a plain request itself (no SDK re-transform): the upstream receives the same request as from the plain SDK."
    plain = openai.OpenAI(api_key='sk-test', base_url=up.openai_url, max_retries=0)
    seen = []
    for c in (plain, client):
        r = c.chat.completions.create(**WIDE, **extra)
        if extra.get('stream'): r = list(r)
        got = up.requests[-1]
        seen.append((got.path, got.query, got.json, {k.lower(): v for k, v in got.headers.items() if k.lower() not in ('x-stainless-retry-count', 'x-stainless-read-timeout')}))
    assert seen[0] == seen[1]
    assert seen[1][2]['messages'][1]['content'][0]['text'] == 'hi é' and ('top_k' in seen[1][2]) == ('extra_body' in extra)


def test_sdk_objects_and_tuples_still_take_the_sdks_transform(client, up):
    "A request holding what the SDK's transform would change (a tuple, an SDK object) reaches the upstream as the plain SDK sends it."
    from openai.types.chat import ChatCompletionUserMessageParam  # a TypedDict: a plain dict at run time
    plain = openai.OpenAI(api_key='sk-test', base_url=up.openai_url, max_retries=0)
    msgs = (ChatCompletionUserMessageParam(role='user', content='hi'),)
    bodies = []
    for c in (plain, client):
        c.chat.completions.create(model='gpt-4o-mini', messages=msgs, stop=('a', 'b'))
        bodies.append(up.requests[-1].json)
    assert bodies[0] == bodies[1] and bodies[1]['stop'] == ['a', 'b']
    with pytest.raises(TypeError, match='no_such_field'):
        client.chat.completions.create(model='gpt-4o-mini', messages=HI, no_such_field=1)


# -- the async client's lean upstream path (`_lean_post`): what the server's /chat/completions goes through --------

LEAN_SKIP = ('x-stainless-retry-count', 'x-stainless-read-timeout', 'accept-encoding', 'connection')  # the lean path asks for no compression


def _sent(up):
    got = up.requests[-1]
    return got.path, got.query, got.json, {k: v for k, v in got.headers.items() if k not in LEAN_SKIP}


@pytest.mark.parametrize('extra', [{}, {'extra_body': {'top_k': 3}, 'extra_headers': {'X-Custom': 'v'}, 'timeout': 9},
                                   {'extra_query': {'q': '1'}}])
def test_async_upstream_gets_what_the_plain_async_sdk_sends(lab, up, extra):
    "The async lab client posts over its own keep-alive connection; the upstream sees the plain SDK's request (a query string takes the SDK's path)."
    plain = openai.AsyncOpenAI(api_key='sk-test', base_url=up.openai_url, max_retries=0)
    client = lab.async_openai(api_key='sk-test', base_url=up.openai_url, max_retries=0)
    async def run():
        seen = []
        for c in (plain, client, client):
            r = await c.chat.completions.create(**WIDE, **extra)
            seen.append((_sent(up), r.model_dump(exclude={'id', 'created'})))
        lean = [conn for conns in client.__dict__.get('_lab_lean', {}).values() for conn in conns]
        await client.close()
        assert '_lab_lean' not in client.__dict__ and all(w.is_closing() for _, w in lean)  # close() closes the idle connections
        return seen, len(lean)
    seen, idle = asyncio.run(run())
    assert seen[0] == seen[1] == seen[2]
    assert idle == (0 if 'extra_query' in extra else 1)  # both calls on one kept-alive connection
    assert len(logs(lab)) == 2 and logs(lab)[0]['resp_payload']['choices'][0]['message']['content'] == seen[1][1]['choices'][0]['message']['content']


@pytest.mark.parametrize('status', [400, 401, 404, 429, 500])
def test_async_lean_errors_are_the_sdks(lab, up, status):
    "An error answer raises what the plain SDK raises: the same class, status, body and message."
    async def run():
        out = []
        for c in (openai.AsyncOpenAI(api_key='sk-test', base_url=up.openai_url, max_retries=0),
                  lab.async_openai(api_key='sk-test', base_url=up.openai_url, max_retries=0)):
            up.script(Reply(status=status, message=f'nope {status}'))
            with pytest.raises(openai.APIStatusError) as e: await c.chat.completions.create(model='gpt-4o-mini', messages=HI)
            out.append((type(e.value), e.value.status_code, e.value.body, str(e.value)))
        return out
    plain, ours = asyncio.run(run())
    assert plain == ours and ours[1] == status and 'nope' in ours[3]
    assert logs(lab)[-1]['status_code'] == status


class _Upstream:
    "A scripted HTTP/1.1 upstream on asyncio streams: `answers` are (status, headers, body bytes, close-after) in order."
    def __init__(self, *answers):
        self.answers, self.requests, self.connections = list(answers), [], 0

    async def handle(self, reader, writer):
        self.connections += 1
        while self.answers:
            try: head = await reader.readuntil(b'\r\n\r\n')
            except asyncio.IncompleteReadError: break
            h = {k.lower(): v for k, v in (l.split(': ', 1) for l in head.decode().split('\r\n')[1:-2])}
            self.requests.append((h, json.loads(await reader.readexactly(int(h['content-length'])))))
            status, headers, body, close = self.answers.pop(0)
            writer.write(f"HTTP/1.1 {status} X\r\n".encode() + b''.join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n" + body)
            await writer.drain()
            if close: break
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, '127.0.0.1', 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc): self.server.close()


def _completion(text: str) -> bytes:
    return json.dumps({'id': 'c1', 'object': 'chat.completion', 'created': 1, 'model': 'gpt-4o-mini', 'choices': [
        {'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': text}}]}).encode()


def _json_answer(text: str, close=False, status=200, **headers):
    body = _completion(text) if status < 400 else json.dumps({'error': {'message': text, 'type': 'server_error'}}).encode()
    return status, {'Content-Type': 'application/json', 'Content-Length': len(body), **headers}, body, close


def test_async_lean_path_survives_a_dropped_idle_connection_and_reads_chunked_gzip(lab):
    "A connection the upstream closed without saying so is replaced (the request sent once more); chunked and gzip answers decode."
    import gzip
    zipped = gzip.compress(_completion('zipped'))
    chunked = b''.join(b'%x\r\n%s\r\n' % (len(p), p) for p in (zipped[:7], zipped[7:])) + b'0\r\n\r\n'
    async def run():
        async with _Upstream(_json_answer('one', close=True), _json_answer('two'),
                             (200, {'Content-Type': 'application/json', 'Transfer-Encoding': 'chunked', 'Content-Encoding': 'gzip'}, chunked, False)) as u:
            c = lab.async_openai(api_key='sk-test', base_url=u.url, max_retries=0)
            got = [(await c.chat.completions.create(model='gpt-4o-mini', messages=HI)).choices[0].message.content for _ in range(3)]
            await c.close()
            return got, u.connections, len(u.requests)
    assert asyncio.run(run()) == (['one', 'two', 'zipped'], 2, 3)


def test_async_lean_retries_like_the_sdk_and_times_out(lab):
    "A retryable failure is retried (the SDK's backoff, then its own call); without retries it raises; a slow answer is the SDK's timeout error."
    async def run():
        async with _Upstream(_json_answer('busy', status=503), _json_answer('ok'), _json_answer('down', status=503)) as u:
            c = lab.async_openai(api_key='sk-test', base_url=u.url, max_retries=1)
            first = (await c.chat.completions.create(model='gpt-4o-mini', messages=HI)).choices[0].message.content
            with pytest.raises(openai.InternalServerError, match='down'):
                await c.with_options(max_retries=0).chat.completions.create(model='gpt-4o-mini', messages=HI)
            n = len(u.requests)
        async def silent(reader, writer): await asyncio.sleep(5)
        srv = await asyncio.start_server(silent, '127.0.0.1', 0)
        slow = lab.async_openai(api_key='sk-test', base_url=f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1", max_retries=0)
        with pytest.raises(openai.APITimeoutError): await slow.chat.completions.create(model='gpt-4o-mini', messages=HI, timeout=0.3)
        srv.close()
        refused = lab.async_openai(api_key='sk-test', base_url='http://127.0.0.1:9/v1', max_retries=0)
        with pytest.raises(openai.APIConnectionError): await refused.chat.completions.create(model='gpt-4o-mini', messages=HI)
        return first, n
    assert asyncio.run(run()) == ('ok', 3)
    assert [r['status_code'] for r in logs(lab)][:2] == [200, 503]


def test_async_lean_path_only_where_the_sdk_would_add_nothing(lab, monkeypatch):
    "A proxy in the environment, https, a custom HTTP client, a stream or the raw-response wrapper: the SDK's own path."
    from openpipe_lab.client import _lean_ok
    body, mk = {'model': 'm', 'messages': HI}, lambda **kw: lab.async_openai(api_key='k', max_retries=0, **{'base_url': 'http://127.0.0.1:9/v1', **kw})
    assert _lean_ok(mk(), body, {})
    assert not _lean_ok(mk(base_url='https://api.example.com/v1'), body, {})
    assert not _lean_ok(mk(http_client=openai.DefaultAsyncHttpxClient()), body, {})
    assert not _lean_ok(mk(), {**body, 'stream': True}, {}) and not _lean_ok(mk(), {**body, 'messages': (HI[0],)}, {})
    assert not _lean_ok(mk(), body, {'extra_headers': {'X-Stainless-Raw-Response': 'raw'}})
    monkeypatch.setenv('HTTP_PROXY', 'http://proxy.invalid:3128')
    assert not _lean_ok(mk(), body, {})
