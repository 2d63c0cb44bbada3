"StudentLM speed on CPU: KV-cached generate vs re-running the whole sequence each step, and a training step with/without padding."
import time

import torch

from kd_lib.models import ModelConfig, StudentLM


def median_time(fn, repeats=5):
    "Median wall time of `fn()` after one warm-up call."
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def uncached_generate(model, ids, max_new_tokens):
    "Greedy generation that re-runs the full forward for every new token (the baseline)."
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def main():
    torch.manual_seed(0)
    model = StudentLM(ModelConfig(vocab_size=4096, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=384)).eval()
    prompt = torch.randint(0, 4096, (8, 64))
    new = 64
    cached = median_time(lambda: model.generate(prompt, max_new_tokens=new), 3)
    plain = median_time(lambda: uncached_generate(model, prompt, new), 3)
    assert torch.equal(model.generate(prompt, max_new_tokens=new).tokens, uncached_generate(model, prompt, new)[:, 64:])
    print(f'generate 8x(64+{new}) tokens: cached {cached * 1e3:.0f} ms | uncached {plain * 1e3:.0f} ms | speedup {plain / cached:.1f}x')

    model.train()
    ids = torch.randint(0, 4096, (16, 384))
    padded = torch.ones_like(ids)
    padded[:8, 300:] = 0

    def train_step(mask):
        model(ids, mask).logits.logsumexp(-1).mean().backward()

    no_pad = median_time(lambda: train_step(None))
    with_pad = median_time(lambda: train_step(padded))
    print(f'fwd+bwd 16x384: is_causal {no_pad * 1e3:.0f} ms | padding mask {with_pad * 1e3:.0f} ms | ratio {with_pad / no_pad:.2f}')


if __name__ == '__main__':
    main()
