"""Peak memory and time of a KD step with a real HF teacher: teacher logits materialised vs teacher hidden states fused.

The teacher is SmolLM2-135M-Instruct (`make smollm2`: models/smollm2/*.gguf, vocab 49,152) loaded through
`kd_lib.teachers.HFTeacher`; the student is pruned from it (`kd_lib.students.prune_model`, 8 layers, MLP 768 by
default). One KD step = teacher forward (no grad) + student forward + loss + backward + AdamW step. Two variants:

- `logits`: `teacher.logits` ([B, T, V]) and the student's logits, into the plain KD loss (`kd_ce_loss` with logits);
- `fused`: `teacher.head_inputs` (final hidden + head weight) and the student's final hidden + head into the fused
  loss (`kd_ce_loss` with hidden states): no [B, T, V] tensor of either model.

Each variant runs in a fresh subprocess. Loading the GGUF (dequantising it) peaks far above a step, so besides the
process's ru_maxrss the worker resets the kernel's peak-RSS mark (/proc/self/clear_refs) once teacher, student and
optimizer exist and reports the peak over the steps (VmHWM) and that peak above the RSS at the reset.

    .venv/bin/python bench/bench_hf_teacher.py        # batch 4 x 256, 1 warm-up + 3 timed steps, 1 thread (~5 min)
    .venv/bin/python bench/bench_hf_teacher.py --batch 2 --seq 128 --steps 1   # quick check
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / 'models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


def status_mb(key: str) -> float:
    "A VmRSS / VmHWM line of /proc/self/status, in MB."
    line = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key + ':'))
    return int(line.split()[1]) / 1024


def kd_step(variant: str, teacher, student, optimizer, input_ids, labels) -> float:
    "One KD step of the student against the teacher; returns the loss."
    from kd_lib.fused import kd_ce_loss
    optimizer.zero_grad(set_to_none=True)
    if variant == 'logits':
        teacher_logits = teacher.logits(input_ids)
        out = student(input_ids)
        loss, _ = kd_ce_loss(labels, student_logits=out.logits, teacher_logits=teacher_logits)
    else:
        teacher_hidden, teacher_head = teacher.head_inputs(input_ids)
        out = student(input_ids, compute_logits=False)
        loss, _ = kd_ce_loss(labels, student_hidden=out.last_hidden, student_head_weight=student.output_weight,
                             teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head)
    loss.backward()
    optimizer.step()
    return loss.item()


def run_one(args) -> dict:
    "Load teacher and student, then a warm-up and `args.steps` timed KD steps; peaks and median time."
    from kd_lib.students import HFStudent, prune_model
    from kd_lib.teachers import HFTeacher
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = HFTeacher(GGUF.parent, dtype=torch.float32, gguf_file=GGUF.name)
    calibration = [(torch.randint(0, teacher.vocab_size, (1, 64)), torch.ones(1, 64, dtype=torch.long))]
    pruned, _ = prune_model(teacher.model, teacher.logits, calibration, n_layers=args.layers, mlp_hidden=args.mlp_hidden)
    student = HFStudent(pruned).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    input_ids = torch.randint(0, teacher.vocab_size, (args.batch, args.seq))
    labels = torch.cat([input_ids[:, 1:], torch.full((args.batch, 1), -100)], 1)
    Path('/proc/self/clear_refs').write_text('5')  # peak RSS mark := current RSS
    setup_mb = status_mb('VmRSS')
    times, loss = [], kd_step(args.worker, teacher, student, optimizer, input_ids, labels)  # warm-up (creates AdamW state)
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = kd_step(args.worker, teacher, student, optimizer, input_ids, labels)
        times.append(time.perf_counter() - start)
    step_peak = status_mb('VmHWM')
    return dict(loss=loss, time_s=statistics.median(times), step_peak_mb=step_peak, above_mb=step_peak - setup_mb,
                process_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                student_params=sum(p.numel() for p in student.parameters()), vocab=teacher.vocab_size)


def spawn(variant: str, args) -> dict:
    "Run one variant in a fresh interpreter."
    cmd = [sys.executable, __file__, '--worker', variant, '--batch', str(args.batch), '--seq', str(args.seq),
           '--steps', str(args.steps), '--threads', str(args.threads), '--layers', str(args.layers),
           '--mlp-hidden', str(args.mlp_hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0: sys.exit(f'{variant} failed:\n{proc.stderr.strip()[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--seq', type=int, default=256)
    parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up')
    parser.add_argument('--threads', type=int, default=1, help='torch threads of each run')
    parser.add_argument('--layers', type=int, default=8, help='student layers kept from the teacher')
    parser.add_argument('--mlp-hidden', type=int, default=768, help='student MLP channels kept per layer')
    parser.add_argument('--worker', choices=['logits', 'fused'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args)))
        return
    if not GGUF.is_file(): sys.exit(f'{GGUF}: not found; run `make smollm2` first')
    logits, fused = spawn('logits', args), spawn('fused', args)
    print(f'SmolLM2-135M teacher (GGUF, fp32), student pruned to {args.layers} layers / MLP {args.mlp_hidden} '
          f'({logits["student_params"] / 1e6:.1f}M params), vocab {logits["vocab"]}, batch {args.batch} x {args.seq} tokens, '
          f'JSD beta 0.5, AdamW; median of {args.steps} steps after a warm-up, {args.threads} thread(s), torch {torch.__version__}')
    print('step peak = peak RSS over the steps (VmHWM after a reset once the models exist); above setup = that minus the '
          'RSS at the reset; process peak = ru_maxrss (includes loading the GGUF)')
    rows = [('step peak', 'step_peak_mb', 'MB'), ('above setup', 'above_mb', 'MB'), ('process peak', 'process_peak_mb', 'MB'),
            ('step time', 'time_s', 's'), ('loss', 'loss', '')]
    print(f"{'':>13} | {'(a) logits':>11} | {'(b) fused':>11} | {'fused/logits':>12}")
    for name, key, unit in rows:
        digits = 2 if unit == 's' else 4 if not unit else 0
        print(f"{name:>13} | {logits[key]:9.{digits}f}{unit:>2} | {fused[key]:9.{digits}f}{unit:>2} | "
              f"{fused[key] / logits[key]:12.3f}")


if __name__ == '__main__':
    main()
