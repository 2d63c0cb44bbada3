"""One optimizer step of the full objective (every term on) on a tiny student; saves the summed gradients.

Run as `python objective_grads.py DATA OUT MICRO_BATCH GRAD_ACCUM [PARALLEL]` or under torchrun (PARALLEL: ddp or fsdp,
fsdp with activation checkpointing); the rows of the step are always 0..7.
"""
import sys
from pathlib import Path

import torch

from kd_lib.config import config_from_dict
from kd_lib.dataset import KDDataset
from kd_lib.device import seed_everything
from kd_lib.models import ModelConfig, StudentLM
from kd_lib.objective import KDObjective
from kd_lib.teachers import CheckpointTeacher
from kd_lib.tokenizer import load_tokenizer
from kd_lib.train import BatchStream, Trainer, close_distributed, init_distributed

ROWS = 8
MODEL = dict(vocab_size=400, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=256)
HEADS = dict(halt_head=True, self_eval_head=True)
SECTIONS = dict(
    distillation=dict(kd_weight=1.0, ce_weight=0.5, intermediate_weight=0.3, self_eval_weight=0.2, fused=False),
    process=dict(tool_name_weight=0.3, json_argument_weight=0.2, integration_weight=0.1, length_weight=0.1, length_budget=8,
                 early_tool_call_weight=0.2),
    halting=dict(enabled=True, weight=0.5), data=dict(code_mode=True))
CODE_MODE = dict(enabled=True, weight=0.3, warmup_steps=0)


def build_trainer(data: Path, run_dir: Path, micro_batch: int, grad_accum: int, parallel: str = 'ddp', code_mode: str = 'code',
                  steps: int = 2) -> tuple:
    "(trainer, student, objective) of the full objective over rows 0..7 per step."
    info = init_distributed(torch.device('cpu'))
    tokenizer = load_tokenizer(data/'tokenizer.json')
    dataset = KDDataset(data/'train.jsonl', tokenizer, max_length=256)
    per_step = micro_batch * info.world_size
    sampler = [list(range(i, i + per_step)) for i in range(0, ROWS, per_step)]
    # FSDP: every rank must run the same forward passes, so no code-mode term (its extra forward depends on the rows)
    code = {} if parallel == 'fsdp' or code_mode == 'nocode' else {'code_mode': CODE_MODE}
    sections = {**SECTIONS, **code, 'process': {**SECTIONS['process'], 'caws_weight': 0.1, 'caws_policy': str(data/'caws.yaml')},
                'data': {**SECTIONS['data'], 'tokenizer_path': str(data/'tokenizer.json')}}
    cfg = config_from_dict({'model': {**MODEL, **HEADS}, 'teacher': {'kind': 'checkpoint', 'path': 'x'}, **sections,
                            'training': dict(steps=steps, batch_size=micro_batch, grad_accum=grad_accum, lr=1e-3, grad_clip=0.0,
                                             parallel=parallel, activation_checkpointing=parallel == 'fsdp'),
                            'checkpoint': dict(min_free_space_gb=0.0), 'tracing': dict(tensorboard=False, progress=False)})
    seed_everything(0)
    student = StudentLM(ModelConfig(**MODEL, **HEADS))
    objective = KDObjective(cfg, CheckpointTeacher.from_model(StudentLM(ModelConfig(**MODEL))), tokenizer, student=student)
    objective.freeze_untrained_heads(student)
    trainer = Trainer(cfg, run_dir, student, BatchStream(dataset, sampler, dataset.collate, info), objective,
                      aux=objective.projector, device=torch.device('cpu'), info=info)
    return trainer, student, objective


def main(data: Path, out: Path, micro_batch: int, grad_accum: int, *options):
    trainer, student, objective = build_trainer(data, out.parent/f'run-{out.stem}', micro_batch, grad_accum, *options)
    info = trainer.info
    loss, comps, _ = trainer.train_step()
    grads = {f'model.{n}': p.grad for n, p in student.named_parameters() if p.grad is not None}
    grads.update({f'aux.{n}': p.grad for n, p in objective.projector.named_parameters()})
    grads = {k: g.full_tensor() if hasattr(g, 'full_tensor') else g for k, g in grads.items()}  # FSDP: gather the shards
    if info.is_main: torch.save({'grads': grads, 'loss': torch.tensor(loss), 'components': comps}, out)
    close_distributed()


if __name__ == '__main__': main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
