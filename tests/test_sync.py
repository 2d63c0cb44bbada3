"The exported package and the notebooks agree: a fresh nbdev-export changes nothing, nbdev-clean changes nothing."
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_project(tmp):
    shutil.copy(ROOT / 'pyproject.toml', tmp)
    shutil.copy(ROOT / 'README.md', tmp)
    shutil.copytree(ROOT / 'nbs', tmp / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_*'))
    return tmp


def _run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}  # nbdev-export is a no-op under IN_TEST
    subprocess.run([str(BIN / cmd)], cwd=cwd, env=env, check=True, capture_output=True)


def _py_files(folder):
    return {p.relative_to(folder): p.read_text() for p in folder.rglob('*.py') if '__pycache__' not in p.parts}


def test_exported_modules_match_notebooks(tmp_path):
    tmp = _copy_project(tmp_path)
    _run('nbdev-export', tmp)
    fresh, repo = _py_files(tmp / 'kd_lib'), _py_files(ROOT / 'kd_lib')
    stale = sorted(str(k) for k in fresh.keys() | repo.keys() if fresh.get(k) != repo.get(k))
    assert not stale, f'kd_lib out of sync with nbs/ (run nbdev-export): {stale}'


def test_notebooks_are_clean(tmp_path):
    tmp = _copy_project(tmp_path)
    _run('nbdev-clean', tmp)
    dirty = [p.name for p in sorted((tmp / 'nbs').glob('*.ipynb')) if p.read_bytes() != (ROOT / 'nbs' / p.name).read_bytes()]
    assert not dirty, f'notebooks not clean (run nbdev-clean): {dirty}'


def test_no_settings_ini():
    assert not (ROOT / 'settings.ini').exists(), 'nbdev 3 reads [tool.nbdev] in pyproject.toml only'
