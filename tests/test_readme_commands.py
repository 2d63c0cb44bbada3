"""Every command in the README's sh blocks, run verbatim in a temporary copy of the project (in README order), scaled
down only by appended arguments or environment variables listed in `SCALE_DOWN`."""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from kd_lib.tracing import read_metrics

TINY_SET = '--set ' + ' '.join(TINY)
# README command (comment stripped, continuation lines joined) -> what is appended to it and extra environment.
# A README command missing here fails the test: add its scale-down when you add a command to the README.
SCALE_DOWN = {
    'make pipeline': ('', {'ARGS': TINY_SET}),
    'make test': ('', {'ARGS': 'tests/test_notebooks.py -k 00_device'}),  # one small test (and not this file: no recursion)
    'make lab': ('', {}),  # a server: started, asked for /api/status on 127.0.0.1, stopped
    ".venv/bin/papermill nbs/run_kd.ipynb runs/kd.ipynb -p run_dir runs/my_kd -p overrides '[\"training.steps=100\"]'":
        (f" -p overrides '{json.dumps(TINY)}'", {}),
    '.venv/bin/kd-lib train --config configs/student_cpu.yaml configs/kd_recipe.yaml --set training.steps=100 --run-dir runs/my_kd':
        (f' {TINY_SET} training.steps=6', {}),  # resumes the papermill run above (4 steps) to step 6
    '.venv/bin/torchrun --standalone --nproc-per-node 2 --no-python .venv/bin/kd-lib train --config configs/student_cpu.yaml '
    'configs/kd_recipe.yaml --set training.steps=100 --run-dir runs/ddp': (f' {TINY_SET}', {}),
    '.venv/bin/kd-lib eval --models ce=runs/default/ce/final kd=runs/default/kd/final --tokenizer runs/default/data/tokenizer.json '
    '--eval-path runs/default/data/eval.jsonl --out-dir runs/eval': (' --max-examples 4 --max-new-tokens 24', {}),
    'make kd': ('', {'ARGS': TINY_SET}),
    '.venv/bin/kd-lib export runs/default/kd/final --to hf runs/kd_hf': ('', {}),  # the tiny pipeline's KD student
}


def readme_commands(text: str) -> list:
    "The commands of every ```sh block, in order: continuation lines joined, comments dropped."
    commands = []
    for block in re.findall(r'^```sh\n(.*?)^```', text, flags=re.M | re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            command = re.sub(r'(^|\s+)#.*$', '', line).strip()
            if command: commands.append(re.sub(r'\s+', ' ', command))
    return commands


def test_readme_commands_parse():
    cmds = readme_commands('x\n```sh\nmake a   # note\nb --x 1 \\\n    --y 2\n```\n```python\nc\n```\n```sh\nd\n```\n')
    assert cmds == ['make a', 'b --x 1 --y 2', 'd']


def _project_copy(dest: Path, venv: Path) -> Path:
    "Copy the tracked (and unignored) files to `dest`, with a .venv that points at `venv` and counts as set up."
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split('\0')
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    (dest / '.venv').mkdir()
    for entry in venv.iterdir():
        if not entry.name.startswith('.kd_setup_'): (dest / '.venv' / entry.name).symlink_to(entry)
    # the Makefile's set-up stamp for this pyproject.toml + Makefile, newer than both: `make setup` is a no-op
    stamp = hashlib.sha1((dest / 'pyproject.toml').read_bytes() + (dest / 'Makefile').read_bytes()).hexdigest()[:12]
    (dest / '.venv' / f'.kd_setup_{stamp}').touch()
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run_server(command: str, cwd: Path, env: dict, log: Path):
    "Start a server command, wait until JupyterLab answers on 127.0.0.1, stop it."
    port, token = _free_port(), 'kdreadme'
    env = {**env, 'JUPYTER_PORT': str(port), 'JUPYTER_TOKEN': token, 'JUPYTER_RUNTIME_DIR': str(cwd / '.jupyter_runtime')}
    with log.open('w') as out:
        proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f'{command!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}'
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={token}', timeout=5) as r:
                    assert r.status == 200
                    return
            except OSError:
                assert time.time() < deadline, f'{command!r} did not answer on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}'
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow  # about 2 minutes on an idle 2-core CPU (5.7 min with the cores shared)
@pytest.mark.xdist_group('torchrun')  # it runs the README's torchrun command: one torchrun job at a time
def test_readme_commands_run(tmp_path):
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix) or not (venv / 'bin' / 'papermill').exists():
        pytest.skip('needs the project venv (make setup)')
    commands = readme_commands((ROOT / 'README.md').read_text())
    assert {'make pipeline', 'make test'} <= set(commands)
    missing = [c for c in commands if c not in SCALE_DOWN]
    assert not missing, f'README commands without a scale-down entry in SCALE_DOWN: {missing}'
    project = _project_copy(tmp_path / 'project', venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTEST_', 'IN_TEST', 'ARGS'))}
    env.update(PYTHONPATH=str(project), OMP_NUM_THREADS='1', WANDB_MODE='disabled')
    # a set-up stamp that make disagrees with would reinstall into the real venv: stop before that
    assert subprocess.run(['make', '-q', 'setup'], cwd=project, env=env).returncode == 0, 'make setup is not a no-op'
    # a stage notebook run before any pipeline says in one line what is missing and which command makes it
    res = subprocess.run('.venv/bin/papermill nbs/run_kd.ipynb early.ipynb', shell=True, cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert ("ConfigError: teacher.path: folder 'runs/default/teacher/final' does not exist: run `make pipeline` first "
            "(or set teacher.path=...)") in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    for i, command in enumerate(commands):
        suffix, extra = SCALE_DOWN[command]
        log = tmp_path / f'command_{i}.log'
        if command == 'make lab':
            _run_server(command + suffix, project, {**env, **extra}, log)
            continue
        res = subprocess.run(command + suffix, shell=True, cwd=project, env={**env, **extra}, capture_output=True, text=True,
                             timeout=600)
        log.write_text(res.stdout + res.stderr)
        assert res.returncode == 0, f'README command failed: {command + suffix!r}\n{(res.stdout + res.stderr)[-4000:]}'
    runs = project / 'runs'
    assert (runs / 'default' / 'results.md').exists() and (runs / 'kd.ipynb').exists()
    for folder in ('my_kd', 'ddp', 'stages/kd'): assert (runs / folder / 'final' / 'model.safetensors').exists(), folder
    assert read_metrics(runs / 'my_kd', split='train')[-1]['step'] == 6  # `train` resumed the papermill run
    assert set(json.loads((runs / 'eval' / 'eval_results.json').read_text())['models']) == {'ce', 'kd'}
    assert json.loads((runs / 'kd_hf' / 'config.json').read_text())['architectures'] == ['LlamaForCausalLM']
