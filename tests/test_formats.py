"Formats against the real openai SDK's shapes, a large JSONL file, and hash stability across processes."
import json, os, subprocess, sys, tracemalloc
import pytest
from openpipe_lab.formats import (Problem, validate_entry, validate_messages, validate_request, read_jsonl,
                                  canonical_json, content_hash, functions_to_tools)
from openpipe_lab.core import ConfigError

import openai.types.chat  # a core requirement: no skip


def test_sdk_response_messages_validate_as_dataset_outputs():
    "A logged response message (`model_dump()` of the SDK object, None fields included) is a valid output."
    from openai.types.chat import ChatCompletion
    for message in [{'role': 'assistant', 'content': 'Hobart'},
                    {'role': 'assistant', 'content': None, 'tool_calls': [
                        {'id': 'call_1', 'type': 'function', 'function': {'name': 'capital', 'arguments': '{"city": "Hobart"}'}}]},
                    {'role': 'assistant', 'content': None, 'refusal': 'I cannot help with that.'}]:
        completion = ChatCompletion.model_validate({'id': 'c', 'object': 'chat.completion', 'created': 1, 'model': 'm',
            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': message}]})
        output = completion.choices[0].message.model_dump()
        assert 'annotations' in output and 'audio' in output  # the SDK adds these as None
        entry = {'messages': [{'role': 'user', 'content': 'Capital of Tasmania?'}, output]}
        assert validate_entry(entry) == []
        assert validate_entry({**entry, 'rejected_message': output}) == []


def test_sdk_request_params_validate():
    "Requests written with the SDK's own typed params validate; a broken one names its path."
    from openai.types.chat import ChatCompletionUserMessageParam, ChatCompletionToolParam
    user: ChatCompletionUserMessageParam = {'role': 'user', 'content': [{'type': 'text', 'text': 'hi'},
        {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,AAAA', 'detail': 'auto'}}]}
    tool: ChatCompletionToolParam = {'type': 'function', 'function': {'name': 'f', 'parameters': {'type': 'object'}}}
    body = {'model': 'gpt-4o-mini', 'messages': [user], 'tools': [tool], 'tool_choice': 'required',
            'response_format': {'type': 'json_object'}, 'metadata': {'prompt_id': 'x'}, 'seed': 1}
    assert validate_request(body) == []
    body['messages'].append({'role': 'assistant', 'tool_calls': [{'id': 'a', 'type': 'function', 'function': {'name': 'f', 'arguments': '{'}}]})
    assert [p.path for p in validate_request(body)] == ['messages[1].tool_calls[0].function.arguments']


def test_read_jsonl_streams_large_files(tmp_path):
    "A 40 MB file is read with little memory, and bad lines anywhere are reported without stopping."
    path = tmp_path / 'big.jsonl'
    row = json.dumps({'messages': [{'role': 'user', 'content': 'x' * 1000}, {'role': 'assistant', 'content': 'y'}]})
    with open(path, 'w') as f:
        for i in range(40_000):
            f.write('{broken\n' if i % 10_000 == 5 else row + '\n')
    assert path.stat().st_size > 40_000_000
    tracemalloc.start()
    bad, good = [], 0
    for n, obj in read_jsonl(path):
        if isinstance(obj, Problem): bad.append(n)
        else: good += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert bad == [6, 10_006, 20_006, 30_006] and good == 39_996
    assert peak < 5_000_000, f'read_jsonl held {peak} bytes at once: it must stream'


def test_read_jsonl_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match='nope.jsonl'): read_jsonl(tmp_path / 'nope.jsonl')


def test_content_hash_is_stable_across_processes():
    "The hash does not depend on dict order, hash seeds or the process: cache keys survive restarts."
    obj = {'model': 'm', 'temperature': 1.0, 'messages': [{'role': 'user', 'content': 'é ☃'}], 'n': 1, 'x': {'b': 2, 'a': 1}}
    code = ("import json,sys; from openpipe_lab.formats import content_hash; "
            "print(content_hash(json.loads(sys.argv[1])))")
    reordered = {'x': {'a': 1, 'b': 2}, 'n': 1, 'messages': obj['messages'], 'temperature': 1, 'model': 'm'}
    hashes = {subprocess.run([sys.executable, '-c', code, json.dumps(o)], capture_output=True, text=True, check=True,
                             env={**os.environ, 'PYTHONHASHSEED': seed}).stdout.strip()
              for o, seed in [(obj, '1'), (reordered, '2')]}
    assert hashes == {content_hash(obj)}
    assert canonical_json(obj) == '{"messages":[{"content":"é ☃","role":"user"}],"model":"m","n":1,"temperature":1,"x":{"a":1,"b":2}}'


def test_functions_to_tools_output_validates_and_hashes_stably():
    old = {'messages': [{'role': 'user', 'content': 'hi'},
                        {'role': 'assistant', 'function_call': {'name': 'f', 'arguments': '{}'}},
                        {'role': 'function', 'name': 'f', 'content': 'done'},
                        {'role': 'assistant', 'content': 'ok'}],
           'functions': [{'name': 'f', 'parameters': {'type': 'object'}}], 'function_call': 'auto'}
    new = functions_to_tools(old)
    assert validate_entry(new) == [] and validate_messages(new['messages']) == []
    assert content_hash(functions_to_tools(old)) == content_hash(new)


from hypothesis import given, settings, strategies as st
from openpipe_lab.formats import json_text, dumps, loads, jsonable, content_text, check_tags

_text = st.text(st.characters(), max_size=8)  # lone surrogates included
_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | _text,
                       lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4), max_leaves=20)

@settings(max_examples=400, deadline=None)
@given(_values)
def test_json_text_reads_back_as_dumps(value):
    "msgspec's text and the standard library's read back to the same values (NaN, big ints and surrogates included)."
    got, want = json_text(value), dumps(value)
    if value is None: assert got is None; return
    assert json.dumps(json.loads(got)) == json.dumps(json.loads(want))
    got.encode('utf-8')  # storable: a lone surrogate stays a JSON escape
    raw = json_text(value, escape_surrogates=False)
    assert json.dumps(json.loads(raw)) == json.dumps(json.loads(want))
    try: want.encode('utf-8')
    except UnicodeEncodeError: assert raw == want  # kept as the character, for the caller to report

def test_jsonable_on_real_sdk_objects():
    "A recorded OpenAI or Anthropic response keeps what the server sent (None included); a reused message drops None fields."
    from openai.types.chat import ChatCompletion
    from anthropic.types import Message
    completion = ChatCompletion.model_validate({'id': 'c', 'object': 'chat.completion', 'created': 1, 'model': 'm',
        'choices': [{'index': 0, 'finish_reason': 'stop', 'logprobs': None, 'message': {'role': 'assistant', 'content': 'Hobart'}}]})
    data = jsonable(completion)
    assert data['choices'][0]['logprobs'] is None and 'usage' not in data and json.loads(json_text(data)) == data
    assert jsonable(completion.choices[0].message, drop_none=True) == {'role': 'assistant', 'content': 'Hobart'}
    message = Message.model_validate({'id': 'msg_1', 'type': 'message', 'role': 'assistant', 'model': 'claude',
        'content': [{'type': 'text', 'text': 'Hobart'}], 'stop_reason': 'end_turn', 'stop_sequence': None,
        'usage': {'input_tokens': 3, 'output_tokens': 1}})
    data = jsonable(message)
    assert data['content'] == [{'type': 'text', 'text': 'Hobart'}] and data['stop_sequence'] is None
    assert content_text(data['content']) == 'Hobart'

def test_check_tags_keeps_its_messages():
    "check_tags is the one tag check (client headers, record, report): the messages name the source and the tag."
    assert check_tags({'a': 1, 'b': None}, 'op-tags') == {'a': '1'}
    with pytest.raises(Exception, match=r"op-tags\.k: must be a string, got list"): check_tags({'k': [1]}, 'op-tags')
    with pytest.raises(Exception, match="req_payload.metadata: must be an object of string values, got str"):
        check_tags('x', 'req_payload.metadata')
