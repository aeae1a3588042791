"""`kernels.dropout.Dropout` keeps `flax.linen.Dropout`'s semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.kernels import dropout


@pytest.mark.parametrize('rate,bits', [(0.25, 8), (0.5, 8), (0.3, 32),
                                       (1 / 1024, 16)])
def test_keep_mask_rate(rate, bits, monkeypatch):
  words = []
  real_bits = jax.random.bits
  monkeypatch.setattr(jax.random, 'bits', lambda *a, **k: words.append(
      a[1]) or real_bits(*a, **k))
  n = 200_000
  keep = dropout.keep_mask(jax.random.PRNGKey(0), rate, (n // 4, 4))
  assert keep.shape == (n // 4, 4) and keep.dtype == jnp.bool_
  assert words == [(-(-n * bits // 32),)]  # 32 // bits decisions per word.
  frac = float(keep.mean())
  sigma = (rate * (1 - rate) / n) ** 0.5
  assert abs(frac - (1 - rate)) < 5 * sigma + 1e-9


def test_keep_mask_lanes_are_not_copies():
  """The 4 decisions of one word are independent, not one decision 4 times."""
  keep = dropout.keep_mask(jax.random.PRNGKey(1), 0.5, (40_000,))
  lanes = np.asarray(keep).reshape(-1, 4)
  agree = (lanes[:, 0] == lanes[:, 1]).mean()
  assert 0.48 < agree < 0.52


def test_dropout_modes_and_scaling():
  x = jnp.ones((64, 50))
  layer = dropout.Dropout(0.25)
  assert layer.apply({}, x, deterministic=True) is x
  assert dropout.Dropout(0.0).apply({}, x, deterministic=False) is x
  np.testing.assert_array_equal(
      dropout.Dropout(1.0).apply({}, x, deterministic=False), 0.0)
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
  layer = dropout.Dropout(0.5)
  rngs = {'dropout': jax.random.PRNGKey(3)}
  y = layer.apply({}, x, deterministic=False, rngs=rngs)
  g = jax.grad(lambda x: layer.apply({}, x, deterministic=False,
                                     rngs=rngs).sum())(x)
  np.testing.assert_array_equal(g, np.where(np.asarray(y) != 0, 2.0, 0.0))
