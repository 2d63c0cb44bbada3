"Shared helpers of the reliability suite: tiny CLI runs, independent checkpoint validation, recorded figures."
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest's TINY and tiny_data)
from conftest import BIN, ROOT, TINY, tiny_data  # noqa: E402

BAD = ROOT / 'tests' / 'data' / 'bad'
CONFIG = ROOT / 'configs' / 'teacher_cpu.yaml'
CKPT_DIR_RE = re.compile(r'checkpoint_step_(\d+)')
RESUMED_RE = re.compile(r'^Resumed from checkpoint step (\d+)$', re.M)
STEP_RE = re.compile(r'^step (\d+) \[train\]', re.M)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> Path:
    "The tiny synthetic corpus and tokenizer, made once per test process."
    from kd_lib.config import load_config
    from kd_lib.recipes import prepare_data
    folder = tmp_path_factory.mktemp('tiny_data')
    prepare_data(load_config(CONFIG, overrides=[*TINY, *tiny_data(folder)]))
    return folder


def train_args(run_dir, data, *extra, config=(CONFIG,)) -> list:
    "`kd-lib` arguments of a tiny CPU training run without evaluation."
    return ['train', '--config', *map(str, config), '--run-dir', str(run_dir), '--no-eval', '--set', *TINY, *tiny_data(data), *extra]


def cli_environ(**extra) -> dict:
    "Environment of a CLI subprocess: one thread, no wandb network, no inherited fault injection."
    env = {k: v for k, v in os.environ.items() if not k.startswith('KD_LIB_TEST_')}
    return {**env, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled', **{k: str(v) for k, v in extra.items()}}


def start_cli(args: list, log: Path, **env) -> subprocess.Popen:
    "Start the `kd-lib` console script with stdout and stderr going to `log`."
    with open(log, 'ab') as f:
        return subprocess.Popen([str(BIN / 'kd-lib'), *args], stdout=f, stderr=subprocess.STDOUT, env=cli_environ(**env),
                                start_new_session=True)


def run_cli(args: list, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    "Run the `kd-lib` console script to completion."
    return subprocess.run([str(BIN / 'kd-lib'), *args], capture_output=True, text=True, timeout=timeout, env=cli_environ(**env))


def run_cli_inprocess(args: list) -> tuple:
    "(exit code, stdout, stderr) of `kd_lib.cli.main(args)` in this process (no interpreter start-up cost)."
    from kd_lib.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def checkpoint_complete(path: Path) -> bool:
    "Independent check (not kd_lib's): meta.json parses and every listed file has its recorded size and sha256."
    try: meta = json.loads((path / 'meta.json').read_text())
    except (OSError, ValueError): return False
    for name, info in meta.get('files', {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != info['bytes']: return False
        if hashlib.sha256(f.read_bytes()).hexdigest() != info['sha256']: return False
    return bool(meta.get('files'))


def checkpoint_steps(ckpt_dir: Path, complete_only: bool = True) -> list:
    "Steps of the checkpoint_step_* folders (only the complete ones by default), ascending."
    if not ckpt_dir.is_dir(): return []
    steps = [(int(m[1]), p) for p in ckpt_dir.iterdir() if (m := CKPT_DIR_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(s for s, p in steps if not complete_only or checkpoint_complete(p))


def newest_complete(ckpt_dir: Path):
    "Step of the newest complete checkpoint, or None."
    steps = checkpoint_steps(ckpt_dir)
    return steps[-1] if steps else None


def load_weights(folder: Path) -> dict:
    return load_file(str(folder / 'model.safetensors'))


def assert_bit_identical(a: dict, b: dict, what: str = ''):
    "Same tensor names, dtypes, shapes and bits."
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f'{what}: {k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})'
    assert a, what


def train_metrics(run_dir: Path) -> list:
    "The 'train' split lines of metrics.jsonl (empty when there is none)."
    f = run_dir / 'metrics.jsonl'
    lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    return [m for m in lines if m.get('split') == 'train']


def record_figures(record_property, name: str, figures: dict):
    "Record figures in the junit report, print them (visible with -s), and append them to $KD_LIB_RELIABILITY_REPORT."
    record_property(name, json.dumps(figures))
    print(f'[reliability] {name}: {json.dumps(figures)}')
    if path := os.environ.get('KD_LIB_RELIABILITY_REPORT'):
        with open(path, 'a') as f: f.write(json.dumps({'test': name, **figures}) + '\n')


class ForkedRun:
    "A CLI child of the fork server, with the Popen methods the kill harness uses."
    def __init__(self, server, pid: int): self.server, self.pid, self.returncode = server, pid, None

    def _ask(self, key: str):
        if self.returncode is None: self.returncode = self.server.request({key: self.pid})['rc']
        return self.returncode

    def poll(self): return self._ask('poll')

    def wait(self, timeout=None): return self._ask('wait')


class CliForkServer:
    "Starts CLI runs as children of tests/reliability/cli_zygote.py (see there); `start` mirrors `start_cli`."
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name('cli_zygote.py'))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=cli_environ(), cwd=str(ROOT))
        assert json.loads(self.proc.stdout.readline()) == {'ready': True}

    def request(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + '\n')
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, args: list, log: Path, **env) -> ForkedRun:
        return ForkedRun(self, self.request({'start': args, 'log': str(log), 'env': {k: str(v) for k, v in env.items()}})['pid'])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
