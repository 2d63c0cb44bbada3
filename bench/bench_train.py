"""Trainer step time against a bare PyTorch loop (same model, batch, optimizer); prints the ratio.

The Trainer adds gradient-accumulation bookkeeping, the non-finite guard, the SIGTERM check, the LR schedule and
JSONL tracing (log_every=1 here, the worst case). Step time is the median gap between consecutive loss computations,
so the few milestone checkpoint saves do not count. Usage: python bench/bench_train.py [--steps 60] [--rounds 2]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kd_lib.config import config_from_dict, load_config
from kd_lib.models import StudentLM
from kd_lib.train import BatchStream, Trainer, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def make_data(n_rows, seq_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(9, vocab, (seq_len,), generator=g)
        rows.append({'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': torch.cat([ids[1:], torch.tensor([-100])])})
    return rows


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class Batches:
    def __init__(self, n, bs): self.n, self.bs, self.epoch = n, bs, 0
    def set_epoch(self, e): self.epoch = e
    def __iter__(self): return iter([list(range(i, i + self.bs)) for i in range(0, self.n - self.bs + 1, self.bs)])


def ce(model, batch):
    logits = model(batch['input_ids'], batch['attention_mask']).logits
    return F.cross_entropy(logits.flatten(0, 1), batch['labels'].flatten(), reduction='sum'), (batch['labels'] != -100).sum()


def bare_loop(cfg, data, steps):
    torch.manual_seed(0)
    model = StudentLM(cfg.model)
    opt, sched = build_optimizer(list(model.named_parameters()), cfg.training)
    stamps, bs = [], cfg.training.batch_size
    for step in range(steps):
        stamps.append(time.perf_counter())
        batch = collate(data[(step * bs) % len(data):][:bs])
        loss_sum, kept = ce(model, batch)
        (loss_sum / kept).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return stamps


def trainer_loop(cfg, data, steps):
    torch.manual_seed(0)
    stamps = []
    def loss_fn(model, batch, kept, step):
        stamps.append(time.perf_counter())
        loss_sum, _ = ce(model, batch)
        loss = loss_sum / kept
        return loss, {'ce': loss.detach()}
    with tempfile.TemporaryDirectory() as tmp:
        stream = BatchStream(data, Batches(len(data), cfg.training.batch_size), collate)
        Trainer(cfg, tmp, StudentLM(cfg.model), stream, loss_fn, device=torch.device('cpu')).fit()
    return stamps


def median_gap(stamps):
    return statistics.median(b - a for a, b in zip(stamps[5:], stamps[6:]))  # skip warm-up steps


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--steps', type=int, default=60)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--seq-len', type=int, default=128)
    ap.add_argument('--log-every', type=int, default=1, help='JSONL lines every N steps (1: the worst case)')
    args = ap.parse_args()
    base = load_config(ROOT / 'configs/student_cpu.yaml').to_dict()
    base['training'].update(steps=args.steps, device='cpu', eval_every=0)
    base['checkpoint'].update(save_every=10 ** 6, min_free_space_gb=0.0)
    base['tracing'].update(log_every=args.log_every, tensorboard=False, wandb=False, progress=False)
    cfg = config_from_dict(base)
    data = make_data(cfg.training.batch_size * args.steps, args.seq_len, cfg.model.vocab_size)
    bare, trainer = [], []
    for _ in range(args.rounds):  # interleaved, so load changes on a shared machine hit both alike
        bare.append(median_gap(bare_loop(cfg, data, args.steps)))
        trainer.append(median_gap(trainer_loop(cfg, data, args.steps)))
    b, t = statistics.median(bare), statistics.median(trainer)
    print(f'model: student_cpu ({sum(p.numel() for p in StudentLM(cfg.model).parameters()):,} params), batch {cfg.training.batch_size} x {args.seq_len} tokens, '
          f'{torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds')
    print(f'{"loop":<28}{"median step (ms)":>18}')
    print(f'{"bare PyTorch":<28}{b * 1e3:>18.1f}')
    print(f'{"kd_lib Trainer (JSONL on)":<28}{t * 1e3:>18.1f}')
    print(f'ratio trainer/bare: {t / b:.3f} (target <= 1.10)')


if __name__ == '__main__':
    main()
