"""`BatchNorm`: `flax.linen.BatchNorm` with a fused gradient.

It has exactly the variables of `nn.BatchNorm` (params ``scale``, ``bias``;
``batch_stats`` ``mean``, ``var``), the same float32 statistics
(``E[x^2] - E[x]^2``, clipped at 0), output and running-average update, so
checkpoints are interchangeable. In training its gradient is a custom VJP:
one reduction pass (``sum g``, ``sum g * x_hat``) and one elementwise pass,
where autodiff of Flax's layer leaves XLA:CPU several passes over each
activation. Normalization over the last axis only, as the models use it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _normalize(x: jax.Array, mean: jax.Array, inv: jax.Array,
               scale: jax.Array, bias: jax.Array) -> jax.Array:
  return (x - mean) * (inv * scale) + bias


def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalizes ``x`` over all but its last axis with its batch statistics.

  Returns ``(y, mean, var)``; the gradient covers all three outputs.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  mean, var = _batch_stats(x)
  inv = lax.rsqrt(var + epsilon)
  return (_normalize(x, mean, inv, scale, bias), mean, var), (x, mean, inv,
                                                               scale)


def _batch_norm_bwd(epsilon, res, cotangents):
  del epsilon
  x, mean, inv, scale = res
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  centered = x - mean
  x_hat = centered * inv
  g_bias = jnp.sum(g, axes)
  g_scale = jnp.sum(g * x_hat, axes)
  g_x = ((scale * inv) * (g - g_bias / m - x_hat * (g_scale / m))
         + (g_mean + 2.0 * g_var * centered) / m)
  return g_x, g_scale, g_bias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis, with a fused gradient."""

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array,
               use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    shape = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, shape,
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, shape, jnp.float32)
    scale = self.param('scale', nn.initializers.ones, shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, shape, jnp.float32)
    x32 = x.astype(jnp.float32)  # Statistics in float32, as Flax's.
    if use_running_average:
      y = _normalize(x32, ra_mean.value,
                     lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
    else:
      y, mean, var = batch_norm_train(x32, scale, bias, self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    return y.astype(self.dtype or x.dtype)
