# %%
#| default_exp train

# %% [md]
# # Training worker
#
# > `python -m openpipe_lab.train <model id>`: the child process a `FineTune` launches. It reads the job from the
# > store, trains with TRL + PEFT stage by stage, reports progress and history, and leaves `serve.json`.

# %%
#| export
from __future__ import annotations
import json, os, sys, math, time, shutil, traceback, importlib.util
from pathlib import Path
import sqlalchemy as sa
from openpipe_lab.core import *
from openpipe_lab.store import Database, tables, dumps, loads
from openpipe_lab.finetune import (BASE_LEARNING_RATES, default_epochs, tokenize_conversation, normalize_messages,
                                   choose_chat_template, training_price, estimate_training_cost, _update_model, _model_row)

# %%
#| hide
from fastcore.test import *
import tempfile, types, warnings
import transformers
from transformers import AutoTokenizer

# %%
#| hide
transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings('ignore')

# %% [md]
# ## Batch plan
#
# `batch_size: "auto"` packs conversations (TRL's best-fit-decreasing packing, padding-free: no pad tokens are
# computed, and each conversation attends only to itself) and fills a token budget per optimizer step. On a GPU the
# budget is 16k tokens, cut down when the estimated activation memory (LoRA, no gradient checkpointing, with
# Liger's fused loss when installed) would exceed 60% of free memory; if even one row does not fit, gradient
# checkpointing is turned on. On CPU it is 4 packed rows. A numeric `batch_size` is that many conversations per
# optimizer step, padded (split into gradient-accumulation micro-batches when it would not fit).

# %%
#| export
def cpu_threads(n_params: int) -> int:
    "Torch threads for CPU training: 1 for tiny models, else half the cores."
    return 1 if n_params < 50e6 else max(1, (os.cpu_count() or 2) // 2)

_IN_WORKER = False  # True in `python -m openpipe_lab.train` (a process of its own), False for start(background=False)
CHECKPOINT_MIN_INTERVAL_S = 300  # default checkpointing: every 10% of the steps, at most once per 5 minutes

def activation_bytes_per_token(cfg, liger: bool) -> float:
    "Rough activation memory per trained token (bf16, no gradient checkpointing) for a decoder config."
    h = cfg.get('hidden_size', 1024); inter = cfg.get('intermediate_size', 4 * h)
    layers = cfg.get('num_hidden_layers', 24); vocab = cfg.get('vocab_size', 32000)
    return layers * (34 * h + 10 * inter) + (0 if liger else 6 * vocab)

def plan_batches(batch_size, device: str, max_length: int, model_cfg: dict, free_bytes: float | None = None,
                 weight_bytes: float = 0, liger: bool = False, target_tokens: int = 16384) -> dict:
    "Per-device batch, gradient accumulation, packing and gradient checkpointing for a stage."
    per_token = activation_bytes_per_token(model_cfg, liger)
    if device == 'cuda' and free_bytes:
        budget = 0.6 * free_bytes - weight_bytes
        fit_rows = int(budget // (per_token * max_length)) if budget > 0 else 0
    else: fit_rows = None
    if batch_size == 'auto':
        want = max(1, target_tokens // max_length) if device == 'cuda' else 4
        rows = want if fit_rows is None else max(1, min(want, fit_rows))
        return dict(per_device=rows, grad_accum=1, packing=True, gradient_checkpointing=fit_rows == 0)
    n = int(batch_size)
    if fit_rows is None or fit_rows >= n: return dict(per_device=n, grad_accum=1, packing=False, gradient_checkpointing=False)
    per = max(1, fit_rows)
    while n % per: per -= 1
    return dict(per_device=per, grad_accum=n // per, packing=False, gradient_checkpointing=fit_rows == 0)

# %% [md]
# Checkpoints: every 10% of the steps by default, but at most once per `CHECKPOINT_MIN_INTERVAL_S` (5 minutes), so
# short jobs do not spend their time writing optimizer states; an explicit `checkpoint_every` is followed exactly.

# %%
test_eq(cpu_threads(1_000_000), 1)
assert cpu_threads(135_000_000) == max(1, (os.cpu_count() or 2) // 2)
qwen15 = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, vocab_size=151936)
test_eq(plan_batches('auto', 'cuda', 2048, qwen15, free_bytes=140e9, weight_bytes=3e9, liger=True),
        dict(per_device=8, grad_accum=1, packing=True, gradient_checkpointing=False))
test_eq(plan_batches('auto', 'cuda', 2048, qwen15, free_bytes=40e9, weight_bytes=3e9, liger=True)['per_device'], 2)
test_eq(plan_batches('auto', 'cuda', 2048, qwen15, free_bytes=8e9, weight_bytes=3e9)['gradient_checkpointing'], True)
test_eq(plan_batches(16, 'cuda', 2048, qwen15, free_bytes=40e9, weight_bytes=3e9, liger=True),
        dict(per_device=2, grad_accum=8, packing=False, gradient_checkpointing=False))
test_eq(plan_batches('auto', 'cpu', 512, qwen15)['per_device'], 4)

# %% [md]
# ## Attention for packed rows on GPU
#
# Padding-free packing hands the model one long row per step (all packed conversations end to end) plus the
# conversations' boundaries (`cu_seq_lens`). With SDPA, transformers turns the boundaries into a dense block-diagonal
# mask over the whole row: attention cost grows with the square of the *step* length (16k tokens) instead of each
# conversation's. We register a small attention function that calls PyTorch's flash-attention `varlen_attn` with
# those boundaries (no extra package: flash-attn wheels are not needed). It is checked against SDPA on the GPU at
# start; when the check fails, training uses SDPA (as it does with `OPENPIPE_LAB_ATTENTION=sdpa`). The function is
# registered with transformers under the name `VARLEN_ATTENTION` (`"openpipe_varlen"`).
#
# Measured with `bench/train_throughput.py` on one H200, Qwen2.5-1.5B shape, LoRA r16 all-linear, seq 2048,
# chat-length rows (median 357 tokens), non-padding tokens/s; two runs on two H200 machines (run 2 after Liger was
# limited to the worker process, the benchmark playing the worker):
#
# | config | run 1 tokens/s | run 2 tokens/s | padding | peak GPU memory |
# |---|---|---|---|---|
# | FineTune defaults (`batch_size: "auto"`: 8 packed rows, varlen attention, Liger) | **38,435** | **39,296** | 0% | 43.0 GB |
# | TRL defaults (A: padded batches of 8) | 9,065 | 8,138 | 59% | 44.8 GB |
# | TRL packing (B: 2 packed rows) | 18,724 | 16,104 | 0% | 14.1 GB |
# | TRL packing + Liger (C) | 8,496 | 16,593 | 0% | 14.1 GB |
#
# FineTune's default is 4.5× / 2.4× C and 2.1× / 2.4× the best raw TRL configuration in each run. (The anchor measurement in
# `../shared/bench/trl_anchor.py` found C faster than B on another H200; absolute figures swing between machines.)

# %%
#| export
VARLEN_ATTENTION = 'openpipe_varlen'

def _varlen_call(q, k, v, cu, max_len, scale):
    import inspect, torch
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    kw = {'scale': scale}
    if 'window_size' in params: kw['window_size'] = (-1, 0)
    else: kw['is_causal'] = True
    if k.shape[1] != q.shape[1]:
        if 'enable_gqa' in params: kw['enable_gqa'] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cu = kwargs.get('cu_seq_lens_q')
    if cu is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    import torch
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
    out = _varlen_call(q, k, v, cu.to(q.device, torch.int32), int(kwargs.get('max_length_q') or q.shape[0]), scaling)
    return out.unsqueeze(0), None

def register_varlen_attention() -> str | None:
    "Register the varlen attention function if this GPU runs it correctly; returns its name, or None."
    try:
        import torch
        if not torch.cuda.is_available() or importlib.util.find_spec('torch.nn.attention.varlen') is None: return None
        from transformers import AttentionInterface
        torch.manual_seed(0)
        lens = [5, 11]; cu = torch.tensor([0, 5, 16], dtype=torch.int32, device='cuda')
        # the layout the model hands over: (1, heads, tokens, dim), viewed as (tokens, heads, dim)
        mk = lambda h: torch.randn(1, h, 16, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
        q4, k4, v4 = mk(4), mk(2), mk(2)
        q, k, v = (x[0].transpose(0, 1) for x in (q4, k4, v4))
        out = _varlen_call(q, k, v, cu, 11, 0.125)
        out.float().sum().backward()
        ref, s = [], 0
        for n in lens:
            qq, kk, vv = (x[s:s + n].transpose(0, 1).float() for x in (q, k, v))
            kk, vv = kk.repeat_interleave(2, 0), vv.repeat_interleave(2, 0)
            ref.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=0.125).transpose(0, 1))
            s += n
        if (out.float() - torch.cat(ref)).abs().max().item() > 3e-2: return None
        AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
        return VARLEN_ATTENTION
    except Exception as e:
        print(f"varlen attention unavailable ({type(e).__name__}: {e}); using sdpa", flush=True)
        return None

# %%
assert register_varlen_attention() is None  # no GPU here: SDPA

# %% [md]
# On CPU the worker leaves half the cores to the notebook, the tokenizer and a model server, and uses one thread for
# models under 50M parameters (unless `OMP_NUM_THREADS` is set): for tiny models thread hand-offs cost more than they
# give, and on a busy 2-core machine a tiny model's step ran 5-10× faster on one thread than on two.
#
# ## Progress into the store
#
# A `TrainerCallback` writes every logged step (loss, learning rate, grad norm, eval loss) to `training_history`,
# numbered across stages (SFT steps first, then preference steps), and keeps the row's `progress` current (stage,
# step, max steps, loss, ETA), throttled to one write a second.

# %%
#| export
def _callback_class():
    from transformers import TrainerCallback
    class StoreCallback(TrainerCallback):
        "Report a stage's progress and logged metrics to the lab store."
        def __init__(self, db, model_id, stage, offset=0, stage_index=1, n_stages=1):
            self.db, self.model_id, self.stage, self.offset = db, model_id, stage, offset
            self.stage_index, self.n_stages, self.loss, self.last, self.t0, self.step0 = stage_index, n_stages, None, 0, None, 0
        def _progress(self, state, force=False):
            if not force and time.time() - self.last < 1: return
            self.last = time.time()
            done = state.global_step - self.step0
            eta = (time.time() - self.t0) / done * (state.max_steps - state.global_step) if done > 0 else None
            _update_model(self.db, self.model_id, progress={
                'stage': self.stage, 'stage_index': self.stage_index, 'n_stages': self.n_stages,
                'step': state.global_step, 'max_steps': state.max_steps, 'epoch': round(state.epoch or 0, 3),
                'loss': self.loss, 'eta_s': None if eta is None else round(eta, 1), 'resumed_from_step': self.step0 or None})
        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.time(), state.global_step
            self._progress(state, force=True)
        def on_step_end(self, args, state, control, **kw): self._progress(state)
        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if not ({'loss', 'eval_loss'} & set(logs)): return
            if 'loss' in logs: self.loss = round(float(logs['loss']), 6)
            rec = {'stage': self.stage, 'stage_step': state.global_step,
                   **{k: (round(float(v), 8) if math.isfinite(v) else None) for k, v in logs.items()}}
            with self.db.begin() as c:
                c.execute(tables.training_history.insert().values(model_id=self.model_id, step=self.offset + state.global_step,
                                                                  record=dumps(rec), created_at=now_ms()))
            self._progress(state, force=True)
        def on_train_end(self, args, state, control, **kw): self._progress(state, force=True)
    class CheckpointThrottle(TrainerCallback):
        "Skip a scheduled checkpoint when the last one is less than `min_interval` seconds old."
        def __init__(self, min_interval): self.min_interval, self.last = min_interval, time.time()
        def on_step_end(self, args, state, control, **kw):
            if control.should_save:
                if time.time() - self.last < self.min_interval: control.should_save = False
                else: self.last = time.time()
    StoreCallback.Throttle = CheckpointThrottle
    return StoreCallback

# %% [md]
# ## Stages
#
# A job is one or more stages, each a TRL trainer over a PEFT model (or the full model for `method="full"`):
#
# - **sft**: `SFTTrainer` on our pre-tokenized rows (`input_ids` + `assistant_masks` from `tokenize_conversation`,
#   so only the final assistant turn is trained, for any template); TEST rows give the eval loss.
# - **preference**: `DPOTrainer` with `loss_type` `sigmoid` (DPO) or `apo_zero` (APO Zero) and `beta=training_beta`
#   on rows with `rejected_message`. It starts from the SFT adapter when SFT ran (the reference model is that
#   adapter, frozen: TRL copies it to a `ref` adapter), else from a fresh LoRA (reference = the base model).
#   `adapter_weight < 1` then mixes the two deltas exactly (`peft`'s `cat` combination: the rank doubles).
# - **reward**: `RewardTrainer` on a sequence-classification head (`num_labels=1`), `messages` as chosen and
#   `messages[:-1] + [rejected_message]` as rejected.
#
# Each stage checkpoints into `checkpoints/<stage>` and, when finished, saves its adapter into `stages/<stage>` with
# a `done.json`. Restarting the worker skips finished stages and resumes the current one from its last checkpoint.

# %%
#| export
def _read_rows(path):
    p = Path(path)
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []

def _tools(r):
    t = r.get('tools')
    return t or None

def _uses_tools(rows):
    return any(r.get('tools') or any(m.get('tool_calls') or m.get('role') == 'tool' for m in r['messages'])
               or (r.get('rejected_message') or {}).get('tool_calls') for r in rows)

def sft_dataset(rows, tok, template, max_length):
    "Pre-tokenized SFT dataset (`input_ids`, `assistant_masks`), truncated to `max_length`; plus token stats."
    datasets = require('datasets')
    ids, masks, dropped = [], [], 0
    for r in rows:
        enc = tokenize_conversation(tok, r['messages'], _tools(r), template)
        x, m = enc['input_ids'][:max_length], enc['assistant_masks'][:max_length]
        if not any(m): dropped += 1; continue
        ids.append(x); masks.append(m)
    return datasets.Dataset.from_dict({'input_ids': ids, 'assistant_masks': masks}), \
        {'rows': len(ids), 'dropped_rows': dropped, 'tokens': sum(map(len, ids))}

def _conv_json(messages): return [dict(m, content=m.get('content') or '') for m in normalize_messages(messages)]

def preference_dataset(rows, tok, template, max_length, reward=False):
    "Conversational preference dataset (prompt/chosen/rejected, or chosen/rejected for reward models) + stats."
    datasets = require('datasets')
    out, tokens = [], 0
    for r in rows:
        rej = r.get('rejected_message')
        if not rej: continue
        prompt, chosen = r['messages'][:-1], r['messages'][-1]
        t = json.dumps(_tools(r)) if _tools(r) else None
        c_enc = tokenize_conversation(tok, r['messages'], _tools(r), template)
        r_enc = tokenize_conversation(tok, prompt + [rej], _tools(r), template)
        tokens += min(len(c_enc['input_ids']), max_length) + min(len(r_enc['input_ids']), max_length)
        if reward: out.append({'chosen': _conv_json(r['messages']), 'rejected': _conv_json(prompt + [rej]), 'tools': t})
        else: out.append({'prompt': _conv_json(prompt), 'chosen': _conv_json([chosen]), 'rejected': _conv_json([rej]), 'tools': t})
    if not any(o['tools'] for o in out):
        for o in out: del o['tools']
    return (datasets.Dataset.from_list(out) if out else None), {'rows': len(out), 'tokens': tokens}

# %% [md]
# The SFT rows keep only the assistant's final turn in the loss; a conversation cut by `max_length` before its
# output starts is dropped (and counted):

# %%
#| hide
sys.path.insert(0, str(Path('../tests').resolve()))  # tests/tiny_model.py builds the tiny models the tests share
from tiny_model import build_tiny_model

# %%
#| hide
_tiny = build_tiny_model(Path(tempfile.gettempdir()) / 'openpipe_lab_nb' / 'tiny-chatml', 'chatml')

# %%
tok = AutoTokenizer.from_pretrained(_tiny)
rows = [{'messages': [{'role': 'user', 'content': 'Capital of France?'}, {'role': 'assistant', 'content': 'Paris'}],
         'rejected_message': {'role': 'assistant', 'content': 'London'}},
        {'messages': [{'role': 'user', 'content': 'word ' * 200}, {'role': 'assistant', 'content': 'ok'}]}]
ds, stats = sft_dataset(rows, tok, tok.chat_template, 64)
test_eq(stats['rows'], 1); test_eq(stats['dropped_rows'], 1)
test_eq(tok.decode([i for i, m in zip(ds[0]['input_ids'], ds[0]['assistant_masks']) if m]), 'Paris<|im_end|>')
pds, pstats = preference_dataset(rows, tok, tok.chat_template, 64)
test_eq(pds[0]['rejected'], [{'role': 'assistant', 'content': 'London'}]); test_eq(pstats['rows'], 1)
rds, _ = preference_dataset(rows, tok, tok.chat_template, 64, reward=True)
test_eq(rds[0]['rejected'][-1]['content'], 'London'); test_eq(len(rds[0]['chosen']), 2)

# %% [md]
# ## The job
#
# `run_job` resolves the base model (a parent fine-tune's slug continues its adapter on its base), loads the
# tokenizer and picks the chat template, runs the stages, then writes the final adapter, `serve.json` and the
# metrics, and sets `DEPLOYED`. Any failure sets `ERROR` with a message a user can act on; out-of-memory names the
# settings to lower.

# %%
#| export
def resolve_base(db, base: str) -> dict:
    "Where to load the base model from, and the adapter to continue from when `base` is a fine-tune's slug."
    t = tables.models
    with db.connect() as c: parent = c.execute(sa.select(t).where(t.c.slug == base)).mappings().first()
    if parent is not None:
        serve = json.loads((Path(parent['output_dir']) / 'serve.json').read_text())
        if serve['method'] == 'full': return {'path': serve['merged_path'], 'init_adapter': None, 'parent': base}
        return {'path': serve['base_model'], 'init_adapter': serve['adapter_path'], 'parent': base}
    p = Path(base).expanduser()
    return {'path': str(p.resolve()) if p.is_dir() else base, 'init_adapter': None, 'parent': None}

def describe_error(e, ctx: dict, log_path) -> str:
    "A message for `error_message`: what failed and what to change."
    torch = sys.modules.get('torch')
    if (torch is not None and isinstance(e, torch.OutOfMemoryError)) or 'out of memory' in str(e).lower():
        return (f"out of memory in stage {ctx.get('stage')!r} (per-device batch {ctx.get('per_device')}, max_length "
                f"{ctx.get('max_length')}, method {ctx.get('method')!r}): set a smaller batch_size in the hyperparameters "
                "(a number, e.g. 4), a smaller max_length=, or method='qlora'; then start() resumes.")
    if isinstance(e, OpenPipeLabError): return str(e)
    if ctx.get('stage') == 'load':
        return f"cannot load base model {ctx.get('base')!r}: {type(e).__name__}: {e}. Pass an existing model folder or a cached Hugging Face id."
    return f"{type(e).__name__}: {e} (stage {ctx.get('stage')!r}; traceback in {log_path})"

def _lr(stage, method, mult): return BASE_LEARNING_RATES[(stage, method)] * float(mult)

def _last_checkpoint(d):
    "The newest complete checkpoint in `d` (a worker killed while saving leaves a partial one: it is removed)."
    d = Path(d)
    if not d.is_dir(): return None
    cks = sorted((p for p in d.glob('checkpoint-*') if p.name.split('-')[-1].isdigit()), key=lambda p: int(p.name.split('-')[-1]))
    for p in reversed(cks):
        if (p / 'trainer_state.json').exists(): return str(p)  # written last by the Trainer
        shutil.rmtree(p, ignore_errors=True)
    return None

class _Job:
    "State of one worker run (not public): row, config, paths, device, tokenizer."
    def __init__(self, db, model_id):
        self.db, self.id = db, model_id
        with db.connect() as c: self.row = dict(c.execute(sa.select(tables.models).where(tables.models.c.id == model_id)).mappings().one())
        self.cfg, self.out = loads(self.row['config']), Path(self.row['output_dir'])
        self.ctx = {'stage': 'load', 'base': self.cfg['baseModel'], 'method': self.cfg['method']}
        self.metrics = loads(self.row['metrics']) or {}

    def setup(self):
        torch, transformers = require('torch'), require('transformers')
        cfg = self.cfg
        self.device = 'cuda' if cfg['device'] in ('auto', 'cuda') and torch.cuda.is_available() else 'cpu'
        if cfg['device'] == 'cuda' and self.device != 'cuda': raise ConfigError("device='cuda' but no CUDA GPU is visible in the worker")
        self.base = resolve_base(self.db, cfg['baseModel'])
        self.model_cfg = transformers.AutoConfig.from_pretrained(self.base['path']).to_dict()
        self.model_cfg = self.model_cfg.get('text_config', self.model_cfg) if 'hidden_size' not in self.model_cfg else self.model_cfg
        self.tok = transformers.AutoTokenizer.from_pretrained(self.base['init_adapter'] or self.base['path'])
        if self.tok.pad_token is None: self.tok.pad_token = self.tok.eos_token
        self.train_rows, self.test_rows = _read_rows(self.out / 'data' / 'train.jsonl'), _read_rows(self.out / 'data' / 'test.jsonl')
        self.template, self.tool_parser = choose_chat_template(self.tok, _uses_tools(self.train_rows), cfg.get('chat_template'))
        self.tok.chat_template = self.template
        self.context_window = self.model_cfg.get('max_position_embeddings') or 4096
        self.max_length = int(cfg.get('max_length') or min(self.context_window, 4096))
        # Liger patches transformers' model classes for the whole process, so it is used only inside the worker
        # process (which exits after the job) and not for reward models (its fused loss expects an LM head).
        self.liger = (self.device == 'cuda' and _IN_WORKER and cfg['provider'] != 'openpipeReward'
                      and importlib.util.find_spec('liger_kernel') is not None)
        self.attn = None
        self.lora = dict(cfg['lora'])
        if self.base['init_adapter']:
            ac = json.loads((Path(self.base['init_adapter']) / 'adapter_config.json').read_text())
            self.lora.update(r=ac['r'], alpha=ac['lora_alpha'], target_modules=ac['target_modules'])

    def load_model(self, reward=False, adapter=None, varlen=False):
        "The base model (4-bit for QLoRA) wrapped in a trainable PEFT model (fresh, or loaded from `adapter`)."
        torch, transformers = require('torch'), require('transformers')
        cfg, cuda = self.cfg, self.device == 'cuda'
        kw = {'dtype': torch.bfloat16 if cuda else torch.float32}
        if cfg['method'] == 'qlora':
            kw['quantization_config'] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
            if cuda: kw['device_map'] = {'': 0}
        if varlen and cuda and not reward and os.environ.get('OPENPIPE_LAB_ATTENTION', 'auto') != 'sdpa':
            self.attn = self.attn or register_varlen_attention()
            if self.attn: kw['attn_implementation'] = self.attn
        auto = transformers.AutoModelForSequenceClassification if reward else transformers.AutoModelForCausalLM
        if reward: kw['num_labels'] = 1
        self.ctx['stage'] = 'load'
        model = auto.from_pretrained(self.base['path'], **kw)
        self.ctx['stage'] = None
        if reward: model.config.pad_token_id = self.tok.pad_token_id
        self.n_params = sum(p.numel() for p in model.parameters()) * (2 if cfg['method'] == 'qlora' else 1)
        if not cuda and not os.environ.get('OMP_NUM_THREADS'):
            torch.set_num_threads(cpu_threads(self.n_params))
        if cfg['method'] == 'full': return model
        peft = require('peft')
        if cfg['method'] == 'qlora':
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            if not cuda:  # bitsandbytes repacks 4-bit weights for CPU inference at the first eval, and that layout
                for m in model.modules():  # then breaks the training step ('a view of a leaf Variable...'): keep it off
                    if hasattr(m, 'support_avx512bf16_for_cpu'): m.support_avx512bf16_for_cpu = False
        adapter = adapter or self.base['init_adapter']
        if adapter: return peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        lc = peft.LoraConfig(r=self.lora['r'], lora_alpha=self.lora['alpha'], lora_dropout=self.lora['dropout'],
                             target_modules=self.lora['target_modules'], task_type='SEQ_CLS' if reward else 'CAUSAL_LM')
        return peft.get_peft_model(model, lc)

    def plan(self, batch_size):
        torch = require('torch')
        free = torch.cuda.mem_get_info()[0] if self.device == 'cuda' else None
        p = plan_batches(batch_size, self.device, self.max_length, self.model_cfg, free, 0, self.liger)  # weights already loaded
        if self.cfg['method'] == 'full' and self.device == 'cuda': p['gradient_checkpointing'] = True
        return p

    def args(self, cls, stage, epochs, lr, plan, has_eval, **extra):
        cuda = self.device == 'cuda'
        ce = self.cfg.get('checkpoint_every') or 0.1
        ee = self.cfg.get('eval_every', 0.25)  # 0: evaluate only once, at the end
        kw = dict(output_dir=str(self.out / 'checkpoints' / stage), num_train_epochs=float(epochs),
                  per_device_train_batch_size=plan['per_device'], per_device_eval_batch_size=plan['per_device'],
                  gradient_accumulation_steps=plan['grad_accum'], learning_rate=lr, lr_scheduler_type='cosine',
                  warmup_steps=0.03, logging_steps=1, logging_first_step=True,
                  save_strategy='steps', save_steps=ce if ce < 1 else int(ce), save_total_limit=2,
                  eval_strategy='steps' if has_eval and ee else 'no', eval_steps=(ee if ee < 1 else int(ee)) if has_eval and ee else None,
                  report_to='none', seed=int(self.cfg.get('seed') or 0), bf16=cuda, use_cpu=not cuda,
                  gradient_checkpointing=plan['gradient_checkpointing'], dataloader_num_workers=0,
                  disable_tqdm=True, max_length=self.max_length, use_liger_kernel=self.liger)
        kw.update(extra)
        return cls(**kw)

    def callbacks(self, stage, offset, index, n):
        cb = _callback_class()
        out = [cb(self.db, self.id, stage, offset, index, n)]
        if self.cfg.get('checkpoint_every') is None: out.append(cb.Throttle(CHECKPOINT_MIN_INTERVAL_S))
        return out

    def finish_stage(self, stage, trainer, model, stats, epochs, lr, plan):
        d = self.out / 'stages' / stage
        if self.cfg['method'] == 'full': trainer.save_model(str(d))
        else: model.save_pretrained(str(d), selected_adapters=['default'])
        self.tok.save_pretrained(str(d))
        h = [l for l in trainer.state.log_history if 'loss' in l]
        ev = trainer.evaluate() if trainer.eval_dataset is not None else {}
        done = dict(stats, steps=trainer.state.global_step, epochs=epochs, learning_rate=lr, plan=plan,
                    final_loss=h[-1]['loss'] if h else None, eval_loss=ev.get('eval_loss'))
        (d / 'done.json').write_text(json.dumps(done))
        shutil.rmtree(self.out / 'checkpoints' / stage, ignore_errors=True)
        return done

def _stage_done(out, stage):
    p = out / 'stages' / stage / 'done.json'
    return json.loads(p.read_text()) if p.exists() else None

# %% [md]
# A worker killed while writing a checkpoint leaves a partial folder; resuming skips (and removes) it. The Trainer
# writes `trainer_state.json` last, so it marks a complete checkpoint:

# %%
d = Path(tempfile.mkdtemp())
for n in (3, 6, 9): (d / f'checkpoint-{n}').mkdir()
for n in (3, 6): (d / f'checkpoint-{n}' / 'trainer_state.json').write_text('{}')
test_eq(_last_checkpoint(d), str(d / 'checkpoint-6'))
assert not (d / 'checkpoint-9').exists()
test_eq(_last_checkpoint(d / 'missing'), None)

# %% [md]
# The stages themselves:

# %%
#| export
def _fault(stage):
    "Test hook: OPENPIPE_LAB_TRAIN_FAULT=oom:<stage> raises an out-of-memory error at that stage's start."
    f = os.environ.get('OPENPIPE_LAB_TRAIN_FAULT', '')
    if f == f'oom:{stage}':
        torch = require('torch')
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB (simulated)')

def run_sft(job, offset, index, n):
    trl = require('trl')
    hp = job.cfg['sft_hyperparameters']
    ds, stats = sft_dataset(job.train_rows, job.tok, job.template, job.max_length)
    if not stats['rows']: raise ConfigError(f"no TRAIN row has its assistant output within max_length={job.max_length} tokens: raise max_length")
    eval_ds, _ = sft_dataset(job.test_rows, job.tok, job.template, job.max_length) if job.test_rows else (None, None)
    if eval_ds is not None and not len(eval_ds): eval_ds = None
    epochs = hp.get('num_epochs') or default_epochs(len(job.train_rows))
    plan = None
    model = job.load_model(varlen=hp.get('batch_size', 'auto') == 'auto')
    plan = job.plan(hp.get('batch_size', 'auto'))
    job.ctx.update(stage='sft', per_device=plan['per_device'], max_length=job.max_length)
    _fault('sft')
    lr = _lr('sft', job.cfg['method'], hp.get('learning_rate_multiplier') or 1.0)
    args = job.args(trl.SFTConfig, 'sft', epochs, lr, plan, eval_ds is not None, packing=plan['packing'],
                    packing_strategy='bfd', padding_free=plan['packing'], eval_packing=plan['packing'])
    tr = trl.SFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=job.tok,
                        callbacks=job.callbacks('sft', offset, index, n))
    tr.train(resume_from_checkpoint=_last_checkpoint(job.out / 'checkpoints' / 'sft'))
    stats['trained_tokens'] = int(stats['tokens'] * epochs)
    plan = dict(plan, attention=job.attn or 'sdpa', liger=job.liger)
    return job.finish_stage('sft', tr, model, stats, epochs, lr, plan)

def run_preference(job, offset, index, n, start_adapter=None):
    trl = require('trl')
    hp = job.cfg['preference_hyperparameters']
    ds, stats = preference_dataset(job.train_rows, job.tok, job.template, job.max_length)
    eval_ds, _ = preference_dataset(job.test_rows, job.tok, job.template, job.max_length) if job.test_rows else (None, None)
    n_pairs = stats['rows']
    epochs = hp.get('num_epochs') or default_epochs(n_pairs)
    model = job.load_model(adapter=start_adapter)
    batch = job.cfg['sft_hyperparameters'].get('batch_size', 'auto')
    plan = job.plan(batch if batch != 'auto' else (8 if job.device == 'cuda' else 4))
    job.ctx.update(stage='preference', per_device=plan['per_device'], max_length=job.max_length)
    _fault('preference')
    lr = _lr('preference', job.cfg['method'], hp.get('learning_rate_multiplier') or 1.0)
    loss = 'apo_zero' if hp.get('variant') == 'APO Zero' else 'sigmoid'
    args = job.args(trl.DPOConfig, 'preference', epochs, lr, plan, eval_ds is not None,
                    beta=float(hp.get('training_beta') or 0.1), loss_type=[loss])
    tr = trl.DPOTrainer(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=job.tok,
                        callbacks=job.callbacks('preference', offset, index, n))
    tr.train(resume_from_checkpoint=_last_checkpoint(job.out / 'checkpoints' / 'preference'))
    w = float(hp.get('adapter_weight', 1.0) if hp.get('adapter_weight') is not None else 1.0)
    if w != 1.0 and job.cfg['method'] != 'full' and 'ref' in model.peft_config:
        model.add_weighted_adapter(['ref', 'default'], [1 - w, w], 'weighted', combination_type='cat')
        tmp = job.out / 'stages' / '_weighted'
        model.save_pretrained(str(tmp), selected_adapters=['weighted'])
        model.delete_adapter('default')
        d = job.out / 'stages' / 'preference'
        shutil.rmtree(d, ignore_errors=True); shutil.move(str(tmp / 'weighted'), str(d)); shutil.rmtree(tmp, ignore_errors=True)
        job.tok.save_pretrained(str(d))
        h = [l for l in tr.state.log_history if 'loss' in l]
        done = dict(stats, steps=tr.state.global_step, epochs=epochs, learning_rate=lr, plan=plan, adapter_weight=w,
                    final_loss=h[-1]['loss'] if h else None, eval_loss=None, trained_tokens=int(stats['tokens'] * epochs))
        (d / 'done.json').write_text(json.dumps(done))
        shutil.rmtree(job.out / 'checkpoints' / 'preference', ignore_errors=True)
        return done
    stats['trained_tokens'] = int(stats['tokens'] * epochs)
    return job.finish_stage('preference', tr, model, stats, epochs, lr, plan)

def run_reward(job, offset, index, n):
    trl = require('trl')
    hp = job.cfg['hyperparameters']
    ds, stats = preference_dataset(job.train_rows, job.tok, job.template, job.max_length, reward=True)
    eval_ds, _ = preference_dataset(job.test_rows, job.tok, job.template, job.max_length, reward=True) if job.test_rows else (None, None)
    epochs = hp.get('num_epochs') or default_epochs(stats['rows'])
    model = job.load_model(reward=True)
    b = hp.get('batch_size', 'auto')
    plan = job.plan(b if b != 'auto' else (8 if job.device == 'cuda' else 4))
    job.ctx.update(stage='reward', per_device=plan['per_device'], max_length=job.max_length)
    _fault('reward')
    lr = _lr('reward', job.cfg['method'], hp.get('learning_rate_multiplier') or 1.0)
    args = job.args(trl.RewardConfig, 'reward', epochs, lr, plan, eval_ds is not None)
    tr = trl.RewardTrainer(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=job.tok,
                           callbacks=job.callbacks('reward', offset, index, n))
    tr.train(resume_from_checkpoint=_last_checkpoint(job.out / 'checkpoints' / 'reward'))
    stats['trained_tokens'] = int(stats['tokens'] * epochs)
    return job.finish_stage('reward', tr, model, stats, epochs, lr, plan)

# %% [md]
# `run_job` strings the stages together and publishes the result: `adapter/` is the last stage's adapter (with the
# tokenizer and its chat template), and `serve.json` describes it.

# %%
#| export
def _copy_dir(src, dst):
    shutil.rmtree(dst, ignore_errors=True); shutil.copytree(src, dst)

def run_job(db, model_id: str):
    "Train the job `model_id` to `DEPLOYED` (idempotent: finished stages are skipped, checkpoints resumed)."
    job = _Job(db, model_id)
    _update_model(db, model_id, status='TRAINING', pid=os.getpid(), error_message=None)
    t0 = time.time()
    try:
        job.setup()
        cfg = job.cfg
        if cfg['provider'] == 'openpipeReward': stages = ['reward']
        else: stages = (['sft'] if cfg['enable_sft'] else []) + (['preference'] if cfg['enable_preference_tuning'] else [])
        results, offset, prev = {}, 0, None
        for i, stage in enumerate(stages, 1):
            done = _stage_done(job.out, stage)
            if done is None:
                job.ctx['stage'] = stage
                if stage == 'sft': done = run_sft(job, offset, i, len(stages))
                elif stage == 'preference': done = run_preference(job, offset, i, len(stages), start_adapter=prev)
                else: done = run_reward(job, offset, i, len(stages))
            results[stage], offset = done, offset + done['steps']
            prev = str(job.out / 'stages' / stage)
        final = job.out / 'stages' / stages[-1]
        full = cfg['method'] == 'full'
        target = job.out / ('merged' if full else 'adapter')
        _copy_dir(final, target)
        (target / 'done.json').unlink(missing_ok=True)
        n_params = getattr(job, 'n_params', None) or _count_params(job)
        trained = sum(r.get('trained_tokens', 0) for r in results.values())
        category, price = training_price(n_params)
        resolved = {}
        for s, r in results.items():
            resolved[s] = {'num_epochs': r['epochs'], 'learning_rate': r['learning_rate'], 'per_device_batch_size': r['plan']['per_device'],
                           'gradient_accumulation_steps': r['plan']['grad_accum'], 'packing': r['plan']['packing'], 'steps': r['steps']}
        metrics = dict(job.metrics, stages=results, train_tokens=trained, n_params=int(n_params), price_category=category,
                       price_per_million_tokens=price, estimated_cost_usd=estimate_training_cost(trained, n_params),
                       context_window=job.context_window, max_length=job.max_length, device=job.device,
                       runtime_s=round(time.time() - t0, 1), resolved_hyperparameters={'resolved': resolved},
                       dropped_rows=sum(r.get('dropped_rows', 0) for r in results.values()))
        ac = {} if full else json.loads((target / 'adapter_config.json').read_text())
        serve = {'format_version': 1, 'slug': job.row['slug'], 'kind': cfg['provider'],
                 'base_model': job.base['path'], 'base_model_requested': cfg['baseModel'], 'method': cfg['method'],
                 'adapter_path': None if full else str(target.resolve()),
                 'merged_path': str(target.resolve()) if full else None,
                 'tokenizer_path': str(target.resolve()),
                 'lora_rank': ac.get('r'), 'lora_alpha': ac.get('lora_alpha'),
                 'target_modules': sorted(ac['target_modules']) if isinstance(ac.get('target_modules'), (list, set)) else ac.get('target_modules'),
                 'max_length': job.max_length, 'context_window': job.context_window,
                 'chat_template': job.template, 'tool_call_parser': job.tool_parser, 'eos_token': job.tok.eos_token,
                 'default_temperature': cfg.get('defaultTemperature'),
                 'pruning_rules': loads(job.row['pruning_rules']) or [], 'dtype': 'bfloat16'}
        (job.out / 'serve.json').write_text(json.dumps(serve, indent=1))
        _update_model(db, model_id, status='DEPLOYED', error_message=None, metrics=metrics,
                      progress=dict(loads(db_row_progress(db, model_id)) or {}, eta_s=0))
    except BaseException as e:
        msg = describe_error(e, job.ctx, job.out / 'train.log')
        traceback.print_exc()
        _update_model(db, model_id, status='ERROR', error_message=msg)
        if isinstance(e, (KeyboardInterrupt, SystemExit)): raise
        return False
    return True

def db_row_progress(db, model_id):
    with db.connect() as c:
        return c.execute(sa.select(tables.models.c.progress).where(tables.models.c.id == model_id)).scalar()

def _count_params(job):
    transformers = require('transformers'); torch = require('torch')
    with torch.device('meta'):
        m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(job.base['path']))
    return sum(p.numel() for p in m.parameters())

def main(argv=None):
    "Entry point: `python -m openpipe_lab.train <model id>`."
    global _IN_WORKER
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1: print("usage: python -m openpipe_lab.train <model id>", file=sys.stderr); return 2
    _IN_WORKER = True
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    os.environ.setdefault('HF_DATASETS_DISABLE_PROGRESS_BARS', '1')  # keep train.log readable
    db = Database(os.environ.get('OPENPIPE_LAB_DB') or default_db_url())
    return 0 if run_job(db, argv[0]) else 1

# %%
#| export
if __name__ == '__main__' and 'IPython' not in sys.modules: sys.exit(main())  # not when a notebook runs this cell
