"The default pipeline and every stage notebook, executed by papermill on a tiny config."
import json

import papermill as pm
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, TINY, tiny_data
from kd_lib.config import ConfigError, load_config
from kd_lib.dataset import KDDataset
from kd_lib.fused import kd_ce_loss
from kd_lib.losses import KDOptions
from kd_lib.models import StudentLM
from kd_lib.recipes import build_cache_stage, prepare_data, run_stage
from kd_lib.teacher_cache import TeacherCache, build_teacher_cache
from kd_lib.teachers import load_teacher, stage_tokenizer
from kd_lib.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_hash
from kd_lib.pipeline import run_default_pipeline
from kd_lib.tracing import read_metrics


def test_default_pipeline_and_answer_stage_tiny(tmp_path):
    run_dir = tmp_path / 'default'
    records = run_default_pipeline(run_dir, TINY)
    assert list(records) == ['data', 'teacher', 'teacher_cache', 'ce', 'kd', 'kd_process', 'qat', 'token_reduction', 'on_policy',
                             'report']
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
    section, latent = text.split('## Token reduction')[1].split('## On-policy')[0].split('### Latent curriculum')
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
    # the on-policy comparison: both students for every seed, on the pipeline's teacher, in results.md
    assert records['on_policy']['seeds'] == [1, 2, 3] and records['on_policy']['steps'] == 4
    assert (run_dir / 'on_policy' / 'on_policy_seed3' / 'final' / 'model.safetensors').exists()
    assert (run_dir / 'on_policy' / 'on_policy.md').read_text().strip() in text and 'on_policy/on_policy.png' in text
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


# --- Hugging Face teachers (tiny Llama models saved to tmp folders; nothing is downloaded) ---

def _hf_teacher(folder, data, vocab_size=400):
    "A tiny random Llama teacher with a byte-level BPE tokenizer trained on the corpus, without kd_lib's tags."
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    rows = [json.loads(line) for line in (data / 'train.jsonl').open()]
    tok.train_from_iterator((r['prompt'] + r['teacher_text'] for r in rows),
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return tok.get_vocab_size()


def _hf_cfg(tmp_path, *overrides):
    data = tmp_path / 'data'
    cfg = load_config(overrides=[*TINY, *tiny_data(data), 'training.stage=kd'])
    prepare_data(cfg)
    if not (tmp_path / 'hf').exists(): _hf_teacher(tmp_path / 'hf', data)
    return cfg.override('teacher.kind=hf', f'teacher.path={tmp_path / "hf"}', 'distillation.kd_weight=1.0', *overrides)


class _VocabTensors(TorchDispatchMode):
    "Records every op output of shape [B, T, V] (B = the batch size, V = the vocabulary) built while active."
    def __init__(self, batch: int, vocab: int):
        super().__init__()
        self.batch, self.vocab, self.seen = batch, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t) and t.dim() == 3 and (t.shape[0], t.shape[-1]) == (self.batch, self.vocab): self.seen.append((str(func), tuple(t.shape)))
        return out


def test_hf_teacher_kd_stage_teacher_tokenizer(tmp_path):
    "KD (plus intermediate-layer matching) from an hf teacher, the student on the teacher's tokenizer; no [B,T,V] tensor."
    # batch 3: the fused loss's chunk buffers are [4, chunk, V]; a [B, T, V] tensor would start with 3
    cfg = _hf_cfg(tmp_path, 'student.tokenizer=teacher', 'distillation.intermediate_weight=0.5', 'training.steps=3', 'training.batch_size=3')
    n0 = len(json.loads((tmp_path / 'hf' / 'tokenizer.json').read_text())['model']['vocab'])
    vocab = n0 + len(SPECIAL_TOKENS)
    with _VocabTensors(3, vocab) as spy:
        result = run_stage(cfg, tmp_path / 'kd', evaluate=False)
    assert result.status == 'finished' and spy.seen == []
    train = read_metrics(tmp_path / 'kd', split='train')
    assert [r['step'] for r in train] == [1, 2, 3] and all(r['kd'] > 0 for r in train)
    report = json.loads((tmp_path / 'kd' / 'tokenizer_compatibility.json').read_text())
    assert report['can_share_logits'] and report['teacher_vocab_size'] == report['student_vocab_size'] == vocab
    final = tmp_path / 'kd' / 'final'
    assert json.loads((final / 'config.json').read_text())['model']['vocab_size'] == vocab
    assert load_tokenizer(final / 'tokenizer.json').token_to_id(SPECIAL_TOKENS[-1]) == vocab - 1
    with _VocabTensors(3, vocab) as control, torch.no_grad():  # the spy does see full logits when they are built
        StudentLM.from_pretrained(final)(torch.zeros(3, 5, dtype=torch.long))
    assert control.seen


def test_hf_teacher_bf16_and_vocab_mismatch(tmp_path):
    "A bf16 hf teacher trains a student; a kd_lib-tokenizer student against it stops with both sizes and the fix."
    cfg = _hf_cfg(tmp_path, 'student.tokenizer=teacher', 'teacher.dtype=bfloat16', 'training.steps=2')
    assert run_stage(cfg, tmp_path / 'bf16', evaluate=False).status == 'finished'
    assert all(r['kd'] > 0 for r in read_metrics(tmp_path / 'bf16', split='train'))
    mismatch = cfg.override('student.tokenizer=kd_lib')
    with pytest.raises(ConfigError, match=r"teacher's vocabulary \(\d+ rows.*model.vocab_size=512.*student.tokenizer: teacher"):
        run_stage(mismatch, tmp_path / 'mismatch', evaluate=False)
    assert not json.loads((tmp_path / 'mismatch' / 'tokenizer_compatibility.json').read_text())['can_share_logits']


def test_hf_teacher_hidden_head_equals_logits(tmp_path):
    "The fused loss from the hf teacher's final hidden states and head weight equals the plain loss from its logits."
    cfg = _hf_cfg(tmp_path, 'student.tokenizer=teacher')
    teacher = load_teacher(cfg.teacher)
    tokenizer, cfg = stage_tokenizer(cfg, teacher)
    ids = torch.tensor([tokenizer.encode('<tool_call>{"name": "get_weather"}</tool_call> Oslo is mild', add_special_tokens=False).ids] * 2)
    mask = torch.ones_like(ids); mask[1, :3] = 0
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).masked_fill(mask == 0, -100)
    torch.manual_seed(1)
    s_hidden, s_weight = torch.randn(*ids.shape, 16), torch.randn(teacher.vocab_size, 16) * 0.1
    t_hidden, t_weight = teacher.head_inputs(ids, mask)
    for divergence in ('forward_kl', 'jsd'):
        opts = KDOptions(divergence=divergence, ce_weight=0.5)
        fused, parts = kd_ce_loss(labels, student_hidden=s_hidden, student_head_weight=s_weight, teacher_hidden=t_hidden,
                                  teacher_head_weight=t_weight, opts=opts)
        plain, plain_parts = kd_ce_loss(labels, student_logits=s_hidden @ s_weight.T, teacher_logits=teacher.logits(ids, mask), opts=opts)
        assert torch.allclose(fused, plain, atol=1e-5) and torch.allclose(parts['kd'], plain_parts['kd'], atol=1e-5), divergence


def _by_id(ids, logprobs):
    "A position's top-k entries in id order."
    ids, order = ids.sort(-1)
    return ids, logprobs.gather(-1, order)


def test_hf_teacher_cache_stage(tmp_path):
    "The cache stage scores an hf teacher from hidden states (no [B,T,V] logits, their top-k); a KD stage distils from it."
    cfg = _hf_cfg(tmp_path, 'student.tokenizer=teacher')
    stage = {'config_paths': [], 'overrides': [*TINY, *tiny_data(tmp_path / 'data'), 'teacher.kind=hf', 'student.tokenizer=teacher']}
    rows = sum(1 for _ in open(cfg.data.train_path, encoding='utf-8'))
    vocab = len(json.loads((tmp_path / 'hf' / 'tokenizer.json').read_text())['model']['vocab']) + len(SPECIAL_TOKENS)
    with _VocabTensors(min(32, rows), vocab) as spy:  # the stage scores 32 rows a batch
        report = build_cache_stage(stage, tmp_path / 'hf', tmp_path / 'cache')
    assert spy.seen == []
    manifest = json.loads((tmp_path / 'cache' / 'manifest.json').read_text())
    assert manifest['k'] == 4 and manifest['fingerprint'].startswith('hf:') and 0 < report['covered_mass'] <= 1
    assert json.loads((tmp_path / 'cache' / 'tokenizer_compatibility.json').read_text())['can_share_logits']
    teacher = load_teacher(cfg.teacher)
    tokenizer, _ = stage_tokenizer(cfg, teacher)
    assert manifest['vocab_size'] == teacher.vocab_size == vocab and manifest['tokenizer_hash'] == tokenizer_hash(tokenizer)
    dataset = KDDataset(cfg.data.train_path, tokenizer, max_length=cfg.data.max_length)
    by_logits = build_teacher_cache(teacher.logits, dataset, tmp_path / 'by_logits', k=4, fingerprint='logits', batch_size=32)
    stage_cache = TeacherCache(tmp_path / 'cache')
    for i in range(rows):  # the same top-k (near-ties may swap places); log-probs equal up to their fp16 storage
        (ids, logprobs), (want_ids, want) = (_by_id(*c.row(i)) for c in (stage_cache, by_logits))
        assert torch.equal(ids, want_ids) and torch.allclose(logprobs, want, rtol=2 ** -10, atol=0)
    # a KD stage distils from that cache, on the tokenizer the cache stage saved
    from_cache = cfg.override('teacher.kind=cache', f'teacher.path={tmp_path / "cache"}', 'training.steps=2')
    assert run_stage(from_cache, tmp_path / 'kd_cache', evaluate=False).status == 'finished'
    assert all(r['kd'] > 0 for r in read_metrics(tmp_path / 'kd_cache', split='train'))
    assert json.loads((tmp_path / 'kd_cache' / 'final' / 'config.json').read_text())['model']['vocab_size'] == teacher.vocab_size


def test_checkpoint_teacher_intermediate_matching(tmp_path):
    "Intermediate-layer matching sizes its projector from the teacher's d_model / n_layers (a kd_lib checkpoint teacher)."
    from kd_lib.config import ModelConfig
    from kd_lib.recipes import save_final
    cfg = load_config(overrides=[*TINY, *tiny_data(tmp_path / 'data'), 'training.stage=kd', 'distillation.intermediate_weight=0.5',
                                 'training.steps=2', 'teacher.kind=checkpoint', f'teacher.path={tmp_path / "teacher"}'])
    prepare_data(cfg)
    teacher = StudentLM(ModelConfig(vocab_size=512, d_model=48, n_layers=3, n_heads=2, n_kv_heads=1, max_seq_len=256))
    save_final(teacher, load_tokenizer(cfg.data.tokenizer_path), tmp_path / 'teacher')
    assert run_stage(cfg, tmp_path / 'kd', evaluate=False).status == 'finished'
    assert all(r['intermediate'] > 0 for r in read_metrics(tmp_path / 'kd', split='train'))
    assert json.loads((tmp_path / 'kd' / 'tokenizer_compatibility.json').read_text())['id_overlap'] == 1.0
