"""Real preemption: `main` killed or signalled in a subprocess, then resumed.

Every run here is a fresh ``python tests/helpers/mock_main.py`` process with
the same environment, so the uninterrupted run and the interrupted-and-
resumed one are compared bit for bit. Training is deterministic, so a rerun
from scratch would match too: each rerun's log must also show that it
restored the newest checkpoint and trained only the steps after it.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import procs
from helpers.resume import assert_same_run

HELPER = procs.HELPERS / 'mock_main.py'
CHUNK_DELAY_S = 0.4  # 12 chunks of 2 steps: seconds to aim a signal at.
STEPS = 24  # 4 epochs of 6 steps (192 mock training examples, batch 32).
FLAGS = dict(model='simple_cnn', epochs=4, batch_size=32, val_examples=64,
             eval_batch_size=64, learning_rate=1e-3, log_every_steps=2,
             checkpoint_every_steps=2, host_devices=1)
# DeepCNN with every stateful or random part, data-parallel on 2 devices.
DEEP_2DEV = dict(model='deep_cnn',
                 model_options='batch_norm=true,dropout_rate=0.25,'
                 'dense_features=16', augment='true', width_multiplier=0.25,
                 epochs=2, host_devices=2)
STEP_LINE = re.compile(r'epoch \d+/\d+ step (\d+)/(\d+) ')


def _args(workdir: pathlib.Path, data_dir: pathlib.Path,
          **flags) -> list[str]:
  flags = {**FLAGS, **flags}
  return [str(HELPER), f'--workdir={workdir}', f'--tfds_data_dir={data_dir}',
          '--download=false', *(f'--{k}={v}' for k, v in flags.items())]


def _env(delay_s: float = 0.0, devices: int = 1) -> dict[str, str]:
  env = procs.jax_env(devices)
  env['CNN_JAX_TEST_CHUNK_DELAY_S'] = str(delay_s)
  return env


def _run_to_end(workdir: pathlib.Path, data_dir: pathlib.Path,
                **flags) -> str:
  """Runs the command to its end; returns its output (the log)."""
  devices = {**FLAGS, **flags}['host_devices']
  done = procs.run_python(_args(workdir, data_dir, **flags),
                          _env(devices=devices))
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout + done.stderr


def _start(workdir: pathlib.Path, data_dir: pathlib.Path,
           log: pathlib.Path, **flags) -> subprocess.Popen:
  devices = {**FLAGS, **flags}['host_devices']
  with open(log, 'w') as out:  # A file, not a pipe: never blocks the run.
    return subprocess.Popen([sys.executable, *_args(workdir, data_dir,
                                                    **flags)],
                            cwd=procs.REPO, env=_env(CHUNK_DELAY_S, devices),
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def _steps_logged(output: str) -> list[int]:
  """The step numbers of the progress lines (one per chunk of 2 steps)."""
  return [int(m.group(1)) for m in STEP_LINE.finditer(output)]


def _assert_resumed(output: str, step: int, total: int = STEPS) -> None:
  """The run restored ``step`` and trained only the steps after it."""
  assert 0 < step <= total
  assert output.count('Resuming from step') == 1, output[-3000:]
  assert f'Resuming from step {step} in ' in output, output[-3000:]
  assert _steps_logged(output) == list(range(step + 2, total + 1, 2))


def _saved_steps(workdir: pathlib.Path) -> list[int]:
  latest = workdir / 'checkpoints' / 'latest'
  if not latest.is_dir():
    return []
  return sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())


def _wait_for_checkpoint(proc: subprocess.Popen, workdir: pathlib.Path,
                         after: int = 0) -> None:
  deadline = time.monotonic() + procs.TIMEOUT_S
  while not any(s > after for s in _saved_steps(workdir)):
    if proc.poll() is not None:
      pytest.fail(f'run ended (exit {proc.returncode}) before saving a '
                  f'checkpoint past step {after}')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail('no checkpoint appeared in time')
    time.sleep(0.05)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, data dir) of the reference run, never interrupted."""
  root = tmp_path_factory.mktemp('preempt')
  workdir = root / 'full'
  output = _run_to_end(workdir, root / 'tfds')
  assert 'Resuming' not in output
  assert _steps_logged(output) == list(range(2, STEPS + 1, 2))
  return workdir, root / 'tfds'


def test_sigkill_at_random_points_then_rerun_matches_uninterrupted(
    uninterrupted, tmp_path):
  reference, data_dir = uninterrupted
  workdir = tmp_path / 'killed'
  rng = random.Random()  # Different kill points each time; logged on failure.
  kills = []
  for i in range(2):
    log = tmp_path / f'kill{i}.log'
    proc = _start(workdir, data_dir, log)
    _wait_for_checkpoint(proc, workdir, after=max(_saved_steps(workdir),
                                                  default=0))
    delay = rng.uniform(0.0, 3 * CHUNK_DELAY_S)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if kills:  # The second run resumed from the first one's checkpoint.
      assert f'Resuming from step {max(kills[-1][2])} in ' in log.read_text()
    kills.append((round(delay, 3), proc.returncode, _saved_steps(workdir)))
    assert proc.returncode == -signal.SIGKILL, kills
  assert not (workdir / 'results.json').exists(), kills
  output = _run_to_end(workdir, data_dir)
  _assert_resumed(output, max(kills[-1][2]))
  assert_same_run(reference, workdir)


def _signal_then_resume(workdir: pathlib.Path, data_dir: pathlib.Path,
                        signum: int, log: pathlib.Path, total: int = STEPS,
                        **flags) -> None:
  """Signals a run after its first checkpoint; it must save and stop, and
  its rerun must resume from that save and train only the steps after it."""
  proc = _start(workdir, data_dir, log, **flags)
  _wait_for_checkpoint(proc, workdir)
  before = _saved_steps(workdir)
  proc.send_signal(signum)
  proc.wait(timeout=120)
  output = log.read_text()
  assert proc.returncode == 143, output[-3000:]
  assert f'stopped by signal {int(signum)}' in output
  assert 'Traceback' not in output
  after = _saved_steps(workdir)
  assert max(after) > max(before), (before, after)  # Saved on the way out.
  assert f'at step {max(after)};' in output
  assert not (workdir / 'results.json').exists()
  _assert_resumed(_run_to_end(workdir, data_dir, **flags), max(after), total)


def test_sigterm_saves_then_rerun_matches_uninterrupted(uninterrupted,
                                                        tmp_path):
  reference, data_dir = uninterrupted
  workdir = tmp_path / 'signalled'
  _signal_then_resume(workdir, data_dir, signal.SIGTERM, tmp_path / 'run.log')
  assert_same_run(reference, workdir)


def test_deep_cnn_with_bn_dropout_augment_on_two_devices_resumes_exactly(
    tmp_path):
  """SIGINT (Ctrl-C), then a rerun: batch statistics, dropout and
  augmentation keys and the data order continue across the resume on a
  2-device mesh."""
  data_dir, reference = tmp_path / 'tfds', tmp_path / 'full'
  output = _run_to_end(reference, data_dir, **DEEP_2DEV)
  assert 'Resuming' not in output and ' 2 device(s) ' in output
  workdir = tmp_path / 'stopped'
  _signal_then_resume(workdir, data_dir, signal.SIGINT, tmp_path / 'run.log',
                      total=12, **DEEP_2DEV)
  results = json.loads((workdir / 'results.json').read_text())
  assert results['training']['num_devices'] == 2
  assert results['model'] == 'deep_cnn'
  assert_same_run(reference, workdir)
