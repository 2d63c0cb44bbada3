"SIGTERM (preemption): the run checkpoints within one step and exits 0, also when the signal lands inside a checkpoint write; resuming is exact."
import re
import signal
import time

from reliability_helpers import (RESUMED_RE, STEP_RE, assert_bit_identical, checkpoint_steps, data_dir,  # noqa: F401
                                 load_weights, record_figures, run_cli, start_cli, train_args)

STEPS = 20  # milestones at 2, 5, 10, 15, 18, 20; no periodic saves: the preemption checkpoint is the SIGTERM's
EXTRA = [f'training.steps={STEPS}', 'checkpoint.save_every=1000', 'tracing.log_every=1']


def _preempt_after(step: int, run_dir, data, log, **env) -> tuple:
    "Start a run, SIGTERM it once `step` is logged; (exit code, output, seconds from signal to exit)."
    proc = start_cli(train_args(run_dir, data, *EXTRA), log, **env)
    deadline = time.monotonic() + 300
    while not any(int(s) >= step for s in STEP_RE.findall(log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    return rc, log.read_text(), time.monotonic() - sent


def test_sigterm_checkpoints_within_one_step_and_resume_is_exact(tmp_path, data_dir, record_property):
    reference = start_cli(train_args(tmp_path / 'reference', data_dir, *EXTRA), tmp_path / 'reference.log')
    run_dir, ckpts = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
    # 1) during plain training: the checkpoint is at the step that was running (or just finished) when the signal came
    rc, out, seconds = _preempt_after(7, run_dir, data_dir, tmp_path / 'first.log')
    m = re.search(r'kd-lib: preempted at step (\d+): SIGTERM: checkpoint saved', out)
    assert rc == 0 and m, out[-3000:]
    first = int(m[1])
    assert first in (7, 8), f'SIGTERM after step 7 was logged, checkpoint at step {first}'
    assert checkpoint_steps(ckpts)[-1] == first and checkpoint_steps(ckpts, complete_only=False)[-1] == first
    # 2) inside the (slowed) milestone checkpoint write of step 10: the write completes, then the run stops there
    rc, out2, seconds2 = _preempt_after(10, run_dir, data_dir, tmp_path / 'second.log', KD_LIB_TEST_SLOW_SAVE=1.0)
    assert rc == 0 and 'kd-lib: preempted at step 10' in out2 and f'Resumed from checkpoint step {first}' in out2, out2[-3000:]
    assert checkpoint_steps(ckpts)[-1] == 10 and not [p for p in ckpts.iterdir() if p.name.startswith('.')]
    # 3) resume to the end: bit-identical to the uninterrupted run
    final = run_cli(train_args(run_dir, data_dir, *EXTRA))
    assert final.returncode == 0 and f'finished at step {STEPS}' in final.stdout, final.stdout + final.stderr[-3000:]
    assert RESUMED_RE.search(final.stderr)[1] == '10'
    assert reference.wait(timeout=300) == 0, (tmp_path / 'reference.log').read_text()[-3000:]
    assert_bit_identical(load_weights(run_dir / 'final'), load_weights(tmp_path / 'reference' / 'final'), 'after two preemptions')
    record_figures(record_property, 'sigterm', {'preempted_at': [first, 10], 'seconds_signal_to_exit': [round(seconds, 2), round(seconds2, 2)],
                                                'final_bit_identical': True})
