"The exported package and the notebooks agree: a fresh nbdev-export changes nothing, nbdev-clean changes nothing."
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def _notebook_numbers() -> dict:
    "kd_lib module name -> the number of the notebook it is exported from (its 'File to edit' header)."
    numbers = {}
    for path in (ROOT / 'kd_lib').glob('*.py'):
        m = re.search(r'File to edit: \.\./nbs/(\d+)_\w+\.ipynb', path.read_text())
        if m: numbers[path.stem] = int(m.group(1))
    return numbers


def _kd_lib_imports(path: Path) -> set:
    "The kd_lib modules a module imports, anywhere in it (functions included)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: found.add(mod.split('.')[0] if mod else '')
            elif mod.startswith('kd_lib.'): found.add(mod.split('.')[1])
            elif mod == 'kd_lib': found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split('.')[1] for a in node.names if a.name.startswith('kd_lib.'))
    return found - {''}


def test_modules_import_only_lower_numbered_notebooks():
    numbers = _notebook_numbers()
    assert len(numbers) >= 20, numbers
    upward = [f'{mod} ({n}) imports {dep} ({numbers[dep]})' for mod, n in numbers.items()
              for dep in _kd_lib_imports(ROOT / 'kd_lib' / f'{mod}.py') if dep in numbers and numbers[dep] >= n]
    assert not upward, 'components import upward (or in a cycle): ' + '; '.join(sorted(upward))


def test_import_checker_sees_upward_and_lazy_imports(tmp_path):
    mod = tmp_path / 'm.py'
    mod.write_text('from .a import x\nimport kd_lib.b\ndef f():\n    from kd_lib.c import y\n    from kd_lib import d\n')
    assert _kd_lib_imports(mod) == {'a', 'b', 'c', 'd'}


def test_no_unused_imports_in_exported_code():
    pyflakes = pytest.importorskip('pyflakes.api')
    from pyflakes.reporter import Reporter
    import io
    out = io.StringIO()
    files = [p for p in sorted((ROOT / 'kd_lib').glob('*.py')) if p.name != '_modidx.py']
    pyflakes.checkRecursive([str(p) for p in files], Reporter(out, out))
    assert not out.getvalue(), out.getvalue()


def test_every_config_key_is_read_by_the_library():
    "A key no module reads would do nothing: each is read as an attribute (`.steps`) or named ('training.steps')."
    import dataclasses
    from kd_lib.config import Config
    code = '\n'.join(p.read_text() for p in (ROOT / 'kd_lib').glob('*.py') if p.name not in ('config.py', '_modidx.py'))
    unread = [f'{s.name}.{f.name}' for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory())
              if not re.search(rf"\.{f.name}\b|['\"]{s.name}\.{f.name}['\"]", code)]
    assert not unread, f'config keys no module reads: {unread}'
