"""Property-based fuzzing (hypothesis, bounded example counts) of the chat/JSONL validators, the provider translations
and Dataset.from_jsonl (issue 13). Expectations are built by the strategies (a generated entry is valid or invalid by
construction), never computed by the code under test."""
import json, string
from pathlib import Path
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from openpipe_lab.core import OpenPipeLabError, ValidationError
from openpipe_lab.formats import (Problem, validate_messages, validate_entry, validate_request, validate_tools, read_jsonl,
                                  canonical_json)
from openpipe_lab import translate as P

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- strategies ----------------------------------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=('Cs',)), min_size=1, max_size=30)
ident = st.text(string.ascii_letters + string.digits + '_-', min_size=1, max_size=20)
json_scalar = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False, width=32) | text
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4), max_leaves=12)
args_obj = st.dictionaries(ident, json_scalar, max_size=3)
# anything a user might put where a message or entry goes: JSON values, plus message-shaped dicts with random fields
wild_message = st.one_of(json_value, st.fixed_dictionaries({'role': st.sampled_from(['user', 'assistant', 'system', 'tool', 'robot', 1, None]),
                                                            'content': json_value}, optional={'tool_calls': json_value, 'name': json_value,
                                                                                             'tool_call_id': json_value}))

@st.composite
def conversation(draw, with_tools=True):
    "A valid OpenAI conversation: optional system, alternating user/assistant turns, tool rounds with unique ids; ends with the assistant."
    msgs = [{'role': 'system', 'content': draw(text)}] if draw(st.booleans()) else []
    ids = iter(range(10**6))
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({'role': 'user', 'content': draw(text)})
        if with_tools and draw(st.booleans()):
            calls = [{'id': f"call_{next(ids)}_{draw(ident)}", 'type': 'function',
                      'function': {'name': draw(ident), 'arguments': json.dumps(draw(args_obj))}} for _ in range(draw(st.integers(1, 2)))]
            msgs.append({'role': 'assistant', 'content': None, 'tool_calls': calls})
            msgs += [{'role': 'tool', 'tool_call_id': c['id'], 'content': draw(text)} for c in calls]
        msgs.append({'role': 'assistant', 'content': draw(text)})
    return msgs

tool_def = st.builds(lambda n, d, props: {'type': 'function', 'function': {'name': n, 'description': d,
                     'parameters': {'type': 'object', 'properties': {p: {'type': 'string'} for p in props}}}},
                     ident, text, st.lists(ident, max_size=3, unique=True))

@st.composite
def request(draw):
    "A chat request whose every field Anthropic can express too."
    req = {'model': 'anthropic:claude-3-5-haiku', 'messages': draw(conversation())}
    tools = draw(st.lists(tool_def, max_size=3, unique_by=lambda t: t['function']['name']))
    if tools:
        req['tools'] = tools
        req['tool_choice'] = draw(st.sampled_from(['auto', 'none', 'required']) | st.just({'type': 'function', 'function': {'name': tools[0]['function']['name']}}))
    if draw(st.booleans()): req['temperature'] = draw(st.floats(0, 1))
    if draw(st.booleans()): req['top_p'] = draw(st.floats(0, 1))
    req['max_tokens'] = draw(st.integers(1, 4096))
    if draw(st.booleans()): req['stop'] = draw(st.lists(text, min_size=1, max_size=3))
    return req


# -- validators: any input gives a list of problems, never an exception --------------------------------------------
@FAST
@given(wild=st.one_of(json_value, st.lists(wild_message, max_size=5)))
def test_validators_never_raise(wild):
    for fn in (validate_messages, validate_tools, lambda v: validate_entry(v), lambda v: validate_entry({'messages': v}),
               lambda v: validate_request({'model': 'm', 'messages': v}), lambda v: validate_request(v) if isinstance(v, dict) else []):
        out = fn(wild)
        assert isinstance(out, list) and all(isinstance(p, Problem) and isinstance(p.message, str) for p in out)

@FAST
@given(conversation())
def test_valid_conversations_have_no_problems(msgs):
    assert validate_messages(msgs) == [] and validate_entry({'messages': msgs}) == []

@FAST
@given(conversation(), st.data())
def test_one_broken_field_is_reported_at_its_path(msgs, data):
    i = data.draw(st.integers(0, len(msgs) - 1))
    bad = json.loads(json.dumps(msgs))
    kind = data.draw(st.sampled_from(['role', 'content', 'extra']))
    if kind == 'role': bad[i]['role'] = 'robot'
    elif kind == 'content': bad[i]['content'] = 42
    else: bad[i]['surprise'] = True
    problems = validate_messages(bad)
    assert problems and any(p.path.startswith(f'messages[{i}]') for p in problems), problems

@FAST
@given(st.binary(max_size=300))
def test_read_jsonl_never_raises_on_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp('j') / 'x.jsonl'
    path.write_bytes(raw)
    for n, item in read_jsonl(path):
        assert isinstance(n, int) and n >= 1 and (isinstance(item, dict) or (isinstance(item, Problem) and item.line == n))


# -- provider translations: OpenAI -> Anthropic -> OpenAI keeps what both express ----------------------------------
def _canon_openai(req):
    "What an OpenAI request says, in a form both sides share (stop as a list, arguments parsed, empty assistant text = None)."
    msgs = []
    for m in req['messages']:
        m = dict(m)
        if m['role'] == 'assistant':
            m['content'] = m.get('content') or None
            if m.get('tool_calls'):
                m['tool_calls'] = [(c['id'], c['function']['name'], json.loads(c['function']['arguments'])) for c in m['tool_calls']]
            else: m.pop('tool_calls', None)
        msgs.append(m)
    out = {'messages': msgs, 'max_tokens': req.get('max_tokens')}
    for k in ('temperature', 'top_p', 'tool_choice'):
        if req.get(k) is not None: out[k] = req[k]
    if req.get('stop'): out['stop'] = [req['stop']] if isinstance(req['stop'], str) else list(req['stop'])
    if req.get('tools'): out['tools'] = [(t['function']['name'], t['function'].get('description', ''), t['function']['parameters']) for t in req['tools']]
    return out

@FAST
@given(request())
def test_openai_to_anthropic_and_back_keeps_the_request(req):
    there = P.to_anthropic(req)
    roles = [m['role'] for m in there['messages']]
    assert all(a != b for a, b in zip(roles, roles[1:])) and roles[0] == 'user'   # Anthropic's alternation rule holds
    back = P.anthropic_request_to_openai(there)
    assert _canon_openai(back) == _canon_openai(req)

def _gemini_back(g):
    "A reference inverse of to_gemini (Gemini has no tool-call ids: calls are matched by name, in order)."
    msgs = [{'role': 'system', 'content': g['config']['system_instruction']}] if g['config'].get('system_instruction') else []
    for c in g['contents']:
        texts = [p['text'] for p in c['parts'] if 'text' in p]
        calls = [(p['function_call']['name'], p['function_call']['args']) for p in c['parts'] if 'function_call' in p]
        results = [p['function_response'] for p in c['parts'] if 'function_response' in p]
        for r in results:
            msgs.append({'role': 'tool', 'name': r['name'], 'content': r['response']['result'] if set(r['response']) == {'result'} else json.dumps(r['response'])})
        if c['role'] == 'model': msgs.append({'role': 'assistant', 'content': ''.join(texts) or None, 'calls': calls})
        elif texts: msgs.append({'role': 'user', 'content': ''.join(texts)})
    return msgs

def _canon_for_gemini(req):
    names, out = {}, []
    for m in req['messages']:
        if m['role'] == 'assistant':
            calls = [(c['function']['name'], json.loads(c['function']['arguments'])) for c in m.get('tool_calls') or []]
            names.update({c['id']: c['function']['name'] for c in m.get('tool_calls') or []})
            out.append({'role': 'assistant', 'content': m.get('content') or None, 'calls': calls})
        elif m['role'] == 'tool':
            content = m['content']
            try: value = json.loads(content)
            except ValueError: value = None
            out.append({'role': 'tool', 'name': names[m['tool_call_id']], 'content': json.dumps(value) if isinstance(value, dict) else content})
        else: out.append({'role': m['role'], 'content': m['content']})
    return out

@FAST
@given(request())
def test_openai_to_gemini_keeps_the_conversation(req):
    g = P.to_gemini(req)
    roles = [c['role'] for c in g['contents']]
    assert all(a != b for a, b in zip(roles, roles[1:]))
    assert _gemini_back(g) == _canon_for_gemini(req)
    cfg = g['config']
    assert cfg['max_output_tokens'] == req['max_tokens'] and cfg.get('temperature') == req.get('temperature')
    assert cfg.get('stop_sequences') == req.get('stop')
    if req.get('tools'):
        assert [f['name'] for f in cfg['tools'][0]['function_declarations']] == [t['function']['name'] for t in req['tools']]

@st.composite
def assistant_output(draw):
    calls = [(f"toolu_{i}{draw(ident)}", draw(ident), draw(args_obj)) for i in range(draw(st.integers(0, 2)))]
    return draw(st.none() | text) if calls else draw(text), calls

@FAST
@given(assistant_output())
def test_provider_responses_come_back_as_the_same_openai_choice(out):
    content, calls = out
    anthropic_msg = {'id': 'msg_1', 'type': 'message', 'role': 'assistant', 'model': 'claude',
                     'content': ([{'type': 'text', 'text': content}] if content else []) +
                                [{'type': 'tool_use', 'id': i, 'name': n, 'input': a} for i, n, a in calls],
                     'stop_reason': 'tool_use' if calls else 'end_turn', 'usage': {'input_tokens': 3, 'output_tokens': 5}}
    gemini = {'candidates': [{'content': {'role': 'model', 'parts': ([{'text': content}] if content else []) +
                                          [{'function_call': {'name': n, 'args': a}} for _, n, a in calls]}, 'finish_reason': 'STOP'}],
              'usage_metadata': {'prompt_token_count': 3, 'candidates_token_count': 5}}
    for resp, ids in ((P.anthropic_response_to_openai(anthropic_msg), True), (P.from_gemini(gemini, 'gemini:x'), False)):
        (choice,) = resp['choices']
        msg = choice['message']
        assert msg['content'] == (content or None) and choice['finish_reason'] == ('tool_calls' if calls else 'stop')
        got = [(c['id'] if ids else None, c['function']['name'], json.loads(c['function']['arguments'])) for c in msg.get('tool_calls') or []]
        assert got == [(i if ids else None, n, a) for i, n, a in calls]
        assert resp['usage'] == {'prompt_tokens': 3, 'completion_tokens': 5, 'total_tokens': 8}


# -- Dataset.from_jsonl: valid lines kept, invalid ones listed with their line numbers ------------------------------
INVALID_LINES = [
    b'not json at all', b'{"messages": [', b'[1, 2, 3]', b'"just a string"', b'{"messages": []}', b'{"messages": "hi"}',
    b'{"messages": [{"role": "user", "content": "no output"}]}', b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "split": "VALID"}',
    b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "metadata": {"k": [1]}}',
    b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": NaN}]}', b'\xff\xfe{"messages": 1}',
    b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}',
]

@st.composite
def jsonl_file(draw):
    "Lines of a JSONL file, each valid (a generated entry) or invalid (a known defect), plus blank lines."
    lines, valid = [], {}
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(['valid', 'valid', 'invalid', 'blank']))
        if kind == 'blank': lines.append(draw(st.sampled_from([b'', b'   ', b'\t'])))
        elif kind == 'valid':
            entry = {'messages': draw(conversation())}
            if draw(st.booleans()): entry['split'] = draw(st.sampled_from(['TRAIN', 'TEST']))
            if draw(st.booleans()): entry['metadata'] = draw(st.dictionaries(ident, text, max_size=2))
            lines.append(json.dumps(entry, ensure_ascii=draw(st.booleans())).encode())
            valid[len(lines)] = entry
        else: lines.append(draw(st.sampled_from(INVALID_LINES)))
    return lines, valid

@SLOW
@given(jsonl_file())
def test_from_jsonl_keeps_every_valid_line_and_lists_every_invalid_one(lab, tmp_path, jsonl_file):
    from openpipe_lab.dataset import Dataset
    lines, valid = jsonl_file
    invalid = {n for n, l in enumerate(lines, 1) if l.strip() and n not in valid}
    path = tmp_path / 'data.jsonl'
    path.write_bytes(b'\n'.join(lines) + b'\n')
    name = f"fz-{abs(hash(tuple(lines))) % 10**12}-{len(list(tmp_path.iterdir()))}"
    try: ds = Dataset.from_jsonl(path, name, store=lab)
    except ValidationError as e:                           # ours: only when no line is valid
        assert not valid
        if invalid: assert {p.line for p in e.problems} == invalid
        else: assert [p.line for p in e.problems] == [None] and 'is empty' in str(e)   # only blank lines
        return
    assert valid, 'a file with no valid line must raise ValidationError'
    kept = ds.entries(limit=None)
    assert [e['messages'] for e in kept] == [v['messages'] for _, v in sorted(valid.items())]
    assert [e['metadata'] or None for e in kept] == [v.get('metadata') or None for _, v in sorted(valid.items())]
    assert all(e['split'] == v['split'] for e, (_, v) in zip(kept, sorted(valid.items())) if 'split' in v)
    assert {p.line for p in ds.errors} == invalid and all(isinstance(p, Problem) for p in ds.errors)
    ds.delete()

@pytest.mark.parametrize('line', [b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
                                  b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "' + b'[' * 10 + b'"}]}',
                                  b'[' * 100000, b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 1e999}]}'])
def test_from_jsonl_odd_lines_are_ours(lab, tmp_path, line):
    "Lone surrogates, deep nesting, huge numbers: an entry or our ValidationError, never a dependency's exception."
    from openpipe_lab.dataset import Dataset
    good = json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}).encode()
    path = tmp_path / 'odd.jsonl'
    path.write_bytes(good + b'\n' + line + b'\n')
    try: ds = Dataset.from_jsonl(path, 'odd', store=lab)
    except OpenPipeLabError as e: pytest.fail(f"the good line was not kept: {e}")
    assert len(ds) in (1, 2) and ds.entries(limit=1)[0]['messages'][1]['content'] == 'a'
    assert (len(ds) == 2) == (ds.errors == [])              # the odd line is either kept or listed
    assert all(p.line == 2 for p in ds.errors)

any_text = st.text(st.characters(), min_size=1, max_size=20)   # lone surrogates included

@SLOW
@given(st.lists(st.tuples(any_text, any_text), min_size=1, max_size=8))
def test_add_entries_with_any_text_keeps_the_storable_ones(lab, pairs):
    "Python strings may hold lone surrogates no database can store: those entries are listed, the others kept."
    from openpipe_lab.dataset import Dataset
    def storable(s):
        try: s.encode('utf-8'); return True
        except UnicodeEncodeError: return False
    ds = Dataset.create(f"at-{len(Dataset.list(store=lab))}", store=lab)
    try:
        out = ds.add_entries([{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]} for q, a in pairs])
        good = [i for i, (q, a) in enumerate(pairs) if storable(q) and storable(a)]
        assert out['entries_created'] == len(good) == len(ds)
        assert sorted(e['entry_index'] for e in out['errors']['data']) == sorted(set(range(len(pairs))) - set(good))
        assert [e['messages'][0]['content'] for e in ds.entries(limit=None)] == [pairs[i][0] for i in good]
    finally: ds.delete()


# -- streams: chunked however the provider likes, they add up to the non-streamed answer ---------------------------
def _pieces(s: str, cuts) -> list:
    cuts = sorted({c % (len(s) + 1) for c in cuts})
    return [s[a:b] for a, b in zip([0] + cuts, cuts + [len(s)]) if b > a]

@FAST
@given(assistant_output(), st.lists(st.integers(0, 1000), max_size=4))
def test_anthropic_stream_adds_up_to_the_message(out, cuts):
    content, calls = out
    events = [{'type': 'message_start', 'message': {'id': 'msg_1', 'usage': {'input_tokens': 3}}}]
    blocks = ([('text', content)] if content else []) + [('tool', c) for c in calls]
    for i, (kind, b) in enumerate(blocks):
        if kind == 'text':
            events.append({'type': 'content_block_start', 'index': i, 'content_block': {'type': 'text', 'text': ''}})
            events += [{'type': 'content_block_delta', 'index': i, 'delta': {'type': 'text_delta', 'text': p}} for p in _pieces(b, cuts)]
        else:
            tid, name, args = b
            events.append({'type': 'content_block_start', 'index': i, 'content_block': {'type': 'tool_use', 'id': tid, 'name': name, 'input': {}}})
            events += [{'type': 'content_block_delta', 'index': i, 'delta': {'type': 'input_json_delta', 'partial_json': p}}
                       for p in _pieces(json.dumps(args), cuts)]
        events.append({'type': 'content_block_stop', 'index': i})
    events += [{'type': 'message_delta', 'delta': {'stop_reason': 'tool_use' if calls else 'end_turn'}, 'usage': {'output_tokens': 5}},
               {'type': 'message_stop'}]
    stream = P.AnthropicStream('anthropic:claude')
    chunks = [c for e in events for c in stream.feed(e)] + [stream.usage_chunk()]
    got = P.assemble_chunks(chunks)
    (choice,) = got['choices']
    assert choice['message']['content'] == (content or None) and choice['finish_reason'] == ('tool_calls' if calls else 'stop')
    assert [(c['id'], c['function']['name'], json.loads(c['function']['arguments'])) for c in choice['message'].get('tool_calls') or []] == calls
    assert got['usage']['prompt_tokens'] == 3 and got['usage']['completion_tokens'] == 5

@FAST
@given(assistant_output(), st.booleans())
def test_replayed_completion_chunks_add_up_to_the_completion(out, usage):
    content, calls = out
    msg = {'role': 'assistant', 'content': content, 'refusal': None}
    if calls: msg['tool_calls'] = [{'id': i, 'type': 'function', 'function': {'name': n, 'arguments': json.dumps(a)}} for i, n, a in calls]
    completion = {'id': 'chatcmpl-1', 'object': 'chat.completion', 'created': 1, 'model': 'm',
                  'choices': [{'index': 0, 'message': msg, 'logprobs': None, 'finish_reason': 'tool_calls' if calls else 'stop'}],
                  'usage': {'prompt_tokens': 1, 'completion_tokens': 2, 'total_tokens': 3}}
    back = P.assemble_chunks(P.completion_chunks(completion, include_usage=usage))
    assert back['choices'] == completion['choices'] and (back.get('usage') == completion['usage']) == usage

@FAST
@given(assistant_output(), st.lists(st.integers(0, 1000), max_size=4))
def test_gemini_stream_adds_up_to_the_response(out, cuts):
    content, calls = out
    texts = _pieces(content, cuts) if content else []
    responses = [{'candidates': [{'content': {'role': 'model', 'parts': [{'text': t}]}}]} for t in texts]
    responses += [{'candidates': [{'content': {'role': 'model', 'parts': [{'function_call': {'name': n, 'args': a}}]}}]} for _, n, a in calls]
    responses.append({'candidates': [{'content': {'role': 'model', 'parts': []}, 'finish_reason': 'STOP'}],
                      'usage_metadata': {'prompt_token_count': 3, 'candidates_token_count': 5}})
    stream = P.GeminiStream('gemini:x')
    got = P.assemble_chunks([c for r in responses for c in stream.feed(r)] + [stream.usage_chunk()])
    (choice,) = got['choices']
    assert choice['message']['content'] == (content or None) and choice['finish_reason'] == ('tool_calls' if calls else 'stop')
    assert [(c['function']['name'], json.loads(c['function']['arguments'])) for c in choice['message'].get('tool_calls') or []] == [(n, a) for _, n, a in calls]
    assert len({c['id'] for c in choice['message'].get('tool_calls') or []}) == len(calls)   # every call gets its own id
    assert got['usage'] == {'prompt_tokens': 3, 'completion_tokens': 5, 'total_tokens': 8}
