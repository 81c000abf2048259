"""Routing and translation through the real SDKs over loopback: our OpenAI client -> anthropic / google-genai /
openai SDKs -> fake upstreams speaking each provider's wire format (tests/fakes)."""
import json, time
import openai, pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from fakes import FakeUpstream, Reply, fake_upstream, fake_providers  # noqa: F401  (fixtures)
from openpipe_lab.core import ProviderError, MissingAPIKeyError
from openpipe_lab.store import tables

WEATHER = {'type': 'function', 'function': {'name': 'weather', 'description': 'Weather in a city',
           'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}
PNG = 'data:image/png;base64,iVBORw0KGgo='


def camel(obj):
    "Keys in lowerCamelCase, recursively (protobuf JSON accepts snake_case and camelCase field names alike)."
    if isinstance(obj, list): return [camel(v) for v in obj]
    if not isinstance(obj, dict): return obj
    return {k.split('_')[0] + ''.join(w.title() for w in k.split('_')[1:]): camel(v) for k, v in obj.items()}


@pytest.fixture
def env(fake_providers): return fake_providers


@pytest.fixture
def client(lab, env):
    return lab.openai(api_key='sk-test', base_url=env.openai_url, max_retries=0)


def logs(lab, **kw):
    lab.flush()
    return sorted(lab.filter(**kw), key=lambda r: r['id'])


# -- Anthropic ----------------------------------------------------------------------------------------------------
def test_anthropic_plain_system_and_abbreviation(client, env, lab):
    r = client.chat.completions.create(model='anthropic:claude-3-5-sonnet', metadata={'prompt_id': 'a1'},
                                       messages=[{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'count to 3'}])
    assert isinstance(r, ChatCompletion)
    assert r.choices[0].message.content == 'echo: count to 3' and r.choices[0].finish_reason == 'stop'
    assert r.model == 'anthropic:claude-3-5-sonnet' and r.usage.prompt_tokens == 11 and r.usage.total_tokens == 18
    sent = env.last
    assert sent.path == '/v1/messages' and 'sk-ant-test' in (sent.headers.get('x-api-key') or sent.headers.get('authorization'))
    assert sent.json['model'] == 'claude-3-5-sonnet-20241022' and sent.json['system'] == 'Be brief.'
    assert sent.json['max_tokens'] == 4096 and 'metadata' not in sent.json
    (log,) = logs(lab, prompt_id='a1')
    assert (log['provider'], log['status_code'], log['completion_id'], log['prompt_tokens'], log['completion_tokens']) == \
           ('anthropic', 200, r.id, 11, 7)
    assert log['resp_payload']['choices'][0]['message']['content'] == 'echo: count to 3'


def test_anthropic_sampling_parameters_reach_the_wire(client, env):
    # anthropic 2.x's Messages.create has no temperature/top_p parameters: they travel in the body all the same
    for stream in (False, True):
        r = client.chat.completions.create(model='anthropic:claude-3-5-sonnet', temperature=0, top_p=0.5, stream=stream,
                                           messages=[{'role': 'user', 'content': 'hi'}])
        if stream: assert ''.join(c.choices[0].delta.content or '' for c in r if c.choices) == 'echo: hi'
        else: assert r.choices[0].message.content == 'echo: hi'
        assert env.last.json['temperature'] == 0 and env.last.json['top_p'] == 0.5


def test_translated_errors_use_the_http_library_openai_is_built_on(client, env):
    import importlib
    http = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split('.')[0])
    env.script(Reply(status=429))
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model='anthropic:claude-3-5-sonnet', messages=[{'role': 'user', 'content': 'hi'}])
    assert isinstance(e.value.response, http.Response)


def test_anthropic_tools_multiturn_and_images(client, env):
    env.script(Reply(tool_calls=[{'name': 'weather', 'arguments': {'city': 'Paris'}}, {'name': 'weather', 'arguments': {'city': 'Oslo'}}]))
    msgs = [{'role': 'user', 'content': [{'type': 'text', 'text': 'weather where this photo was taken?'},
                                         {'type': 'image_url', 'image_url': {'url': PNG}}]}]
    r = client.chat.completions.create(model='anthropic:claude-3-haiku', messages=msgs, tools=[WEATHER], tool_choice='required')
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == 'tool_calls' and [json.loads(c.function.arguments) for c in calls] == [{'city': 'Paris'}, {'city': 'Oslo'}]
    sent = env.last.json
    assert sent['tool_choice'] == {'type': 'any'} and sent['tools'][0]['input_schema'] == WEATHER['function']['parameters']
    assert sent['messages'][0]['content'][1] == {'type': 'image', 'source': {'type': 'base64', 'media_type': 'image/png', 'data': 'iVBORw0KGgo='}}
    # second turn: the assistant message object goes back as is, with the tool results
    msgs += [r.choices[0].message] + [{'role': 'tool', 'tool_call_id': c.id, 'content': t} for c, t in zip(calls, ['21C', '9C'])]
    r2 = client.chat.completions.create(model='anthropic:claude-3-haiku', messages=msgs, tools=[WEATHER])
    sent = env.last.json
    assert [m['role'] for m in sent['messages']] == ['user', 'assistant', 'user']
    assert [b['type'] for b in sent['messages'][1]['content']] == ['tool_use', 'tool_use']
    assert sent['messages'][2]['content'] == [{'type': 'tool_result', 'tool_use_id': calls[0].id, 'content': '21C'},
                                              {'type': 'tool_result', 'tool_use_id': calls[1].id, 'content': '9C'}]
    assert r2.choices[0].message.content.startswith('echo')


def test_anthropic_streaming_text_and_tools(client, env, lab):
    env.script(Reply(text='It is sunny', tool_calls=[{'name': 'weather', 'arguments': {'city': 'Rome'}}]))
    stream = client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'hi'}],
                                            tools=[WEATHER], stream=True, metadata={'prompt_id': 'as'})
    assert isinstance(stream, openai.Stream)
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) and c.choices for c in chunks)  # no usage chunk: not asked for
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == 'It is sunny'
    args = ''.join(tc.function.arguments or '' for c in chunks for tc in c.choices[0].delta.tool_calls or [])
    assert json.loads(args) == {'city': 'Rome'} and chunks[-1].choices[0].finish_reason == 'tool_calls'
    (log,) = logs(lab, prompt_id='as')
    msg = log['resp_payload']['choices'][0]['message']
    assert log['stream'] and msg['content'] == 'It is sunny' and json.loads(msg['tool_calls'][0]['function']['arguments']) == {'city': 'Rome'}
    assert log['resp_payload']['usage'] == {'prompt_tokens': 11, 'completion_tokens': 7, 'total_tokens': 18}
    assert log['prompt_tokens'] == 11 and env.last.json['stream'] is True


def test_anthropic_n_loops_and_usage_chunk_on_request(client, env):
    r = client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'x'}], n=2)
    assert [c.index for c in r.choices] == [0, 1] and len(env.requests) == 2 and r.usage.prompt_tokens == 22
    chunks = list(client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'y'}],
                                                 n=2, stream=True, stream_options={'include_usage': True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14


def test_anthropic_json_response_format(client, env):
    env.script(Reply(tool_calls=[{'name': 'json_output', 'arguments': {'a': 1}}]))
    schema = {'type': 'object', 'properties': {'a': {'type': 'integer'}}}
    r = client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'x'}],
                                       response_format={'type': 'json_schema', 'json_schema': {'name': 'o', 'schema': schema}})
    assert json.loads(r.choices[0].message.content) == {'a': 1} and r.choices[0].message.tool_calls is None
    assert env.last.json['tool_choice'] == {'type': 'tool', 'name': 'json_output'}


def test_anthropic_errors_become_openai_errors_and_are_logged(client, env, lab):
    env.script(Reply(status=429, message='slow down'))
    with pytest.raises(openai.RateLimitError, match='slow down'):
        client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'x'}], metadata={'prompt_id': 'e'})
    env.script(Reply(delay=1.5))
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'x'}], timeout=0.3,
                                       metadata={'prompt_id': 'e'})
    rate, slow = logs(lab, prompt_id='e')
    assert rate['status_code'] == 429 and 'slow down' in rate['error_message'] and rate['resp_payload']['error']['type'] == 'rate_limit_error'
    assert slow['status_code'] is None and slow['error_message'].startswith('timeout')


# -- Gemini -------------------------------------------------------------------------------------------------------
def test_gemini_plain_and_candidates(client, env, lab):
    r = client.chat.completions.create(model='gemini:gemini-1.5-flash', n=2, temperature=0.1, max_tokens=50,
                                       messages=[{'role': 'developer', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hello'}],
                                       metadata={'prompt_id': 'g1'})
    assert [c.message.content for c in r.choices] == ['echo: hello [0]', 'echo: hello [1]'] and r.model == 'gemini:gemini-1.5-flash'
    sent = env.last
    assert sent.path.endswith('/models/gemini-1.5-flash-002:generateContent') and sent.headers['x-goog-api-key'] == 'gem-test'
    assert sent.json['systemInstruction']['parts'][0]['text'] == 'Be brief.'
    assert sent.json['generationConfig'] == {'temperature': 0.1, 'maxOutputTokens': 50, 'candidateCount': 2}
    (log,) = logs(lab, prompt_id='g1')
    assert log['provider'] == 'gemini' and log['prompt_tokens'] == 11 and len(log['resp_payload']['choices']) == 2


def test_gemini_tools_multiturn_images(client, env):
    env.script(Reply(tool_calls=[{'name': 'weather', 'arguments': {'city': 'Lima'}}]))
    msgs = [{'role': 'user', 'content': [{'type': 'text', 'text': 'weather?'}, {'type': 'image_url', 'image_url': {'url': PNG}}]}]
    r = client.chat.completions.create(model='gemini:gemini-2.0-flash', messages=msgs, tools=[WEATHER],
                                       tool_choice={'type': 'function', 'function': {'name': 'weather'}})
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == 'tool_calls' and json.loads(call.function.arguments) == {'city': 'Lima'}
    sent = camel(env.last.json)  # google-genai sends some nested keys snake_case; the API accepts both spellings
    assert sent['contents'][0]['parts'][1] == {'inlineData': {'mimeType': 'image/png', 'data': 'iVBORw0KGgo='}}
    assert sent['tools'][0]['functionDeclarations'][0]['parametersJsonSchema'] == WEATHER['function']['parameters']
    assert sent['toolConfig'] == {'functionCallingConfig': {'mode': 'ANY', 'allowedFunctionNames': ['weather']}}
    msgs += [r.choices[0].message, {'role': 'tool', 'tool_call_id': call.id, 'content': '{"temp": 18}'}]
    client.chat.completions.create(model='gemini:gemini-2.0-flash', messages=msgs, tools=[WEATHER])
    sent = camel(env.last.json)
    assert [c['role'] for c in sent['contents']] == ['user', 'model', 'user']
    assert sent['contents'][1]['parts'][0]['functionCall'] == {'name': 'weather', 'args': {'city': 'Lima'}}
    assert sent['contents'][2]['parts'][0]['functionResponse'] == {'name': 'weather', 'response': {'temp': 18}}


def test_gemini_streaming_and_json_mode(client, env, lab):
    stream = client.chat.completions.create(model='gemini:gemini-1.5-pro', messages=[{'role': 'user', 'content': 'stream please'}],
                                            stream=True, metadata={'prompt_id': 'gs'}, response_format={'type': 'json_object'})
    chunks = list(stream)
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == 'echo: stream please'
    assert chunks[-1].choices[0].finish_reason == 'stop'
    assert env.last.query == {'alt': 'sse'} and env.last.json['generationConfig']['responseMimeType'] == 'application/json'
    (log,) = logs(lab, prompt_id='gs')
    assert log['resp_payload']['choices'][0]['message']['content'] == 'echo: stream please' and log['completion_tokens'] == 7


def test_gemini_errors(client, env, lab):
    env.script(Reply(status=500, message='backend exploded'))
    with pytest.raises(openai.InternalServerError, match='backend exploded'):
        client.chat.completions.create(model='gemini:gemini-1.5-flash', messages=[{'role': 'user', 'content': 'x'}], metadata={'prompt_id': 'ge'})
    env.script(Reply(delay=1.5))
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model='gemini:gemini-1.5-flash', messages=[{'role': 'user', 'content': 'x'}], timeout=0.3,
                                       metadata={'prompt_id': 'ge'})
    boom, slow = logs(lab, prompt_id='ge')
    assert boom['status_code'] == 500 and slow['status_code'] is None and 'timeout' in slow['error_message']


# -- keys, prefixes, custom providers, deployments -----------------------------------------------------------------
def test_missing_keys_and_unknown_prefix_name_the_fix(client, monkeypatch):
    monkeypatch.delenv('ANTHROPIC_API_KEY')
    with pytest.raises(MissingAPIKeyError, match="'anthropic:claude-3-haiku'.*ANTHROPIC_API_KEY"):
        client.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'x'}])
    monkeypatch.delenv('GEMINI_API_KEY')
    with pytest.raises(MissingAPIKeyError, match='GEMINI_API_KEY'):
        client.chat.completions.create(model='gemini:gemini-1.5-flash', messages=[{'role': 'user', 'content': 'x'}])
    with pytest.raises(ProviderError, match="unknown provider prefix 'mistral'"):
        client.chat.completions.create(model='mistral:large', messages=[{'role': 'user', 'content': 'x'}])


def test_custom_openai_and_azure_providers(client, env, lab, monkeypatch):
    lab.add_provider('my-vllm', env.openai_url, api_key_env='MY_VLLM_KEY')
    with pytest.raises(MissingAPIKeyError, match='MY_VLLM_KEY'):
        client.chat.completions.create(model='openpipe:my-vllm/llama-3', messages=[{'role': 'user', 'content': 'x'}])
    monkeypatch.setenv('MY_VLLM_KEY', 'vk')
    r = client.chat.completions.create(model='openpipe:my-vllm/llama-3', messages=[{'role': 'user', 'content': 'x'}], metadata={'prompt_id': 'cp'})
    assert env.last.json['model'] == 'llama-3' and env.last.headers['authorization'] == 'Bearer vk' and r.model == 'openpipe:my-vllm/llama-3'
    lab.add_provider('custom-azure-provider', env.root, api_key_env='AZ_KEY', kind='azure', api_version='2024-06-01')
    monkeypatch.setenv('AZ_KEY', 'azk')
    r = client.chat.completions.create(model='openpipe:custom-azure-provider/gpt-4o-2024-08-06', messages=[{'role': 'user', 'content': 'y'}])
    assert env.last.api == 'azure' and env.last.path == '/openai/deployments/gpt-4o-2024-08-06/chat/completions'
    assert env.last.query == {'api-version': '2024-06-01'} and env.last.headers['api-key'] == 'azk'
    assert r.choices[0].message.content == 'echo: y'
    (log,) = logs(lab, prompt_id='cp')
    assert log['provider'] == 'my-vllm' and log['model'] == 'openpipe:my-vllm/llama-3'


def _deploy(lab, url, slug='pii-smol', served='pii-smol-lora', rules=None, status='RUNNING'):
    now = int(time.time() * 1000)
    with lab.db.begin() as c:
        c.execute(tables.deployments.insert().values(id=f'dep_{slug}', url=url, status=status, created_at=now, updated_at=now))
        c.execute(tables.deployment_models.insert().values(deployment_id=f'dep_{slug}', slug=slug, served_name=served))
        c.execute(tables.models.insert().values(id=f'm_{slug}', slug=slug, kind='openpipe', base_model='b', status='DEPLOYED', config='{}',
                                                pruning_rules=json.dumps(rules) if rules else None, created_at=now, updated_at=now))


def test_deployment_route_rewrites_model_and_prunes(client, env, lab):
    msgs = [{'role': 'system', 'content': 'You are a PII redactor. Follow the rules.'}, {'role': 'user', 'content': 'John lives here'}]
    with pytest.raises(ProviderError, match=r"no running deployment for slug 'pii-smol'.*FineTune.get\('pii-smol'\).deploy\(\)"):
        client.chat.completions.create(model='openpipe:pii-smol', messages=msgs)
    _deploy(lab, env.openai_url, rules=['You are a PII redactor. '])
    r = client.chat.completions.create(model='openpipe:pii-smol', messages=msgs, metadata={'prompt_id': 'dep'})
    sent = env.last.json
    assert sent['model'] == 'pii-smol-lora' and sent['messages'][0]['content'] == 'Follow the rules.'
    assert r.model == 'openpipe:pii-smol'
    chunks = list(client.chat.completions.create(model='openpipe:pii-smol', messages=msgs, stream=True, metadata={'prompt_id': 'dep'}))
    assert env.last.json['stream_options'] == {'include_usage': True}  # asked upstream for the log...
    assert all(c.choices for c in chunks) and {c.model for c in chunks} == {'openpipe:pii-smol'}  # ...hidden from the caller
    plain, streamed = logs(lab, prompt_id='dep')
    assert plain['req_payload']['messages'] == msgs  # the log keeps what the caller sent
    assert plain['provider'] == 'openpipe' and streamed['prompt_tokens'] == 11 and streamed['resp_payload']['model'] == 'openpipe:pii-smol'


def test_stopped_deployment_is_not_used(client, env, lab):
    _deploy(lab, env.openai_url, status='STOPPED')
    with pytest.raises(ProviderError, match='no running deployment'):
        client.chat.completions.create(model='openpipe:pii-smol', messages=[{'role': 'user', 'content': 'x'}])


def test_async_routes_anthropic_gemini_and_deployment(lab, env):
    import asyncio
    _deploy(lab, env.openai_url)
    async def main():
        c = lab.async_openai(api_key='sk-test', base_url=env.openai_url, max_retries=0)
        a = await c.chat.completions.create(model='anthropic:claude-3-haiku', messages=[{'role': 'user', 'content': 'a'}], n=2,
                                            metadata={'prompt_id': 'async-routes'})
        g = await c.chat.completions.create(model='gemini:gemini-1.5-flash', messages=[{'role': 'user', 'content': 'g'}],
                                            metadata={'prompt_id': 'async-routes'})
        gs = await c.chat.completions.create(model='gemini:gemini-1.5-flash', messages=[{'role': 'user', 'content': 'gs'}], stream=True,
                                             metadata={'prompt_id': 'async-routes'})
        gtext = ''.join([ch.choices[0].delta.content or '' async for ch in gs])
        d = await c.chat.completions.create(model='openpipe:pii-smol', messages=[{'role': 'user', 'content': 'd'}],
                                            metadata={'prompt_id': 'async-routes'})
        env.script(Reply(status=429))
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model='gemini:gemini-1.5-flash', messages=[{'role': 'user', 'content': 'x'}],
                                            metadata={'prompt_id': 'async-routes'})
        return a, g, gtext, d
    a, g, gtext, d = asyncio.run(main())
    assert [ch.message.content for ch in a.choices] == ['echo: a', 'echo: a'] and g.choices[0].message.content == 'echo: g'
    assert gtext == 'echo: gs' and d.model == 'openpipe:pii-smol'
    rows = logs(lab, prompt_id='async-routes')
    assert [r['provider'] for r in rows] == ['anthropic', 'gemini', 'gemini', 'openpipe', 'gemini']
    assert [r['status_code'] for r in rows] == [200, 200, 200, 200, 429]
    assert rows[2]['resp_payload']['choices'][0]['message']['content'] == 'echo: gs'


def test_openai_stream_with_n_choices_is_assembled(lab, env):
    client = lab.openai(api_key='sk-test', base_url=env.openai_url, max_retries=0)
    chunks = list(client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'two'}], n=2, stream=True,
                                                 metadata={'prompt_id': 'n2'}))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    (log,) = logs(lab, prompt_id='n2')
    assert [c['message']['content'] for c in log['resp_payload']['choices']] == ['echo: two [0]', 'echo: two [1]']


def test_dead_deployment_names_the_url_and_the_fix(lab, env):
    with FakeUpstream() as gone: url = gone.openai_url
    _deploy(lab, url)
    client = lab.openai(api_key='sk-test', base_url=env.openai_url, max_retries=0)
    with pytest.raises(openai.APIConnectionError, match=r"openpipe:pii-smol: cannot connect to http://127.0.0.1:\d+/v1 .*still running"):
        client.chat.completions.create(model='openpipe:pii-smol', messages=[{'role': 'user', 'content': 'x'}], metadata={'prompt_id': 'dead'})
    (log,) = logs(lab, prompt_id='dead')
    assert 'cannot connect' in log['error_message'] and log['status_code'] is None
