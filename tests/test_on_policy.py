"On-policy distillation through run_stage: the on-policy steps are logged, and a stopped then resumed run equals an uninterrupted one bit for bit."
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, ROOT, TINY
from kd_lib.config import Config
from kd_lib.recipes import run_stage
from kd_lib.tracing import read_metrics


def test_on_policy_run_resumes_exactly(tiny_teacher):
    tmp, data = tiny_teacher
    cfg = Config().override(*TINY, *data, 'teacher.kind=checkpoint', f'teacher.path={tmp / "teacher"}', 'distillation.kd_weight=1',
                            'distillation.on_policy_fraction=0.5', 'distillation.on_policy_temperature=1.0',
                            'distillation.on_policy_max_new_tokens=8')
    assert run_stage(cfg, tmp / 'full', evaluate=False).status == 'finished'
    drawn = [r['on_policy'] for r in read_metrics(tmp / 'full', split='train')]
    assert len(drawn) == 4 and all(0 <= x <= 1 for x in drawn) and 0 < sum(drawn) < 4, drawn  # some steps of each kind
    assert run_stage(cfg, tmp / 'split', until=2, evaluate=False).status == 'stopped'
    assert run_stage(cfg, tmp / 'split', evaluate=False).status == 'finished'
    assert [r['on_policy'] for r in read_metrics(tmp / 'split', split='train', latest_only=True)] == drawn
    a, b = load_file(str(tmp / 'full' / 'final' / 'model.safetensors')), load_file(str(tmp / 'split' / 'final' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_on_policy_under_torchrun_two_processes(tiny_teacher, cli_env):
    "Two gloo ranks drawing on-policy micro-batches (each from its own RNG) train to the end without a hang."
    tmp, data = tiny_teacher
    args = ['train', '--config', str(ROOT / 'configs/student_cpu.yaml'), str(ROOT / 'configs/kd_recipe.yaml'),
            '--run-dir', str(tmp / 'ddp'), '--no-eval', '--set', *TINY,
            *data, 'training.batch_size=2', 'teacher.kind=checkpoint', f'teacher.path={tmp / "teacher"}',
            'distillation.kd_weight=1', 'distillation.on_policy_fraction=0.5', 'distillation.on_policy_max_new_tokens=8']
    cmd = [str(BIN / 'torchrun'), '--standalone', '--nproc-per-node=2', '--no-python', str(BIN / 'kd-lib'), *args]
    res = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    drawn = [r['on_policy'] for r in read_metrics(tmp / 'ddp', split='train')]
    assert len(drawn) == 4 and sum(drawn) > 0 and (tmp / 'ddp' / 'final' / 'model.safetensors').is_file(), drawn
