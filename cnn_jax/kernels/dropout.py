"""`Dropout`: `flax.linen.Dropout` drawing several decisions per random word.

Each element is kept with probability exactly ``1 - rate``, as in Flax, but
the decisions are 8-bit lanes of 32-bit random words when ``rate`` is a
multiple of 1/256 (16-bit lanes for multiples of 1/65536), so ``rate=0.25``
needs a quarter of the threefry evaluations of `nn.Dropout`. Its masks differ
from Flax's for the same key. No ``broadcast_dims``: the models need none.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]
              ) -> jax.Array:
  """Boolean mask, each element True with probability ``1 - rate``.

  Each decision compares one 8-, 16- or 32-bit lane of a random word with
  ``rate * 2**bits``: the narrowest lane where that is an integer, so the
  keep probability is exact (32-bit lanes round it to 2**-32).
  """
  n = math.prod(shape)
  bits = next(b for b in (8, 16, 32)
              if b == 32 or float(rate * 2**b).is_integer())
  lanes = 32 // bits
  words = jax.random.bits(key, (-(-n // lanes),), jnp.uint32)
  if lanes > 1:
    shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
    words = ((words[:, None] >> shifts) & (2**bits - 1)).reshape(-1)
  threshold = min(round(rate * 2**bits), 2**32 - 1)
  return (words[:n] >= threshold).reshape(shape)


class Dropout(nn.Module):
  """`flax.linen.Dropout` (no broadcast dims), several decisions per word."""

  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array,
               deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param('deterministic', self.deterministic,
                                   deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng('dropout'), self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
