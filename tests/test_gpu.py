"""One GPU per rank under torchrun on a mocked 2-GPU machine (student and bf16 teacher on cuda:LOCAL_RANK); gpu_check.sh without
CUDA; and, marked `cuda`, the GPU paths themselves on a real GPU (bf16 KD with on-policy steps and exact resume, an HF teacher
and pruned HF student, an FSDP2 step over NCCL)."""
import math

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


# --- On a real GPU (bench/gpu_check.sh runs `pytest -m cuda tests/test_gpu.py`; skipped without CUDA) ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU (bench/gpu_check.sh)')
ON_CUDA = ['training.device=cuda', 'training.precision=bf16', 'training.deterministic=true']


def _weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / 'model.safetensors'))


@pytest.fixture(scope='module')
def gpu_setup(tiny_teacher):
    "Tiny data, a tiny kd_lib teacher and a tiny HF Llama (built on the CPU)."
    from test_students import tiny_llama
    tmp, data = tiny_teacher
    return tmp, data, tiny_llama(tmp / 'hf')


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize('fused', ['true', 'false'])
def test_cuda_kd_on_policy_bf16_resumes_exactly(gpu_setup, fused):
    "KD from a live teacher on the GPU under bf16 autocast, half the steps on-policy: stopped at step 2 and resumed, it ends bit for bit where the uninterrupted run ends."
    from kd_lib.config import Config
    from kd_lib.tracing import read_metrics
    tmp, data, _ = gpu_setup
    cfg = Config().override(*TINY, *data, *ON_CUDA, 'teacher.kind=checkpoint', f'teacher.path={tmp / "teacher"}',
                            'distillation.kd_weight=1', f'distillation.fused={fused}', 'distillation.on_policy_fraction=0.5',
                            'distillation.on_policy_max_new_tokens=8', 'training.steps=6', 'training.eval_every=3')
    torch.cuda.reset_peak_memory_stats()
    full, split = tmp / f'full_{fused}', tmp / f'split_{fused}'
    assert recipes.run_stage(cfg, full).status == 'finished'
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
    train = read_metrics(full, split='train')
    assert len(train) == 6 and all(math.isfinite(r['loss']) for r in train) and 0 < sum(r['on_policy'] for r in train) < 6
    assert [r['step'] for r in read_metrics(full, split='eval', latest_only=True)] == [3, 6]  # held-out rollouts on the GPU
    assert recipes.run_stage(cfg, split, until=2).status == 'stopped'
    assert recipes.run_stage(cfg, split).status == 'finished'
    a, b = _weights(full / 'final'), _weights(split / 'final')
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert a.keys() == b.keys() and not diff, diff



@pytest.mark.cuda
@needs_cuda
def test_cuda_hf_teacher_bf16_pruned_hf_student(gpu_setup):
    "An HF teacher in bf16 on the GPU distils into an HF student pruned from it; the final folder loads in transformers on the CPU."
    from transformers import AutoModelForCausalLM
    from kd_lib.config import Config
    from kd_lib.tracing import read_metrics
    tmp, data, hf = gpu_setup
    cfg = Config().override(*TINY, *data, *ON_CUDA, 'teacher.kind=hf', f'teacher.path={hf}', 'teacher.dtype=bfloat16',
                            'distillation.kd_weight=1', 'student.init=prune_teacher', 'student.prune_n_layers=2',
                            'student.prune_mlp_hidden=32', 'student.calibration_batches=2')
    assert recipes.run_stage(cfg, tmp / 'hf_kd').status == 'finished'
    train = read_metrics(tmp / 'hf_kd', split='train')
    assert len(train) == 4 and all(math.isfinite(r['kd']) and r['kd'] > 0 for r in train)
    model = AutoModelForCausalLM.from_pretrained(tmp / 'hf_kd' / 'final')
    assert model.config.num_hidden_layers == 2 and torch.isfinite(model(input_ids=torch.randint(1, 512, (1, 5))).logits).all()



@pytest.mark.cuda
@needs_cuda
def test_cuda_fsdp2_bf16_step_matches_unsharded(tmp_path):
    "FSDP2 over NCCL on the GPU (one rank), bf16 parameters, fp32 reduction: the loss and gradients of the unsharded model under bf16 autocast."
    import copy
    import torch.distributed as dist
    import torch.nn.functional as F
    from kd_lib.models import ModelConfig, StudentLM
    from kd_lib.train import shard_fsdp
    dist.init_process_group('nccl', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)
        plain = StudentLM(cfg).cuda()
        sharded = shard_fsdp(model := copy.deepcopy(plain), model, torch.bfloat16)
        ids = torch.randint(0, 512, (4, 32), device='cuda')
        with torch.autocast('cuda', dtype=torch.bfloat16):
            expected = F.cross_entropy(plain(ids[:, :-1]).logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss = F.cross_entropy(sharded(ids[:, :-1]).logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        expected.backward(); loss.backward()
        assert torch.allclose(loss, expected, rtol=2e-2), (loss, expected)
        grads = dict(plain.named_parameters())
        for name, p in sharded.named_parameters():
            g, ref = p.grad.full_tensor().float(), grads[name].grad.float()
            assert F.cosine_similarity(g.flatten(), ref.flatten(), dim=0) > 0.99, name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gpu_stage_steps_script_on_cpu(capsys):
    "bench/gpu_check.sh's stage check, run here through CPU bf16 autocast so that it cannot rot between GPU sessions."
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_stage_steps', ROOT / 'bench/gpu_stage_steps.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(['--device', 'cpu', '--rel-tol', '0.05']) == 0, capsys.readouterr().err
    assert {'kd fused (live teacher)', 'process', 'qat'} <= {line[:30].strip() for line in capsys.readouterr().out.splitlines()}
