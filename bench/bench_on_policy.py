"""On-policy against off-policy KD at equal optimizer steps over several seeds; prints means, spreads and ratios.

Both students distil the default pipeline's teacher live (teacher.kind checkpoint: on-policy steps need a white-box
teacher to score the student's samples) with the KD recipe; the on-policy one takes `--fraction` of its micro-batches
from its own samples (`distillation.on_policy_fraction`). Reported per student, mean and spread over the seeds:
held-out tool-name accuracy and JSON validity of the final model, per-token KL to the teacher on the held-out
reference text, wall time per optimizer step, and accuracy per minute of training. Needs a finished
`kd-lib pipeline` run. Usage: python bench/bench_on_policy.py [--run-dir runs/default] [--seeds 1 2 3]
[--fraction 0.5] [--steps N] [--jobs 2]
"""
import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench_kd_seeds import ROOT, train  # bench/ is on sys.path when a bench script runs
from kd_lib.pipeline import default_stages


def final_metrics(run_dir: str, teacher: str, eval_path: str, tokenizer: str, episodes: int) -> dict:
    "Held-out metrics of a run's final model, with per-token KL to the teacher (in a worker process, one thread)."
    import torch
    torch.set_num_threads(1)
    from kd_lib.evaluate import evaluate_models
    from kd_lib.models import StudentLM
    from kd_lib.teachers import CheckpointTeacher
    from kd_lib.tokenizer import load_tokenizer
    model = StudentLM.from_pretrained(Path(run_dir)/'final')
    result = evaluate_models({'m': model}, load_tokenizer(tokenizer), eval_path, max_examples=episodes,
                             teacher=CheckpointTeacher(teacher))['m']
    times = [r['time'] for r in map(json.loads, open(Path(run_dir)/'metrics.jsonl')) if r['split'] == 'train']
    steps = [r['step'] for r in map(json.loads, open(Path(run_dir)/'metrics.jsonl')) if r['split'] == 'train']
    seconds_per_step = (times[-1] - times[0]) / (steps[-1] - steps[0])
    return {k: result[k] for k in ('tool_name_accuracy', 'json_validity', 'kl_to_teacher')} | {'seconds_per_step': seconds_per_step}


def spread(values: list) -> str:
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}' if len(values) > 1 else f'{values[0]:.3f}'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--run-dir', default=str(ROOT/'runs/default'), help='a finished default pipeline run (corpus and teacher)')
    ap.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    ap.add_argument('--fraction', type=float, default=0.5, help='on-policy fraction of the micro-batches (lambda)')
    ap.add_argument('--steps', type=int, default=0, help='optimizer steps per student (0: the KD stage config)')
    ap.add_argument('--episodes', type=int, default=256, help='held-out episodes of the final evaluation')
    ap.add_argument('--jobs', type=int, default=2)
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    teacher = run_dir/'teacher'/'final'
    if not (teacher/'config.json').exists(): raise SystemExit(f'{teacher}: missing; run `kd-lib pipeline --run-dir {run_dir}` first')
    kd = next(s.parameters for s in default_stages(run_dir) if s.name == 'kd')
    live = ['teacher.kind=checkpoint', f'teacher.path={teacher}', 'training.eval_every=0'] + ([f'training.steps={args.steps}'] if args.steps else [])
    students = {'off_policy': live, 'on_policy': [*live, f'distillation.on_policy_fraction={args.fraction}']}
    out_dir = run_dir/'on_policy'
    jobs = [(name, {**kd, 'overrides': [*kd['overrides'], *over]}, seed, str(out_dir)) for seed in args.seeds for name, over in students.items()]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(train, *zip(*jobs)))
        data = run_dir/'data'
        metrics = list(pool.map(final_metrics, runs, [str(teacher)] * len(runs), [str(data/'eval.jsonl')] * len(runs),
                                [str(data/'tokenizer.json')] * len(runs), [args.episodes] * len(runs)))
    by = {name: [m for (n, *_), m in zip(jobs, metrics) if n == name] for name in students}
    print(f'off- vs on-policy KD (lambda {args.fraction}), seeds {args.seeds}, {args.episodes} held-out episodes: mean ± std')
    keys = ('tool_name_accuracy', 'json_validity', 'kl_to_teacher', 'seconds_per_step')
    print(f"{'student':<12}" + ''.join(f'{k:>22}' for k in keys) + f"{'accuracy / minute':>20}")
    for name, ms in by.items():
        per_minute = [m['tool_name_accuracy'] / (m['seconds_per_step'] / 60) for m in ms]
        print(f'{name:<12}' + ''.join(f'{spread([m[k] for m in ms]):>22}' for k in keys) + f'{spread(per_minute):>20}')
    for k in keys:
        off, on = (statistics.mean(m[k] for m in by[n]) for n in ('off_policy', 'on_policy'))
        print(f'on / off {k}: {on / off if off else float("nan"):.3f}')
    for name, ms in by.items():
        print(f'{name} per seed tool-name accuracy: ' + ', '.join(f'{m["tool_name_accuracy"]:.3f}' for m in ms))


if __name__ == '__main__':
    main()
