"""Full disk: ENOSPC (simulated, partway through a file) during a checkpoint save in a CLI training run. The error is
one clear line, nothing partial is left, the manifest and every earlier checkpoint still load, and the run resumes
exactly once there is space again."""
import errno
import json
import os
import types

import pytest

import kd_lib.checkpoint
from kd_lib.checkpoint import CheckpointManager
from reliability_helpers import (assert_bit_identical, checkpoint_steps, data_dir, load_weights, record_figures,  # noqa: F401
                                 run_cli_inprocess, train_args)

EXTRA = ['training.steps=4', 'tracing.log_every=1']  # a checkpoint after every step (milestones 1, 2, 3, 4)


def _full_disk(monkeypatch, target: str):
    "Make kd_lib.checkpoint's writes to files whose name contains `target` write half their bytes, then fail with ENOSPC."
    names, hits = {}, []
    def open_(path, flags, *args):
        fd = os.open(path, flags, *args)
        names[fd] = str(path)
        return fd
    def write(fd, data):
        if target in names.get(fd, ''):
            hits.append(names[fd])
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, 'No space left on device')
        return os.write(fd, data)
    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith('__')})
    fake.open, fake.write = open_, write
    monkeypatch.setattr(kd_lib.checkpoint, 'os', fake)
    return hits


def _leftovers(folder) -> list:
    return [str(p.relative_to(folder)) for p in folder.rglob('*') if p.name.startswith('.') or '.tmp' in p.name]


def test_enospc_inside_a_checkpoint_file(tmp_path, data_dir, monkeypatch, record_property):
    run_dir, ckpts = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
    hits = _full_disk(monkeypatch, 'checkpoint_step_3/.training_state.pt.tmp')
    rc, out, err = run_cli_inprocess(train_args(run_dir, data_dir, *EXTRA))
    assert hits and rc == 2, (hits, out, err)
    assert err.count('\n') == 1 and err.startswith('kd-lib: error: No space left on device while writing checkpoint_step_3'), err
    assert 'earlier checkpoints are intact' in err
    assert not _leftovers(ckpts), _leftovers(ckpts)
    manifest = json.loads((ckpts / 'progress' / 'checkpoints.json').read_text())
    assert [c['step'] for c in manifest['checkpoints']] == [1, 2] == checkpoint_steps(ckpts, complete_only=False)
    for c in manifest['checkpoints']:
        assert CheckpointManager(ckpts, 4).load(ckpts / c['path'])['step'] == c['step']
    monkeypatch.undo()  # space again: the run resumes from step 2 and ends as if nothing happened
    rc, out, _ = run_cli_inprocess(train_args(run_dir, data_dir, *EXTRA))
    assert rc == 0 and 'finished at step 4' in out
    rc, _, _ = run_cli_inprocess(train_args(tmp_path / 'clean', data_dir, *EXTRA))
    assert rc == 0
    assert_bit_identical(load_weights(run_dir / 'final'), load_weights(tmp_path / 'clean' / 'final'), 'resumed after ENOSPC')
    record_figures(record_property, 'disk_full', {'enospc_at': 'checkpoint_step_3/training_state.pt (half written)',
                                                  'earlier_checkpoints_loadable': 2, 'partial_files_left': 0, 'resume_bit_identical': True})


def test_enospc_while_writing_the_manifest(tmp_path, data_dir, monkeypatch):
    run_dir, ckpts = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
    hits = _full_disk(monkeypatch, 'progress/.checkpoints.json.tmp')
    try: rc, _, err = run_cli_inprocess(train_args(run_dir, data_dir, *EXTRA))
    finally: assert not _leftovers(ckpts), _leftovers(ckpts)  # the atomic write cleans up even here
    assert hits and rc == 2 and err.count('\n') == 1, (hits, err)
    assert err.startswith('kd-lib: error: No space left on device while writing ') and 'checkpoints.json' in err, err
    assert not (ckpts / 'progress' / 'checkpoints.json').exists()  # the first manifest never landed: no partial one either
    steps = checkpoint_steps(ckpts, complete_only=False)
    assert steps == [1] == checkpoint_steps(ckpts), steps  # the checkpoint itself landed, complete
    assert CheckpointManager(ckpts, 4).load()['step'] == 1
    monkeypatch.undo()  # space again: the run resumes from step 1 and writes the manifest
    rc, out, _ = run_cli_inprocess(train_args(run_dir, data_dir, *EXTRA))
    assert rc == 0 and 'finished at step 4' in out
    manifest = json.loads((ckpts / 'progress' / 'checkpoints.json').read_text())
    assert [c['step'] for c in manifest['checkpoints']] == checkpoint_steps(ckpts)
