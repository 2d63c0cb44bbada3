import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# token caches of the test session (and its CLI subprocesses) go to a temp folder, not ~/.cache/kd_lib
if 'KD_LIB_CACHE' not in os.environ:
    os.environ['KD_LIB_CACHE'] = tempfile.mkdtemp(prefix='kd_lib_cache-')
    atexit.register(shutil.rmtree, os.environ['KD_LIB_CACHE'], True)

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / '.venv' / 'bin'

# Tiny everything: a pipeline or CLI run in seconds on a shared 2-core CPU.
TINY = ['data.synth_train_episodes=160', 'data.synth_eval_episodes=8', 'data.vocab_size=512', 'data.max_length=256',
        'model.vocab_size=512', 'model.d_model=32', 'model.n_layers=1', 'model.n_heads=2', 'model.n_kv_heads=1',
        'model.max_seq_len=256', 'training.steps=4', 'training.batch_size=4', 'training.warmup_steps=1',
        'training.eval_every=2', 'training.eval_examples=4', 'training.device=cpu', 'checkpoint.save_every=2',
        'checkpoint.min_free_space_gb=0', 'tracing.tensorboard=false', 'tracing.progress=false', 'tracing.log_every=1',
        'teacher.topk=4']


def tiny_data(folder: Path) -> list:
    "Overrides pointing the data section at `folder` (generated on first use)."
    return [f'data.train_path={folder}/train.jsonl', f'data.eval_path={folder}/eval.jsonl', f'data.tokenizer_path={folder}/tokenizer.json']


@pytest.fixture
def cli_env():
    "Environment for CLI subprocesses: one thread each, no wandb network."
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled'}


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    "(folder, data overrides): tiny data in folder/data and a tiny 2-layer kd_lib teacher in folder/teacher."
    import torch
    from kd_lib.config import Config
    from kd_lib.models import ModelConfig, StudentLM
    from kd_lib.recipes import prepare_data
    tmp = tmp_path_factory.mktemp('tiny_teacher')
    data = tiny_data(tmp / 'data')
    cfg = Config().override(*TINY, *data)
    prepare_data(cfg)
    torch.manual_seed(1)
    StudentLM(ModelConfig(**{**cfg.model.__dict__, 'n_layers': 2})).save_pretrained(tmp / 'teacher')
    return tmp, data
