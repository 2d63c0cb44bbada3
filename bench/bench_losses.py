"""Peak memory and time: plain generalized JSD vs `fused_linear_kd_loss`, forward + backward from hidden states.

Each configuration runs in a fresh subprocess (so ru_maxrss is its own peak). The plain path is a training step
as written without fusion: student logits = hidden @ W.T, teacher logits = teacher_hidden @ W_t.T (no grad),
`generalized_jsd`, backward. The fused path gets the same loss and gradients from `kd_lib.fused.fused_linear_kd_loss`.

    .venv/bin/python bench/bench_losses.py --repeats 1     # fp32 and bf16, 1024/4096 tokens x 32k/128k vocab, hidden 512 (~25 min)
    .venv/bin/python bench/bench_losses.py --repeats 1 --hidden 256 512   # the same at two hidden sizes (~50 min)
    .venv/bin/python bench/bench_losses.py --tokens 256 --vocabs 8192 --repeats 1   # quick check
    .venv/bin/python bench/bench_losses.py --device cuda --dtype bf16 --tokens 4096 --vocabs 131072   # on a GPU (bench/gpu_check.sh)

What it measures, per row (dtype, hidden, vocab, tokens): the peak RSS (ru_maxrss) of each path's process, the
headline; the peak above the RSS once torch, the inputs and the weights exist ("above setup"); the median time of
forward + backward after one warm-up. `--dtype` sets the dtype of the hidden states and head weights (bf16 is how
LLM distillation runs; the losses compute in fp32 inside either way). Hidden size 512 for student and teacher by
default: a small real model's. The fused peak cannot go below what both paths hold anyway (torch, the two [V, D]
heads and the head gradient), which a larger hidden size makes larger against the plain path's [N, V] logits, so
`--hidden` takes several sizes and every one gets its rows.

The fused chunk is the library's default (`chunk_size=0`: about `kd_lib.fused.auto_chunk_logits(device)` logits a chunk)
unless `--chunk-size` sets the tokens per chunk. A subprocess runs under an address-space limit (`--mem-limit-gb`),
so a configuration that would not fit reports OOM instead of starving the machine; the peak ratio is then an
upper bound (fused peak / limit). Keep `--threads 1` on a shared machine.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from kd_lib.fused import auto_chunk_logits, fused_linear_kd_loss
from kd_lib.losses import generalized_jsd


DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16)


def run_one(method: str, tokens: int, vocab: int, hidden: int, repeats: int, chunk_size: int, threads: int, dtype: str,
            device: str = 'cpu') -> dict:
    "One configuration in this process: median time of forward+backward and the peak RSS (on CUDA: max_memory_allocated)."
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    dt, cuda = DTYPES[dtype], device == 'cuda'
    h = torch.randn(tokens, hidden, dtype=dt, device=device, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=dt, device=device).mul_(hidden ** -0.5).requires_grad_()  # in place: no transient [V, D] copy
    teacher_h = torch.randn(tokens, hidden, dtype=dt, device=device)
    teacher_w = torch.randn(vocab, hidden, dtype=dt, device=device).mul_(hidden ** -0.5)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[torch.rand(tokens, device=device) < 0.1] = -100
    if cuda: torch.cuda.reset_peak_memory_stats()
    def peak_mb(): return torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    setup_mb = torch.cuda.memory_allocated() / 2 ** 20 if cuda else peak_mb()

    def step():
        h.grad = w.grad = None
        if method == 'plain':
            logits = h @ w.T
            with torch.no_grad(): teacher_logits = teacher_h @ teacher_w.T
            loss = generalized_jsd(logits, teacher_logits, labels, beta=0.5)
        else:
            loss, _ = fused_linear_kd_loss(h, w, labels, teacher_hidden=teacher_h, teacher_head_weight=teacher_w,
                                           beta=0.5, chunk_size=chunk_size)
        loss.backward()
        return loss.item()  # waits for the device

    times, loss = [], step()  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(loss=loss, time_s=statistics.median(times), peak_mb=peak_mb(), setup_mb=setup_mb)


def spawn(method: str, tokens: int, vocab: int, hidden: int, dtype: str, args) -> dict:
    "Run one configuration in a fresh interpreter under the memory limit."
    cmd = [sys.executable, __file__, '--worker', method, '--tokens', str(tokens), '--vocabs', str(vocab),
           '--hidden', str(hidden), '--dtype', dtype, '--repeats', str(args.repeats), '--chunk-size', str(args.chunk_size),
           '--threads', str(args.threads), '--mem-limit-gb', str(args.mem_limit_gb), '--device', args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        oom = 'memory' in proc.stderr.lower() or proc.returncode < 0
        return dict(error='OOM' if oom else f'failed: {proc.stderr.strip().splitlines()[-1:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(result, key, unit):
    "A right-aligned number with its unit, or the run's error."
    return f"{result[key]:9.{2 if unit == 's' else 0}f}{unit}" if 'error' not in result else f"{result['error']:>10}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tokens', type=int, nargs='+', default=[1024, 4096])
    parser.add_argument('--vocabs', type=int, nargs='+', default=[32768, 131072])
    parser.add_argument('--hidden', type=int, nargs='+', default=[512], help='hidden sizes of student and teacher (each one a row)')
    parser.add_argument('--dtype', nargs='+', choices=list(DTYPES), default=['fp32', 'bf16'],
                        help='dtype of hidden states and head weights (each one a row); the losses compute in fp32')
    parser.add_argument('--repeats', type=int, default=2, help='timed repeats after one warm-up')
    parser.add_argument('--chunk-size', type=int, default=0, help='fused tokens per chunk; 0: the library default (auto)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads of each run')
    parser.add_argument('--mem-limit-gb', type=float, default=12.0, help='address-space limit of each subprocess')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='cuda: tensors on the GPU, peak = torch.cuda.max_memory_allocated (no address-space limit)')
    parser.add_argument('--worker', choices=['plain', 'fused'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.device == 'cpu':  # CUDA reserves far more address space than it uses
            limit = int(args.mem_limit_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_one(args.worker, args.tokens[0], args.vocabs[0], args.hidden[0], args.repeats, args.chunk_size,
                                 args.threads, args.dtype[0], args.device)))
        return
    chunk = f'{args.chunk_size} tokens' if args.chunk_size else f'auto (~{auto_chunk_logits(args.device)} logits)'
    print(f'generalized JSD beta=0.5, fused chunk {chunk}, median of {args.repeats} after a warm-up, '
          f'torch threads {args.threads}, limit {args.mem_limit_gb} GB per run, torch {torch.__version__}')
    if args.device == 'cuda': print(f'device {torch.cuda.get_device_name()}: peak = torch.cuda.max_memory_allocated, not ru_maxrss')
    print('peak = ru_maxrss of the run; above setup = peak minus the RSS once the inputs and weights exist; '
          '<x: plain ran out of the limit, x = fused peak / limit bounds the ratio')
    print(f"{'dtype':>5} {'hidden':>6} {'vocab':>7} {'tokens':>6} | {'plain peak':>10} {'fused peak':>10} {'fused/plain':>11} | "
          f"{'plain above':>11} {'fused above':>11} {'fused/plain':>11} | {'plain time':>10} {'fused time':>10} {'fused/plain':>11}")
    for dtype in args.dtype:
        for hidden in args.hidden:
            for vocab in args.vocabs:
                for tokens in args.tokens:
                    plain, fused = spawn('plain', tokens, vocab, hidden, dtype, args), spawn('fused', tokens, vocab, hidden, dtype, args)
                    ok = 'error' not in plain and 'error' not in fused
                    for r in (plain, fused):
                        if 'error' not in r: r['above_mb'] = r['peak_mb'] - r['setup_mb']
                    ratio = lambda key: f"{fused[key] / plain[key]:11.3f}" if ok else f"{'-':>11}"
                    peak_ratio = ratio('peak_mb') if ok or 'error' in fused else f"{'<' + format(fused['peak_mb'] / (args.mem_limit_gb * 1024), '.3f'):>11}"
                    print(f"{dtype:>5} {hidden:>6} {vocab:>7} {tokens:>6} | {fmt(plain, 'peak_mb', 'M')} {fmt(fused, 'peak_mb', 'M')} {peak_ratio} | "
                          f"{fmt(plain, 'above_mb', 'M'):>11} {fmt(fused, 'above_mb', 'M'):>11} {ratio('above_mb')} | "
                          f"{fmt(plain, 'time_s', 's')} {fmt(fused, 'time_s', 's')} {ratio('time_s')}", flush=True)


if __name__ == '__main__':
    main()
