"""`kernels.pool.max_pool_2x2` is the models' Flax max-pool, gradient included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.kernels import pool


@pytest.mark.parametrize('shape', [(2, 26, 26, 3), (2, 11, 11, 4),
                                   (1, 5, 8, 2)])
def test_values_and_gradients_match_the_flax_pool(shape):
  # Distinct values: no ties, where the two gradients may legitimately differ.
  x = jax.random.permutation(jax.random.PRNGKey(0),
                             jnp.arange(np.prod(shape), dtype=jnp.float32))
  x = x.reshape(shape) / x.size
  a, b = pool.max_pool_2x2(x), models.max_pool_2x2(x)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  grads = [jax.grad(lambda v, p=p: (p(v) ** 3).sum())(x)
           for p in (pool.max_pool_2x2, models.max_pool_2x2)]
  np.testing.assert_array_equal(*grads)
  # Inside jit and a scan too, as the trainer runs it.
  scanned = jax.jit(lambda v: jax.lax.scan(
      lambda c, vi: (c + jax.grad(lambda u: (pool.max_pool_2x2(u) ** 3).sum())(
          vi), None), jnp.zeros_like(v), v[None])[0])(x)
  np.testing.assert_allclose(scanned, grads[1], rtol=1e-6)


def test_ties_share_the_gradient():
  x = jnp.array([[1.0, 1.0], [0.0, -1.0]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda v: pool.max_pool_2x2(v).sum())(x)
  np.testing.assert_array_equal(g.reshape(2, 2), [[0.5, 0.5], [0.0, 0.0]])
  x = jnp.array([[-1.0, 2.0], [2.0, 2.0]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda v: pool.max_pool_2x2(v).sum())(x)
  np.testing.assert_allclose(g.reshape(2, 2), [[0.0, 1 / 3], [1 / 3, 1 / 3]])
  # The gradient's total is the same as Flax's, which gives it to one input.
  flax_g = jax.grad(lambda v: models.max_pool_2x2(v).sum())(x)
  assert float(g.sum()) == pytest.approx(float(flax_g.sum()))
