"""`kd-lib generate` killed with SIGKILL at random moments and started again: every prompt ends up in the output exactly
once, no torn line, and the file equals an uninterrupted run's (which used another batch size).
KD_LIB_GENERATE_KILLS=N sets the number of kills (default 3); KD_LIB_GENERATE_SEED=S replays a schedule."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_lib.generate import SamplingConfig, generate_dataset
from kd_lib.models import ModelConfig, StudentLM
from kd_lib.synth import generate_episodes
from kd_lib.tokenizer import build_tokenizer, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get('KD_LIB_GENERATE_KILLS') or 3)
SAMPLING = dict(temperature=1.0, top_p=0.9, max_new_tokens=48, seed=5)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A tiny kd_lib teacher, its tokenizer and 40 tag prompts."
    tmp = tmp_path_factory.mktemp('gen')
    rows = generate_episodes(40, seed=0)
    save_tokenizer(build_tokenizer([r['prompt'] + r['teacher_text'] for r in rows], vocab_size=400), tmp / 'tokenizer.json')
    torch.manual_seed(0)
    StudentLM(ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)).save_pretrained(tmp / 'teacher')
    (tmp / 'prompts.jsonl').write_text(''.join(json.dumps({'prompt': r['prompt'], 'metadata': r['metadata']}) + '\n' for r in rows))
    return tmp


def _cli(tmp: Path, out: Path, batch_size: int) -> list:
    s = SAMPLING
    return [sys.executable, '-c', 'import sys; from kd_lib.cli import main; sys.exit(main(sys.argv[1:]))', 'generate',
            '--teacher', str(tmp / 'teacher'), '--prompts', str(tmp / 'prompts.jsonl'), '--tokenizer', str(tmp / 'tokenizer.json'),
            '--out', str(out), '--batch-size', str(batch_size), '--device', 'cpu', '--temperature', str(s['temperature']),
            '--top-p', str(s['top_p']), '--max-new-tokens', str(s['max_new_tokens']), '--seed', str(s['seed'])]


def _lines(path: Path) -> int: return path.read_bytes().count(b'\n') if path.exists() else 0


def test_sigkill_then_resume_writes_every_prompt_once(setup):
    seed = int(os.environ.get('KD_LIB_GENERATE_SEED') or time.time_ns() % 1_000_000)
    rng, ctx = random.Random(seed), f'(replay with KD_LIB_GENERATE_SEED={seed})'
    reference = setup / 'reference.jsonl'
    generate_dataset(setup / 'teacher', setup / 'prompts.jsonl', reference, setup / 'tokenizer.json', SamplingConfig(**SAMPLING),
                     batch_size=5, progress=False)
    out, env = setup / f'killed-{seed}.jsonl', {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    kills = 0
    for _ in range(KILLS):
        before = _lines(out)
        proc = subprocess.Popen(_cli(setup, out, rng.choice([1, 2, 3])), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _lines(out) == before and time.monotonic() < deadline: time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # kill at a random moment after the first new rows
        if proc.poll() is not None: break
        proc.kill()
        proc.wait()
        kills += 1
        assert 0 < _lines(out) < 40 or out.read_bytes().endswith(b'\n'), ctx
    done = subprocess.run(_cli(setup, out, 4), env=env, capture_output=True, text=True)
    assert done.returncode == 0, f'{done.stderr[-2000:]} {ctx}'
    assert kills >= 1, f'the run finished before any kill {ctx}'
    assert out.read_bytes() == reference.read_bytes(), ctx
    meta = json.loads(out.with_suffix('.meta.json').read_text())
    assert meta['status'] == 'complete' and meta['rows'] == 40 and meta['resumed_at'] > 0, ctx


def test_torn_last_line_is_dropped_and_regenerated(setup):
    sampling, out = SamplingConfig(**{**SAMPLING, 'max_new_tokens': 8}), setup / 'torn.jsonl'
    args = (setup / 'teacher', setup / 'prompts.jsonl')
    generate_dataset(*args, out, setup / 'tokenizer.json', sampling, batch_size=8, progress=False)
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    out.write_bytes(b''.join(lines[:17]) + lines[17][: len(lines[17]) // 2])
    meta = generate_dataset(*args, out, setup / 'tokenizer.json', sampling, batch_size=3, progress=False)
    assert meta['resumed_at'] == 17 and out.read_bytes() == whole
    assert [json.loads(l)['metadata'] for l in whole.splitlines()] == [json.loads(l)['metadata'] for l in (setup / 'prompts.jsonl').read_text().splitlines()]
