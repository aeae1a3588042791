"""`max_pool_2x2`: the models' 2x2 max-pool with a one-pass gradient.

The same forward values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, but
the gradient is taken as a mask of each window's maximum (the gradient
``jnp.max`` would give) instead of XLA's select-and-scatter, which XLA:CPU
runs slowly. The two gradients differ only on exact ties inside a window,
where this one shares the gradient among the tied inputs instead of giving
it to one; after a ReLU the usual ties are zeros, whose gradient is zero
either way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


max_pool_2x2 = jax.custom_vjp(_pool)
max_pool_2x2.__doc__ = ('2x2 max-pool, stride 2, VALID (an odd last row or '
                        'column is dropped), with a mask gradient.')


def _fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _pool(x), x


def _bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  # The maxima are recomputed from the saved input rather than saved: XLA
  # may recompute the input in a differently fused (differently rounded)
  # way, and a mask against maxima of other bits could be empty (0/0). The
  # four taps of each window are strided views combined elementwise, so XLA
  # fuses the whole gradient into one pass.
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  windows = x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c)
  taps = [windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]
  top = jnp.maximum(jnp.maximum(taps[0], taps[1]),
                    jnp.maximum(taps[2], taps[3]))
  masks = [(t == top).astype(g.dtype) for t in taps]
  share = g / (masks[0] + masks[1] + masks[2] + masks[3])
  gx = jnp.stack([m * share for m in masks], axis=3)  # n, h2, w2, (i, j), c
  gx = gx.reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  gx = gx.reshape(n, 2 * h2, 2 * w2, c)
  return (jnp.pad(gx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


max_pool_2x2.defvjp(_fwd, _bwd)
