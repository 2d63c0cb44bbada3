"The real run (kd_lib.real) end to end at a tiny scale: a tiny Llama teacher with a ChatML tokenizer, a few steps per stage."
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kd_lib.cli import main
from kd_lib.dataset import CHATML_TEMPLATE
from kd_lib.real import MODEL_ROWS, run_real_pipeline, student_run_name, tool_menu
from kd_lib.synth import generate_episodes
from kd_lib.tracing import read_metrics


def tiny_teacher(folder):
    "A tiny random Llama with a byte-level BPE tokenizer (ChatML tokens, a ChatML chat template), saved locally: no download."
    texts = [tool_menu()] + [json.dumps(r['messages']) for r in generate_episodes(300, 0, 'train', fmt='chat')]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=['<|im_start|>', '<|im_end|>'], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=50000.0)
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|im_end|>', pad_token='<|im_end|>',
                            chat_template=CHATML_TEMPLATE).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_real_pipeline_tiny(tmp_path):
    teacher = tiny_teacher(tmp_path / 'tiny_teacher')
    overrides = [f'real.teacher_source={teacher}', 'real.train_rows=24', 'real.eval_rows=6', 'real.teacher_steps=3', 'real.student_steps=3',
                 'real.prune_layers=2', 'real.prune_mlp_hidden=48', 'real.max_new_tokens=8', 'real.finetune_below=1.1',
                 'real.second_seed=always', 'real.on_policy_seeds=3', 'real.student_lr=0.001', 'data.max_length=1024', 'training.device=cpu',
                 'tracing.progress=false']
    run = tmp_path / 'run'
    records = run_real_pipeline(run, overrides, log=lambda m: None)
    assert list(records) == ['teacher_hf', 'data', 'eval_teacher_before', 'teacher', 'eval_teacher', 'kl_teacher_before',
                             'ce', 'eval_ce', 'kd', 'eval_kd', 'kd_random', 'eval_kd_random', 'ce_seed1', 'eval_ce_seed1',
                             'kd_seed1', 'eval_kd_seed1', 'kd_on_policy', 'eval_kd_on_policy', 'kd_on_policy_seed1',
                             'eval_kd_on_policy_seed1', 'kd_seed2', 'eval_kd_seed2', 'kd_on_policy_seed2', 'eval_kd_on_policy_seed2',
                             'on_policy', 'export', 'report']
    assert records['teacher_hf']['max_logit_diff'] < 1e-5 and records['teacher']['steps'] == 3
    # the students: pruned to 2 of 4 layers (under half the non-embedding parameters), KD terms where distilled, equal steps
    prune = json.loads((run / 'kd' / 'prune_report.json').read_text())
    assert len(prune['kept_layers']) == 2 and prune['param_ratio']['non_embedding'] < 0.5
    for name in ('ce', 'kd', 'kd_random', 'ce_seed1', 'kd_seed1', 'kd_seed2', 'kd_on_policy', 'kd_on_policy_seed1', 'kd_on_policy_seed2'):
        train = read_metrics(run / name, split='train')
        assert [r['step'] for r in train] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r['loss'])) for r in train)
        assert all((r.get('kd') or 0) > 0 for r in train) == name.startswith('kd'), name
        assert any(r.get('on_policy') for r in train) == name.startswith('kd_on_policy'), name
    assert read_metrics(run / 'ce', split='train')[0]['loss'] != read_metrics(run / 'ce_seed1', split='train')[0]['loss']  # another order
    evals = {p.stem: json.loads(p.read_text()) for p in (run / 'eval').glob('*.json')}
    assert all(len(evals[n]['generations']) == 6 for n in ('teacher_before', 'teacher', 'ce', 'kd', 'kd_random'))
    assert evals['kd']['kl_to_teacher'] > 0 and evals['teacher']['kl_to_teacher'] is None and evals['teacher_before_kl']['kl_to_teacher'] > 0
    # the export: the best student, a transformers folder with the same logits
    export = records['export']
    assert export['max_logit_diff'] < 1e-4 and export['student'] in ('ce', 'kd', 'kd_random', 'ce_seed1', 'kd_seed1')
    assert AutoModelForCausalLM.from_pretrained(export['folder']).config.vocab_size == prune['student_params']['embedding'] // 48
    # the on-policy comparison: every seed's KL in its table is the student's evaluation
    per_seed = (run / 'on_policy.md').read_text().split('| student | seed |')[1]
    for arm, student in (('off_policy', 'kd'), ('on_policy', 'kd_on_policy')):
        for seed in range(3):
            kl = evals[student_run_name(student, seed)]['kl_to_teacher']
            assert f'| {arm} | {seed} |' in per_seed and f'{kl:.3f}' in per_seed.split(f'| {arm} | {seed} |')[1].splitlines()[0], (arm, seed)
    text = (run / 'results.md').read_text()
    assert '## On-policy against off-policy KD' in text and 'On-policy ' in text
    assert all(f'| {label} |' in text for label in MODEL_ROWS.values()) and (run / 'learning_curves.png').stat().st_size > 5000
    # a rerun through the CLI resumes: every stage is done already
    assert main(['real', '--run-dir', str(run), '--set', *overrides]) == 0
    assert json.loads((run / 'stages' / 'report.json').read_text())['seconds'] == records['report']['seconds']
