"""On-policy against off-policy KD at equal optimizer steps over several seeds, two students at a time; prints the report and ratios.

Trains the students of the default pipeline's `on_policy` stage (`kd_lib.pipeline.on_policy_student`: the KD recipe,
the pipeline's teacher live, on-policy fraction 0 and `--fraction`) in worker processes of one thread each, writes
the same report as the stage (`write_on_policy_report`: on_policy.md, .json, .png in --out-dir) and prints it with the
on/off ratio of each measurement. Students already measured in --out-dir are read back, so the pipeline's stage
run afterwards on the same folder only writes its report. Needs a finished teacher (`kd-lib pipeline`).
Usage: python bench/bench_on_policy.py [--run-dir runs/default] [--seeds 1 2 3] [--fraction 0.5] [--steps N] [--jobs 2]
"""
import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kd_lib.pipeline import ON_POLICY_SEEDS, default_stages, write_on_policy_report
from kd_lib.report import ON_POLICY_COLUMNS, on_policy_summary

ROOT = Path(__file__).resolve().parents[1]


def measure(stage: dict, name: str, arm: list, seed: int, out_dir: str) -> dict:
    "One student of the comparison (in a worker process, one thread)."
    import torch
    torch.set_num_threads(1)
    from kd_lib.pipeline import on_policy_student
    return on_policy_student(stage, name, arm, seed, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--run-dir', default=str(ROOT/'runs/default'), help='a default pipeline run with a finished teacher')
    ap.add_argument('--seeds', type=int, nargs='+', default=list(ON_POLICY_SEEDS))
    ap.add_argument('--fraction', type=float, default=0.5, help='on-policy fraction of the micro-batches (lambda)')
    ap.add_argument('--steps', type=int, default=0, help='optimizer steps per student (0: the pipeline stage, student_cpu.yaml)')
    ap.add_argument('--out-dir', default='', help='default: RUN_DIR/on_policy, the pipeline stage\'s folder')
    ap.add_argument('--jobs', type=int, default=2)
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    teacher = run_dir/'teacher'/'final'
    if not (teacher/'config.json').exists(): raise SystemExit(f'{teacher}: missing; run `kd-lib pipeline --run-dir {run_dir}` first')
    stage = next(s.parameters for s in default_stages(run_dir) if s.name == 'on_policy')
    if args.steps: stage = {**stage, 'overrides': [*stage['overrides'], f'training.steps={args.steps}']}
    arms = {'off_policy': [], 'on_policy': [f'distillation.on_policy_fraction={args.fraction}']}
    out_dir = Path(args.out_dir or run_dir/'on_policy')
    jobs = [(stage, name, arm, seed, str(out_dir)) for seed in args.seeds for name, arm in arms.items()]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(measure, *zip(*jobs)))
    print(write_on_policy_report(results, out_dir).read_text())
    summary = on_policy_summary(results)
    for key, title in ON_POLICY_COLUMNS.items():
        off, on = summary['off_policy'][key][0], summary['on_policy'][key][0]
        print(f'on / off {title}: {on / off if off else float("nan"):.3f}')


if __name__ == '__main__':
    main()
