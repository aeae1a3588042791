"""A run's progress besides its train state, saved with every latest
checkpoint: each member's best epoch so far, the training seconds, and the
running metric sums of an epoch interrupted mid-way; and the one rule that
picks each member's best epoch, for any number of members."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.config import Config


@dataclasses.dataclass
class Best:
  """A network's best epoch so far, by its validation metrics."""

  epoch: int = -1
  val_accuracy: float = -1.0
  val_loss: float = math.inf

  def beaten_by(self, config: Config, val: dict[str, float]) -> bool:
    """Whether validation metrics ``val`` beat this best.

    ``val_loss`` exists because on a 5,000-image split accuracy moves in
    steps of one image, so a single lucky epoch at a high learning rate can
    win.
    """
    if self.epoch < 0:
      return True
    if config.best_metric == 'val_loss':
      return val['loss'] < self.val_loss
    return val['accuracy'] > self.val_accuracy


@dataclasses.dataclass
class Progress:
  """A run's progress besides its state, saved with each latest checkpoint:
  each member's best epoch, the training seconds so far, and the running
  metric sums of an epoch interrupted mid-way."""

  members: list[Best]
  train_seconds: float = 0.0
  sums: dict[str, list] | None = None

  @classmethod
  def start(cls, members: int) -> 'Progress':
    """A run's progress before its first step."""
    return cls([Best() for _ in range(members)])

  def to_json(self) -> dict[str, Any]:
    """JSON-ready (no best yet: a loss of None rather than infinity)."""
    members = [{**dataclasses.asdict(b), 'val_loss': None
                if math.isinf(b.val_loss) else b.val_loss}
               for b in self.members]
    return {'members': members, 'train_seconds': self.train_seconds,
            'sums': self.sums}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'Progress':
    """Of this layout, or of the one before (best_* keys at the top level
    for one network, ``best_val_accuracy``/... per member for many)."""
    def best(m: dict[str, Any]) -> Best:
      if 'epoch' in m:
        epoch, acc, loss = m['epoch'], m['val_accuracy'], m['val_loss']
      else:
        epoch, acc, loss = (m['best_epoch'], m['best_val_accuracy'],
                            m.get('best_val_loss'))
      return Best(epoch, acc, math.inf if loss is None else loss)
    return cls([best(m) for m in d.get('members') or [d]],
               d.get('train_seconds', 0.0), d.get('sums'))

  def best_meta(self, step: int) -> dict[str, Any]:
    """The best checkpoint's metadata (`inference.best_members` reads it)."""
    return {'step': step, 'members': [
        {'epoch': b.epoch, 'loss': b.val_loss, 'accuracy': b.val_accuracy}
        for b in self.members]}


def keep_best(improved: list[bool], variables: Any, best: Any) -> Any:
  """Each network's variables of this epoch where it improved, else its
  best so far; new arrays, as the state's are donated to the next chunk."""
  best = variables if best is None else best
  return _pick(np.asarray(improved), variables, best)


@jax.jit
def _pick(improved: jax.Array, variables: Any, best: Any) -> Any:
  """`keep_best` as one program for the whole tree (one per leaf would each
  be traced and compiled or looked up, ~10-20 ms apiece)."""
  stacked = improved.shape[0] > 1

  def pick(new, old):
    mask = (improved.reshape((-1,) + (1,) * (new.ndim - 1)) if stacked
            else improved[0])
    return jnp.where(mask, new, old)
  return jax.tree_util.tree_map(pick, variables, best)
