"""Criterion throughput: judgements/s through `judge_many` at concurrency 16 against a loopback judge, and a cached
re-run of the same judgements, with the plain `openai` client sending the same requests as the baseline.

    python bench/criterion.py [--n 1000] [--concurrency 16]

Goals (issue 10): >= 50 judgements/s at concurrency 16 on the development machine; re-judging 1,000 rows from the lab
cache in < 1 s with zero upstream calls.

The fake OpenAI judge (tests/fakes, JSON verdicts with logprobs, as OpenAI sends them) runs in its own process so its
work does not take this process's GIL. Three measurements, one run, one machine:
- `plain openai`: the same judge requests (already built) sent with a plain `openai.OpenAI` from 16 threads: what the
  network path alone allows;
- `judge_many cold`: `Criterion.judge_many` on n new rows (templating, routing, logging, cache write, verdict parsing,
  logprob scoring): the ratio to `plain openai` is what the criterion layer costs;
- `judge_many cached`: the same rows again: every judgement from the lab cache, upstream requests counted by the fake.
"""
import argparse, json, math, os, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE = r'''
import sys, json, math, re
sys.path.insert(0, %r)
from fakes import FakeUpstream, Reply
def tok(t, p, alts=None):
    return {'token': t, 'logprob': math.log(p), 'bytes': None,
            'top_logprobs': [{'token': a, 'logprob': math.log(q), 'bytes': None} for a, q in ({t: p} | (alts or {})).items()]}
def judge(req):
    user = req.json['messages'][-1]['content']
    v = 'FAIL' if '@' in user.split('<output>')[-1] else 'PASS'
    content = json.dumps({'explanation': 'scripted', 'verdict': v})
    head, tail = content.rsplit(v, 1)
    return Reply(text=content, logprobs=[tok(head, 1.0), tok(v, 0.9, {('PASS' if v == 'FAIL' else 'FAIL'): 0.1}), tok(tail, 1.0)])
up = FakeUpstream(responder=judge).start()
print(up.openai_url, flush=True)
for line in sys.stdin: print(len(up.requests), flush=True)
''' % str(ROOT / 'tests')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=1000, help='rows judged')
    ap.add_argument('--concurrency', type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import openai
    from openpipe_lab.logstore import LogStore
    from openpipe_lab.criterion import Criterion
    fake = subprocess.Popen([sys.executable, '-c', FAKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = fake.stdout.readline().strip()
        def upstream_calls():
            fake.stdin.write('count\n'); fake.stdin.flush()
            return int(fake.stdout.readline())
        os.environ.update(OPENAI_BASE_URL=url, OPENAI_API_KEY='sk-bench')
        lab = LogStore(Path(tempfile.mkdtemp()) / 'lab.db')
        crit = Criterion('no-email', prompt='Mark the criterion as failed if the output contains an email address; passed otherwise.', store=lab)
        rows = [{'output': f'Regards, person {i}' + (f' (p{i}@example.com)' if i % 4 == 0 else ''),
                 'messages': [{'role': 'user', 'content': f'Sign off as person {i}.'}]} for i in range(args.n)]
        warm = [{'output': f'warm-up {i}'} for i in range(32)]
        crit.judge_many(warm, concurrency=args.concurrency, progress=False)          # connections, imports, version row
        # baseline: the same requests through a plain openai client
        plain = openai.OpenAI(base_url=url, api_key='sk-bench', max_retries=0)
        reqs = [crit.judge_request(r['output'], r['messages']) for r in rows]
        with ThreadPoolExecutor(args.concurrency) as pool:
            t = time.perf_counter(); list(pool.map(lambda q: plain.chat.completions.create(**q), reqs)); plain_s = time.perf_counter() - t
        before = upstream_calls()
        t = time.perf_counter(); cold = crit.judge_many(rows, concurrency=args.concurrency, progress=False); cold_s = time.perf_counter() - t
        mid = upstream_calls()
        t = time.perf_counter(); hot = crit.judge_many(rows, concurrency=args.concurrency, progress=False); hot_s = time.perf_counter() - t
        after = upstream_calls()
        lab.flush()
        assert all(r['error'] is None for r in cold + hot), [r['error'] for r in cold + hot if r['error']][:3]
        assert [r['score'] for r in cold] == [r['score'] for r in hot]
        fails = sum(r['score'] < 0.5 for r in cold)
        print(f"machine: {os.cpu_count()} CPUs; n={args.n} rows, concurrency {args.concurrency}; judge: loopback fake (separate process)")
        print(f"plain openai, same requests     : {args.n / plain_s:8.1f} req/s   ({plain_s:.2f} s)")
        print(f"judge_many cold                 : {args.n / cold_s:8.1f} judgements/s ({cold_s:.2f} s, {mid - before} upstream calls)"
              f"  = {plain_s / cold_s:.2f}x the plain client's rate   [goal >= 50/s]")
        print(f"judge_many cached re-run        : {hot_s:8.3f} s for {args.n} ({args.n / hot_s:.0f}/s, {after - mid} upstream calls)"
              f"  = {cold_s / hot_s:.1f}x faster than cold   [goal < 1 s, 0 calls]")
        print(f"verdicts: {fails} FAIL of {args.n} (expected {sum(1 for i in range(args.n) if i % 4 == 0)})")
    finally:
        fake.stdin.close(); fake.terminate(); fake.wait(10)


if __name__ == '__main__':
    main()
