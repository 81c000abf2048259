"FineTune on a tiny local model: every training mode for real on CPU, the job lifecycle, kill-and-resume, errors."
import json, os, signal, subprocess, time
from pathlib import Path
import pytest
import sqlalchemy as sa
from conftest_tiny import tiny_model_dir, tiny_llama3_dir  # session fixtures (tiny Qwen2/ChatML and Llama-3 models)
from openpipe_lab.core import ConfigError, TrainingError
from openpipe_lab.finetune import FineTune, model_row, update_model
import openpipe_lab.train  # start(background=False) trains in this process with the worker's code (07a adds it)
from openpipe_lab.store import tables

CAPITALS = [('France', 'Paris', 'London'), ('Sweden', 'Stockholm', 'Berlin'), ('Japan', 'Tokyo', 'Paris'),
            ('Tasmania', 'Hobart', 'Tokyo')]
WEATHER = [{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Weather in a city',
            'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}]

def capital_rows(reps=4):
    return [{'messages': [{'role': 'system', 'content': 'Answer with the city.'}, {'role': 'user', 'content': f'Capital of {c}?'},
                          {'role': 'assistant', 'content': a}],
             'rejected_message': {'role': 'assistant', 'content': r}, 'split': 'TEST' if i % 8 == 7 else 'TRAIN'}
            for i, (c, a, r) in enumerate(CAPITALS * reps)]

def tool_rows(reps=4):
    def call(city): return {'role': 'assistant', 'content': None, 'tool_calls': [
        {'id': 'call_1', 'type': 'function', 'function': {'name': 'get_weather', 'arguments': json.dumps({'city': city})}}]}
    return [{'messages': [{'role': 'user', 'content': f'Weather in {a}?'}, call(a)], 'tools': WEATHER,
             'split': 'TEST' if i % 8 == 7 else 'TRAIN'} for i, (_, a, _) in enumerate(CAPITALS * reps)]

def losses(ft, stage=None):
    h = ft.history_
    if stage: h = h[h['stage'] == stage]
    return h['loss'].dropna().tolist()

def decreased(ls, factor=0.8):
    assert len(ls) >= 4, ls
    assert sum(ls[-2:]) / 2 < factor * sum(ls[:2]) / 2, ls

def generate(model, tok, messages, tools=None, n=48):
    enc = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors='pt', return_dict=True)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=False)

def completion_logprob(model, tok, prompt, completion):
    import torch
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt + [completion], tokenize=False)
    ids = tok(full, add_special_tokens=False, return_tensors='pt').input_ids
    n = len(tok(p, add_special_tokens=False).input_ids)
    with torch.no_grad(): logp = model(ids).logits[0, :-1].log_softmax(-1)
    tgt = ids[0, 1:]
    return logp[n - 1:, :].gather(1, tgt[n - 1:, None]).sum().item()

def base_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()

def timed(fn):
    t = time.time(); r = fn(); print(f"  {time.time() - t:.1f}s"); return r

# --- every mode, in process (the worker's code, without the subprocess start-up) ---

def test_sft_chatml_with_tool_calls(lab, tiny_model_dir):
    ft = FineTune(tool_rows(), str(tiny_model_dir), 'weather', sft={'num_epochs': 10, 'batch_size': 4, 'learning_rate_multiplier': 50})
    timed(lambda: ft.train(background=False, progress=False))
    assert ft.status == 'DEPLOYED'
    decreased(losses(ft))
    model, tok = ft.load()
    q = [{'role': 'user', 'content': 'Weather in Paris?'}]
    out = generate(model, tok, q, WEATHER)
    assert out == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', out
    assert generate(base_model(tiny_model_dir), tok, q, WEATHER) != out
    s = ft.serve_config
    assert (s['tool_call_parser'], s['eos_token'], s['lora_rank'], s['method']) == ('hermes', '<|im_end|>', 16, 'lora')
    assert Path(s['adapter_path'], 'adapter_model.safetensors').exists() and Path(s['tokenizer_path'], 'tokenizer.json').exists()
    m = ft.metrics_
    assert m['train_tokens'] > 0 and m['price_category'] == '8B and smaller' and m['estimated_cost_usd'] >= 0
    assert m['stages']['sft']['eval_loss'] is not None

def test_sft_llama3_template_auto_batch_packs(lab, tiny_llama3_dir):
    # enough data to fill >= 10 packed rows of max_length: "auto" packs (smaller data trains whole rows, test_finetune_small)
    ft = FineTune(capital_rows(30), str(tiny_llama3_dir), 'caps-llama', max_length=64,
                  sft={'num_epochs': 4, 'learning_rate_multiplier': 30})
    timed(lambda: ft.train(background=False, progress=False))
    res = ft.metrics_['stages']['sft']
    import torch
    # the device's packed rows per step (CPU 4, GPU 16384 // max_length), at most a tenth of the data's packed rows
    target = 16384 // 64 if torch.cuda.is_available() else 4
    assert res['plan']['packing'] is True and res['plan']['per_device'] == min(target, res['tokens'] // (64 * 10))
    assert res['steps'] >= 4 * 10
    decreased(losses(ft))
    model, tok = ft.load()
    q = [{'role': 'system', 'content': 'Answer with the city.'}, {'role': 'user', 'content': 'Capital of Sweden?'}]
    assert generate(model, tok, q, n=4).startswith('Stockholm<|eot_id|>')
    assert ft.serve_config['tool_call_parser'] == 'llama3_json'

@pytest.mark.parametrize('variant', ['DPO', 'APO Zero'])
def test_preference_only(lab, tiny_model_dir, variant):
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'pref', sft=False,
                  preference={'variant': variant, 'num_epochs': 6, 'learning_rate_multiplier': 1000, 'training_beta': 0.1})
    timed(lambda: ft.train(background=False, progress=False))
    decreased(losses(ft, 'preference'), 0.9)
    model, tok = ft.load()
    base = base_model(tiny_model_dir)
    prompt = capital_rows()[0]['messages'][:-1]
    chosen, rejected = {'role': 'assistant', 'content': 'Paris'}, {'role': 'assistant', 'content': 'London'}
    margin = lambda m: completion_logprob(m, tok, prompt, chosen) - completion_logprob(m, tok, prompt, rejected)
    assert margin(model) > margin(base) + 1.0, (margin(model), margin(base))

def test_sft_then_dpo_with_adapter_weight(lab, tiny_model_dir):
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'sft-dpo', sft={'num_epochs': 4, 'batch_size': 4, 'learning_rate_multiplier': 20},
                  preference={'num_epochs': 2, 'learning_rate_multiplier': 200, 'adapter_weight': 0.5})
    timed(lambda: ft.train(background=False, progress=False))
    h = ft.history_
    sft_steps = h[h['stage'] == 'sft']['step'].max()
    assert h[h['stage'] == 'preference']['step'].min() > sft_steps  # numbered across stages
    s = ft.serve_config
    assert s['lora_rank'] == 32  # exact mix of the SFT and DPO deltas: ranks concatenate
    assert ft.metrics_['stages']['preference']['adapter_weight'] == 0.5
    # the mix is exactly halfway between the SFT adapter and the DPO-trained one, on every weight delta
    from safetensors.torch import load_file
    mixed = load_file(Path(s['adapter_path'], 'adapter_model.safetensors'))
    sft = load_file(ft.output_dir / 'stages' / 'sft' / 'adapter_model.safetensors')
    k = next(k for k in sft if 'q_proj.lora_A' in k)
    kb = k.replace('lora_A', 'lora_B')
    d_mix = mixed[kb] @ mixed[k]
    d_sft = sft[kb] @ sft[k] * (32 / 16)  # lora_alpha / r of the SFT adapter; the mix has scaling 1
    assert d_mix.shape == d_sft.shape and not (d_mix - 0.5 * d_sft).abs().max() < 1e-9  # DPO moved it
    model, tok = ft.load()
    q = capital_rows()[0]['messages'][:-1]
    assert generate(model, tok, q, n=4).startswith('Paris')

def test_reward_model(lab, tiny_model_dir):
    ft = FineTune.reward_model(capital_rows(), str(tiny_model_dir), 'rm',
                               hyperparameters={'num_epochs': 6, 'batch_size': 4, 'learning_rate_multiplier': 50})
    timed(lambda: ft.train(background=False, progress=False))
    decreased(losses(ft, 'reward'), 0.9)
    assert ft.to_dict()['capabilities'] == [] and ft.serve_config['kind'] == 'openpipeReward'
    import torch
    model, tok = ft.load()
    def score(msgs):
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False, return_tensors='pt')
        with torch.no_grad(): return model(**ids).logits[0, 0].item()
    wins = sum(score(r['messages']) > score(r['messages'][:-1] + [r['rejected_message']]) for r in capital_rows(1))
    assert wins == 4

def test_qlora_on_cpu(lab, tiny_model_dir):
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'q', method='qlora',
                  sft={'num_epochs': 4, 'batch_size': 4, 'learning_rate_multiplier': 20})
    timed(lambda: ft.train(background=False, progress=False))
    decreased(losses(ft))
    model, tok = ft.load()
    base = base_model(tiny_model_dir)
    q = capital_rows()[0]['messages'][:-1]
    assert completion_logprob(model, tok, q, {'role': 'assistant', 'content': 'Paris'}) > \
        completion_logprob(base, tok, q, {'role': 'assistant', 'content': 'Paris'}) + 2

def test_full_fine_tune_and_continue_from_slug(lab, tiny_model_dir):
    parent = FineTune(capital_rows(), str(tiny_model_dir), 'parent', sft={'num_epochs': 3, 'batch_size': 4, 'learning_rate_multiplier': 20})
    parent.train(background=False, progress=False)
    child = FineTune(capital_rows(), 'parent', 'child', sft={'num_epochs': 1, 'batch_size': 4, 'learning_rate_multiplier': 20})
    child.train(background=False, progress=False)
    s = child.serve_config
    assert s['base_model'] == str(Path(tiny_model_dir).resolve()) and s['base_model_requested'] == 'parent'
    assert losses(child)[0] < 0.5 * losses(parent)[0]  # it starts where the parent ended
    full = FineTune(capital_rows(), str(tiny_model_dir), 'full', method='full', sft={'num_epochs': 3, 'batch_size': 4, 'learning_rate_multiplier': 50})
    full.train(background=False, progress=False)
    fs = full.serve_config
    assert fs['adapter_path'] is None and Path(fs['merged_path'], 'config.json').exists()
    decreased(losses(full), 0.95)

def test_from_dataset_with_pruning_rules(lab, tiny_model_dir):
    from openpipe_lab.dataset import Dataset
    ds = Dataset.create('caps', store=lab)
    ds.add_entries([{k: v for k, v in r.items()} for r in capital_rows(2)])
    ds.add_pruning_rule('Answer with the city.')
    ft = FineTune(ds, str(tiny_model_dir), 'caps-ds', sft={'num_epochs': 1, 'batch_size': 4})
    assert ft.store is lab
    ft.start(background=False)
    row = ft._row()
    assert row['dataset_id'] == ds.id and row['dataset_snapshot'] == ds.snapshot()
    train = (ft.output_dir / 'data' / 'train.jsonl').read_text()
    assert 'Answer with the city.' not in train and 'Capital of France?' in train
    assert ft.serve_config['pruning_rules'] == ['Answer with the city.']
    assert ft.to_dict()['openpipe']['datasetId'] == ds.id

def test_out_of_memory_is_an_actionable_error(lab, tiny_model_dir, monkeypatch):
    monkeypatch.setenv('OPENPIPE_LAB_TRAIN_FAULT', 'oom:sft')
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'oom', sft={'batch_size': 8})
    ft.start(background=False)
    assert ft.status == 'ERROR'
    with pytest.raises(TrainingError, match='out of memory.*smaller batch_size'):
        ft.wait(progress=False)
    assert 'qlora' in ft.to_dict()['openpipe']['errorMessage']

# --- the job as a child process: statuses, kill and resume, cancel ---

def _wait_for(pred, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if pred(): return True
        time.sleep(0.2)
    raise AssertionError('timed out')

def test_lifecycle_kill_and_resume(lab, tiny_model_dir):
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'life', checkpoint_every=3,
                  sft={'num_epochs': 16, 'batch_size': 4, 'learning_rate_multiplier': 20})
    ft.start()
    seen = {ft.status}
    assert seen <= {'PENDING', 'TRAINING'}  # PENDING until the worker has loaded; it may already have on a fast machine
    _wait_for(lambda: seen.add(ft.status) or (ft.progress_.get('step') or 0) >= 5)
    assert 'TRAINING' in seen
    pid = ft._row()['pid']
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TrainingError, match='exited without reporting'):
        ft.wait(progress=False)
    assert ft.status == 'ERROR'
    assert any(p.name.startswith('checkpoint-') for p in (ft.output_dir / 'checkpoints' / 'sft').iterdir())
    ft2 = FineTune.get('life', store=lab)  # any process can reopen it
    ft2.start()
    ft2.wait()  # with the progress bar
    assert ft2.status == 'DEPLOYED' and ft2.to_dict()['openpipe']['errorMessage'] is None
    assert ft2.progress_['resumed_from_step'] >= 3
    assert ft2.history_['stage_step'].max() == ft2.metrics_['stages']['sft']['steps']
    decreased(losses(ft2))

def test_cancel_and_delete(lab, tiny_model_dir):
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'cancel-me', sft={'num_epochs': 50, 'batch_size': 2})
    ft.start()
    _wait_for(lambda: ft.status == 'TRAINING')
    pid = ft._row()['pid']
    ft.cancel()
    assert ft.status == 'ERROR' and 'cancelled' in ft.to_dict()['openpipe']['errorMessage']
    with pytest.raises(ProcessLookupError): os.kill(pid, 0)
    ft.delete()
    assert ft.status is None and not ft.output_dir.exists()
    with lab.db.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(tables.training_history)).scalar() == 0
    assert len(FineTune.list(store=lab)) == 0

def test_a_reused_pid_does_not_keep_a_dead_job_training(lab, tiny_model_dir):
    "The worker died and the system gave its pid to another process: the job is ERROR, and that process is left alone."
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'reused', sft={'num_epochs': 50, 'batch_size': 2})
    ft.start()
    _wait_for(lambda: ft.status == 'TRAINING')
    info = json.loads((ft.output_dir / 'worker.json').read_text())
    assert info['pid'] == ft._row()['pid'] and info['start_ticks']
    os.kill(info['pid'], signal.SIGKILL); ft._proc.wait()
    other = subprocess.Popen(['sleep', '60'])
    try:  # what reuse looks like from the store: the recorded pid is now a live process that started later
        update_model(lab.db, ft.id, pid=other.pid)
        (ft.output_dir / 'worker.json').write_text(json.dumps(dict(info, pid=other.pid)))
        watcher = FineTune.get('reused', store=lab)  # another process's view: no handle on the child
        with pytest.raises(TrainingError, match='exited without reporting'):
            watcher.wait(progress=False, timeout=30)
        assert watcher.status == 'ERROR' and other.poll() is None  # not one of the job's processes: not killed
    finally: other.kill(); other.wait()

def test_model_row_and_update_model(lab, tiny_model_dir):
    ft = FineTune(capital_rows(), str(tiny_model_dir), 'rowed')
    assert model_row(lab, slug='rowed') is None
    ft._snapshot()  # the PENDING row, without a worker
    assert model_row(lab, slug='rowed')['id'] == ft.id and model_row(lab.db, id=ft.id)['status'] == 'PENDING'
    before = model_row(lab, id=ft.id)['updated_at']
    update_model(lab.db, ft.id, progress={'step': 3}, status='TRAINING')
    row = model_row(lab, id=ft.id)
    assert json.loads(row['progress']) == {'step': 3} and row['status'] == 'TRAINING' and row['updated_at'] >= before
