"""Telling a resumed run from one that started over, and comparing runs.

Training is deterministic, so a rerun from scratch ends with the same bits
as a resume. `record_chunks` shows which steps a run actually trained: a
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


def record_chunks(monkeypatch, crash_after: int | None = None,
                  sigterm_at: int | None = None) -> list[tuple[int, int]]:
  """Patches every new Trainer; returns the list of chunks it trains.

  Each `train_chunk` call appends ``(step before the chunk, steps in it)``.
  With ``crash_after=N`` the call after the N-th raises `SimulatedCrash`
  instead of training; with ``sigterm_at=S`` the chunk that starts at step
  S gets SIGTERM (the training loop's handler is called) as it starts.
  ``monkeypatch.undo()`` restores the Trainer.
  """
  chunks: list[tuple[int, int]] = []
  original = train.Trainer.__init__

  def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    chunk = self.train_chunk

    def recorded(state, images, labels, idx):
      if crash_after is not None and len(chunks) >= crash_after:
        raise SimulatedCrash(f'simulated crash after {crash_after} chunks')
      chunks.append((int(state.step), int(idx.shape[0])))
      if chunks[-1][0] == sigterm_at:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), 'the training loop handles no SIGTERM'
        handler(signal.SIGTERM, None)
      return chunk(state, images, labels, idx)
    self.train_chunk = recorded

  monkeypatch.setattr(train.Trainer, '__init__', init)
  return chunks


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
  for key in ('test_loss', 'test_accuracy', 'best_epoch', 'best_val_accuracy',
              'steps'):
    assert ra[key] == rb[key], key
  keys = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')
  assert ([[r[k] for k in keys] for r in workdir_lib.read_history(str(a))] ==
          [[r[k] for k in keys] for r in workdir_lib.read_history(str(b))])
  (sa, _), (sb, _) = final_state(str(a)), final_state(str(b))
  assert int(sa.step) == int(sb.step) == ra['steps']
  leaves = lambda s: jax.tree_util.tree_leaves(
      (s.params, s.opt_state, s.batch_stats, s.key))
  for x, y in zip(leaves(sa), leaves(sb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
