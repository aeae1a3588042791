"""Orbax checkpoints: the latest train state (for resume) and the best params.

Layout under ``workdir/checkpoints``:

* ``latest/<step>``: the whole train state plus JSON metadata (epoch
  progress, running metric sums, history), the two newest kept, so a
  corrupt newest one falls back to the one before.
* ``best/<step>``: params and batch stats of the epoch with the highest
  validation accuracy, plus its metrics; selection never looks at test data.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from cnn_jax.config import CnnJaxError


def _manager(directory: str, max_to_keep: int, read_only: bool = False
             ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _mismatch(directory: str, e: Exception) -> CnnJaxError:
  detail = ' '.join(str(e).split())[:300]
  return CnnJaxError(f'checkpoint in {directory} does not match this model/'
                     f'config (was it written by a different --model or '
                     f'width?): {detail}')


class Checkpointer:
  """Saves and restores the latest state and the best params of one run."""

  def __init__(self, workdir: str, read_only: bool = False):
    self.root = os.path.join(workdir, 'checkpoints')
    best = os.path.join(self.root, 'best')
    if read_only:  # Eval/analysis/predict only ever read the best params.
      self._latest = None
      self._best = _manager(best, 1, True) if os.path.isdir(best) else None
      return
    self._latest = _manager(os.path.join(self.root, 'latest'), 2)
    self._best = _manager(best, 1)

  # Latest state -----------------------------------------------------------
  def latest_steps(self) -> list[int]:
    return sorted(self._latest.all_steps()) if self._latest else []

  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    try:
      self._latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                        force=True)
      self._latest.wait_until_finished()
    except OSError as e:
      raise CnnJaxError(f'could not write a checkpoint under {self.root}: '
                        f'{e.strerror or e}') from e

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """Newest readable (state, meta), falling back past corrupt ones."""
    steps = self.latest_steps()
    for step in reversed(steps):
      try:
        out = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)),
            meta=ocp.args.JsonRestore()))
        return out['state'], out['meta']
      except (ValueError, TypeError) as e:
        if 'shape' in str(e).lower() or 'structure' in str(e).lower():
          raise _mismatch(self.root, e) from e
        logging.warning('latest checkpoint %d is unreadable (%s); trying an '
                        'older one', step, ' '.join(str(e).split())[:200])
      except Exception as e:  # Truncated/corrupt files: fall back.
        logging.warning('latest checkpoint %d is unreadable (%s: %s); trying '
                        'an older one', step, type(e).__name__,
                        ' '.join(str(e).split())[:200])
    if steps:
      raise CnnJaxError(f'no readable checkpoint among steps {steps} in '
                        f'{self.root}/latest; remove it to start over')
    return None

  # Best params ------------------------------------------------------------
  def save_best(self, step: int, variables: Any, meta: dict[str, Any]) -> None:
    try:
      self._best.save(step, args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables),
          meta=ocp.args.JsonSave(meta)), force=True)
      self._best.wait_until_finished()
    except OSError as e:
      raise CnnJaxError(f'could not write a checkpoint under {self.root}: '
                        f'{e.strerror or e}') from e

  def has_best(self) -> bool:
    return bool(self._best and self._best.latest_step() is not None)

  def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]]:
    """(variables, meta) of the best epoch; `target` gives the tree shapes."""
    if not self.has_best():
      raise CnnJaxError(f'no checkpoint found in {self.root}/best; train '
                        'first with --mode=train and the same --workdir')
    step = self._best.latest_step()
    try:
      out = self._best.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(_abstract(target)),
          meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise _mismatch(os.path.join(self.root, 'best'), e) from e
    return out['variables'], out['meta']

  def close(self) -> None:
    for m in (self._latest, self._best):
      if m is not None:
        m.close()
