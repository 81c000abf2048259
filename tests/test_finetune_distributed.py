"""FineTune with several processes (torchrun, gloo on CPU): trains, matches one process at the same global batch,
survives kill + resume and cancel; and the worker process is reaped when it exits (no zombie)."""
import os, signal, socket, time
from pathlib import Path
import pytest
from conftest_tiny import tiny_model_dir  # session fixture: a tiny Qwen2/ChatML model
from openpipe_lab.core import TrainingError
from openpipe_lab.finetune import FineTune, model_row
from test_finetune import losses, _wait_for  # shared helpers (the one-process lifecycle tests)

CAPITALS = [('France', 'Paris'), ('Sweden', 'Stockholm'), ('Japan', 'Tokyo'), ('Tasmania', 'Hobart'),
            ('Peru', 'Lima'), ('Kenya', 'Nairobi'), ('Chile', 'Santiago'), ('Egypt', 'Cairo')]

def rows(n=32):
    "`n` TRAIN rows (no TEST rows: the comparison is about training alone)."
    return [{'messages': [{'role': 'user', 'content': f'Capital of {c}?'}, {'role': 'assistant', 'content': a}], 'split': 'TRAIN'}
            for c, a in (CAPITALS * (n // len(CAPITALS) + 1))[:n]]

def _alive(pid):
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(') ', 1)[1][0] not in 'ZX'
    except OSError: return False

def _rank_pids(ft):
    return [int(p.read_text()) for p in sorted((ft.output_dir / 'ranks').glob(f'{socket.gethostname()}-*.pid'))]

def _adapter(ft):
    from safetensors.torch import load_file
    return load_file(Path(ft.serve_config['adapter_path'], 'adapter_model.safetensors'))

def test_two_processes_match_one_at_the_same_global_batch(lab, tiny_model_dir):
    # 32 rows, global batch 4: 8 steps per epoch either way (1 process x 4 rows, or 2 processes x 2 rows)
    sft = {'num_epochs': 2, 'batch_size': 4, 'learning_rate_multiplier': 20}
    one = FineTune(rows(), str(tiny_model_dir), 'one-proc', sft=sft, num_processes=1, device='cpu', eval_every=0).train(progress=False)
    two = FineTune(rows(), str(tiny_model_dir), 'two-procs', sft=sft, num_processes=2, device='cpu', eval_every=0).start()
    assert '--nproc-per-node=2' in two.launch_command()
    two.wait(progress=False)
    m1, m2 = one.metrics_, two.metrics_
    assert (m1['num_processes'], m2['num_processes']) == (1, 2)
    p1, p2 = m1['stages']['sft']['plan'], m2['stages']['sft']['plan']
    assert (p1['per_device'], p2['per_device'], p1['global_batch'], p2['global_batch']) == (4, 2, 4, 4)
    assert m1['stages']['sft']['steps'] == m2['stages']['sft']['steps'] == 16
    h = two.history_
    assert h['step'].is_unique and len(h) == 16  # one record per step: only rank 0 writes
    l1, l2 = losses(one), losses(two)
    assert sum(l2[-3:]) < 0.8 * sum(l2[:3]), l2  # it trains
    # the same steps on the same rows: the logged losses and the trained weights agree up to float reduction order
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-3 * max(l1), (l1, l2)
    a1, a2 = _adapter(one), _adapter(two)
    assert a1.keys() == a2.keys()
    for k in a1:
        delta = a1[k].abs().max().item()
        assert (a1[k] - a2[k]).abs().max().item() <= 1e-3 * delta + 1e-7, k
    pids = _rank_pids(two)
    assert len(pids) == 2
    _wait_for(lambda: not any(_alive(p) for p in pids), timeout=60)  # both workers exit after the job

def test_two_processes_survive_kill_and_resume_and_cancel(lab, tiny_model_dir):
    ft = FineTune(rows(32), str(tiny_model_dir), 'two-kill', num_processes=2, device='cpu', checkpoint_every=3, eval_every=0,
                  sft={'num_epochs': 6, 'batch_size': 4, 'learning_rate_multiplier': 20})
    ft.start()
    _wait_for(lambda: (ft.progress_.get('step') or 0) >= 5, timeout=180)
    launcher, ranks = ft._row()['pid'], _rank_pids(ft)
    assert len(ranks) == 2 and launcher not in ranks
    os.kill(launcher, signal.SIGKILL)  # the launcher only: its workers run in sessions of their own
    _wait_for(lambda: not any(_alive(p) for p in ranks), timeout=20)  # they notice and leave
    # rank 0 reports the stopped launcher itself (its collective fails first), or the supervisor notices the exit
    with pytest.raises(TrainingError, match=r'launcher \(pid \d+\) stopped while training|exited without reporting'):
        ft.wait(progress=False)
    assert 'call start() to resume' in ft.to_dict()['openpipe']['errorMessage']
    assert any(p.name.startswith('checkpoint-') for p in (ft.output_dir / 'checkpoints' / 'sft').iterdir())
    again = FineTune.get('two-kill', store=lab).start()
    again.wait(progress=False)
    assert again.status == 'DEPLOYED' and again.progress_['resumed_from_step'] >= 3
    assert again.history_['stage_step'].max() == again.metrics_['stages']['sft']['steps'] == 6 * 8
    ls = losses(again)
    assert sum(ls[-3:]) < 0.8 * sum(ls[:3]), ls
    # cancel stops the launcher and both workers
    c = FineTune(rows(32), str(tiny_model_dir), 'two-cancel', num_processes=2, device='cpu', eval_every=0,
                 sft={'num_epochs': 50, 'batch_size': 4})
    c.start()
    _wait_for(lambda: c.status == 'TRAINING' and len(_rank_pids(c)) == 2, timeout=180)
    pids = [c._row()['pid'], *_rank_pids(c)]
    c.cancel()
    assert c.status == 'ERROR' and 'cancelled' in c.to_dict()['openpipe']['errorMessage']
    assert not any(_alive(p) for p in pids)

def test_finished_worker_is_reaped_without_wait(lab, tiny_model_dir):
    ft = FineTune(rows(8), str(tiny_model_dir), 'reap', num_processes=1, eval_every=0,
                  sft={'num_epochs': 1, 'batch_size': 4}).start()
    pid = ft._row()['pid']
    # follow the job through the store only (no wait(), no poll of the child): nothing else reaps it
    _wait_for(lambda: model_row(lab, slug='reap')['status'] in ('DEPLOYED', 'ERROR'), timeout=180)
    def state():
        try: return Path(f'/proc/{pid}/stat').read_text().rsplit(') ', 1)[1][0]
        except OSError: return None  # gone: reaped
    _wait_for(lambda: state() not in ('R', 'S', 'D'), timeout=60)  # the worker exits after its last write
    time.sleep(1)
    assert state() is None, f"worker {pid} left as a zombie (state {state()})"
    assert ft.status == 'DEPLOYED'
