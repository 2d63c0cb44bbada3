"""Three steps of the full objective (no code mode) under FSDP, uninterrupted and stopped after step 1 then resumed
from its sharded (DCP) checkpoint.

Run under torchrun as `fsdp_resume.py DATA OUT`; saves both runs' final weights (full tensors) from rank 0.
"""
import sys
from pathlib import Path

import torch

from kd_lib.train import close_distributed
from objective_grads import build_trainer


def weights(trainer) -> dict:
    model, aux, _ = trainer._weights()
    return {**{f'model.{k}': v for k, v in model.items()}, **{f'aux.{k}': v for k, v in aux.items()}}


def main(data: Path, out: Path):
    straight, *_ = build_trainer(data, out.parent/'straight', 4, 1, 'fsdp', steps=3)
    straight.fit()
    first, *_ = build_trainer(data, out.parent/'resumed', 4, 1, 'fsdp', steps=3)
    first.fit(until=1)
    resumed, *_ = build_trainer(data, out.parent/'resumed', 4, 1, 'fsdp', steps=3)
    assert resumed.resume() and resumed.step == 1
    resumed.fit()
    results = {'straight': weights(straight), 'resumed': weights(resumed), 'after_one': weights(first)}
    if straight.info.is_main: torch.save(results, out)
    close_distributed()


if __name__ == '__main__': main(Path(sys.argv[1]), Path(sys.argv[2]))
