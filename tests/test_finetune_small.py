"Small datasets: batch_size 'auto' gives enough optimizer steps, the first step trains, degenerate jobs say so."
import warnings
from pathlib import Path
import pytest
from conftest_tiny import tiny_model_dir  # session fixture: a tiny Qwen2/ChatML model
from openpipe_lab.finetune import FineTune, TrainingWarning
from openpipe_lab.train import MIN_STEPS_PER_EPOCH
from test_finetune import losses  # loss per step of one stage

PAIRS = [('red', 'rouge'), ('blue', 'bleu'), ('green', 'vert'), ('black', 'noir'), ('white', 'blanc'),
         ('cat', 'chat'), ('dog', 'chien'), ('house', 'maison'), ('water', 'eau')]

def short_rows(n):
    "`n` short chat rows (a few tokens each), all TRAIN, like a new user's first small dataset."
    return [{'messages': [{'role': 'user', 'content': f'French for {en}?'}, {'role': 'assistant', 'content': fr}],
             'rejected_message': {'role': 'assistant', 'content': PAIRS[(i + 1) % len(PAIRS)][1]}, 'split': 'TRAIN'}
            for i, (en, fr) in enumerate((PAIRS * (n // len(PAIRS) + 1))[:n])]

def test_ninety_short_rows_train_with_auto_batch(lab, tiny_model_dir):
    # the case: 90 short rows, 2 epochs, multiplier 10, default batch_size "auto", on CPU
    ft = FineTune(short_rows(90), str(tiny_model_dir), 'small', sft={'num_epochs': 2, 'learning_rate_multiplier': 10})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ft.train(background=False, progress=False)
    sft = ft.metrics_['stages']['sft']
    assert sft['plan']['packing'] is False and sft['plan']['global_batch'] == 90 // 10  # whole rows, a tenth per step
    assert sft['steps'] >= 2 * 10, sft['steps']  # >= 10 per epoch (it was 2 steps in all)
    ls = losses(ft, 'sft')
    assert len(ls) == sft['steps'] and len(set(ls)) > 1
    assert sum(ls[-3:]) / 3 < 0.8 * sum(ls[:3]) / 3, ls
    assert ft.warnings_ == [] and not [w for w in caught if issubclass(w.category, TrainingWarning)]
    assert ft.to_dict()['openpipe']['hyperparameters']['resolved']['sft']['batch_size'] == 9

def test_one_step_job_trains_and_warns(lab, tiny_model_dir):
    # one optimizer step in all: with warm-up starting at learning rate 0 the adapter stayed exactly the base model
    ft = FineTune(short_rows(20), str(tiny_model_dir), 'one-step', sft={'num_epochs': 1, 'batch_size': 20})
    with pytest.warns(TrainingWarning, match='only 1 optimizer step '):
        ft.train(background=False, progress=False)
    assert ft.metrics_['stages']['sft']['steps'] == 1
    from safetensors.torch import load_file
    weights = load_file(Path(ft.serve_config['adapter_path'], 'adapter_model.safetensors'))
    b = [v for k, v in weights.items() if 'lora_B' in k]
    assert b and all(v.abs().max().item() > 0 for v in b)  # LoRA B starts at zero: nonzero means the step trained
    assert any('only 1 optimizer step ' in w for w in ft.warnings_)
    assert 'warning' in ft._repr_markdown_()

@pytest.mark.parametrize('kind', ['preference', 'reward'])
def test_small_preference_and_reward_jobs_get_enough_steps(lab, tiny_model_dir, kind):
    rows = short_rows(30)
    if kind == 'preference':
        ft = FineTune(rows, str(tiny_model_dir), 'pref-small', sft=False, preference={'num_epochs': 3, 'learning_rate_multiplier': 200})
    else:
        ft = FineTune.reward_model(rows, str(tiny_model_dir), 'rm-small', hyperparameters={'num_epochs': 3, 'learning_rate_multiplier': 20})
    ft.start(background=False)
    assert ft.status == 'DEPLOYED', ft.to_dict()['openpipe']['errorMessage']
    done = ft.metrics_['stages'][kind]
    assert done['plan']['global_batch'] == 30 // 10  # the fixed 4 pairs per step gave 8 steps
    assert done['steps'] == 3 * 10  # MIN_STEPS_PER_EPOCH per epoch
    ls = losses(ft, kind)
    assert sum(ls[-10:]) < 0.9 * sum(ls[:10]), ls  # the last epoch's mean loss below the first's
