"One GPU per rank under torchrun on a mocked 2-GPU machine (student and bf16 teacher on cuda:LOCAL_RANK); gpu_check.sh without CUDA."
import pytest
import torch

from conftest import ROOT, TINY, tiny_data
from kd_lib import recipes
from kd_lib.config import load_config
from kd_lib.train import DistInfo


class TeacherPlaced(Exception): "Raised by the mocked loader once the recipe has picked the teacher's device."


@pytest.mark.parametrize('rank', [0, 1])
def test_rank_trains_and_holds_teacher_on_its_gpu(tmp_path, monkeypatch, rank):
    for key, value in dict(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE='2', KD_LIB_DEVICE='').items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)
    current = []
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    monkeypatch.setattr(recipes, 'init_distributed', lambda device: DistInfo(rank, 2, rank))
    monkeypatch.setattr(torch.distributed, 'barrier', lambda: None)
    if rank == 1: recipes.prepare_data(load_config(ROOT / 'configs/student_cpu.yaml', overrides=[*TINY, *tiny_data(tmp_path / 'data')]))
    placed = []
    def load_teacher(teacher_cfg, device, dtype=None):
        placed.append((device, dtype))
        raise TeacherPlaced
    monkeypatch.setattr(recipes, 'load_teacher', load_teacher)
    over = [*TINY, *tiny_data(tmp_path / 'data'), 'training.device=', 'teacher.kind=checkpoint', f'teacher.path={tmp_path}/t']
    cfg = load_config(ROOT / 'configs/student_cpu.yaml', ROOT / 'configs/kd_recipe.yaml', overrides=over)
    with pytest.raises(TeacherPlaced): recipes.run_stage(cfg, tmp_path / 'run', evaluate=False)
    assert placed == [(torch.device('cuda', rank), torch.bfloat16)] and current == [torch.device('cuda', rank)]


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a machine without CUDA')
def test_gpu_check_without_cuda_says_so(cli_env):
    import subprocess, sys
    proc = subprocess.run(['bash', str(ROOT / 'bench/gpu_check.sh')], env={**cli_env, 'PYTHON': sys.executable},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and 'gpu_check.sh: no CUDA device' in proc.stderr, proc.stderr
