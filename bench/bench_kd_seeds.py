"""KD students against the CE-only student over several training seeds; prints mean tool-name accuracy per step and the ratios.

One pipeline run is one seed, and on the embedded default one seed's held-out accuracy moves by up to 0.1 with the
seed (initialisation and data order). This trains the default pipeline's students again (same configs, corpus and
teacher cache as a finished `kd-lib pipeline` run) with other `training.seed`s, two at a time on one thread each,
and prints the per-step means, KD/CE ratios, per-seed finals and the steps each student needs to reach the CE-only
student's final accuracy. Usage: python bench/bench_kd_seeds.py [--run-dir runs/default] [--seeds 1 2 3]
[--students ce kd kd_process] [--jobs 2]
"""
import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kd_lib.config import load_config
from kd_lib.explore import load_run
from kd_lib.pipeline import default_stages, steps_to_reach

ROOT = Path(__file__).resolve().parents[1]
METRIC = 'tool_name_accuracy'


def train(name: str, stage_params: dict, seed: int, out_dir: str) -> str:
    "Train one student of the pipeline with another seed (in a worker process, one thread)."
    import torch
    torch.set_num_threads(1)
    from kd_lib.recipes import run_stage
    cfg = load_config(*stage_params['config_paths'], overrides=[*stage_params['overrides'], f'training.seed={seed}'])
    run_dir = Path(out_dir)/f'{name}_seed{seed}'
    run_stage(cfg, run_dir)
    return str(run_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--run-dir', default=str(ROOT/'runs/default'), help='a finished default pipeline run (corpus and teacher cache)')
    ap.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    ap.add_argument('--students', nargs='+', default=['ce', 'kd', 'kd_process'])
    ap.add_argument('--jobs', type=int, default=2)
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    if not (run_dir/'teacher_cache'/'manifest.json').exists():
        raise SystemExit(f'{run_dir}: no teacher_cache/manifest.json; run `kd-lib pipeline --run-dir {run_dir}` first')
    if 'ce' not in args.students: raise SystemExit('--students must include ce (the baseline)')
    stages = {s.name: s.parameters for s in default_stages(run_dir) if s.name in args.students}
    out_dir = run_dir/'seeds'
    jobs = [(name, stages[name], seed, str(out_dir)) for seed in args.seeds for name in args.students]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(train, *zip(*jobs)))
    evals = {(name, seed): load_run(r)['eval'] for (name, _, seed, _), r in zip(jobs, runs)}
    hist = {key: {r['step']: r[METRIC] for r in records} for key, records in evals.items()}
    steps = sorted(set.intersection(*(set(h) for h in hist.values())))

    def mean(name, step): return statistics.mean(hist[name, s][step] for s in args.seeds)
    print(f'mean held-out {METRIC} over seeds {args.seeds}')
    print('step ' + ' '.join(f'{n:>10}' for n in args.students) + ' ' + ' '.join(f'{n + "/ce":>14}' for n in args.students if n != 'ce'))
    for step in steps:
        ce = mean('ce', step)
        ratios = ' '.join(f'{mean(n, step) / ce if ce else float("nan"):14.3f}' for n in args.students if n != 'ce')
        print(f'{step:4d} ' + ' '.join(f'{mean(n, step):10.3f}' for n in args.students) + ' ' + ratios)
    print('\nper seed: final accuracy (steps to reach the CE-only final; - never)')
    for seed in args.seeds:
        target = hist['ce', seed][steps[-1]]
        cells = [f'{n} {hist[n, seed][steps[-1]]:.3f} ({steps_to_reach(evals[n, seed], METRIC, target) or "-"})' for n in args.students]
        print(f'seed {seed}: ' + ', '.join(cells))


if __name__ == '__main__':
    main()
