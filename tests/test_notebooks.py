"Every notebook's own test cells, run by nbdev's engine (as nbdev-test does)."
from pathlib import Path

import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook  # aliased: pytest would collect `test_nb` itself

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))


@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb):
    ok, _ = run_notebook(nb, skip_flags=get_config(ROOT).tst_flags.split(), basepath=ROOT)
    assert ok, f'{nb.name} failed (traceback above)'


def test_stage_notebooks_keep_parameters_tag():
    import nbformat
    for nb_path in (ROOT / 'nbs').glob('run_*.ipynb'):
        nb = nbformat.read(nb_path, as_version=4)
        assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells if c.cell_type == 'code'), nb_path.name
