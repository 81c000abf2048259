"""Eval throughput: (a) head-to-head judge calls per second through the lab client at concurrency 16 against a
loopback judge, with concurrency 1 in the same run as the baseline; (b) the wall time of a cached re-run of an eval
(generations + head-to-head + code grader) as a ratio to its first run.

    python bench/eval.py [--entries 200] [--latency 0.02]

The loopback judge is the wire-compatible fake of tests/fakes (real HTTP, the real openai SDK inside the lab
client), answering every request after `--latency` seconds, which stands in for a provider's time to answer: with
it, (a) shows how much of that latency concurrency hides, and (b) what a re-run costs when every call is a cache
hit. Models are loopback too (`openpipe:loop/<name>`), so generation goes through the client and the cache as well.
Compare only the ratios printed by one run: absolute rates depend on the machine and its load.
"""
import argparse, json, os, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from fakes import FakeUpstream, Reply  # noqa: E402
from openpipe_lab.logstore import LogStore  # noqa: E402
from openpipe_lab.eval import Eval  # noqa: E402
import openpipe_lab.pairwise  # noqa: E402,F401  (Eval.head_to_head is defined by the pairwise layer)


def responder(latency):
    def answer(received):
        body = received.json
        time.sleep(latency)
        text = body['messages'][-1]['content']
        if '<response_a>' in text:
            a = text.split('<response_a>\n')[1].split('\n</response_a>')[0]
            b = text.split('<response_b>\n')[1].split('\n</response_b>')[0]
            return Reply(text=json.dumps({'explanation': 'the shorter one', 'verdict': 'A' if len(a) < len(b) else 'B'}))
        return Reply(text=('short ' if 'short' in body['model'] else 'a longer answer to ') + text)
    return answer


def data(n):
    return [{'messages': [{'role': 'user', 'content': f'question {i}'}, {'role': 'assistant', 'content': f'answer {i}'}]}
            for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--entries', type=int, default=200)
    ap.add_argument('--latency', type=float, default=0.02, help='seconds the fake takes to answer each call')
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    os.environ['FAKE_KEY'] = 'k'
    with FakeUpstream(responder=responder(args.latency)) as up:
        lab = LogStore(str(d / 'lab.db'), dir=d)
        lab.add_provider('loop', base_url=up.openai_url, api_key_env='FAKE_KEY')
        rows = data(args.entries)
        models = ['openpipe:loop/short', 'openpipe:loop/long']
        # (a) judge calls/s: generations first (not timed here), then the head-to-head alone, cache off for the judge
        rates = {}
        for conc in (1, 16):
            ev = Eval(rows, models=models, store=lab, name=f'bench-judge-{conc}', cache=False, progress=False, concurrency=16)
            ev.head_to_head('openpipe:loop/judge', concurrency=conc).run()
            calls = int(ev.judgements_.order.notna().sum())
            rates[conc] = calls / ev.timings_['head-to-head']
            print(f"judge calls at concurrency {conc:2d}: {calls} calls in {ev.timings_['head-to-head']:.2f} s = {rates[conc]:.1f} calls/s")
        print(f"concurrency 16 / concurrency 1: {rates[16] / rates[1]:.1f}x (latency {args.latency * 1000:.0f} ms per call)")
        # (b) a cached re-run: same eval twice with the cache on
        walls = []
        for attempt in ('first run', 'cached re-run'):
            before = len(up.requests)
            t0 = time.perf_counter()
            ev = Eval(rows, models=models, store=lab, name='bench-cache', progress=False, concurrency=16)
            ev.code('exact_match').head_to_head('openpipe:loop/judge').run()
            walls.append(time.perf_counter() - t0)
            print(f"{attempt}: {walls[-1]:.2f} s, {len(up.requests) - before} upstream calls, stages {ev.timings_}")
        print(f"cached re-run / first run: {walls[1] / walls[0]:.2f} of the wall time")
        lab.close()


if __name__ == '__main__':
    main()
