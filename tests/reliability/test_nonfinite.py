"""Non-finite losses injected into real CLI runs (KD_LIB_TEST_NONFINITE, see kd_lib.train.nonfinite_hook_from_env):
isolated NaN/inf are skipped and counted; `training.max_nonfinite` in a row stop the run with a checkpoint of the last
good state, exit code 1 and the reason."""
import json

from kd_lib.checkpoint import CheckpointManager
from reliability_helpers import (assert_bit_identical, checkpoint_steps, data_dir, load_weights, record_figures,  # noqa: F401
                                 start_cli, train_args)

EXTRA = ['training.steps=4', 'training.max_nonfinite=3', 'tracing.log_every=1']  # milestones (saved): 1, 2, 3, 4


def _guard_lines(run_dir) -> list:
    lines = [json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines() if x.strip()]
    return [m for m in lines if m.get('split') == 'guard']


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, data_dir, record_property):
    runs = {'clean': '', 'skips': '2,3:inf', 'stops': '3,4:inf,5'}  # which losses (1-based) become NaN (default) or inf
    procs = {name: start_cli(train_args(tmp_path / name, data_dir, *EXTRA), tmp_path / f'{name}.log', KD_LIB_TEST_NONFINITE=spec)
             for name, spec in runs.items()}
    rcs = {name: p.wait(timeout=300) for name, p in procs.items()}
    logs = {name: (tmp_path / f'{name}.log').read_text() for name in runs}
    # isolated NaN and inf: skipped (no optimizer step), counted, the run still does all its steps
    assert rcs['skips'] == 0 and 'kd-lib: finished at step 4' in logs['skips'], logs['skips'][-3000:]
    guard = _guard_lines(tmp_path / 'skips')
    assert [(g['nonfinite_total'], g['nonfinite_in_row']) for g in guard] == [(1, 1), (2, 2)], guard
    state = CheckpointManager(tmp_path / 'skips' / 'checkpoints', 4).load()
    assert state['step'] == 4 and state['nonfinite_total'] == 2
    # three in a row (NaN, inf, NaN) after step 2: checkpoint of the last good state, exit 1, the reason on stdout
    assert rcs['stops'] == 1, logs['stops'][-3000:]
    assert 'kd-lib: nonfinite at step 2: 3 non-finite losses in a row at step 2; saved the last good state' in logs['stops']
    assert checkpoint_steps(tmp_path / 'stops' / 'checkpoints') == [1, 2] and not (tmp_path / 'stops' / 'final').exists()
    assert [g['nonfinite_in_row'] for g in _guard_lines(tmp_path / 'stops')] == [1, 2, 3]
    assert rcs['clean'] == 0, logs['clean'][-3000:]
    good = load_weights(tmp_path / 'clean' / 'checkpoints' / 'checkpoint_step_2')
    assert_bit_identical(load_weights(tmp_path / 'stops' / 'checkpoints' / 'checkpoint_step_2'), good, 'last good state')
    assert CheckpointManager(tmp_path / 'stops' / 'checkpoints', 4).load()['nonfinite_total'] == 3
    record_figures(record_property, 'nonfinite', {'injected': 5, 'skipped_and_counted': 2, 'stopped_after_in_a_row': 3,
                                                  'stop_checkpoint_equals_last_good_state': True})
