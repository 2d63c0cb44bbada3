"""On-policy distillation through run_stage: the on-policy steps are logged, and a stopped then resumed run equals an
uninterrupted one bit for bit. The pipeline's on-policy stage: its report against the students' measurements, its resume."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, ROOT, TINY
from kd_lib.config import Config
from kd_lib.pipeline import on_policy_stage, on_policy_student
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
@pytest.mark.xdist_group('torchrun')  # one torchrun job at a time (tests/test_distributed.py)
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


def _table(text: str, header: str) -> list:
    "The cells of each row of the markdown table whose header line starts with `header`."
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'| {header}'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'): break
        rows.append([c.strip() for c in line.strip('|').split('|')])
    return rows


def test_on_policy_stage_report_and_resume(tiny_teacher):
    "The stage's table holds the mean and sample std over the seeds of what each student measured; a rerun trains nothing again."
    tmp, data = tiny_teacher
    stage = {'config_paths': [str(ROOT / 'configs/student_cpu.yaml'), str(ROOT / 'configs/kd_recipe.yaml')],
             'overrides': [*TINY, *data, 'teacher.kind=checkpoint', f'teacher.path={tmp / "teacher"}',
                           'distillation.on_policy_max_new_tokens=8']}
    out = tmp / 'compare'
    record = on_policy_stage(stage, out, seeds=(1, 2))
    assert record['seeds'] == [1, 2] and record['steps'] == 4
    measured = {(s, seed): json.loads((out / f'{s}_seed{seed}' / 'on_policy_result.json').read_text())
                for s in ('off_policy', 'on_policy') for seed in (1, 2)}
    assert 'distillation.on_policy_fraction=0.5' in measured['on_policy', 1]['overrides']
    assert 'distillation.on_policy_fraction=0.5' not in measured['off_policy', 1]['overrides']
    for m in measured.values():
        assert m['steps'] == 4 and m['episodes'] == 4 and m['seconds_per_step'] > 0 and m['kl_to_teacher'] > 0, m
    text = (out / 'on_policy.md').read_text()
    assert text == Path(record['table']).read_text() and (out / 'on_policy.png').stat().st_size > 1000
    summary = {r[0]: r for r in _table(text, 'student | tool-name acc.')}
    per_seed = {(r[0], r[1]): r for r in _table(text, 'student | seed')}
    keys = ['tool_name_accuracy', 'json_validity', 'kl_to_teacher', 'seconds_per_step']
    for student in ('off_policy', 'on_policy'):
        rows = [measured[student, seed] for seed in (1, 2)]
        rate = [m['tool_name_accuracy'] / (4 * m['seconds_per_step'] / 60) for m in rows]
        for col, values in zip(summary[student][1:], [*([m[k] for m in rows] for k in keys), rate]):
            values = [v for v in values if v is not None]  # JSON validity: None for a student that made no tool call
            if not values:
                assert col == '-'
                continue
            mean, std = (float(x) for x in col.split(' ± '))
            digits = len(col.split(' ± ')[0].split('.')[1])
            assert abs(mean - np.mean(values)) <= 0.6 * 10 ** -digits and abs(std - np.std(values, ddof=1)) <= 0.6 * 10 ** -digits, (student, col)
        for seed, m in zip((1, 2), rows):
            cells = per_seed[student, str(seed)][2:]
            assert [None if c == '-' else float(c) for c in cells[:4]] == pytest.approx([m[k] for k in keys], abs=6e-4), (student, seed)
    means = {s: np.mean([measured[s, seed]['tool_name_accuracy'] for seed in (1, 2)]) for s in ('off_policy', 'on_policy')}
    assert ('On-policy helped here' if means['on_policy'] > means['off_policy'] else 'On-policy did not help here') in text
    # a rerun trains nothing; a student folder removed (a killed run) is trained again, and only that one
    stamps = {p: p.stat().st_mtime_ns for p in out.glob('*_seed*/metrics.jsonl')}
    assert on_policy_stage(stage, out, seeds=(1, 2)) == record
    assert {p: p.stat().st_mtime_ns for p in out.glob('*_seed*/metrics.jsonl')} == stamps
    shutil.rmtree(out / 'on_policy_seed2')
    on_policy_stage(stage, out, seeds=(1, 2))
    assert [p.parent.name for p in stamps if p.stat().st_mtime_ns != stamps[p]] == ['on_policy_seed2']
    assert json.loads((out / 'on_policy_seed2' / 'on_policy_result.json').read_text())['tool_name_accuracy'] == \
        measured['on_policy', 2]['tool_name_accuracy']  # one thread: the same student again
    with pytest.raises(ValueError, match='on_policy_seed1/on_policy_result.json: measured with other overrides'):
        on_policy_student(stage, 'on_policy', ['distillation.on_policy_fraction=0.25'], 1, out)
