"""One bf16 training step of every stage on a tiny generated corpus: teacher, KD (fused and plain, live teacher and top-k
cache), process supervision, answer, halting and QAT. Each loss must be finite and match an fp32 step within 1%.

    .venv/bin/python bench/gpu_stage_steps.py --device cuda      # on a GPU (bench/gpu_check.sh); bf16 = CUDA autocast
    .venv/bin/python bench/gpu_stage_steps.py --device cpu       # the same through CPU bf16 autocast (~30 s)
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from kd_lib.config import load_config
from kd_lib.recipes import build_cache_stage, run_stage
from kd_lib.tracing import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / 'configs/student_cpu.yaml', ROOT / 'configs/kd_recipe.yaml']
SMALL = ['data.synth_train_episodes=160', 'data.synth_eval_episodes=8', 'data.vocab_size=512', 'data.max_length=256',
         'model.vocab_size=512', 'model.d_model=64', 'model.n_layers=2', 'model.n_heads=2', 'model.n_kv_heads=1',
         'model.max_seq_len=256', 'training.batch_size=4', 'training.warmup_steps=1', 'checkpoint.min_free_space_gb=0',
         'tracing.tensorboard=false', 'tracing.progress=false', 'tracing.log_every=1', 'teacher.topk=4']


def stages(folder: Path) -> dict:
    "Stage name -> overrides, against the teacher and cache in `folder`."
    live = ['teacher.kind=checkpoint', f'teacher.path={folder}/teacher_bf16/final', 'training.seed=1']
    cache = ['teacher.kind=cache', f'teacher.path={folder}/cache', 'training.seed=1']
    return {
        'kd fused (live teacher)': ['training.stage=kd', *live],
        'kd fused jsd (live teacher)': ['training.stage=kd', *live, 'distillation.divergence=jsd'],
        'kd plain (live teacher)': ['training.stage=kd', *live, 'distillation.fused=false'],
        'kd fused (top-k cache)': ['training.stage=kd', *cache],
        'kd plain (top-k cache)': ['training.stage=kd', *cache, 'distillation.fused=false'],
        'process': ['training.stage=process', *live, 'process.tool_name_weight=0.5', 'process.json_argument_weight=0.5',
                    'process.integration_weight=0.5', 'distillation.intermediate_weight=0.5'],
        'answer': ['training.stage=answer', *live],
        'halting': ['training.stage=kd', 'teacher.kind=none', 'distillation.kd_weight=0', 'distillation.ce_weight=1',
                    'model.halt_head=true', 'halting.enabled=true'],
        'qat': ['training.stage=qat', *live, 'qat.enabled=true', 'qat.calibration_batches=1',
                f'qat.student_path={folder}/teacher_bf16/final', 'distillation.ce_weight=0.5'],
    }


def one_step(folder: Path, name: str, overrides: list, precision: str) -> dict:
    "Train one step of a stage; its first logged losses and the wall time."
    run = folder / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}_{precision}"
    cfg = load_config(*CONFIGS, overrides=[*overrides, f'training.precision={precision}'])
    start = time.perf_counter()
    result = run_stage(cfg, run, evaluate=False)
    if result.status != 'finished': raise RuntimeError(f'{name} ({precision}): {result.status} {result.reason}')
    return {**read_metrics(run, split='train')[0], 'time_s': time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    parser.add_argument('--rel-tol', type=float, default=0.01, help='bf16 vs fp32 loss tolerance (relative)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_stage_steps.py: no CUDA device (torch.cuda.is_available() is False); use --device cpu', file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix='kd_gpu_stages_'))
    base = [*SMALL, f'data.train_path={folder}/data/train.jsonl', f'data.eval_path={folder}/data/eval.jsonl',
            f'data.tokenizer_path={folder}/data/tokenizer.json', f'training.device={args.device}', 'training.steps=1',
            'checkpoint.save_every=1']
    teacher_over = [*base, 'training.stage=teacher', 'teacher.kind=none', 'distillation.kd_weight=0', 'distillation.ce_weight=1']
    teacher = one_step(folder, 'teacher', teacher_over, 'bf16')  # the teacher of every other stage, and its top-k cache
    build_cache_stage({'config_paths': [str(p) for p in CONFIGS], 'overrides': teacher_over}, folder / 'teacher_bf16/final', folder / 'cache')
    print(f"{'stage':<30}{'bf16 loss':>12}{'fp32 loss':>12}{'rel. diff':>11}{'bf16 time':>11}")
    print(f"{'teacher':<30}{teacher['loss']:>12.5f}{'':>12}{'':>11}{teacher['time_s']:>10.2f}s")
    failed = []
    for name, overrides in stages(folder).items():
        bf16, fp32 = (one_step(folder, name, [*base, *overrides], p) for p in ('bf16', 'fp32'))
        rel = abs(bf16['loss'] - fp32['loss']) / abs(fp32['loss'])
        if not (math.isfinite(bf16['loss']) and rel <= args.rel_tol): failed.append(name)
        print(f"{name:<30}{bf16['loss']:>12.5f}{fp32['loss']:>12.5f}{rel:>11.2e}{bf16['time_s']:>10.2f}s", flush=True)
    if failed: print(f'gpu_stage_steps.py: bf16 differs from fp32 by more than {args.rel_tol} (or is not finite): {failed}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
