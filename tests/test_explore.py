"The inspection explorers on a real (tiny) run folder written by the Trainer, and the inspection notebooks end to end."
import json
from pathlib import Path

import numpy as np
import pytest

from kd_lib.explore import (HaltExplorer, LossExplorer, ema, load_run, read_halt_records, series, write_demo_halt_records)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A real 5-step CE run folder (metrics.jsonl with train and eval lines, config.yaml, checkpoints, final)."
    from kd_lib.config import config_from_dict
    from kd_lib.recipes import run_stage
    tmp = tmp_path_factory.mktemp('tiny')
    data = tmp/'data'
    cfg = config_from_dict({
        'data': dict(train_path=str(data/'train.jsonl'), eval_path=str(data/'eval.jsonl'), tokenizer_path=str(data/'tokenizer.json'),
                     synth_train_episodes=60, synth_eval_episodes=4, vocab_size=400, max_length=192),
        'model': dict(vocab_size=400, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=192),
        'training': dict(stage='teacher', steps=5, batch_size=4, lr=3e-3, warmup_steps=1, device='cpu', eval_examples=2),
        'checkpoint': dict(save_every=5, min_free_space_gb=0.0), 'tracing': dict(log_every=1, tensorboard=False, progress=False)})
    run_stage(cfg, tmp/'teacher')
    return tmp/'teacher'


def test_loss_explorer_on_a_real_run(tiny_run):
    run = load_run(tiny_run)
    assert [r['step'] for r in run['train']] == [1, 2, 3, 4, 5] and run['eval'] and run['config']['training']['stage'] == 'teacher'
    lx = LossExplorer([tiny_run], smoothing=0.0)
    ce_line = lambda: [l for l in lx.figures['losses'].axes[list(lx.metric_picker.value).index('ce')].lines if l.get_label() == 'teacher'][0]
    png, ydata = lx.images['losses'].value, ce_line().get_ydata()
    assert np.allclose(ydata, series(run['train'], 'ce')[1])
    lx.smoothing.value = 0.9  # the slider callback redraws: new image bytes, smoothed data
    assert lx.images['losses'].value != png
    assert np.allclose(ce_line().get_ydata(), ema(series(run['train'], 'ce')[1], 0.9)) and not np.allclose(ce_line().get_ydata(), ydata)
    lx.tabs.selected_index = 2
    assert 'tool_name_accuracy' in [ax.get_title() for ax in lx.figures['eval'].axes]
    lx.tabs.selected_index = 0
    # the run keeps training: refresh shows the new step
    with open(tiny_run/'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': 6, 'split': 'train', 'time': 0.0, 'loss': 1.0, 'lr': 1e-4, 'grad_norm': 0.5, 'kd': 0.0, 'ce': 1.0, 'total': 1.0}) + '\n')
    png = lx.images['losses'].value
    lx.refresh_button.click()
    assert lx.runs[0]['train'][-1]['step'] == 6 and lx.images['losses'].value != png and 'step 6' in lx.status.value


def test_halt_explorer_callbacks(tmp_path):
    path = write_demo_halt_records(tmp_path/'halt_records.jsonl', n_examples=12)
    hx = HaltExplorer(tmp_path, threshold=0.5)
    png, status = hx.images['example'].value, hx.status.value
    hx.threshold.value = 0.2
    assert hx.images['example'].value != png and hx.status.value != status
    assert list(hx.figures['example'].axes[0].lines[2].get_ydata()) == [0.2, 0.2]
    png = hx.images['calibration'].value
    hx.rule.value = 'curriculum'
    assert hx.images['calibration'].value != png and hx.figures['calibration'].axes[0].get_title().startswith('curriculum')
    assert len(read_halt_records(path)) == 12


def _execute(name: str, parameters: dict, tmp_path: Path):
    "Run a notebook with papermill in a kernel of this venv; return the executed notebook."
    import nbformat
    import papermill as pm
    out = tmp_path/name
    pm.execute_notebook(str(ROOT/'nbs'/name), str(out), parameters=parameters, cwd=str(ROOT/'nbs'), kernel_name='python3',
                        progress_bar=False)
    return nbformat.read(out, as_version=4)


def test_inspect_losses_notebook_on_a_real_run(tiny_run, tmp_path):
    nb = _execute('inspect_losses.ipynb', {'run_dirs': [str(tiny_run)]}, tmp_path)
    text = json.dumps([c.get('outputs', []) for c in nb.cells])
    assert 'teacher: 5 train steps' in text or 'teacher: 6 train steps' in text
    assert 'application/vnd.jupyter.widget-view+json' in text and 'image/png' in text


def test_inspect_halt_targets_notebook(tmp_path):
    write_demo_halt_records(tmp_path/'run/halt_records.jsonl', n_examples=15, seed=3)
    nb = _execute('inspect_halt_targets.ipynb', {'run_dir': str(tmp_path/'run')}, tmp_path)
    text = json.dumps([c.get('outputs', []) for c in nb.cells])
    assert '15 examples' in text and 'ECE' in text and 'image/png' in text
