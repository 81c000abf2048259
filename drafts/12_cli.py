# %%
#| default_exp cli

# %% [md]
# # Command line
#
# > `openpipe-lab`: run the end-to-end demo, and look at a lab (logs, datasets, models, deployments) from a shell.

# %%
#| export
from __future__ import annotations
import argparse, os, sys
from openpipe_lab.core import *

# %%
#| hide
from fastcore.test import *
import tempfile, io, contextlib

# %% [md]
# The command is a thin layer over the library: each subcommand calls one public function and prints its result,
# so whatever it shows is what the same call shows in a notebook. The read-only commands work on the default lab
# (`./.openpipe_lab`, or `$OPENPIPE_LAB_DIR` / `$OPENPIPE_LAB_DB`) or on the one given with `--lab DIR`.
#
# | command | what it does |
# |---|---|
# | `openpipe-lab demo [--dir D] [--rows N] [--steps N] [--small]` | the whole loop on this machine (see `13_demo`) |
# | `openpipe-lab logs [-n N] [--tag KEY=VALUE ...] [--model M]` | the most recent request logs |
# | `openpipe-lab datasets` | the lab's datasets with entry counts |
# | `openpipe-lab models` | the lab's fine-tuned models and their status |
# | `openpipe-lab deployments [--all]` | running (or all) model servers |
#
# Errors are our own (`OpenPipeLabError`) and print as one line on stderr with exit status 1, never as a traceback;
# Ctrl-C exits with status 130 after the command's own clean-up (the demo stops its servers and training worker).

# %%
#| export
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='openpipe-lab', description='The OpenPipe workflow on your own machine.')
    p.add_argument('--lab', metavar='DIR', help='lab directory (default: $OPENPIPE_LAB_DIR or ./.openpipe_lab)')
    sub = p.add_subparsers(dest='command', metavar='command')
    d = sub.add_parser('demo', help='run the end-to-end demo: logs -> dataset -> fine-tune -> deployment -> eval')
    d.add_argument('--dir', help='lab directory for the demo (default: ./.openpipe_lab/demo); each run starts afresh')
    d.add_argument('--rows', type=int, help='request logs to generate (default 300; --small: 100)')
    d.add_argument('--steps', type=int, help='LoRA training steps of 8 conversations (default 20; --small: 12)')
    d.add_argument('--small', action='store_true', help='a reduced run (fewer rows and steps): the same code path, for tests')
    d.add_argument('--port', type=int, help='port for the model server (default: a free one)')
    d.add_argument('--quiet', action='store_true', help='no progress bars')
    lg = sub.add_parser('logs', help='the most recent request logs')
    lg.add_argument('-n', type=int, default=20, help='how many (default 20)')
    lg.add_argument('--tag', action='append', default=[], metavar='KEY=VALUE', help='only logs with this metadata tag (repeatable)')
    lg.add_argument('--model', help='only logs for this model id')
    sub.add_parser('datasets', help="the lab's datasets")
    sub.add_parser('models', help="the lab's fine-tuned models")
    dp = sub.add_parser('deployments', help='model servers')
    dp.add_argument('--all', action='store_true', help='include stopped and failed deployments')
    return p

# %% [md]
# Tables print as plain text, wide enough for a terminal; long JSON cells are cut.

# %%
#| export
def _show(df, columns=None, empty: str = '(none)') -> str:
    "A DataFrame as terminal text (selected columns, long cells cut)."
    if df is None or len(df) == 0: return empty
    if columns: df = df[[c for c in columns if c in df.columns]]
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object: df[c] = df[c].map(lambda v: v if v is None or len(str(v)) <= 60 else str(v)[:57] + '...')
    return df.to_string(index=False)

def _tags(pairs: list) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition('=')
        if not sep or not k: raise ConfigError(f"--tag expects KEY=VALUE, got {p!r}")
        out[k] = v
    return out

def _store():
    from openpipe_lab.logstore import get_store
    return get_store()

def _cmd_logs(a) -> str:
    q = _store().filter(**({'model': a.model} if a.model else {}), **_tags(a.tag))
    df = q.latest(a.n)
    if len(df):
        import pandas as pd
        df['requested_at'] = pd.to_datetime(df['requested_at'], unit='ms', utc=True).dt.strftime('%Y-%m-%d %H:%M:%S')
    return _show(df, ['id', 'requested_at', 'model', 'status_code', 'duration_ms', 'cache_hit'] +
                 [c for c in df.columns if str(c).startswith('tag.') and not str(c).startswith('tag.$')], '(no logs)')

def _cmd_datasets(a) -> str:
    from openpipe_lab.dataset import Dataset
    return _show(Dataset.list(_store()), ['name', 'dataset_entry_count', 'fine_tune_count', 'updated'], '(no datasets)')

def _cmd_models(a) -> str:
    from openpipe_lab.finetune import FineTune
    return _show(FineTune.list(store=_store()), None, '(no models)')

def _cmd_deployments(a) -> str:
    from openpipe_lab.deployment import Deployment
    return _show(Deployment.list(_store(), all=a.all), None, '(no deployments)')

def _cmd_demo(a) -> str:
    from openpipe_lab.demo import run_demo
    report = run_demo(dir=a.dir, rows=a.rows, steps=a.steps, small=a.small, port=a.port, progress=not a.quiet)
    return f"report written to {report.path}"

_COMMANDS = {'logs': _cmd_logs, 'datasets': _cmd_datasets, 'models': _cmd_models, 'deployments': _cmd_deployments,
             'demo': _cmd_demo}

# %% [md]
# `main` is the console script (`openpipe-lab = openpipe_lab.cli:main` in `settings.ini`); it takes the argument
# list so tests and notebooks can call it directly, and returns the exit status.

# %%
#| export
def main(argv: list | None = None  # arguments (default: sys.argv[1:])
        ) -> int:
    "Run the `openpipe-lab` command; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."
    p = _parser()
    a = p.parse_args(argv)
    if not a.command:
        p.print_help(); return 2
    if a.lab: os.environ['OPENPIPE_LAB_DIR'] = a.lab
    try:
        out = _COMMANDS[a.command](a)
        if out: print(out)
        return 0
    except OpenPipeLabError as e:
        print(f"openpipe-lab {a.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"openpipe-lab {a.command}: interrupted", file=sys.stderr)
        return 130

# %% [md]
# The read-only commands on a small lab:

# %%
#| export
def _run(argv) -> tuple:
    "(exit status, stdout, stderr) of `main(argv)` (for tests and demos)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(argv)
    return code, out.getvalue(), err.getvalue()

# %%
from openpipe_lab.logstore import LogStore

# %%
lab = tempfile.mkdtemp()
logs = LogStore(f"{lab}/lab.db")
for i in range(3):
    logs.report(requested_at=1_760_000_000_000 + i, received_at=1_760_000_000_500 + i,
                req_payload={'model': 'gpt-4o-mini', 'messages': [{'role': 'user', 'content': f'hi {i}'}], 'metadata': {'prompt_id': 'greet'}},
                resp_payload={'id': f'c{i}', 'object': 'chat.completion', 'created': 0, 'model': 'gpt-4o-mini',
                              'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': 'hello'}}]})
logs.flush(); logs.close()
code, out, err = _run(['--lab', lab, 'logs', '--tag', 'prompt_id=greet', '-n', '2'])
print(out)

# %%
test_eq(code, 0)
test_eq(len(out.strip().splitlines()), 3)  # header + 2 rows
assert 'gpt-4o-mini' in out and 'greet' in out
test_eq(_run(['--lab', lab, 'datasets'])[1].strip(), '(no datasets)')
test_eq(_run(['--lab', lab, 'deployments'])[1].strip(), '(no deployments)')
code, out, err = _run(['--lab', lab, 'logs', '--tag', 'prompt_id'])
test_eq(code, 1); test_eq(err.strip(), "openpipe-lab logs: error: --tag expects KEY=VALUE, got 'prompt_id'")
del os.environ['OPENPIPE_LAB_DIR']
