# %%
#| default_exp eval

# %% [md]
# # Eval
#
# > Compare models on a dataset's TEST split: generate every model's output through the logging client
# > (concurrent, cached), score each output with code graders run in an isolated worker process, and report
# > mean scores with bootstrap intervals.

# %%
#| export
from __future__ import annotations
import json, math, os, numbers, random, traceback, functools
import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor, as_completed
from fastcore.basics import patch
from openpipe_lab.core import *
from openpipe_lab.formats import split_output

# %%
#| hide
from fastcore.test import *
import tempfile, time, re
import numpy as np
import matplotlib

# %% [md]
# ## What an evaluation is
#
# The hosted product evaluates models on a dataset's **TEST** entries: for each entry, each model answers the
# entry's input messages (with the entry's tools, tool choice and response format), and the answers are scored.
# The entry's own output is shown next to them as a model named **`"dataset"`** — the reference every grader
# compares against, and a sanity check (it should score 1.0 on any grader that compares with it).
#
# A **code evaluation** scores an output with a function. The spec's grader receives `messages`, `tools`,
# `toolChoice`, `generatedOutput` and `datasetOutput` and returns a number in `[0, 1]`; ours is the same function
# in Python, with the arguments in snake case:
#
# ```python
# def grader(messages, tools, tool_choice, generated_output, dataset_output) -> float: ...
# ```
#
# `generated_output` and `dataset_output` are assistant message dicts (`content`, `tool_calls`, `refusal`), exactly
# the spec's `ChatCompletionMessage`.
#
# ## The two grader templates
#
# **Exact Match** (the spec's template): the content and every tool call (name and argument string) must be
# identical.

# %%
#| export
def _tool_calls(message: dict | None) -> list | None:
    calls = (message or {}).get('tool_calls')
    return calls or None

def _exact_tool_calls_match(calls1: list | None, calls2: list | None) -> bool:
    "The spec's `exactToolCallsMatch`: both absent, or the same names and argument strings in the same order."
    if not calls1 and not calls2: return True
    if not calls1 or not calls2 or len(calls1) != len(calls2): return False
    for c1, c2 in zip(calls1, calls2):
        f1, f2 = (c1 or {}).get('function') or {}, (c2 or {}).get('function') or {}
        if f1.get('name') != f2.get('name') or f1.get('arguments') != f2.get('arguments'): return False
    return True

def exact_match(messages, tools, tool_choice, generated_output, dataset_output) -> float:
    "1.0 when the generated content and tool calls equal the dataset output's exactly, else 0.0 (the spec's Exact Match)."
    if not _exact_tool_calls_match(_tool_calls(generated_output), _tool_calls(dataset_output)): return 0.0
    if (generated_output or {}).get('content') != (dataset_output or {}).get('content'): return 0.0
    return 1.0

# %%
hello = {'role': 'assistant', 'content': 'Hello [NAME]'}
call = lambda args: {'role': 'assistant', 'content': None,
                     'tool_calls': [{'id': 'c0', 'type': 'function', 'function': {'name': 'judge', 'arguments': args}}]}
test_eq(exact_match([], None, None, hello, dict(hello)), 1.0)
test_eq(exact_match([], None, None, {'role': 'assistant', 'content': 'Hello Ann'}, hello), 0.0)
test_eq(exact_match([], None, None, call('{"score": 1}'), call('{"score": 1}')), 1.0)
test_eq(exact_match([], None, None, call('{"score":1}'), call('{"score": 1}')), 0.0)  # argument strings compared as text
test_eq(exact_match([], None, None, hello, call('{"score": 1}')), 0.0)

# %% [md]
# **Argument Comparison**: the spec's template parses the first tool call's arguments on both sides as JSON and
# compares one argument (`score`). Ours compares the parsed arguments — all of them by default, or only `keys` —
# so formatting differences (spaces, key order) do not count. Arguments that are not valid JSON, or a missing tool
# call, score 0. Pick the keys with `functools.partial(argument_comparison, keys=['score'])`.

# %%
#| export
def _first_arguments(message: dict | None):
    calls = _tool_calls(message)
    args = ((calls[0] or {}).get('function') or {}).get('arguments') if calls else None
    if not args: return None
    try: return json.loads(args)
    except (TypeError, ValueError): return None

def argument_comparison(messages, tools, tool_choice, generated_output, dataset_output,
                        keys: list | None = None  # compare only these arguments; None: all of them
                       ) -> float:
    "1.0 when the first tool call's arguments, parsed as JSON, equal the dataset output's (or agree on `keys`)."
    gen, ref = _first_arguments(generated_output), _first_arguments(dataset_output)
    if gen is None or ref is None: return 0.0
    if keys is None: return float(gen == ref)
    if not isinstance(gen, dict) or not isinstance(ref, dict): return 0.0
    return float(all(k in gen and gen[k] == ref.get(k) for k in keys))

# %%
test_eq(argument_comparison([], None, None, call('{"score":1, "explanation":"x"}'), call('{"explanation": "x", "score": 1}')), 1.0)
test_eq(argument_comparison([], None, None, call('{"score": 1, "explanation": "y"}'), call('{"score": 1, "explanation": "x"}')), 0.0)
by_score = functools.partial(argument_comparison, keys=['score'])
test_eq(by_score([], None, None, call('{"score": 1, "explanation": "y"}'), call('{"score": 1, "explanation": "x"}')), 1.0)
test_eq(argument_comparison([], None, None, call('not json'), call('{"score": 1}')), 0.0)
test_eq(argument_comparison([], None, None, hello, call('{"score": 1}')), 0.0)

# %% [md]
# ## Running graders in isolation
#
# A grader is user code run over every output: it may raise on an output it did not expect, loop forever, or
# return something that is not a score. None of that may kill the evaluation or hang the notebook. So graders run in
# a **worker process** (one per grader, reused across rows): each call has a timeout, after which the worker is
# killed and a fresh one takes the next row. A row whose grader raised, timed out, crashed the process or returned
# anything but a number in `[0, 1]` (booleans count as 0/1) gets `score=None` and the reason in `error`; the run goes on.
#
# The worker is forked, so a grader defined in a notebook cell (or a lambda, or a closure) works without being
# importable. On platforms without `fork` the grader must be picklable (a module-level function).

# %%
#| export
def _grader_name(grader) -> str:
    fn = grader.func if isinstance(grader, functools.partial) else grader
    return getattr(fn, '__name__', None) or type(fn).__name__

def _check_score(value) -> tuple:
    "(score, error) for what a grader returned."
    if isinstance(value, bool): return float(value), None
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v) or not 0.0 <= v <= 1.0: return None, f"grader returned {value!r}; a score must be a number in [0, 1]"
        return v, None
    return None, f"grader returned {type(value).__name__} {value!r:.60}; a score must be a number in [0, 1]"

def _grader_loop(conn, grader):
    "Worker process: score the rows sent over `conn` until it is closed or sent None."
    while True:
        try: job = conn.recv()
        except EOFError: return
        if job is None: return
        try:
            value = grader(**job)
            reply = _check_score(value)
        except BaseException as e:
            reply = (None, f"grader raised {type(e).__name__}: {e}"[:500])
        conn.send(reply)

class _GraderWorker:
    "One grader in its own process; `score(kwargs)` returns (score, error) within `timeout` seconds."
    def __init__(self, grader, timeout: float):
        self.grader, self.timeout, self.proc = grader, timeout, None
        self.ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')

    def _start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_grader_loop, args=(child, self.grader), daemon=True,
                                     name=f"openpipe-lab grader {_grader_name(self.grader)}")
        self.proc.start()
        child.close()

    def score(self, kwargs: dict) -> tuple:
        if self.proc is None or not self.proc.is_alive(): self._start()
        try:
            self.conn.send(kwargs)
            if self.conn.poll(self.timeout): return self.conn.recv()
            self.close()
            return None, f"grader timed out after {self.timeout:g} s"
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            if self.proc is not None: self.proc.join(2)
            code = self.proc.exitcode if self.proc is not None else None
            self.close()
            return None, f"grader process died (exit code {code})"

    def close(self):
        if self.proc is None: return
        try: self.conn.send(None)
        except Exception: pass
        self.proc.join(0.2)
        if self.proc.is_alive():
            self.proc.kill(); self.proc.join(5)
        self.conn.close()
        self.proc = None

# %%
def slow(messages, tools, tool_choice, generated_output, dataset_output):
    if generated_output['content'] == 'hang': time.sleep(60)
    if generated_output['content'] == 'raise': raise KeyError('score')
    if generated_output['content'] == 'junk': return 'great'
    if generated_output['content'] == 'exit': os._exit(3)
    return 0.5

w = _GraderWorker(slow, timeout=1)
args = lambda c: dict(messages=[], tools=None, tool_choice=None, generated_output={'content': c}, dataset_output={'content': 'x'})
test_eq(w.score(args('ok')), (0.5, None))
test_eq(w.score(args('raise')), (None, "grader raised KeyError: 'score'"))
test_eq(w.score(args('junk')), (None, "grader returned str 'great'; a score must be a number in [0, 1]"))
t0 = time.monotonic(); test_eq(w.score(args('hang')), (None, 'grader timed out after 1 s')); assert time.monotonic() - t0 < 5
test_eq(w.score(args('exit')), (None, 'grader process died (exit code 3)'))
test_eq(w.score(args('ok')), (0.5, None))  # a fresh worker took over
w.close()
test_eq(_check_score(True), (1.0, None))
test_eq(_check_score(float('nan'))[1], "grader returned nan; a score must be a number in [0, 1]")
test_eq(_check_score(1.5)[1], "grader returned 1.5; a score must be a number in [0, 1]")

# %% [md]
# ## Confidence intervals
#
# A mean over 20 test rows is noisy, so every mean comes with a **95% bootstrap interval**: resample the scores
# with replacement many times, take each resample's mean, and report the 2.5th and 97.5th percentiles of those
# means (the percentile bootstrap). It needs no assumption about the score distribution (scores are often 0/1) and
# is seeded, so a report is reproducible.

# %%
#| export
def bootstrap_ci(scores,  # the scores (numbers); empty gives NaNs
                 level: float = 0.95,  # coverage of the interval
                 n_resamples: int = 2000,  # bootstrap resamples
                 seed: int = 0  # resampling seed (same scores + seed -> same interval)
                ) -> tuple:
    "(mean, low, high): the mean of `scores` and its percentile-bootstrap confidence interval."
    import numpy as np
    x = np.asarray([float(s) for s in scores], dtype=float)
    if len(x) == 0: return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(x.mean()), float(low), float(high))

# %% [md]
# Checked against a direct computation: the same resamples drawn one at a time with the same generator, their means
# sorted, and the percentiles read off by hand (linear interpolation, numpy's default).

# %%
scores = [1, 0, 1, 1, 0.5, 0, 1, 1, 1, 0.25]
mean, low, high = bootstrap_ci(scores, n_resamples=500, seed=3)
rng = np.random.default_rng(3)
draws = rng.integers(0, len(scores), size=(500, len(scores)))
means = sorted(sum(scores[i] for i in row) / len(scores) for row in draws)
def pct(q):
    pos = q * (len(means) - 1); lo = int(math.floor(pos))
    return means[lo] + (means[min(lo + 1, len(means) - 1)] - means[lo]) * (pos - lo)
test_close(mean, sum(scores) / len(scores))
test_close(low, pct(0.025)); test_close(high, pct(0.975))
assert low < mean < high
test_eq(bootstrap_ci([1, 1, 1]), (1.0, 1.0, 1.0))
assert all(math.isnan(v) for v in bootstrap_ci([]))
# large sample: close to the normal interval mean ± 1.96·sd/√n
big = [float(i % 3 == 0) for i in range(3000)]
m, lo, hi = bootstrap_ci(big)
half = 1.96 * np.std(big) / math.sqrt(len(big))
assert abs((hi - lo) / 2 - half) < 0.1 * half, (lo, hi, half)

# %% [md]
# ## Which entries are evaluated
#
# `Eval` takes a dataset split view (`ds.test`), a `Dataset` (its TEST split is used, as in the hosted product), or
# any list of entries in the dataset format (messages ending with the assistant output). Each becomes an input
# (messages without the final assistant message, plus tools / tool choice / response format) and a reference output.

# %%
#| export
def _eval_entries(data) -> tuple:
    "(name, entries) for what `Eval` was given; each entry has id, messages, tools, tool_choice, response_format, output."
    from openpipe_lab.dataset import Dataset, DatasetSplit
    if isinstance(data, Dataset): data = data.test
    if isinstance(data, DatasetSplit): name, rows = data.name, data.entries(0, None)
    elif isinstance(data, (list, tuple)) or hasattr(data, '__iter__') and not isinstance(data, (str, bytes, dict)):
        name, rows = 'entries', list(data)
    else: raise ConfigError(f"Eval needs a Dataset, a split view like ds.test, or a list of entries; got {type(data).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get('messages'), list):
            raise ConfigError(f"entry {i} must be a dict with a 'messages' list, got {type(row).__name__}")
        inp, output = split_output(row['messages'])
        out.append({'id': row.get('id', i), 'messages': inp, 'output': output,
                    **{k: row.get(k) for k in ('tools', 'tool_choice', 'response_format')}})
    return name, out

# %%
def entry(user, answer): return {'messages': [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': answer}]}
name, es = _eval_entries([entry('Hi, I am Ann', 'Hi, I am [NAME]'), entry('Call 555-0101', 'Call [PHONE]')])
test_eq(es[1], {'id': 1, 'messages': [{'role': 'user', 'content': 'Call 555-0101'}], 'output': {'role': 'assistant', 'content': 'Call [PHONE]'},
                'tools': None, 'tool_choice': None, 'response_format': None})
test_fail(lambda: _eval_entries('data.jsonl'), contains='Eval needs a Dataset')

# %% [md]
# ## `Eval`
#
# `Eval(data, models=[...])` only stores configuration; `code(grader)` adds a grader (the templates by name,
# `'exact_match'` or `'argument_comparison'`, or any function); `run()` does the work and returns the object:
#
# 1. **Generate**: every model answers every entry. A model is a model id the lab client routes
#    (`'openpipe:pii-smol'` for a running deployment, `'gpt-4o-mini'`, `'anthropic:...'`), or a Python callable
#    `fn(messages, tools, tool_choice, response_format) -> str | message dict` (a rule-based baseline, a stub in a
#    test). Model ids go through `store.openai()`, so every call is **recorded** in the lab like any other request
#    (tagged `eval=<name>`) and **cached** (`openpipe={"cache": "readWrite"}`): re-running an eval, or adding a
#    grader and re-running, does not pay for the generations again. Calls run concurrently (`concurrency`) with a
#    progress bar; greedy decoding (`temperature=0`) keeps the comparison fair and the cache useful.
# 2. **Score**: each grader scores each output in its worker process.
#
# Results land in trailing-underscore attributes: `outputs_` (one row per entry and model), `results_` (one row per
# entry, model and grader: `entry, model, grader, score, error`) and `scores_` (per model and grader: mean, 95%
# interval, counts). `plot()` draws the scores. Head-to-head and criterion evaluations will be further graders on
# the same object (`.head_to_head(...)`, `.criterion(...)`), scored in the same `run()`.

# %%
#| export
_TEMPLATES = {'exact_match': exact_match, 'argument_comparison': argument_comparison}
_SCORE_COLUMNS = ['model', 'grader', 'mean', 'ci_low', 'ci_high', 'n', 'errors']

class Eval:
    "Compare models on a dataset's TEST entries with code graders; results in `results_`, `scores_`."
    def __init__(self, data,  # `ds.test`, a `Dataset` (its TEST split) or a list of entries
                 models: list = (),  # model ids the lab client routes, or callables; 'dataset' is the reference output
                 store=None,  # LogStore generations are recorded in; None: the data's store, else the default lab
                 name: str | None = None,  # tag put on every generation request (`eval=<name>`)
                 concurrency: int = 8,  # generation requests in flight at once
                 temperature: float = 0.0,  # sampling temperature for generations
                 max_tokens: int | None = None,  # cap on generated tokens per output
                 cache: bool = True,  # read and write the lab's completion cache
                 client=None,  # an OpenAI-compatible client to generate with; None: `store.openai()`
                 progress: bool = True  # show a progress bar while generating
                ):
        self.data, self.store, self.client = data, store, client
        self.models = self._check_models(models)
        self.name, self.concurrency, self.temperature, self.max_tokens = name, concurrency, temperature, max_tokens
        self.cache, self.progress = cache, progress
        self.graders = []

    @staticmethod
    def _check_models(models) -> list:
        if isinstance(models, (str, bytes)) or callable(models): models = [models]
        out = ['dataset']
        for m in models:
            if not (isinstance(m, str) and m) and not callable(m):
                raise ConfigError(f"a model must be a model id string or a callable, got {type(m).__name__}")
            if m not in out: out.append(m)
        names = [_model_name(m) for m in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup: raise ConfigError(f"two models share the name {dup[0]!r}; give callables distinct __name__s")
        return out

    @property
    def model_names(self) -> list: return [_model_name(m) for m in self.models]

    def __repr__(self):
        state = f"{len(self.results_)} results" if hasattr(self, 'results_') else 'not run'
        return (f"Eval({self.name or _data_name(self.data)!r}, models={self.model_names}, "
                f"graders={[g['name'] for g in self.graders]}, {state})")

def _model_name(model) -> str: return model if isinstance(model, str) else _grader_name(model)

def _data_name(data) -> str: return getattr(data, 'name', None) or 'entries'

# %% [md]
# `code(grader, name=None, timeout=10)` adds a code grader; adding two graders with the same name is an error
# (results are keyed by grader name).

# %%
#| export
@patch
def code(self: Eval, grader,  # a function `grader(messages, tools, tool_choice, generated_output, dataset_output) -> float`, or a template name
          name: str | None = None,  # its name in the results (default: the function's name)
          timeout: float = 10.0  # seconds one call may take before the row is marked as an error
         ) -> Eval:
    "Add a code grader (scores in [0, 1]); returns self so calls chain."
    if isinstance(grader, str):
        if grader not in _TEMPLATES: raise ConfigError(f"unknown grader template {grader!r}; templates: {sorted(_TEMPLATES)}")
        grader = _TEMPLATES[grader]
    if not callable(grader): raise ConfigError(f"a grader must be callable or a template name, got {type(grader).__name__}")
    name = name or _grader_name(grader)
    if name in [g['name'] for g in self.graders]: raise ConfigError(f"this Eval already has a grader named {name!r}; pass name=...")
    self.graders.append({'kind': 'code', 'name': name, 'fn': grader, 'timeout': float(timeout)})
    return self

# %%
ev = Eval([entry('Hi, I am Ann', 'Hi, I am [NAME]')], models=['openpipe:pii-smol']).code('exact_match').code(lambda **kw: 1.0, name='always')
ev

# %%
test_eq(ev.model_names, ['dataset', 'openpipe:pii-smol'])
test_eq([g['name'] for g in ev.graders], ['exact_match', 'always'])
test_fail(lambda: ev.code('exact_match'), contains="already has a grader named 'exact_match'")
test_fail(lambda: ev.code('fuzzy'), contains="unknown grader template 'fuzzy'")
test_fail(lambda: Eval([], models=[3]), contains='a model must be a model id string or a callable')

# %% [md]
# ### Generation
#
# Each (entry, model) pair is one job. For a model id the request carries the entry's input messages and request
# parameters; for the `"dataset"` model the output is the entry's own. The output is kept as an assistant message
# dict (`role`, `content`, `tool_calls` when present); a failed call becomes an error on that row, not an exception.

# %%
#| export
def _message_dict(message) -> dict:
    if isinstance(message, str): return {'role': 'assistant', 'content': message}
    if hasattr(message, 'model_dump'): message = message.model_dump(exclude_none=True)
    if not isinstance(message, dict): raise TypeError(f"expected a message, got {type(message).__name__}")
    out = {'role': 'assistant', 'content': message.get('content')}
    if message.get('tool_calls'): out['tool_calls'] = [
        {'id': tc.get('id'), 'type': 'function', 'function': {'name': tc['function']['name'], 'arguments': tc['function'].get('arguments')}}
        for tc in message['tool_calls']]
    if message.get('refusal'): out['refusal'] = message['refusal']
    return out

@patch
def _lab_client(self: Eval):
    if self.client is not None: return self.client
    if self.store is None:
        from openpipe_lab.logstore import get_store
        self.store = getattr(self.data, 'store', None) or get_store()
    self.client = self.store.openai()  # no OpenAI key needed for local models; an OpenAI model without one errors on its rows
    return self.client

@patch
def _generate(self: Eval, model, entry: dict) -> dict:
    "One output: {'output': message dict or None, 'error': str or None, 'duration_ms': int}."
    t0 = now_ms()
    try:
        if model == 'dataset': msg = entry['output']
        elif callable(model):
            msg = _message_dict(model(entry['messages'], entry['tools'], entry['tool_choice'], entry['response_format']))
        else:
            req = dict(model=model, messages=entry['messages'], temperature=self.temperature)
            for k in ('tools', 'tool_choice', 'response_format'):
                if entry[k] is not None: req[k] = entry[k]
            if self.max_tokens: req['max_tokens'] = self.max_tokens
            opts = {'tags': {'eval': self.name or _data_name(self.data)}}
            if self.cache: opts['cache'] = 'readWrite'
            resp = self._lab_client().chat.completions.create(**req, openpipe=opts)
            msg = _message_dict(resp.choices[0].message)
        return {'output': msg, 'error': None, 'duration_ms': now_ms() - t0}
    except Exception as e:
        return {'output': None, 'error': f"{type(e).__name__}: {e}"[:500], 'duration_ms': now_ms() - t0}

@patch
def _generate_all(self: Eval, entries: list) -> list:
    "Every (entry, model) output, concurrently, in entry-major order."
    jobs = [(e, m) for e in entries for m in self.models]
    results = [None] * len(jobs)
    from tqdm.auto import tqdm
    n_remote = sum(1 for _, m in jobs if isinstance(m, str) and m != 'dataset')
    with tqdm(total=len(jobs), desc=f"generating ({len(self.models)} models × {len(entries)} entries)", unit='output',
              disable=not self.progress or n_remote == 0, leave=False) as bar, \
         ThreadPoolExecutor(max(1, self.concurrency), thread_name_prefix='eval') as pool:
        futures = {pool.submit(self._generate, m, e): i for i, (e, m) in enumerate(jobs)}
        for f in as_completed(futures):
            results[futures[f]] = f.result(); bar.update(1)
    return [{'entry': e['id'], 'model': _model_name(m), **r} for (e, m), r in zip(jobs, results)]

# %% [md]
# ### Scoring and summaries
#
# A row whose generation failed is not given to the graders: it gets the generation error. Means and intervals are
# over the rows that have a score; `errors` counts the rest, so a model that fails half its calls cannot hide behind
# a good mean of the other half.

# %%
#| export
@patch
def _score_all(self: Eval, entries: list, outputs: list) -> list:
    by_id = {e['id']: e for e in entries}
    rows = []
    for g in self.graders:
        worker = _GraderWorker(g['fn'], g['timeout'])
        try:
            for o in outputs:
                e = by_id[o['entry']]
                if o['error'] is not None: score, error = None, f"generation failed: {o['error']}"
                elif e['output'] is None: score, error = None, 'the entry has no dataset output to compare with'
                else:
                    score, error = worker.score(dict(messages=e['messages'], tools=e['tools'], tool_choice=e['tool_choice'],
                                                     generated_output=o['output'], dataset_output=e['output']))
                rows.append({'entry': o['entry'], 'model': o['model'], 'grader': g['name'], 'score': score, 'error': error})
        finally: worker.close()
    return rows

def _summarise(results, models: list, graders: list, level: float = 0.95):
    import pandas as pd
    out = []
    for g in graders:
        for m in models:
            sub = results[(results.model == m) & (results.grader == g)]
            ok = sub.score.dropna()
            mean, low, high = bootstrap_ci(ok.tolist(), level=level)
            out.append({'model': m, 'grader': g, 'mean': mean, 'ci_low': low, 'ci_high': high,
                        'n': int(len(ok)), 'errors': int(sub.error.notna().sum())})
    return pd.DataFrame(out, columns=_SCORE_COLUMNS)

@patch
def run(self: Eval) -> Eval:
    "Generate every model's output for every entry, score them with every grader; returns self."
    import pandas as pd
    if not self.graders: raise ConfigError("this Eval has no grader: add one with .code('exact_match') or .code(my_grader)")
    self.data_name_, entries = _eval_entries(self.data)
    if not entries: raise EvalError(f"{_data_name(self.data)} has no entries to evaluate (a dataset's TEST split may be empty: ds.split(test_fraction=0.1))")
    t0 = now_ms()
    outputs = self._generate_all(entries)
    self.outputs_ = pd.DataFrame([{**o, 'content': (o['output'] or {}).get('content')} for o in outputs],
                                 columns=['entry', 'model', 'content', 'output', 'error', 'duration_ms'])
    self.generation_s_ = (now_ms() - t0) / 1000
    t1 = now_ms()
    self.results_ = pd.DataFrame(self._score_all(entries, outputs), columns=['entry', 'model', 'grader', 'score', 'error'])
    self.results_['score'] = self.results_['score'].astype(float)
    self.scoring_s_ = (now_ms() - t1) / 1000
    self.scores_ = _summarise(self.results_, self.model_names, [g['name'] for g in self.graders])
    return self


# %% [md]
# A complete offline evaluation: two rule-based "models" (a callable each) against the dataset output, graded with
# the Exact Match template and a custom grader that only checks no PII is left.

# %%
data = [entry('Hi, I am Ann Lee', 'Hi, I am [NAME]'), entry('Call 555-0101 please', 'Call [PHONE] please'),
        entry('Mail ann@x.io', 'Mail [EMAIL]'), entry('Thanks, Bo', 'Thanks, [NAME]')]
def echo(messages, tools, tool_choice, response_format): return messages[-1]['content']
def rules(messages, tools, tool_choice, response_format):
    text = messages[-1]['content']
    text = re.sub(r'\S+@\S+', '[EMAIL]', text); text = re.sub(r'\d{3}-\d{4}', '[PHONE]', text)
    return re.sub(r'(I am|Thanks,) [A-Z]\w+( [A-Z]\w+)?', r'\1 [NAME]', text)
def no_digits(messages, tools, tool_choice, generated_output, dataset_output):
    return float(not any(c.isdigit() for c in generated_output['content']))
ev = Eval(data, models=[echo, rules], progress=False).code('exact_match').code(no_digits).run()
ev.scores_[['model', 'grader', 'mean', 'ci_low', 'ci_high', 'n', 'errors']]

# %%
test_eq(ev.results_.columns.tolist(), ['entry', 'model', 'grader', 'score', 'error'])
test_eq(len(ev.results_), 4 * 3 * 2)
s = ev.scores_.set_index(['model', 'grader'])['mean']
test_eq(s[('dataset', 'exact_match')], 1.0)
test_eq(s[('rules', 'exact_match')], 1.0)
test_eq(s[('echo', 'exact_match')], 0.0)
test_eq(s[('echo', 'no_digits')], 0.75)
test_eq(ev.outputs_.query("model == 'echo'").content.tolist(), [e['messages'][0]['content'] for e in data])

# %% [md]
# A grader that misbehaves on some rows only costs those rows: here one raises on a row and hangs on another; the
# rows get their error and the means are over the rest.

# %%
def fragile(messages, tools, tool_choice, generated_output, dataset_output):
    if 'Bo' in generated_output['content']: raise ValueError('cannot grade Bo')
    if '555' in generated_output['content']: time.sleep(30)
    return 1.0
ev2 = Eval(data, models=[echo], progress=False).code(fragile, timeout=1).run()
ev2.results_.query("model == 'echo'")

# %%
r = ev2.results_.query("model == 'echo'").set_index('entry')
test_eq(r.loc[3, 'error'], 'grader raised ValueError: cannot grade Bo')
test_eq(r.loc[1, 'error'], 'grader timed out after 1 s')
test_eq(r.score.tolist()[0], 1.0)
test_eq(ev2.scores_.query("model == 'echo'")[['n', 'errors']].values.tolist(), [[2, 2]])

# %% [md]
# A generation that fails (here a callable that raises) is an error row for every grader, and the other models'
# rows are unaffected:

# %%
def broken(messages, tools, tool_choice, response_format): raise RuntimeError('model offline')
ev3 = Eval(data[:2], models=[broken], progress=False).code('exact_match').run()
test_eq(ev3.results_.query("model == 'broken'").error.tolist(), ['generation failed: RuntimeError: model offline'] * 2)
test_eq(ev3.scores_.set_index('model').loc['dataset', 'mean'], 1.0)
test_fail(lambda: Eval(data).run(), contains='has no grader')
test_fail(lambda: Eval([]).code('exact_match').run(), contains='has no entries')

# %% [md]
# ## Reporting
#
# `plot()` draws one panel per grader: each model's mean score with its 95% interval. `to_markdown()` gives the
# same numbers as a table for reports (and the notebook display).

# %%
#| export
@patch
def plot(self: Eval, path=None,  # also save the figure here (PNG, SVG, ...)
         title: str | None = None,  # figure title
         labels: dict | None = None  # display names for models, e.g. {'openpipe:pii-smol': 'fine-tuned'}
        ):
    "A matplotlib Figure: one panel per grader, a bar per model with its 95% interval; saved to `path` if given."
    if not hasattr(self, 'scores_'): raise EvalError("nothing to plot yet: call .run() first")
    import numpy as np
    import matplotlib.pyplot as plt
    graders = list(dict.fromkeys(self.scores_.grader))
    names = [(labels or {}).get(m, m) for m in self.model_names]
    width = 3.4 * len(graders) + 0.075 * max(len(n) for n in names) + 0.6
    fig, axes = plt.subplots(1, len(graders), figsize=(width, 0.55 * len(names) + 1.5), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], graders):
        s = self.scores_[self.scores_.grader == g].iloc[::-1]
        y = [(labels or {}).get(m, m) for m in s.model]
        means = s['mean'].fillna(0).to_numpy()
        err = np.vstack([(s['mean'] - s['ci_low']).fillna(0).to_numpy(), (s['ci_high'] - s['mean']).fillna(0).to_numpy()])
        ax.barh(y, means, xerr=err, color='#4c72b0', ecolor='#333333', capsize=3)
        for i, m in enumerate(means):
            inside = m > 0.3
            ax.text(m - 0.03 if inside else m + 0.03, i, f"{m:.2f}", va='center', ha='right' if inside else 'left',
                    color='white' if inside else 'black', fontsize=9)
        ax.set_xlim(0, 1.05); ax.set_title(g); ax.set_xlabel('mean score, 95% CI')
    if title: fig.suptitle(title)
    fig.tight_layout()
    if path is not None: fig.savefig(path, dpi=110)
    return fig

@patch
def to_markdown(self: Eval, digits: int = 2) -> str:
    "The scores as a markdown table (model, grader, mean, 95% interval, n, errors)."
    if not hasattr(self, 'scores_'): return repr(self)
    lines = ['| model | grader | mean | 95% CI | n | errors |', '|---|---|---|---|---|---|']
    for r in self.scores_.itertuples():
        f = lambda v: 'n/a' if v != v else f"{v:.{digits}f}"
        lines.append(f"| {r.model} | {r.grader} | {f(r.mean)} | [{f(r.ci_low)}, {f(r.ci_high)}] | {r.n} | {r.errors} |")
    return '\n'.join(lines)

@patch
def _repr_markdown_(self: Eval): return f"`{self!r}`\n\n" + (self.to_markdown() if hasattr(self, 'scores_') else '')

# %%
matplotlib.use('Agg')
with tempfile.TemporaryDirectory() as d:
    fig = ev.plot(path=f"{d}/scores.png")
    assert os.path.getsize(f"{d}/scores.png") > 5000
test_eq(len(fig.axes), 2)
test_eq([t.get_text() for t in fig.axes[0].get_yticklabels()], ['rules', 'echo', 'dataset'])
print(ev.to_markdown())
test_fail(lambda: Eval(data).code('exact_match').plot(), contains='call .run() first')
