"""`Dataset.relabel` through the lab's real client (`store.openai()`, the openai SDK over loopback) against the fake
upstream: outputs replaced with history, tools forwarded, per-row failures collected, resume after an interrupt and
after the process is killed."""
import json, os, signal, subprocess, sys, textwrap, time
import pytest
from fakes import FakeUpstream, Reply
from openpipe_lab.dataset import Dataset

TOOL = {'type': 'function', 'function': {'name': 'identify_capital', 'parameters': {'type': 'object', 'properties': {'capital': {'type': 'string'}}}}}


def qa(country, answer='?', **kw):
    return {'messages': [{'role': 'system', 'content': 'Answer with the city.'}, {'role': 'user', 'content': f'Capital of {country}?'},
                         {'role': 'assistant', 'content': answer}], **kw}


@pytest.fixture
def upstream(monkeypatch):
    "A fake OpenAI upstream that `store.openai()` reaches through the SDK's own environment variables."
    with FakeUpstream() as up:
        monkeypatch.setenv('OPENAI_BASE_URL', up.openai_url)
        monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
        yield up


def outputs(ds): return [r['messages'][-1] for r in ds.rows(split=None, apply_pruning=False)]


def test_relabel_replaces_outputs_keeps_history_and_logs(lab, upstream):
    ds = Dataset.create('caps', store=lab)
    ds.add_entries([qa('Chile', split='TRAIN'), qa('Peru', split='TEST'),
                    {**qa('Fiji'), 'tools': [TOOL], 'tool_choice': 'auto', 'response_format': None, 'split': 'TRAIN'}])
    upstream.script(Reply(text='Santiago'), Reply(text='Lima'),
                    Reply(tool_calls=[{'name': 'identify_capital', 'arguments': {'capital': 'Suva'}}]))
    ds.relabel('gpt-4o-mini', concurrency=1, progress=False, temperature=0)
    assert ds.relabel_failures_ == [] and ds.relabel_job_['status'] == 'done'
    out = outputs(ds)
    assert out[0] == {'role': 'assistant', 'content': 'Santiago'} and out[1] == {'role': 'assistant', 'content': 'Lima'}
    assert out[2]['content'] is None and json.loads(out[2]['tool_calls'][0]['function']['arguments']) == {'capital': 'Suva'}
    # what was sent: the input only (no output), with tools / tool_choice and the extra arguments
    sent = [r.json for r in upstream.requests]
    assert sent[0]['messages'] == qa('Chile')['messages'][:-1] and sent[0]['temperature'] == 0 and 'tools' not in sent[0]
    assert sent[2]['tools'] == [TOOL] and sent[2]['tool_choice'] == 'auto'
    for e in ds.entries(limit=None):
        assert e['provenance'] == 'RELABELED_BY_MODEL'
        (h,) = e['history']
        assert h['output'] == {'role': 'assistant', 'content': '?'} and h['provenance'] == 'UPLOAD'
        assert (h['by'], h['job']) == ('gpt-4o-mini', ds.relabel_job_['id'])
    assert [e['split'] for e in ds.entries(limit=None)] == ['TRAIN', 'TEST', 'TRAIN']  # splits untouched
    lab.flush()
    assert len(lab.filter(**{'relabel.job': ds.relabel_job_['id']})) == 3  # every call logged and tagged


def test_relabel_one_split(lab, upstream):
    ds = Dataset.create('caps', store=lab)
    ds.add_entries([qa('Chile', split='TRAIN'), qa('Peru', split='TEST')])
    ds.relabel('gpt-4o-mini', split='TEST', progress=False)
    assert [o['content'] for o in outputs(ds)] == ['?', 'echo: Capital of Peru?'] and len(upstream.requests) == 1


def test_per_row_failures_are_collected_then_resumed(lab, upstream):
    ds = Dataset.create('caps', store=lab)
    ds.add_entries([qa(c) for c in ('Chile', 'Peru', 'Fiji', 'Laos', 'Mali')])
    bad_args = {'id': 'x', 'object': 'chat.completion', 'created': 0, 'model': 'gpt-4o-mini', 'choices': [{
        'index': 0, 'finish_reason': 'tool_calls', 'message': {'role': 'assistant', 'content': None, 'tool_calls': [
            {'id': 'c', 'type': 'function', 'function': {'name': 'identify_capital', 'arguments': '{bad json'}}]}}]}
    # entry 1: HTTP 400 (not retried); entry 3: an answer that is not a valid output; the rest succeed
    upstream.script(Reply(), Reply(status=400, message='context too long'), Reply(), Reply(body=bad_args), Reply())
    ds.relabel('gpt-4o-mini', concurrency=1, progress=False)
    fails = ds.relabel_failures_
    assert [f['position'] for f in fails] == [2, 4]
    assert 'BadRequestError' in fails[0]['error'] and 'context too long' in fails[0]['error']
    assert 'ValidationError' in fails[1]['error'] and 'arguments: not valid JSON' in fails[1]['error']
    assert ds.relabel_job_['status'] == 'incomplete'
    assert [o['content'] for o in outputs(ds)] == ['echo: Capital of Chile?', '?', 'echo: Capital of Fiji?', '?', 'echo: Capital of Mali?']
    job = ds.relabel_job_['id']
    n = len(upstream.requests)
    ds.relabel('gpt-4o-mini', concurrency=3, progress=False)  # resumes the unfinished job: only the two failures
    assert len(upstream.requests) - n == 2 and ds.relabel_failures_ == []
    assert (ds.relabel_job_['id'], ds.relabel_job_['status']) == (job, 'done')
    assert all(e['history'][-1]['job'] == job and len(e['history']) == 1 for e in ds.entries(limit=None))
    ds.relabel('gpt-4o-mini', progress=False)  # finished: a new job relabels everything again
    assert len(upstream.requests) - n == 7 and ds.relabel_job_['id'] != job


def test_interrupt_then_resume(lab, upstream):
    "Ctrl-C (KeyboardInterrupt) stops the job; the rows done are kept and the next call sends only the rest."
    ds = Dataset.create('caps', store=lab)
    ds.add_entries([qa(f'country {i}') for i in range(12)])
    real = lab.openai()
    class Interrupting:
        "The real client, interrupted by the user during the 6th call."
        def __init__(self): self.calls, self.chat = 0, self
        @property
        def completions(self): return self
        def create(self, **kw):
            self.calls += 1
            if self.calls == 6: raise KeyboardInterrupt
            return real.chat.completions.create(**kw)
    with pytest.raises(KeyboardInterrupt):
        ds.relabel('gpt-4o-mini', concurrency=1, client=Interrupting(), progress=False)
    assert ds._config()['relabel']['status'] == 'interrupted'
    done = sum(e['provenance'] == 'RELABELED_BY_MODEL' for e in ds.entries(limit=None))
    # calls 1-5 answered; the 7th was already queued (2 in flight per worker) and its answer is kept if it arrived
    # before the interrupt was handled: a timing race (seen under CI load), both outcomes are what relabel promises
    relabeled = [e['provenance'] == 'RELABELED_BY_MODEL' for e in ds.entries(limit=None)]
    assert done in (5, 6) and relabeled[:6] == [True] * 5 + [False] and relabeled[7:] == [False] * 5  # the 6th was the interrupted call
    n = len(upstream.requests)
    ds.relabel('gpt-4o-mini', concurrency=4, progress=False)
    assert len(upstream.requests) - n == 12 - done
    assert all(e['provenance'] == 'RELABELED_BY_MODEL' and len(e['history']) == 1 for e in ds.entries(limit=None))


def test_resume_after_the_process_is_killed(lab, tmp_path):
    "A relabel running in a script is killed (SIGKILL) half-way; relabel() here resumes the same job."
    ds = Dataset.create('slow', store=lab)
    ds.add_entries([qa(f'country {i}') for i in range(40)])
    with FakeUpstream(default=Reply(delay=0.1)) as up:
        script = tmp_path / 'relabel.py'
        script.write_text(textwrap.dedent(f'''
            from openpipe_lab.logstore import LogStore
            from openpipe_lab.dataset import Dataset
            Dataset.open('slow', store=LogStore({str(lab.db.url.removeprefix("sqlite:///"))!r})).relabel('gpt-4o-mini', concurrency=2, progress=False)
        '''))
        env = {**os.environ, 'OPENAI_BASE_URL': up.openai_url, 'OPENAI_API_KEY': 'sk-test', 'OPENPIPE_LAB_DIR': str(tmp_path)}
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 60
            while ds.count(provenance='RELABELED_BY_MODEL') < 10:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, 'the script relabeled nothing in 60 s'
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        proc.stderr.close()
        done = ds.count(provenance='RELABELED_BY_MODEL')
        assert 10 <= done < 40
        job = ds._config()['relabel']
        assert job['status'] == 'running'  # killed: never got to record an end
        n = len(up.requests)
        up.default = Reply()
        ds.relabel('gpt-4o-mini', concurrency=4, client=lab.openai(base_url=up.openai_url, api_key='sk-test'), progress=False)
        assert len(up.requests) - n == 40 - done
    assert ds.relabel_job_['id'] == job['id'] and ds.relabel_job_['status'] == 'done'
    entries = ds.entries(limit=None)
    assert all(e['provenance'] == 'RELABELED_BY_MODEL' and len(e['history']) == 1 and e['history'][0]['job'] == job['id'] for e in entries)
    assert [e['messages'][-1]['content'] for e in entries] == [f'echo: Capital of country {i}?' for i in range(40)]


def test_relabel_through_a_routed_provider(lab, upstream, monkeypatch):
    "Any model id the client routes works: here Anthropic, translated both ways by the client."
    monkeypatch.setenv('ANTHROPIC_API_KEY', 'sk-ant-test')
    monkeypatch.setenv('ANTHROPIC_BASE_URL', upstream.anthropic_url)
    ds = Dataset.create('caps', store=lab)
    ds.add_entries([{**qa('Fiji'), 'tools': [TOOL]}, qa('Peru')])
    upstream.script(Reply(tool_calls=[{'name': 'identify_capital', 'arguments': {'capital': 'Suva'}}]), Reply(text='Lima'))
    ds.relabel('anthropic:claude-3-5-sonnet-20241022', concurrency=1, progress=False, max_tokens=50)
    assert ds.relabel_failures_ == [] and [r.api for r in upstream.requests] == ['anthropic', 'anthropic']
    first = upstream.requests[0].json
    assert first['system'] == 'Answer with the city.' and first['tools'][0]['name'] == 'identify_capital'
    fiji, peru = outputs(ds)
    assert json.loads(fiji['tool_calls'][0]['function']['arguments']) == {'capital': 'Suva'} and peru == {'role': 'assistant', 'content': 'Lima'}
    e = ds.entries(limit=1)[0]
    assert e['history'][0]['by'] == 'anthropic:claude-3-5-sonnet-20241022'
