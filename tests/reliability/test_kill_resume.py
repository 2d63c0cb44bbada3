"""Kill harness: SIGKILL a real `kd-lib train` run at random moments (many of them inside a slowed checkpoint write),
resume, repeat; every resume starts from the newest complete checkpoint and the final weights equal an uninterrupted run's.

The reference run, the first cycle and the final resume use the real `kd-lib` console script; the other cycles fork
`kd_lib.cli.main` from a pre-imported server (tests/reliability/cli_zygote.py) to skip ~5 s of start-up per cycle
(KD_LIB_RELIABILITY_EXEC=1: the console script for every cycle). KD_LIB_RELIABILITY_LONG=1 runs 100 kill/resume cycles
instead of 20 (or KD_LIB_RELIABILITY_CYCLES=N); KD_LIB_RELIABILITY_SEED=S replays a schedule (the seed is in every
failure message and in the recorded figures)."""
import os
import random
import shutil
import signal
import time

from reliability_helpers import (RESUMED_RE, CliForkServer, STEP_RE, assert_bit_identical, checkpoint_steps, data_dir,  # noqa: F401
                                 load_weights, newest_complete, record_figures, run_cli, start_cli, train_args)

CYCLES = int(os.environ.get('KD_LIB_RELIABILITY_CYCLES') or (100 if os.environ.get('KD_LIB_RELIABILITY_LONG') else 20))
SLOW_SAVE = 0.25  # seconds slept after each file of a checkpoint (KD_LIB_TEST_SLOW_SAVE): saves are a big kill target
STEPS = 6 * CYCLES + 10  # a cycle advances ~3 steps on average, so the kills end well before the run does
EXTRA = [f'training.steps={STEPS}', 'checkpoint.save_every=1', 'checkpoint.max_checkpoints=2', 'tracing.log_every=1']
CORRUPTIONS = ('flip a byte of model.safetensors', 'truncate training_state.pt', 'delete meta.json')


def _wait_for_steps(count: int, log, proc, deadline: float) -> bool:
    "Wait until the run has logged `count` training steps (True), or it exits or the deadline passes (False)."
    while time.monotonic() < deadline:
        if len(STEP_RE.findall(log.read_text(errors='replace'))) >= count: return True
        if proc.poll() is not None: return False
        time.sleep(0.01)
    return False


def _kill(pid: int):
    "SIGKILL the run's process group (the run itself if it has not made one yet)."
    try: os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError: os.kill(pid, signal.SIGKILL)


def _corrupt(ckpt_dir, step: int, how: str):
    "Damage the complete checkpoint at `step` the way a torn write or a bad disk would."
    folder = ckpt_dir / f'checkpoint_step_{step}'
    if how.startswith('flip'):
        data = bytearray((folder / 'model.safetensors').read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / 'model.safetensors').write_bytes(bytes(data))
    elif how.startswith('truncate'):
        data = (folder / 'training_state.pt').read_bytes()
        (folder / 'training_state.pt').write_bytes(data[: len(data) // 2])
    else: (folder / 'meta.json').unlink()


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, data_dir, record_property):
    seed = int(os.environ.get('KD_LIB_RELIABILITY_SEED') or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    ctx = f'(seed {seed}; replay with KD_LIB_RELIABILITY_SEED={seed})'
    reference = start_cli(train_args(tmp_path / 'reference', data_dir, *EXTRA), tmp_path / 'reference.log')
    run_dir, ckpt_dir = tmp_path / 'killed', tmp_path / 'killed' / 'checkpoints'
    fig = dict(kills=0, kills_inside_checkpoint_write=0, kills_before_first_step=0, corrupted_checkpoints_planted=0,
               resumes_checked=0, corrupt_loads=0, seed=seed, steps=STEPS)
    wrong_resumes, time_to_first_step = [], {True: 4.0, False: 0.5}  # seconds, by launch kind (console script?), as last seen
    server = None if os.environ.get('KD_LIB_RELIABILITY_EXEC') else CliForkServer()
    for cycle in range(CYCLES):
        expected = newest_complete(ckpt_dir)  # computed independently of kd_lib, before the process starts
        log = tmp_path / f'cycle_{cycle:03d}.log'
        log.touch()
        launch = start_cli if server is None or cycle == 0 else server.start
        slow = rng.choice([SLOW_SAVE, SLOW_SAVE, SLOW_SAVE, 0])  # a quarter of the cycles: kills in plain training
        proc = launch(train_args(run_dir, data_dir, *EXTRA), log, KD_LIB_TEST_SLOW_SAVE=slow)
        mode = rng.choices(['save', 'step', 'startup'], weights=[70, 15, 15])[0]
        started = time.monotonic()
        if mode == 'startup':  # before the first step: import, data, model build or checkpoint load
            time.sleep(rng.uniform(0.0, 0.9 * time_to_first_step[launch is start_cli]))
        else:
            assert _wait_for_steps(1, log, proc, started + 180), f'cycle {cycle}: no training step {ctx}\n{log.read_text()[-3000:]}'
            time_to_first_step[launch is start_cli] = time.monotonic() - started
            assert _wait_for_steps(rng.randint(1, 3), log, proc, started + 180), f'cycle {cycle}: run ended {ctx}\n{log.read_text()[-3000:]}'
            # a step line is logged just before that step's checkpoint write (~2 x SLOW_SAVE long)
            time.sleep(rng.uniform(0, 2 * slow) if mode == 'save' and slow else rng.uniform(2 * slow, 2 * slow + (0.3 if slow else 0.15)))
        assert proc.poll() is None, f'cycle {cycle}: the run ended by itself (rc {proc.returncode}) {ctx}\n{log.read_text()[-3000:]}'
        _kill(proc.pid)
        proc.wait()
        fig['kills'] += 1
        text = log.read_text(errors='replace')
        logged = STEP_RE.findall(text)
        fig['kills_inside_checkpoint_write'] += bool(logged) and (ckpt_dir / f'.tmp_checkpoint_step_{logged[-1]}').exists()
        fig['kills_before_first_step'] += not logged  # during start-up, data, model build or checkpoint load
        if m := RESUMED_RE.search(text):
            fig['resumes_checked'] += 1
            if int(m[1]) != expected: wrong_resumes.append((cycle, int(m[1]), expected))
        elif expected is not None and STEP_RE.search(text): wrong_resumes.append((cycle, None, expected))  # trained without resuming
        if cycle % 5 == 4 and len(steps := checkpoint_steps(ckpt_dir)) >= 2:  # plant a corrupt newest checkpoint
            _corrupt(ckpt_dir, steps[-1], CORRUPTIONS[fig['corrupted_checkpoints_planted'] % len(CORRUPTIONS)])
            fig['corrupted_checkpoints_planted'] += 1
    if server is not None: server.close()
    expected = newest_complete(ckpt_dir)
    final = run_cli(train_args(run_dir, data_dir, *EXTRA), timeout=600)
    out = final.stdout + final.stderr
    assert final.returncode == 0 and f'finished at step {STEPS}' in out, f'{ctx}\n{out[-3000:]}'
    m = RESUMED_RE.search(out)
    fig['resumes_checked'] += bool(m)
    if expected is not None and (not m or int(m[1]) != expected): wrong_resumes.append(('final', m and int(m[1]), expected))
    fig['corrupt_loads'] = len(wrong_resumes)
    assert reference.wait(timeout=600) == 0, (tmp_path / 'reference.log').read_text()[-3000:]
    fig['final_bit_identical'] = True
    try: assert_bit_identical(load_weights(run_dir / 'final'), load_weights(tmp_path / 'reference' / 'final'), f'final weights {ctx}')
    except AssertionError:
        fig['final_bit_identical'] = False
        raise
    finally: record_figures(record_property, 'kill_resume', fig)
    assert not wrong_resumes, f'resumed from the wrong checkpoint (cycle, resumed, newest complete): {wrong_resumes} {ctx}'
    assert fig['kills'] == CYCLES and fig['kills_inside_checkpoint_write'] > 0, fig
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.name.startswith('.')]
    assert not leftovers, f'interrupted-save leftovers after a clean finish: {leftovers}'
    shutil.rmtree(run_dir)  # keep tmp small in long mode
