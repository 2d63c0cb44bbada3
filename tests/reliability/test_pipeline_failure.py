"""Pipeline failures: a stage notebook that raises stops the pipeline with the stage's error, its executed notebook is
kept, and a rerun resumes at the failed stage without redoing the finished ones. Also: `kd-lib pipeline` turns a
PipelineError into one line and exit code 2."""
import json

import nbformat
import pytest

import kd_lib.pipeline
from kd_lib.stages import PipelineError, Stage, run_stages
from reliability_helpers import run_cli_inprocess


def _stage_notebook(path, flag):
    "A two-cell stage: parameters, then a cell that fails while `flag` exists."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f'flag = {str(flag)!r}', metadata={'tags': ['parameters']}),
                nbformat.v4.new_code_cell('from pathlib import Path\n'
                                          'if Path(flag).exists(): raise RuntimeError("stage exploded: disk on fire")\n'
                                          'Path(flag).with_name("trained.txt").write_text("ok")')]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, path)


def test_failed_stage_stops_keeps_notebook_and_rerun_resumes(tmp_path):
    runs = {'prepare': 0, 'report': 0}
    def counted(name):
        def fn(run_dir):
            runs[name] += 1
            return {'ran': runs[name]}
        return fn
    flag = tmp_path / 'broken'
    flag.touch()
    _stage_notebook(tmp_path / 'train_stage.ipynb', flag)
    stages = [Stage('prepare', fn=counted('prepare')), Stage('train', str(tmp_path / 'train_stage.ipynb'), {'flag': str(flag)}),
              Stage('report', fn=counted('report'))]
    run_dir, log = tmp_path / 'run', []
    with pytest.raises(PipelineError) as err: run_stages(stages, run_dir, log=log.append)
    assert err.value.stage == 'train' and 'RuntimeError: stage exploded: disk on fire' in str(err.value)
    kept = run_dir / 'notebooks' / 'train.ipynb'
    assert err.value.notebook == kept and str(kept) in str(err.value) and 'stage exploded' in kept.read_text()
    assert runs == {'prepare': 1, 'report': 0}  # stopped at the failure
    assert sorted(p.stem for p in (run_dir / 'stages').glob('*.json')) == ['prepare']
    flag.unlink()  # the user fixes the cause and reruns
    records = run_stages(stages, run_dir, log=log.append)
    assert runs == {'prepare': 1, 'report': 1} and '[pipeline] prepare: already done, skipped' in log
    assert (tmp_path / 'trained.txt').read_text() == 'ok' and records['train']['notebook'] == str(kept)
    assert json.loads((run_dir / 'stages' / 'report.json').read_text())['ran'] == 1


def test_cli_reports_a_failed_stage_in_one_line(tmp_path, monkeypatch):
    def fail(run_dir, overrides): raise PipelineError('teacher', 'RuntimeError: boom', tmp_path / 'teacher.ipynb')
    monkeypatch.setattr(kd_lib.pipeline, 'run_default_pipeline', fail)
    rc, _, err = run_cli_inprocess(['pipeline', '--run-dir', str(tmp_path / 'run')])
    assert rc == 2 and err == f"kd-lib: error: stage 'teacher' failed: RuntimeError: boom (executed notebook kept at {tmp_path / 'teacher.ipynb'})\n"
