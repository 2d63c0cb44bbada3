"The default pipeline and every stage notebook, executed by papermill on a tiny config."
import json

import papermill as pm

from conftest import ROOT, TINY
from kd_lib.pipeline import run_default_pipeline
from kd_lib.tracing import read_metrics


def test_default_pipeline_and_answer_stage_tiny(tmp_path):
    run_dir = tmp_path / 'default'
    records = run_default_pipeline(run_dir, TINY)
    assert list(records) == ['data', 'teacher', 'teacher_cache', 'ce', 'kd', 'kd_process', 'qat', 'token_reduction', 'report']
    for stage in ('teacher', 'ce', 'kd', 'kd_process'):
        assert (run_dir / stage / 'final' / 'model.safetensors').exists(), stage
        assert (run_dir / 'notebooks' / f'{stage}.ipynb').exists(), stage
        assert [r['step'] for r in read_metrics(run_dir / stage, split='eval', latest_only=True)] == [2, 4], stage
    kd = read_metrics(run_dir / 'kd', split='train')
    ce = read_metrics(run_dir / 'ce', split='train')
    assert all(r['kd'] > 0 for r in kd) and all(r['kd'] == 0 for r in ce)
    text = (run_dir / 'results.md').read_text()
    assert '| kd_process |' in text and (run_dir / 'results_metrics.png').exists()
    assert (run_dir / 'qat' / 'final_int8' / 'model.safetensors').exists() and 'int8' in text
    assert json.loads((run_dir / 'teacher_cache' / 'manifest.json').read_text())['k'] == 4
    # the token-reduction table: a row per student (and the halting row), every number parses
    tr = run_dir / 'token_reduction'
    assert all((tr / s / 'final' / 'model.safetensors').exists() for s in ('direct', 'code_mode', 'plan', 'latent'))
    assert records['token_reduction']['episodes'] == 4 and records['token_reduction']['steps'] == 4
    section, latent = text.split('## Token reduction')[1].split('## Stage times')[0].split('### Latent curriculum')
    latent_rows = [[c.strip() for c in line.strip('|').split('|')] for line in latent.splitlines() if line.startswith('|')][2:]
    assert latent_rows[-1][:3] == ['plan (full plan)', '4', '0'] and len(latent_rows) >= 3
    assert all(r[0] == 'latent' and 0 <= float(r[3]) <= 1 for r in latent_rows[:-1])  # one row per evaluation
    assert [int(r[2]) for r in latent_rows[:-1]] == sorted(int(r[2]) for r in latent_rows[:-1])  # stages grow
    assert 'trained 4 steps' in section and 'same 4 held-out episodes' in section and 'halt head' in section
    table = [line for line in section.splitlines() if line.startswith('|')]
    assert table == (tr / 'token_reduction.md').read_text().splitlines()
    assert 'generated tokens / episode' in table[0] and 'unneeded tool calls / episode' in table[0]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip('|').split('|')] for line in table[2:])}
    assert list(rows) == ['direct', 'direct + halting', 'code_mode', 'plan', 'latent']
    results = {r['student']: r for r in json.loads((tr / 'token_reduction.json').read_text())['results']}
    for name, cells in rows.items():
        generated, context, tool_name, exact, integration, calls, unneeded = cells
        assert 0 < float(generated) <= 160 and float(context) >= float(generated) - 0.05, name
        assert tool_name == '-' or 0 <= float(tool_name) <= 1, name
        assert 0 <= float(exact) <= 1 and float(calls) >= 0 and 0 <= float(unneeded) <= float(calls) + 0.005, name
        assert integration == '-' or 0 <= float(integration) <= 1, name
        assert abs(float(generated) - results[name]['generated_tokens']) <= 0.05, name
    # a rerun resumes: every stage is already done
    assert run_default_pipeline(run_dir, TINY) == records

    # the answer stage (not part of the default pipeline) on the pipeline's data and teacher cache
    data = run_dir / 'data'
    params = {'config_paths': [str(ROOT / 'configs/student_cpu.yaml'), str(ROOT / 'configs/kd_recipe.yaml')],
              'overrides': [f'data.train_path={data}/train.jsonl', f'data.eval_path={data}/eval.jsonl',
                            f'data.tokenizer_path={data}/tokenizer.json', 'training.stage=answer', 'teacher.kind=cache',
                            f'teacher.path={run_dir}/teacher_cache', *TINY],
              'run_dir': str(tmp_path / 'answer')}
    pm.execute_notebook(str(ROOT / 'nbs/run_answer.ipynb'), str(tmp_path / 'answer.ipynb'), parameters=params,
                        cwd=str(ROOT / 'nbs'), progress_bar=False)
    assert (tmp_path / 'answer' / 'final' / 'model.safetensors').exists()

    # the evaluation stage notebook compares the pipeline's students (with the teacher for perplexity and span KL)
    ev = {'models': {'ce': str(run_dir / 'ce/final'), 'kd': str(run_dir / 'kd/final')}, 'tokenizer_path': str(data / 'tokenizer.json'),
          'eval_path': str(data / 'eval.jsonl'), 'out_dir': str(tmp_path / 'eval'), 'max_examples': 4, 'max_new_tokens': 24,
          'teacher': str(run_dir / 'teacher/final'), 'device': 'cpu'}
    pm.execute_notebook(str(ROOT / 'nbs/run_eval.ipynb'), str(tmp_path / 'eval.ipynb'), parameters=ev, cwd=str(ROOT / 'nbs'), progress_bar=False)
    models = json.loads((tmp_path / 'eval' / 'eval_results.json').read_text())['models']
    assert set(models) == {'ce', 'kd'} and all(m['episodes'] == 4 and m['perplexity'] > 1 for m in models.values())
