"Two CPU processes under torchrun (gloo) give the same weights as one process with the same global batch."
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, ROOT, TINY, tiny_data

# torchrun jobs run one at a time on one xdist worker (`make test` uses --dist loadgroup): two of them at once
# oversubscribe the 2 cores and their standalone rendezvous can meet
pytestmark = pytest.mark.xdist_group('torchrun')


def _train(run_dir, data, env, extra, nproc=None, evaluate=False):
    args = ['train', '--config', str(ROOT / 'configs/teacher_cpu.yaml'), '--run-dir', str(run_dir), *([] if evaluate else ['--no-eval']),
            '--set', *TINY, *tiny_data(data), 'training.steps=3', 'training.lr=1e-3', *extra]
    cmd = [str(BIN / 'kd-lib'), *args] if nproc is None else \
          [str(BIN / 'torchrun'), '--standalone', f'--nproc-per-node={nproc}', '--no-python', str(BIN / 'kd-lib'), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return load_file(str(run_dir / 'final' / 'model.safetensors'))


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_two_processes_equal_one_process_same_global_batch(tmp_path, cli_env):
    """Also with halt / self-eval heads that no term trains (frozen, so DDP's reduction does not wait for them), and under
    `kd-lib train --set training.parallel=fsdp` (sharded checkpoints, the final model gathered to rank 0)."""
    heads = ['model.halt_head=true', 'model.self_eval_head=true']
    single = _train(tmp_path / 'single', tmp_path / 'data', cli_env, ['training.batch_size=4', *heads])
    double = _train(tmp_path / 'ddp', tmp_path / 'data', cli_env, ['training.batch_size=2', *heads], nproc=2)
    assert single.keys() == double.keys()
    for k in single:
        assert torch.allclose(single[k], double[k], atol=2e-5, rtol=1e-4), (k, (single[k] - double[k]).abs().max())
    fsdp = ['training.batch_size=2', 'training.parallel=fsdp', *heads]
    sharded = _train(tmp_path / 'fsdp', tmp_path / 'data', cli_env, fsdp, nproc=2)
    assert sharded.keys() == single.keys() and (tmp_path / 'fsdp' / 'final' / 'tokenizer.json').is_file()
    for k in single:
        assert torch.allclose(single[k], sharded[k], atol=2e-5, rtol=1e-4), (k, (single[k] - sharded[k]).abs().max())
    assert json.loads((tmp_path / 'fsdp' / 'checkpoints' / 'checkpoint_step_3' / 'meta.json').read_text())['sharded']
    start = _train(tmp_path / 'fresh', tmp_path / 'data', cli_env, ['training.batch_size=4', 'training.steps=1', *heads])
    assert any(not torch.allclose(single[k], start[k]) for k in single)  # the comparison above is not vacuous


def _objective_grads(data, out, env, micro_batch, grad_accum, *options, nproc=None):
    "Summed gradients of one optimizer step of the full objective (tests/distributed/objective_grads.py)."
    script = [str(ROOT / 'tests/distributed/objective_grads.py'), str(data), str(out), str(micro_batch), str(grad_accum), *options]
    cmd = [str(BIN / 'python'), *script] if nproc is None else \
          [str(BIN / 'torchrun'), '--standalone', f'--nproc-per-node={nproc}', *script]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _write_data(folder):
    "Code-mode episodes, their tokenizer and a CAWS policy with a budget of 0 tool calls."
    from kd_lib.synth import generate_episodes, write_jsonl
    from kd_lib.tokenizer import build_tokenizer, save_tokenizer
    episodes = generate_episodes(40, seed=0, code_mode=True)
    write_jsonl(episodes, folder / 'train.jsonl')
    save_tokenizer(build_tokenizer([r['prompt'] + r['teacher_text'] for r in episodes], vocab_size=400), folder / 'tokenizer.json')
    (folder / 'caws.yaml').write_text('budget_tokens: ["<tool_call>"]\ndefault_tier: low\ntiers:\n  low: 0\n')


def _assert_same_grads(run, one, name):
    assert torch.allclose(run['loss'], one['loss'], rtol=1e-5), (name, run['loss'], one['loss'])
    assert run['grads'].keys() == one['grads'].keys(), name
    for k, g in one['grads'].items():
        assert torch.allclose(run['grads'][k], g, rtol=1e-4, atol=1e-6), (name, k, (run['grads'][k] - g).abs().max())


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_full_objective_same_gradient_for_grad_accum_and_processes(tmp_path, cli_env):
    "Every term on: one step over rows 0..7 gives the same gradient as 1x8, 4x2 (grad_accum) and 2 processes x 4."
    _write_data(tmp_path)
    env = {**cli_env, 'PYTHONPATH': str(ROOT)}
    one = _objective_grads(tmp_path, tmp_path / 'one.pt', env, 8, 1)
    assert {'tool_name', 'json_arguments', 'integration', 'length', 'early_tool_call', 'caws', 'intermediate', 'self_eval',
            'halt', 'code_ce', 'code_mode_preference'} <= set(one['components'])
    assert all(v > 0 for v in one['components'].values())
    assert any(k.startswith('model.halt_head') for k in one['grads']) and any(k.startswith('aux.') for k in one['grads'])
    for name, run in (('accum', _objective_grads(tmp_path, tmp_path / 'accum.pt', env, 2, 4)),
                      ('ddp', _objective_grads(tmp_path, tmp_path / 'ddp.pt', env, 4, 1, nproc=2))):
        _assert_same_grads(run, one, name)


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_fsdp_two_processes_same_gradient_as_one_process(tmp_path, cli_env):
    "training.parallel: fsdp (FSDP2, activation checkpointing) over 2 processes: the gradient of one process (no code mode)."
    _write_data(tmp_path)
    env = {**cli_env, 'PYTHONPATH': str(ROOT)}
    one = _objective_grads(tmp_path, tmp_path / 'one.pt', env, 8, 1, 'ddp', 'nocode')
    sharded = _objective_grads(tmp_path, tmp_path / 'fsdp.pt', env, 4, 1, 'fsdp', nproc=2)
    _assert_same_grads(sharded, one, 'fsdp')


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_fsdp_resume_equals_uninterrupted_run(tmp_path, cli_env):
    "FSDP over 2 processes: stopped after step 1, checkpointed and resumed, 3 steps give the weights of 3 steps in one go."
    _write_data(tmp_path)
    cmd = [str(BIN / 'torchrun'), '--standalone', '--nproc-per-node=2', str(ROOT / 'tests/distributed/fsdp_resume.py'),
           str(tmp_path), str(tmp_path / 'resume.pt')]
    res = subprocess.run(cmd, env={**cli_env, 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = torch.load(tmp_path / 'resume.pt', weights_only=True)
    for k, w in runs['straight'].items():
        assert torch.equal(runs['resumed'][k], w), k
    assert any(not torch.equal(runs['after_one'][k], w) for k, w in runs['straight'].items())  # not vacuous
    _check_sharded_checkpoint(tmp_path / 'resumed' / 'checkpoints', runs['resumed'], tmp_path)


def _check_sharded_checkpoint(folder, weights, tmp_path):
    "The last checkpoint is sharded (one DCP file per rank, every rank's RNG states) and exports the trained weights."
    from kd_lib.checkpoint import CheckpointManager
    from kd_lib.export import consolidate_checkpoint, to_hf
    manager = CheckpointManager(folder, total_steps=3)
    ckpt = manager.latest()
    meta = json.loads((ckpt / 'meta.json').read_text())
    assert ckpt.name == 'checkpoint_step_3' and meta['sharded'] and {'__0_0.distcp', '__1_0.distcp'} <= set(meta['files'])
    assert len(manager.load(ckpt)['rank_rng']) == 2
    model = {k.removeprefix('model.'): w for k, w in weights.items() if k.startswith('model.')}
    consolidated = load_file(str(consolidate_checkpoint(ckpt, tmp_path / 'consolidated') / 'model.safetensors'))
    assert consolidated.keys() == model.keys()
    for k, w in model.items(): assert torch.equal(consolidated[k], w), k
    record = to_hf(ckpt, tmp_path / 'hf')
    assert record['source'] == str(ckpt) and (tmp_path / 'hf' / 'model.safetensors').is_file()


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_fsdp_hf_student_two_processes_equal_one_process(tmp_path, cli_env):
    """An HF student (student.init: hf) sharded by FSDP2 over 2 processes, activation checkpointing on, evaluated during
    training by every rank: the weights and held-out metrics of one process."""
    from test_students import tiny_llama
    from kd_lib.tracing import read_metrics
    hf = tiny_llama(tmp_path / 'hf')
    student = ['student.init=hf', f'student.path={hf}']
    single = _train(tmp_path / 'single', tmp_path / 'data', cli_env, ['training.batch_size=4', *student], evaluate=True)
    fsdp = ['training.batch_size=2', 'training.parallel=fsdp', 'training.activation_checkpointing=true', *student]
    sharded = _train(tmp_path / 'fsdp', tmp_path / 'data', cli_env, fsdp, nproc=2, evaluate=True)
    evals = [read_metrics(tmp_path / run, split='eval') for run in ('single', 'fsdp')]
    assert [r['step'] for r in evals[0]] == [r['step'] for r in evals[1]] == [2, 3]
    for a, b in zip(*evals):
        assert a['tool_name_accuracy'] == b['tool_name_accuracy'] and a['perplexity'] == pytest.approx(b['perplexity'], rel=1e-4)
    assert single.keys() == sharded.keys() and 'model.layers.0.mlp.up_proj.weight' in single
    for k in single:
        assert torch.allclose(single[k], sharded[k], atol=2e-5, rtol=1e-4), (k, (single[k] - sharded[k]).abs().max())
    assert not torch.equal(single['model.layers.0.mlp.up_proj.weight'], load_file(str(hf / 'model.safetensors'))['model.layers.0.mlp.up_proj.weight'])
