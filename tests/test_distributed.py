"Two CPU processes under torchrun (gloo) give the same weights as one process with the same global batch."
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, ROOT, TINY, tiny_data


def _train(run_dir, data, env, extra, nproc=None):
    args = ['train', '--config', str(ROOT / 'configs/teacher_cpu.yaml'), '--run-dir', str(run_dir), '--no-eval',
            '--set', *TINY, *tiny_data(data), 'training.steps=3', 'training.lr=1e-3', *extra]
    cmd = [str(BIN / 'kd-lib'), *args] if nproc is None else \
          [str(BIN / 'torchrun'), '--standalone', f'--nproc-per-node={nproc}', '--no-python', str(BIN / 'kd-lib'), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return load_file(str(run_dir / 'final' / 'model.safetensors'))


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_two_processes_equal_one_process_same_global_batch(tmp_path, cli_env):
    single = _train(tmp_path / 'single', tmp_path / 'data', cli_env, ['training.batch_size=4'])
    double = _train(tmp_path / 'ddp', tmp_path / 'data', cli_env, ['training.batch_size=2'], nproc=2)
    assert single.keys() == double.keys()
    for k in single:
        assert torch.allclose(single[k], double[k], atol=2e-5, rtol=1e-4), (k, (single[k] - double[k]).abs().max())
    start = _train(tmp_path / 'fresh', tmp_path / 'data', cli_env, ['training.batch_size=4', 'training.steps=1'])
    assert any(not torch.allclose(single[k], start[k]) for k in single)  # the comparison above is not vacuous
