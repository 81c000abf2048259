"""Training throughput on one GPU: FineTune's default SFT config vs raw TRL, same data, same model shape, same run.

Configs (raw TRL ones as in ../shared/bench/trl_anchor.py: LoRA r16 all-linear, bf16, no gradient checkpointing):
  FT  FineTune(rows, base, slug) with default hyperparameters (batch_size "auto"), trained in this process
  A   TRL defaults: padded batches of 8, no packing
  B   packing (TRL bfd, padding-free), batch 2
  C   packing + Liger kernels, batch 2
Metric: non-padding tokens processed per second, timed with CUDA syncs from step --warm to the last counted step;
and MFU on known GPUs (conventional 6N + attention FLOPs per token over the dense bf16 peak; see flops_per_token).
All configs see the same token sequences: the synthetic chat rows are rendered once with the ChatML template.

Usage: python bench/train_throughput.py [--tiny] [--size 0.5b|1.5b] [--steps 30] [--warm 5] [--configs FT,A,B,C]
       (--tiny: CPU-sized dry run; results in $OUT or bench/results/train_throughput.json)
"""
import argparse, json, math, os, random, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]
for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE'): os.environ[k] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

p = argparse.ArgumentParser()
p.add_argument('--tiny', action='store_true')
p.add_argument('--steps', type=int, default=30)
p.add_argument('--warm', type=int, default=5)
p.add_argument('--configs', default='FT,A,B,C')
p.add_argument('--size', default='1.5b')
p.add_argument('--out', default=os.environ.get('OUT') or str(ROOT / 'bench' / 'results'))
a = p.parse_args()

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, AutoTokenizer, TrainerCallback

SHAPES = {
    '0.5b': dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    '1.5b': dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    'tiny': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}
shape = SHAPES['tiny' if a.tiny else a.size]
MAXLEN = 256 if a.tiny else 2048
MEDIAN = 60 if a.tiny else 350
cuda = torch.cuda.is_available()
sync = torch.cuda.synchronize if cuda else (lambda: None)
work = Path(tempfile.mkdtemp(prefix='train_throughput_'))

# --- data: chat rows with lognormal lengths (median ~MEDIAN tokens), rendered once ---
from tiny_model import build_tiny_model, _WORDS
tok_dir = build_tiny_model(work / 'tok', 'chatml')
tok = AutoTokenizer.from_pretrained(tok_dir)
from openpipe_lab.train import tokenize_conversation
words = _WORDS.split()

def make_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        L = int(min(MAXLEN - 16, max(32, rng.lognormvariate(math.log(MEDIAN), 0.8))))
        n_out = max(4, int(L * 0.3)); n_in = max(4, L - n_out - 12)
        text = lambda k: ' '.join(rng.choice(words) for _ in range(k))
        rows.append({'messages': [{'role': 'user', 'content': text(n_in)}, {'role': 'assistant', 'content': text(n_out)}],
                     'split': 'TRAIN'})
    return rows

# FineTune's auto plan on this GPU decides tokens per step; give it enough rows for > steps + 10 steps of 16k tokens
n_rows = 300 if a.tiny else int((a.steps + 12) * 16384 / (MEDIAN * 1.35))
rows = make_rows(n_rows)
encoded = [tokenize_conversation(tok, r['messages']) for r in rows]
lengths = [len(e['input_ids']) for e in encoded]
print(f"rows {len(rows)}, tokens {sum(lengths)}, median length {sorted(lengths)[len(lengths) // 2]}", flush=True)

def new_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.device('cuda' if cuda else 'cpu'):
        m = Qwen2ForCausalLM(cfg)
    return m.to(torch.bfloat16) if cuda else m

class Timer(TrainerCallback):
    "CUDA-synced time from the start of step `warm` to the end of step `last` (the final step when None)."
    def __init__(self, warm, last=None): self.warm, self.last, self.t0, self.t1, self.step_end = warm, last, None, None, 0
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warm: sync(); self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        sync(); self.t1, self.step_end = time.perf_counter(), state.global_step

class CountCollator:
    "Wraps a collator; records (non-padding tokens, token slots) per batch."
    def __init__(self, inner): self.inner, self.counts = inner, []
    def __call__(self, feats):
        b = self.inner(feats)
        real = int(b['attention_mask'].sum()) if 'attention_mask' in b else int(b['input_ids'].numel())
        self.counts.append((real, int(b['input_ids'].numel())))
        return b

# Model FLOPs utilisation. FLOPs per trained token by the usual convention (PaLM appendix B): 6 x the matmul
# parameters + 12 x layers x hidden x the attended length (here the mean conversation length: packed rows attend
# within a conversation). LoRA skips the frozen weights' gradients, so the hardware does ~2/3 of this; the
# convention is kept so that figures compare with published MFUs. Peak: dense bf16 tensor-core FLOP/s.
PEAK_BF16 = {'H200': 989.4e12, 'H100': 989.4e12, 'A100': 312e12, 'L40S': 362e12, 'A10': 125e12}

def flops_per_token(s, attended):
    h, inter, layers, vocab = s['hidden_size'], s['intermediate_size'], s['num_hidden_layers'], s['vocab_size']
    kv = h // s['num_attention_heads'] * s['num_key_value_heads']
    matmul_params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab
    return 6 * matmul_params + 12 * layers * h * attended

def peak_flops():
    if not cuda: return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)

def result(cfg, timer, counts, **extra):
    counts = counts[a.warm:timer.step_end]
    real, slots = sum(c[0] for c in counts), sum(c[1] for c in counts)
    dt = timer.t1 - timer.t0
    peak = peak_flops()
    mfu = round(real / dt * flops_per_token(shape, sum(lengths) / len(lengths)) / peak, 4) if peak else None
    return dict(config=cfg, steps=len(counts), seconds=round(dt, 3), real_tokens=real, slot_tokens=slots,
                real_tok_per_s=round(real / dt, 1), pad_fraction=round(1 - real / max(slots, 1), 3), mfu=mfu,
                peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, **extra)

def run_raw(cfg):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    ds = Dataset.from_list([{'input_ids': e['input_ids']} for e in encoded])
    kw = dict(output_dir=str(work / f'raw_{cfg}'), max_steps=a.steps, logging_steps=10, report_to='none', save_strategy='no',
              bf16=cuda, use_cpu=not cuda, max_length=MAXLEN, learning_rate=2e-4, dataloader_num_workers=0,
              gradient_checkpointing=False, seed=0, disable_tqdm=True)
    kw.update({'A': dict(per_device_train_batch_size=8, packing=False),
               'B': dict(per_device_train_batch_size=2, packing=True),
               'C': dict(per_device_train_batch_size=2, packing=True, use_liger_kernel=True)}[cfg])
    timer = Timer(a.warm)
    tr = SFTTrainer(model=new_model(), args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules='all-linear', task_type='CAUSAL_LM'),
                    callbacks=[timer])
    cc = CountCollator(tr.data_collator); tr.data_collator = cc
    tr.train()
    return result(cfg, timer, cc.counts)

def run_finetune():
    import openpipe_lab.train as T
    from openpipe_lab.logstore import LogStore
    from openpipe_lab.finetune import FineTune
    base = work / 'base'
    m = new_model(); m.save_pretrained(base); tok.save_pretrained(base); del m
    if cuda: torch.cuda.empty_cache()
    timer, box = Timer(a.warm), {}
    class Hook(TrainerCallback):  # count the tokens of each batch the trainer's dataloader collates
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            dl = getattr(train_dataloader, 'base_dataloader', train_dataloader)
            box['cc'] = CountCollator(dl.collate_fn); dl.collate_fn = box['cc']
            box['max_steps'] = state.max_steps
    orig = T._Job.callbacks
    T._Job.callbacks = lambda self, *args: orig(self, *args) + [timer, Hook()]
    try:
        lab = LogStore(str(work / 'lab' / 'lab.db'), dir=work / 'lab')
        total_tokens = sum(lengths)
        steps_per_epoch_guess = max(1, total_tokens / 16384) if cuda else max(1, total_tokens / (4 * MAXLEN))
        epochs = min(1.0, (a.steps + 2) / steps_per_epoch_guess)
        ft = FineTune(rows, str(base), 'bench', sft={'num_epochs': round(epochs, 4)}, max_length=MAXLEN, store=lab)
        t = time.time()
        import openpipe_lab.train as _worker
        _worker._IN_WORKER = True  # this benchmark process plays the worker: Liger may patch it, as in a real job
        ft.train(background=False, progress=False)
        plan = ft.metrics_['stages']['sft']['plan']
        r = result('FT', timer, box['cc'].counts, total_s=round(time.time() - t, 1), plan=plan)
        return r
    finally:
        T._Job.callbacks = orig

results = []
for cfg in a.configs.split(','):
    if cuda: torch.cuda.reset_peak_memory_stats()
    try: r = run_finetune() if cfg == 'FT' else run_raw(cfg)
    except Exception as e:
        import traceback; traceback.print_exc()
        r = dict(config=cfg, error=repr(e)[:500])
    if cfg == 'FT' and 'error' in r and os.environ.get('OPENPIPE_LAB_ATTENTION') != 'sdpa':
        print('RESULT', json.dumps(r), flush=True); results.append(r)
        os.environ['OPENPIPE_LAB_ATTENTION'] = 'sdpa'  # retry once without the varlen attention path
        work = Path(tempfile.mkdtemp(prefix='train_throughput_'))
        try: r = dict(run_finetune(), config='FT-sdpa')
        except Exception as e:
            import traceback; traceback.print_exc()
            r = dict(config='FT-sdpa', error=repr(e)[:500])
    print('RESULT', json.dumps(r), flush=True)
    results.append(r)
    if cuda: torch.cuda.empty_cache()

by = {r['config']: r for r in results if 'real_tok_per_s' in r}
if 'FT' in by and 'C' in by: print(f"FT / C = {by['FT']['real_tok_per_s'] / by['C']['real_tok_per_s']:.2f}x")
import trl, transformers, peft
meta = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if cuda else 'cpu', shape=shape, maxlen=MAXLEN,
            trl=trl.__version__, transformers=transformers.__version__, peft=peft.__version__, rows=len(rows),
            tokens=sum(lengths))
print('META', json.dumps(meta))
print(f"{'config':6} {'tok/s':>10} {'pad':>6} {'mem GB':>7} {'steps':>5} {'MFU':>6}")
for r in results:
    if 'real_tok_per_s' in r: print(f"{r['config']:6} {r['real_tok_per_s']:>10.0f} {r['pad_fraction']:>6.2f} {str(r['peak_mem_gb']):>7} {r['steps']:>5} {str(r['mfu']):>6}")
    else: print(f"{r['config']:6} ERROR {r['error'][:200]}")
Path(a.out).mkdir(parents=True, exist_ok=True)
Path(a.out, 'train_throughput.json').write_text(json.dumps(dict(meta=meta, results=results), indent=1))
