"""Telling a resumed run from one that started over, and comparing runs.

Training is deterministic, so a rerun from scratch ends with the same bits
as a resume. A `ChunkRecorder` hook shows which steps a run trained: a
resume trains only the steps after the checkpoint it restored.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np

from cnn_jax import registry, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config


class SimulatedCrash(RuntimeError):
  """Raised in place of a chunk of steps, as a crash mid-run."""


class ChunkRecorder:
  """A training hook (`train.Hook`) that records the chunks a run trains.

  Each chunk appends ``(step before the chunk, steps in it)`` to ``chunks``.
  With ``crash_after=N`` the chunk after the N-th raises `SimulatedCrash`
  instead of training; with ``sigterm_at=S`` the chunk that starts at step
  S gets SIGTERM (the training loop's handler is called) as it starts.
  """

  def __init__(self, crash_after: int | None = None,
               sigterm_at: int | None = None):
    self.crash_after, self.sigterm_at = crash_after, sigterm_at
    self.chunks: list[tuple[int, int]] = []

  def __call__(self, step: int, steps: int) -> None:
    if self.crash_after is not None and len(self.chunks) >= self.crash_after:
      raise SimulatedCrash(f'simulated crash after {self.crash_after} chunks')
    self.chunks.append((step, steps))
    if step == self.sigterm_at:
      handler = signal.getsignal(signal.SIGTERM)
      assert callable(handler), 'the training loop handles no SIGTERM'
      handler(signal.SIGTERM, None)

  @property
  def steps(self) -> list[int]:
    return steps_run(self.chunks)


def steps_run(chunks: list[tuple[int, int]]) -> list[int]:
  """The step numbers (1-based, as logged) that the chunks trained."""
  return [start + i + 1 for start, n in chunks for i in range(n)]


def abstract_state(config: Config) -> Any:
  """The TrainState's shapes and dtypes on one device, as a restore target.

  Nothing is initialized or compiled (creating a real state compiles the
  model's init, seconds on CPU).
  """
  model = registry.create_model(config, 10)
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_one_device),
      jax.eval_shape(lambda: train.create_train_state(config, model,
                                                      (28, 28, 1), 1)))


def final_state(workdir: str) -> tuple[Any, dict[str, Any]]:
  """(train state, meta) of the newest readable latest checkpoint."""
  config = Config.from_dict(workdir_lib.read_json(
      os.path.join(workdir, workdir_lib.CONFIG)))
  ckpt = Checkpointer(workdir)
  try:
    return ckpt.restore_latest(abstract_state(config))
  finally:
    ckpt.close()


def assert_same_run(a: str, b: str) -> None:
  """Two finished workdirs agree bit for bit: results, history, state."""
  ra, rb = (workdir_lib.read_results(str(w)) for w in (a, b))
  assert ra.members == rb.members and ra.ensemble == rb.ensemble
  assert ra.training.steps == rb.training.steps
  keys = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')
  assert ([[r[k] for k in keys] for r in workdir_lib.read_history(str(a))] ==
          [[r[k] for k in keys] for r in workdir_lib.read_history(str(b))])
  (sa, _), (sb, _) = final_state(str(a)), final_state(str(b))
  assert int(sa.step) == int(sb.step) == ra.training.steps
  leaves = lambda s: jax.tree_util.tree_leaves(
      (s.params, s.opt_state, s.batch_stats, s.key))
  for x, y in zip(leaves(sa), leaves(sb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
