"The QAT stage end to end on a tiny corpus: teacher -> KD student -> calibrate, distill with fake quantization, convert, save, report."
import json
from pathlib import Path

import pytest
import torch

from kd_lib.config import ConfigError, config_from_dict
from kd_lib.qat import load_int8
from kd_lib.recipes import qat_markdown, qat_report, run_stage
from kd_lib.tracing import read_metrics


def tiny(tmp, stage, **sections):
    base = {'data': dict(train_path=str(tmp/'data/train.jsonl'), eval_path=str(tmp/'data/eval.jsonl'), tokenizer_path=str(tmp/'data/tokenizer.json'),
                         synth_train_episodes=200, synth_eval_episodes=20, vocab_size=512, max_length=256),
            'model': dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=256),
            'training': dict(stage=stage, steps=6, batch_size=4, lr=3e-3, warmup_steps=1, device='cpu', eval_examples=4),
            'checkpoint': dict(save_every=3, min_free_space_gb=0.0), 'tracing': dict(log_every=1, tensorboard=False, progress=False)}
    for sec, kv in sections.items(): base[sec] = {**base.get(sec, {}), **kv}
    return config_from_dict(base)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny teacher and a tiny KD student, and the QAT config on top of them."
    tmp_path = tmp_path_factory.mktemp('qat')
    assert run_stage(tiny(tmp_path, 'teacher'), tmp_path/'teacher', evaluate=False).status == 'finished'
    teacher = dict(kind='checkpoint', path=str(tmp_path/'teacher/final'))
    assert run_stage(tiny(tmp_path, 'kd', teacher=teacher), tmp_path/'kd', evaluate=False).status == 'finished'
    cfg = tiny(tmp_path, 'qat', teacher=teacher, distillation=dict(kd_weight=1.0, ce_weight=0.5),
               qat=dict(enabled=True, calibration_batches=2, student_path=str(tmp_path/'kd/final')))
    return tmp_path, cfg


def test_qat_stage_end_to_end(trained):
    tmp_path, cfg = trained
    with pytest.raises(ConfigError, match='qat.enabled'): run_stage(cfg.override('qat.enabled=false'), tmp_path/'x')
    with pytest.raises(ConfigError, match='qat.student_path'): run_stage(cfg.override(f'qat.student_path={tmp_path}/none'), tmp_path/'x')

    # interrupted after 3 steps, then resumed: the frozen activation scales come back from the checkpoint
    assert run_stage(cfg, tmp_path/'qat', until=3).status == 'stopped'
    result = run_stage(cfg, tmp_path/'qat')
    assert result.status == 'finished' and result.step == 6
    m = read_metrics(tmp_path/'qat', split='train')
    assert [r['step'] for r in m] == list(range(1, 7)) and m[0]['kd'] > 0 and m[0]['ce'] > 0  # KD against the fp teacher

    int8 = load_int8(tmp_path/'qat/final_int8')
    assert int8.blocks[0].attn.qkv.qweight.dtype == torch.int8 and (tmp_path/'qat/final_int8/tokenizer.json').exists()
    quant = json.loads((tmp_path/'qat/final_int8/config.json').read_text())['quantization']
    assert quant['qat_steps'] == 6 and quant['fake_quant_max_logit_diff'] < 1e-2

    report = qat_report(cfg, tmp_path/'qat', max_examples=4, batch_size=4, speed_prompts=2, speed_tokens=4)
    assert report['size_ratio'] >= 3.5 and report['speed_ratio'] > 0
    assert set(report['quality']) == {'fp32', 'ptq_int8', 'qat_int8'} and report['eval_examples'] == 4
    assert '## INT8 quantization-aware training' in qat_markdown(report)


def test_run_qat_notebook(trained, tmp_path):
    "The stage notebook under papermill, with the tiny config given as overrides."
    import papermill as pm
    _, cfg = trained
    nb = Path(__file__).resolve().parents[1]/'nbs/run_qat.ipynb'
    (tmp_path/'qat.yaml').write_text(cfg.to_yaml())
    pm.execute_notebook(str(nb), str(tmp_path/'out.ipynb'), parameters=dict(config_paths=[str(tmp_path/'qat.yaml')], overrides=[], run_dir=str(tmp_path/'qat'), eval_examples=4),
                        cwd=str(nb.parent), progress_bar=False)
    report = json.loads((tmp_path/'qat/qat_report.json').read_text())
    assert report['size_ratio'] >= 3.5 and (tmp_path/'qat/qat_report.md').read_text().startswith('## INT8')
