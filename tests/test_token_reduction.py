"Token reduction (issue 7): the four students of the table trained and evaluated end to end on a tiny config."
import json

from conftest import ROOT, TINY
from kd_lib.config import load_config
from kd_lib.explore import read_halt_records
from kd_lib.recipes import run_token_reduction


def test_run_token_reduction_tiny(tmp_path):
    cfg = load_config(ROOT / 'configs/student_cpu.yaml', overrides=TINY)
    table = run_token_reduction(cfg, tmp_path, max_new_tokens=24)
    lines = table.splitlines()
    assert [line.split(' | ')[0] for line in lines[2:]] == ['| direct', '| direct + halting', '| code_mode', '| plan', '| latent']
    assert (tmp_path / 'token_reduction.md').read_text() == table + '\n'
    results = json.loads((tmp_path / 'token_reduction.json').read_text())['results']
    assert all(r['generated_tokens'] > 0 for r in results)
    assert read_halt_records(tmp_path / 'direct')  # the halting student's records for the inspection notebook
    # every student's held-out prompts are the same episodes
    evals = [(tmp_path / 'data' / c / 'eval.jsonl').read_text().splitlines() for c in ('code', 'plans')]
    assert [json.loads(l)['prompt'] for l in evals[0]] == [json.loads(l)['prompt'] for l in evals[1]]
    # finished students are not retrained
    assert run_token_reduction(cfg, tmp_path, max_new_tokens=24) == table
