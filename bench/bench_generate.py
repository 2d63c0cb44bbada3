"""Generation speed on CPU with and without the KV cache, for a kd_lib StudentLM and a Hugging Face LlamaForCausalLM of
the same shape (both through kd_lib.generate.sample_completions), and the time of an on-policy training step against
an off-policy one. Run: PYTHONPATH=. python bench/bench_generate.py"""
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_lib.config import config_from_dict
from kd_lib.dataset import KDDataset
from kd_lib.generate import SamplingConfig, sample_completions
from kd_lib.models import ModelConfig, StudentLM, mlp_hidden_size
from kd_lib.objective import KDObjective
from kd_lib.students import HFStudent
from kd_lib.synth import generate_episodes, write_jsonl
from kd_lib.teachers import CheckpointTeacher
from kd_lib.tokenizer import build_tokenizer

from bench_models import median_time  # bench/ is on sys.path when a bench script runs

SHAPE = dict(vocab_size=2048, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=256)
BATCH, PROMPT, NEW = 8, 48, 48


@torch.no_grad()
def uncached_greedy(model, ids, new):
    "Greedy generation that re-runs the whole sequence for every new token (no cache)."
    for _ in range(new): ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, -new:]


def same_shape_llama(cfg: ModelConfig) -> HFStudent:
    "A random LlamaForCausalLM with the StudentLM's shape, behind kd_lib's HFStudent."
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=mlp_hidden_size(cfg),
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                      max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings))
    return HFStudent(hf).eval()


def generation_rows(models: dict) -> None:
    "Tokens/s of greedy generation with and without the KV cache."
    prompt = torch.randint(1, SHAPE['vocab_size'], (BATCH, PROMPT))
    print(f'greedy generation, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens (tokens/s)')
    print(f'{"model":<22}{"KV cache":>10}{"no cache":>10}{"ratio":>8}')
    for name, model in models.items():
        cached = sample_completions(model, prompt.tolist(), SamplingConfig(max_new_tokens=NEW), [0] * BATCH)
        assert torch.equal(torch.tensor(cached), uncached_greedy(model, prompt, NEW)), name  # the same tokens either way
        t_cache = median_time(lambda: sample_completions(model, prompt.tolist(), SamplingConfig(max_new_tokens=NEW), [0] * BATCH), repeats=3)
        t_plain = median_time(lambda: uncached_greedy(model, prompt, NEW), repeats=3)
        n = BATCH * NEW
        print(f'{name:<22}{n / t_cache:>10.0f}{n / t_plain:>10.0f}{t_plain / t_cache:>7.1f}x')


def objective_step_rows(student: StudentLM) -> None:
    "Wall time of one training step (forward + backward) of an off-policy and an on-policy micro-batch."
    tmp = Path(tempfile.mkdtemp())
    episodes = generate_episodes(16, seed=0)
    tokenizer = build_tokenizer([r['prompt'] + r['teacher_text'] for r in episodes], vocab_size=SHAPE['vocab_size'])
    write_jsonl(episodes, tmp / 'train.jsonl')
    data = KDDataset(tmp / 'train.jsonl', tokenizer, max_length=192)
    batch = data.collate([data[i] for i in range(BATCH)])
    torch.manual_seed(1)
    StudentLM(student.cfg).save_pretrained(tmp / 'teacher')
    teacher = CheckpointTeacher(tmp / 'teacher')
    student.train()

    def step(fraction):
        cfg = config_from_dict({'model': SHAPE, 'teacher': {'kind': 'checkpoint', 'path': str(tmp / 'teacher')}, 'data': {'max_length': 256},
                                'distillation': {'kd_weight': 1.0, 'on_policy_fraction': fraction, 'on_policy_max_new_tokens': NEW}})
        objective = KDObjective(cfg, teacher, tokenizer)
        def run():
            student.zero_grad()
            objective(student, batch, None, 0)[0].backward()
        return median_time(run, repeats=3)
    off, on = step(0.0), step(1.0)
    print(f'\ntraining step, batch {BATCH} (prompts of the synthetic episodes), on-policy samples {NEW} tokens per row')
    print(f'{"off-policy step":<22}{off * 1e3:>8.0f} ms\n{"on-policy step":<22}{on * 1e3:>8.0f} ms\n{"ratio":<22}{on / off:>8.1f}x')


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = StudentLM(ModelConfig(**SHAPE)).eval()
    generation_rows({'kd_lib StudentLM': student, 'HF LlamaForCausalLM': same_shape_llama(student.cfg)})
    objective_step_rows(student)


if __name__ == '__main__': main()
