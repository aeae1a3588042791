"""`cnn_jax.layers`: Flax's batch norm and dropout semantics, other kernels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import layers


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
  ours = layers.BatchNorm(momentum=0.9)
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
  ours = layers.BatchNorm(dtype=jnp.bfloat16)
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
    y, mean, var = layers.batch_norm_train(x, scale, bias, 1e-5)
    return jnp.sum(y[:2]) + jnp.sum(mean * 3.0) + jnp.sum(var * var)

  def ref(x):
    mean = x.mean(0)
    var = (x * x).mean(0) - mean**2
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    return jnp.sum(y[:2]) + jnp.sum(mean * 3.0) + jnp.sum(var * var)

  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(ref)(x), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('rate,bits', [(0.25, 8), (0.5, 8), (0.3, 32),
                                       (1 / 1024, 16)])
def test_keep_mask_rate(rate, bits, monkeypatch):
  words = []
  real_bits = jax.random.bits
  monkeypatch.setattr(jax.random, 'bits', lambda *a, **k: words.append(
      a[1]) or real_bits(*a, **k))
  n = 200_000
  keep = layers.keep_mask(jax.random.PRNGKey(0), rate, (n // 4, 4))
  assert keep.shape == (n // 4, 4) and keep.dtype == jnp.bool_
  assert words == [(-(-n * bits // 32),)]  # 32 // bits decisions per word.
  frac = float(keep.mean())
  sigma = (rate * (1 - rate) / n) ** 0.5
  assert abs(frac - (1 - rate)) < 5 * sigma + 1e-9


def test_keep_mask_lanes_are_not_copies():
  """The 4 decisions of one word are independent, not one decision 4 times."""
  keep = layers.keep_mask(jax.random.PRNGKey(1), 0.5, (40_000,))
  lanes = np.asarray(keep).reshape(-1, 4)
  agree = (lanes[:, 0] == lanes[:, 1]).mean()
  assert 0.48 < agree < 0.52


def test_dropout_modes_and_scaling():
  x = jnp.ones((64, 50))
  layer = layers.Dropout(0.25)
  assert layer.apply({}, x, deterministic=True) is x
  assert layers.Dropout(0.0).apply({}, x, deterministic=False) is x
  np.testing.assert_array_equal(
      layers.Dropout(1.0).apply({}, x, deterministic=False), 0.0)
  rngs = {'dropout': jax.random.PRNGKey(0)}
  y = layer.apply({}, x, deterministic=False, rngs=rngs)
  assert set(np.unique(np.asarray(y))) == {0.0, np.float32(1 / 0.75)}
  again = layer.apply({}, x, deterministic=False, rngs=rngs)
  other = layer.apply({}, x, deterministic=False,
                      rngs={'dropout': jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(y, again)  # Same key, same mask.
  assert (np.asarray(y) != np.asarray(other)).any()
  # The expectation is kept (mean of 3,200 scaled Bernoulli(0.75) draws).
  assert abs(float(y.mean()) - 1.0) < 0.05


def test_dropout_gradient_is_the_mask():
  x = jnp.arange(1.0, 401.0).reshape(20, 20)
  layer = layers.Dropout(0.5)
  rngs = {'dropout': jax.random.PRNGKey(3)}
  y = layer.apply({}, x, deterministic=False, rngs=rngs)
  g = jax.grad(lambda x: layer.apply({}, x, deterministic=False,
                                     rngs=rngs).sum())(x)
  np.testing.assert_array_equal(g, np.where(np.asarray(y) != 0, 2.0, 0.0))
