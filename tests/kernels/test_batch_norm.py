"""`kernels.batch_norm.BatchNorm` computes what `flax.linen.BatchNorm` does."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.kernels import batch_norm


def _loss_and_grads(module: nn.Module, variables, x, train: bool):
  """A loss that weights outputs unevenly, its grads and new batch stats."""

  def loss(v, x):
    y, updates = module.apply(v, x, use_running_average=not train,
                              mutable=['batch_stats'])
    weights = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), updates

  (value, updates), grads = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(variables, x)
  return value, grads, updates


@pytest.mark.parametrize('shape', [(8, 5, 5, 4), (16, 6)])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_matches_flax(shape, train):
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3.0 + 1.5
  ours = batch_norm.BatchNorm(momentum=0.9)
  ref = nn.BatchNorm(momentum=0.9)
  v_ours = ours.init(jax.random.PRNGKey(1), x, use_running_average=False)
  v_ref = ref.init(jax.random.PRNGKey(1), x, use_running_average=False)
  assert jax.tree_util.tree_structure(v_ours) == jax.tree_util.tree_structure(
      v_ref)
  # Non-trivial params and running statistics.
  v = jax.tree_util.tree_map(
      lambda a: a + 0.3 * jax.random.uniform(jax.random.PRNGKey(2), a.shape),
      v_ref)
  got = _loss_and_grads(ours, v, x, train)
  want = _loss_and_grads(ref, v, x, train)
  # float32 sums in another order: a few ulps of the loss's scale.
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if train:  # The running averages moved, the same way.
    assert not np.allclose(got[2]['batch_stats']['mean'],
                           v['batch_stats']['mean'])


def test_batch_norm_bfloat16_output_float32_statistics():
  x = (jax.random.normal(jax.random.PRNGKey(0), (32, 7)) * 50 + 1000
       ).astype(jnp.bfloat16)
  ours = batch_norm.BatchNorm(dtype=jnp.bfloat16)
  ref = nn.BatchNorm(dtype=jnp.bfloat16)
  v = ref.init(jax.random.PRNGKey(1), x, use_running_average=False)
  y, upd = ours.apply(v, x, use_running_average=False, mutable=['batch_stats'])
  y_ref, upd_ref = ref.apply(v, x, use_running_average=False,
                             mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(np.float32), y_ref.astype(np.float32),
                             atol=1e-2)
  np.testing.assert_allclose(upd['batch_stats']['var'],
                             upd_ref['batch_stats']['var'], rtol=1e-6)


def test_batch_norm_gradient_of_its_statistics():
  """The custom VJP also differentiates the returned mean and variance."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  scale, bias = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 0.1, -0.2])

  def f(x):
    y, mean, var = batch_norm.batch_norm_train(x, scale, bias, 1e-5)
    return jnp.sum(y[:2]) + jnp.sum(mean * 3.0) + jnp.sum(var * var)

  def ref(x):
    mean = x.mean(0)
    var = (x * x).mean(0) - mean**2
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    return jnp.sum(y[:2]) + jnp.sum(mean * 3.0) + jnp.sum(var * var)

  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(ref)(x), rtol=1e-5,
                             atol=1e-6)
