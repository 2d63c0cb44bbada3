"Students that start from something: a Hugging Face student trained by run_stage (KD from an HF teacher, exact resume), a pruned teacher."
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY, tiny_data
from kd_lib.checkpoint import CheckpointManager
from kd_lib.config import Config
from kd_lib.evaluate import load_eval_rows, rollout_batch
from kd_lib.recipes import prepare_data, run_stage
from kd_lib.students import HFStudent
from kd_lib.tokenizer import BOS, EOS, PAD, load_tokenizer
from kd_lib.tracing import read_metrics


def tiny_llama(folder, n_layers=3, seed=0):
    "A tiny random LlamaForCausalLM saved to `folder` (vocabulary of TINY's tokenizer)."
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                      initializer_range=0.3)  # large weights: diverse greedy tokens
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "Tiny data and a tiny HF model folder."
    tmp = tmp_path_factory.mktemp('students')
    data = tiny_data(tmp / 'data')
    prepare_data(Config().override(*TINY, *data))
    return tmp, data, tiny_llama(tmp / 'hf')


def weights(folder) -> dict: return load_file(str(folder / 'model.safetensors'))


def test_hf_student_trains_and_resumes_exactly(setup):
    tmp, data, hf = setup
    over = [*TINY, *data, 'student.init=hf', f'student.path={hf}', 'distillation.kd_weight=0', 'distillation.ce_weight=1',
            'training.ema_decay=0.5']
    cfg = Config().override(*over)
    assert run_stage(cfg, tmp / 'full').status == 'finished'
    losses = [r['loss'] for r in read_metrics(tmp / 'full', split='train')]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert [r['step'] for r in read_metrics(tmp / 'full', split='eval', latest_only=True)] == [2, 4]  # kd_lib's rollout evaluation ran
    # interrupted after step 2, resumed: bit-identical final weights (the EMA) to the uninterrupted run
    assert run_stage(cfg, tmp / 'split', until=2).status == 'stopped'
    assert run_stage(cfg, tmp / 'split').status == 'finished'
    a, b = weights(tmp / 'full' / 'final'), weights(tmp / 'split' / 'final')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['model.layers.0.mlp.up_proj.weight'], weights(hf)['model.layers.0.mlp.up_proj.weight'])  # it trained
    # the final folder is a plain HF folder; a checkpoint's model state has the HF names and loads into the plain model
    plain = AutoModelForCausalLM.from_pretrained(tmp / 'full' / 'final')
    state = CheckpointManager(tmp / 'full' / 'checkpoints', 4).load()['model']
    fresh = AutoModelForCausalLM.from_pretrained(hf)
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(1, 512, (2, 6))
    assert torch.equal(plain(input_ids=ids).logits, HFStudent.from_pretrained(tmp / 'full' / 'final')(ids).logits)


def test_pruned_hf_teacher_distils_through_run_stage(setup):
    tmp, data, hf = setup
    cfg = Config().override(*TINY, *data, 'teacher.kind=hf', f'teacher.path={hf}', 'distillation.kd_weight=1', 'student.init=prune_teacher',
                            'student.prune_n_layers=2', 'student.prune_mlp_hidden=32', 'student.calibration_batches=2')
    assert run_stage(cfg, tmp / 'pruned', evaluate=False).status == 'finished'
    report = json.loads((tmp / 'pruned' / 'prune_report.json').read_text())
    assert len(report['kept_layers']) == 2 and report['student_mlp_hidden'] == 32 and report['calibration_tokens'] > 0
    assert report['kept_layers'] == sorted(torch.tensor(report['block_importance']).topk(2).indices.tolist())
    assert report['param_ratio']['embedding'] == 1.0 and 0 < report['param_ratio']['non_embedding'] < 0.5
    assert (tmp / 'pruned' / 'prune_report.md').read_text().startswith('Kept 2 of 3 layers')
    assert all(r['kd'] > 0 for r in read_metrics(tmp / 'pruned', split='train'))
    final = AutoModelForCausalLM.from_pretrained(tmp / 'pruned' / 'final')
    assert final.config.num_hidden_layers == 2 and final.config.intermediate_size == 32


def test_rollout_of_hf_student_equals_hf_generate(setup):
    tmp, data, hf = setup
    cfg = Config().override(*TINY, *data)
    tok, rows = load_tokenizer(cfg.data.tokenizer_path), load_eval_rows(cfg.data.eval_path, 4)
    student = HFStudent.from_pretrained(hf)
    rollouts = rollout_batch(student, tok, rows, max_new_tokens=8)
    pad, eos = tok.token_to_id(PAD), tok.token_to_id(EOS)
    prompts = [[tok.token_to_id(BOS)] + tok.encode(r['prompt'], add_special_tokens=False).ids for r in rows]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = student.hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, width:]
    for r, row in zip(rollouts, ref.tolist()):
        row = row[:row.index(eos) + 1] if eos in row else row
        assert r.transcript == tok.decode(row, skip_special_tokens=False) and r.generated_tokens == len(row) and r.tool_calls == 0
