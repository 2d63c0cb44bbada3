"Every stage under CPU bf16 autocast (what `precision: auto` does on CUDA) against fp32: a few steps, the same losses within 1%."
import math

import pytest
import torch

from conftest import ROOT, TINY, tiny_data
from kd_lib.config import load_config
from kd_lib.recipes import build_cache_stage, run_stage
from kd_lib.tracing import read_metrics

CONFIGS = [ROOT / 'configs/student_cpu.yaml', ROOT / 'configs/kd_recipe.yaml']
REL_TOL = 1e-2  # bf16 keeps 8 mantissa bits (relative rounding 2**-9 per op); the losses are reduced in fp32
PROCESS = ['process.tool_name_weight=0.5', 'process.json_argument_weight=0.5', 'process.integration_weight=0.5',
           'distillation.intermediate_weight=0.5', 'model.self_eval_head=true', 'distillation.self_eval_weight=0.5']


def _overrides(folder, *extra) -> list:
    return [*TINY, *tiny_data(folder / 'data'), 'training.steps=2', 'checkpoint.save_every=2', *extra]


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    "A tiny teacher (fp32) and its top-k cache; the students start from another seed so the divergence is not ~0."
    tmp = tmp_path_factory.mktemp('precision')
    over = _overrides(tmp, 'training.stage=teacher', 'teacher.kind=none', 'distillation.kd_weight=0', 'training.steps=6',
                     'training.lr=0.03')
    assert run_stage(load_config(*CONFIGS, overrides=over), tmp / 'teacher', evaluate=False).status == 'finished'
    build_cache_stage({'config_paths': [str(p) for p in CONFIGS], 'overrides': over}, tmp / 'teacher/final', tmp / 'cache')
    return tmp


def _live(t): return ['teacher.kind=checkpoint', f'teacher.path={t}/teacher/final', 'training.seed=1']
def _cache(t): return ['teacher.kind=cache', f'teacher.path={t}/cache', 'training.seed=1']

STAGES = {
    'teacher': lambda t: ['training.stage=teacher', 'teacher.kind=none', 'distillation.kd_weight=0'],
    'kd_fused_forward_kl': lambda t: ['training.stage=kd', *_live(t)],
    'kd_fused_jsd': lambda t: ['training.stage=kd', *_live(t), 'distillation.divergence=jsd'],
    'kd_plain': lambda t: ['training.stage=kd', *_live(t), 'distillation.fused=false'],
    'kd_cache_fused': lambda t: ['training.stage=kd', *_cache(t)],
    'kd_cache_plain': lambda t: ['training.stage=kd', *_cache(t), 'distillation.fused=false'],
    'process': lambda t: ['training.stage=process', *_live(t), *PROCESS],
    'answer': lambda t: ['training.stage=answer', *_live(t)],
    'halting': lambda t: ['training.stage=kd', 'teacher.kind=none', 'distillation.kd_weight=0', 'distillation.ce_weight=1',
                          'model.halt_head=true', 'halting.enabled=true', 'training.seed=1'],
    'qat': lambda t: ['training.stage=qat', *_live(t), 'qat.enabled=true', 'qat.calibration_batches=1',
                      f'qat.student_path={t}/teacher/final', 'distillation.ce_weight=0.5'],
}


def _losses(tmp, name, precision, extra) -> list:
    cfg = load_config(*CONFIGS, overrides=_overrides(tmp, *extra, f'training.precision={precision}'))
    run = tmp / f'{name}_{precision}'
    assert run_stage(cfg, run, evaluate=False).status == 'finished'
    return read_metrics(run, split='train')


@pytest.mark.parametrize('name', list(STAGES))
def test_stage_bf16_autocast_matches_fp32(teacher, name):
    fp32, bf16 = (_losses(teacher, name, p, STAGES[name](teacher)) for p in ('fp32', 'bf16'))
    assert [r['step'] for r in bf16] == [1, 2]
    for a, b in zip(fp32, bf16):
        assert math.isfinite(b['loss']) and math.isfinite(b['grad_norm'])
        for key in ('loss', 'kd', 'ce'):
            if key in a: assert b[key] == pytest.approx(a[key], rel=REL_TOL, abs=1e-6), (name, key, a, b)
    assert any(a['loss'] != b['loss'] for a, b in zip(fp32, bf16)), 'bf16 autocast changed nothing: was it on?'
    if name.startswith('kd'): assert fp32[0]['kd'] > 0.005  # a real divergence is compared, not ~0


def test_cpu_precision_bf16_autocasts(tmp_path):
    "training.precision: bf16 on CPU autocasts to bf16 (auto stays fp32 there); the loss function sees bf16 matmuls."
    from kd_lib.train import Trainer
    cfg = load_config(*CONFIGS, overrides=_overrides(tmp_path, 'training.precision=bf16'))
    seen = []
    def loss_fn(model, batch, kept, step):
        out = model(batch)
        seen.append(out.dtype)
        return out.float().mean(), {}
    class Stream:
        def next(self): return {'labels': torch.zeros(2, 3, dtype=torch.long), 'x': torch.randn(2, 4)}
        def state_dict(self): return {}
    trainer = Trainer(cfg, tmp_path / 'run', torch.nn.Linear(4, 4), Stream(), lambda m, b, k, s: loss_fn(m, b['x'], k, s),
                      device=torch.device('cpu'))
    assert trainer.amp_dtype == torch.bfloat16
    trainer.train_step()
    assert seen == [torch.bfloat16]
    auto = Trainer(cfg.override('training.precision=auto'), tmp_path / 'run2', torch.nn.Linear(4, 4), Stream(), loss_fn,
                   device=torch.device('cpu'))
    assert auto.amp_dtype == torch.float32
