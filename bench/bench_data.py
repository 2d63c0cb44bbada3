"""Data pipeline benchmark: corpus generation, first-pass tokenization vs cached load, peak memory, and the
teacher top-k cache's bytes per token against dense fp16 logits.

Usage: .venv/bin/python bench/bench_data.py [--rows 100000] [--k 32] [--teacher-rows 2000]
"""
import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_lib.dataset import KDDataset
from kd_lib.synth import iter_episodes, write_jsonl
from kd_lib.teacher_cache import build_teacher_cache
from kd_lib.tokenizer import build_tokenizer


def peak_rss_mb() -> float:
    "Peak resident memory of this process so far (Linux reports KiB)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RandomTeacher(nn.Module):
    "A stand-in white-box teacher: embedding, causal running mean, output head."
    def __init__(self, vocab: int, dim: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask):
        h = (self.embed(input_ids) * attention_mask[..., None]).cumsum(1)
        return self.head(torch.tanh(h / torch.arange(1, input_ids.shape[1] + 1)[:, None])) * 4


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rows', type=int, default=100_000)
    ap.add_argument('--vocab', type=int, default=4096)
    ap.add_argument('--k', type=int, default=32)
    ap.add_argument('--teacher-rows', type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the CPU is shared
    out = Path(tempfile.mkdtemp(prefix='bench_data-'))

    path, t_gen = timed(lambda: write_jsonl(iter_episodes(args.rows, seed=0), out / 'train.jsonl'))
    texts = [r['prompt'] + r['teacher_text'] for r in iter_episodes(20000, seed=0)]
    tok, t_tok = timed(lambda: build_tokenizer(texts, args.vocab))
    del texts
    rss_before = peak_rss_mb()
    ds, t_first = timed(lambda: KDDataset(path, tok, cache_dir=out / 'cache'))
    rss_first = peak_rss_mb()
    ds2, t_open = timed(lambda: KDDataset(path, tok, cache_dir=out / 'cache'))
    assert ds2.from_cache
    _, t_read = timed(lambda: sum(len(ds2[i]['input_ids']) for i in range(len(ds2))))
    lengths = ds.lengths

    sub = write_jsonl(iter_episodes(args.teacher_rows, seed=1), out / 'teacher.jsonl')
    tds = KDDataset(sub, tok, cache_dir=out / 'cache')
    cache, t_cache = timed(lambda: build_teacher_cache(RandomTeacher(tok.get_vocab_size()), tds, out / 'teacher_cache',
                                                       k=args.k, fingerprint='bench', batch_size=16))
    rep = cache.report()

    mb = path.stat().st_size / 2**20
    print(f'corpus: {args.rows} rows, {mb:.1f} MiB JSONL; generated and written at {args.rows / t_gen:,.0f} rows/s; '
          f'tokenizer (20k rows, vocab {args.vocab}) built in {t_tok:.1f}s')
    print(f'tokens/row: mean {lengths.mean():.0f}, p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}')
    print(f'{"":34s}{"rows/s":>12s}{"seconds":>10s}')
    print(f'{"first pass (validate+tokenize)":34s}{len(ds) / t_first:>12,.0f}{t_first:>10.2f}')
    print(f'{"cached open (index+memmap)":34s}{len(ds2) / t_open:>12,.0f}{t_open:>10.2f}')
    print(f'{"cached read of every row":34s}{len(ds2) / t_read:>12,.0f}{t_read:>10.2f}')
    print(f'ratio cached-read / first-pass rows/s: {t_first / t_read:.1f}x')
    print(f'peak RSS: {rss_before:.0f} MB before tokenizing, {rss_first:.0f} MB after the first pass, {peak_rss_mb():.0f} MB at the end '
          f'(the JSONL is {mb:.0f} MiB; tokens are streamed to disk and memory-mapped)')
    print(f'teacher cache ({args.teacher_rows} rows, k={rep["k"]}, {rep["positions"]:,} positions, {t_cache:.1f}s): '
          f'{rep["bytes_per_token"]:.1f} bytes/token vs dense fp16 {rep["dense_fp16_bytes_per_token"]} bytes/token '
          f'-> {rep["compression"]:.1f}x smaller; covered probability mass {rep["covered_mass"]:.3f} (random teacher)')


if __name__ == '__main__':
    main()
