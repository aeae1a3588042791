"""Orbax checkpoints: the latest train state (for resume) and the best params.

Layout under ``workdir/checkpoints``:

* ``latest/<step>``: the whole train state plus JSON metadata (epoch
  progress, running metric sums, history), the two newest kept, so a
  corrupt newest one falls back to the one before.
* ``best/<step>``: params and batch stats of the epoch with the best
  validation metric (``--best_metric``), plus its metrics; selection never
  looks at test data.
"""

from __future__ import annotations

import os
import shutil
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


def _for_saving(tree: Any) -> Any:
  """Host copies of ``tree``'s arrays in a single process.

  Orbax splits a replicated ``jax.Array``'s write across its replicas and
  compiles a slicing program per leaf and device for it (~20 ms each, most
  of a small model's save); the host copy is written as one piece, and
  restores as before. Several processes keep the arrays: each writes its
  own part.
  """
  return jax.device_get(tree) if jax.process_count() == 1 else tree


def tree_bytes(tree: Any) -> int:
  """Uncompressed size of a pytree's arrays: an upper bound for a save."""
  return sum(int(getattr(x, 'nbytes', 0))
             for x in jax.tree_util.tree_leaves(tree))


def free_bytes(path: str) -> int:
  """Free space on the filesystem holding ``path`` (or its nearest parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _mb(n: int) -> str:
  return f'{n / 2**20:.1f} MB'


# Failures of a write that the user can fix (disk full, permissions), as
# Orbax/TensorStore report them: OSError, or ValueError with a status code.
_WRITE_REASONS = ('No space left on device', 'Permission denied',
                  'Read-only file system')
_WRITE_ERRORS = _WRITE_REASONS + ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED',
                                  'os_error_code')


def _write_error(root: str, e: Exception, saved: list[int]) -> CnnJaxError:
  reason = e.strerror if isinstance(e, OSError) and e.strerror else next(
      (m for m in _WRITE_REASONS if m in str(e)),
      ' '.join(str(e).split())[:200])
  kept = (f'the checkpoints saved before (steps {saved}) are kept'
          if saved else 'nothing had been saved yet')
  return CnnJaxError(f'could not write a checkpoint under {root}: {reason}; '
                     f'{kept}; fix it and re-run the same command to resume')


def _mismatch(directory: str, e: Exception) -> CnnJaxError:
  detail = ' '.join(str(e).split())[:300]
  return CnnJaxError(f'checkpoint in {directory} does not match this model/'
                     f'config (was it written by a different --model or '
                     f'width?): {detail}')


def has_best(workdir: str) -> bool:
  """Whether ``workdir`` holds a best checkpoint (read-only look)."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.has_best()
  finally:
    ckpt.close()


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

  def check_space(self, state: Any) -> None:
    """Fails before training when the disk cannot hold this run's saves.

    At peak the latest directory holds three states (two kept plus the one
    being written) and the best one holds params and statistics.
    """
    need = 4 * tree_bytes(state) + 2**20
    free = free_bytes(self.root)
    if free < need:
      raise CnnJaxError(f'not enough free space for checkpoints under '
                        f'{self.root}: {_mb(free)} free, this run needs about '
                        f'{_mb(need)}; free some space or use another '
                        '--workdir')

  def _save(self, manager: ocp.CheckpointManager, step: int,
            args: ocp.args.Composite, nbytes: int) -> None:
    """One save, refused up front when it cannot fit; never half-reported."""
    saved = sorted(manager.all_steps())
    free = free_bytes(self.root)
    if free < nbytes + 2**20:
      raise _write_error(self.root, OSError(
          28, f'No space left on device ({_mb(free)} free, a checkpoint '
          f'needs up to {_mb(nbytes)})'), saved)
    if step in saved:  # Unreadable, so a resume fell back past it: redone.
      logging.warning('replacing checkpoint %d in %s', step, manager.directory)
      manager.delete(step)
      saved.remove(step)
    try:
      manager.save(step, args=args, force=True)
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, OSError) or any(m in str(e) for m in _WRITE_ERRORS):
        raise _write_error(self.root, e, saved) from e
      raise

  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._save(self._latest, step, ocp.args.Composite(
        state=ocp.args.StandardSave(_for_saving(state)),
        meta=ocp.args.JsonSave(meta)), tree_bytes(state))

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """Newest readable (state, meta), falling back past corrupt ones.

    A shape or structure error is a different model only when no older
    checkpoint restores either: a damaged newest one (missing metadata)
    raises the same errors.
    """
    steps = self.latest_steps()
    mismatches = []
    for step in reversed(steps):
      try:
        out = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)),
            meta=ocp.args.JsonRestore()))
        return out['state'], out['meta']
      except Exception as e:  # Truncated/corrupt files: fall back.
        if isinstance(e, (ValueError, TypeError)) and (
            'shape' in str(e).lower() or 'structure' in str(e).lower()):
          mismatches.append(e)
        logging.warning('latest checkpoint %d is unreadable (%s: %s); trying '
                        'an older one', step, type(e).__name__,
                        ' '.join(str(e).split())[:200])
    if steps and len(mismatches) == len(steps):
      raise _mismatch(self.root, mismatches[0]) from mismatches[0]
    if steps:
      raise CnnJaxError(f'no readable checkpoint among steps {steps} in '
                        f'{self.root}/latest; remove it to start over')
    return None

  # Best params ------------------------------------------------------------
  def save_best(self, step: int, variables: Any, meta: dict[str, Any]) -> None:
    self._save(self._best, step, ocp.args.Composite(
        variables=ocp.args.StandardSave(_for_saving(variables)),
        meta=ocp.args.JsonSave(meta)), tree_bytes(variables))

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
