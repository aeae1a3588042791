"""Real preemption: `main` killed or signalled in a subprocess, then resumed.

Every run here is a fresh ``python tests/helpers/mock_main.py`` process with
the same environment, so the uninterrupted run and the interrupted-and-
resumed one are compared bit for bit.
"""

from __future__ import annotations

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnn_jax import registry, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config
from helpers import procs

HELPER = procs.HELPERS / 'mock_main.py'
CHUNK_DELAY_S = 0.4  # 12 chunks of 2 steps: seconds to aim a signal at.


def _args(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
  return [str(HELPER), f'--workdir={workdir}', f'--tfds_data_dir={data_dir}',
          '--download=false', '--model=simple_cnn', '--epochs=4',
          '--batch_size=32', '--val_examples=64', '--eval_batch_size=64',
          '--learning_rate=1e-3', '--log_every_steps=2',
          '--checkpoint_every_steps=2', '--host_devices=1']


def _env(delay_s: float = 0.0) -> dict[str, str]:
  env = procs.jax_env(1)
  env['CNN_JAX_TEST_CHUNK_DELAY_S'] = str(delay_s)
  return env


def _run_to_end(workdir: pathlib.Path, data_dir: pathlib.Path) -> None:
  done = procs.run_python(_args(workdir, data_dir), _env())
  assert done.returncode == 0, done.stderr[-3000:]


def _start(workdir: pathlib.Path, data_dir: pathlib.Path,
           log: pathlib.Path) -> subprocess.Popen:
  with open(log, 'w') as out:  # A file, not a pipe: never blocks the run.
    return subprocess.Popen([sys.executable, *_args(workdir, data_dir)],
                            cwd=procs.REPO, env=_env(CHUNK_DELAY_S),
                            stdout=out, stderr=subprocess.STDOUT, text=True)


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


def _final_state(workdir: pathlib.Path):
  config = Config(epochs=4, batch_size=32)
  model = registry.create_model(config, 10)
  target = train.create_train_state(config, model, (28, 28, 1), 6)
  ckpt = Checkpointer(str(workdir))
  try:
    state, _ = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  return state


def _assert_same_run(a: pathlib.Path, b: pathlib.Path) -> None:
  ra = json.loads((a / 'results.json').read_text())
  rb = json.loads((b / 'results.json').read_text())
  for key in ('test_loss', 'test_accuracy', 'best_val_accuracy', 'best_epoch',
              'steps'):
    assert ra[key] == rb[key], key
  keys = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')
  assert ([[r[k] for k in keys] for r in workdir_lib.read_history(str(a))] ==
          [[r[k] for k in keys] for r in workdir_lib.read_history(str(b))])
  sa, sb = _final_state(a), _final_state(b)
  assert int(sa.step) == int(sb.step) == ra['steps']
  for x, y in zip(jax.tree_util.tree_leaves((sa.params, sa.opt_state)),
                  jax.tree_util.tree_leaves((sb.params, sb.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, data dir) of the reference run, never interrupted."""
  root = tmp_path_factory.mktemp('preempt')
  workdir = root / 'full'
  _run_to_end(workdir, root / 'tfds')
  return workdir, root / 'tfds'


def test_sigkill_at_random_points_then_rerun_matches_uninterrupted(
    uninterrupted, tmp_path):
  reference, data_dir = uninterrupted
  workdir = tmp_path / 'killed'
  rng = random.Random()  # Different kill points each time; logged on failure.
  kills = []
  for _ in range(2):
    proc = _start(workdir, data_dir, tmp_path / f'kill{len(kills)}.log')
    _wait_for_checkpoint(proc, workdir, after=max(_saved_steps(workdir),
                                                  default=0))
    delay = rng.uniform(0.0, 3 * CHUNK_DELAY_S)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    kills.append((round(delay, 3), proc.returncode, _saved_steps(workdir)))
    assert proc.returncode == -signal.SIGKILL, kills
  assert not (workdir / 'results.json').exists(), kills
  _run_to_end(workdir, data_dir)
  _assert_same_run(reference, workdir)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_then_rerun_matches_uninterrupted(
    uninterrupted, tmp_path, signum):
  reference, data_dir = uninterrupted
  workdir = tmp_path / 'signalled'
  log = tmp_path / 'run.log'
  proc = _start(workdir, data_dir, log)
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
  _run_to_end(workdir, data_dir)
  _assert_same_run(reference, workdir)
