"""The corruptions: each kind's defining property, severities, seeds, and
the on-device corruption of uint8 sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import corruptions
from cnn_jax.config import CnnJaxError

KINDS = list(corruptions.CORRUPTIONS)
RANDOM = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'glass_blur',
          'motion_blur', 'shear', 'rotate', 'translate', 'stripe', 'fog',
          'spatter', 'dotted_line', 'zigzag')
_apply = jax.jit(corruptions.apply_each, static_argnums=0)


def _digits(n: int = 6, size: int = 28) -> np.ndarray:
  """Light-on-dark, anti-aliased strokes: rings, bars and slants."""
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  out = np.zeros((n, size, size, 1), np.float32)
  for i in range(n):
    cy, cx = 13.5 + (i % 3) - 1, 13.5 - (i % 2)
    if i % 3 == 0:
      d = np.abs(np.hypot(yy - cy, xx - cx) - 6 - i % 2)
    elif i % 3 == 1:
      d = np.where(np.abs(yy - cy) < 8, np.abs(xx - cx), 99)
    else:
      d = np.where(np.abs(yy - cy) < 8, np.abs((xx - cx) - 0.4 * (yy - cy)),
                   99)
    out[i, ..., 0] = np.clip(2.0 - d, 0, 1)
  return out


def _run(name, images, params, seed=0):
  keys = corruptions.example_keys(seed, name, jnp.arange(len(images)))
  return np.asarray(_apply(name, keys, jnp.asarray(images),
                           {k: jnp.float32(v) for k, v in params.items()}))


@pytest.fixture(scope='module')
def digits() -> np.ndarray:
  return _digits()


@pytest.mark.parametrize('name', KINDS)
def test_every_severity_keeps_shape_dtype_and_range_and_changes_more(
    digits, name):
  c = corruptions.CORRUPTIONS[name]
  changes = []
  for params in c.severities:
    out = _run(name, digits, params)
    assert out.shape == digits.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    changes.append(float(np.abs(out - digits).mean()))
  assert changes[0] > 1e-3, changes  # Severity 1 is a real change.
  assert all(a < b for a, b in zip(changes, changes[1:])), changes


@pytest.mark.parametrize('name', [k for k in KINDS
                                  if corruptions.CORRUPTIONS[k].identity])
def test_identity_parameters_change_nothing(digits, name):
  out = _run(name, digits, corruptions.params_of(name, 0))
  np.testing.assert_allclose(out, digits, atol=2e-6)


@pytest.mark.parametrize('name', RANDOM)
def test_random_kinds_are_deterministic_by_seed(digits, name):
  params = corruptions.params_of(name, 2)
  a, b = _run(name, digits, params, 0), _run(name, digits, params, 0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, _run(name, digits, params, 1))


def test_kinds_without_randomness_ignore_the_key(digits):
  for name in sorted(set(KINDS) - set(RANDOM)):
    params = corruptions.params_of(name, 1)
    np.testing.assert_array_equal(_run(name, digits, params, 0),
                                  _run(name, digits, params, 5))


def _width(image: np.ndarray, row: int = 14) -> float:
  """The ink across ``row``: a vertical bar's width in pixels."""
  return float(image[row, :, 0].sum())


def test_dilation_thickens_and_erosion_thins_strokes():
  bar = np.zeros((1, 28, 28, 1), np.float32)
  bar[0, 4:24, 12:16] = 1.0  # 4 pixels wide.
  # A disc of radius r widens (narrows) a stroke by r on each side.
  for radius in (0.5, 1.0, 1.5):
    out = _run('dilate', bar, {'radius': radius})[0]
    assert _width(out) == pytest.approx(4 + 2 * radius, abs=0.05)
  for radius in (0.5, 1.0):
    out = _run('erode', bar, {'radius': radius})[0]
    assert _width(out) == pytest.approx(4 - 2 * radius, abs=0.05)
  ink = lambda x: float(x.sum())
  d = _digits()
  assert ink(_run('dilate', d, {'radius': 1.0})) > 1.3 * ink(d)
  assert ink(_run('erode', d, {'radius': 0.75})) < 0.7 * ink(d)


def test_light_noise_and_geometry_do_what_they_say(digits):
  out = _run('brightness', digits, {'delta': 0.4})
  np.testing.assert_allclose(out[digits == 0], 0.4, atol=1e-6)
  out = _run('contrast', digits, {'factor': 0.3})
  np.testing.assert_allclose(out.std((1, 2, 3)), 0.3 * digits.std((1, 2, 3)),
                             rtol=1e-4)
  out = _run('impulse_noise', np.full((4, 28, 28, 1), 0.5, np.float32),
             {'amount': 0.2})
  assert set(np.unique(out)) == {0.0, 0.5, 1.0}
  assert (out != 0.5).mean() == pytest.approx(0.2, abs=0.02)
  # A shift moves the centre of mass by its length.
  bar = np.zeros((1, 28, 28, 1), np.float32)
  bar[0, 10:18, 10:18] = 1.0
  moved = _run('translate', bar, {'pixels': 4.0})[0, ..., 0]
  ys, xs = np.indices(moved.shape)
  dy = (ys * moved).sum() / moved.sum() - 13.5
  dx = (xs * moved).sum() / moved.sum() - 13.5
  assert np.hypot(dy, dx) == pytest.approx(4.0, abs=0.1)
  # Scaling shrinks the square about the centre.
  small = _run('scale', bar, {'factor': 0.5})[0, ..., 0]
  assert (small > 0.5).sum() == pytest.approx(16, abs=4)
  # Edges: binary, on the square's outline, none inside it.
  edges = _run('canny_edges', bar, {'threshold': 0.2})[0, ..., 0]
  assert set(np.unique(edges)) <= {0.0, 1.0} and edges.sum() > 20
  assert edges[13:15, 13:15].sum() == 0


def test_clutter_adds_ink_without_removing_any(digits):
  for name in ('spatter', 'dotted_line', 'zigzag'):
    out = _run(name, digits, corruptions.params_of(name, 3))
    assert (out >= digits - 1e-6).all(), name
    assert (out > digits + 0.5).sum() > 10, name


def test_corrupt_images_is_keyed_by_index_and_compiles_once_per_kind():
  images = np.round(_digits(10) * 255).astype(np.uint8)
  name = 'rotate'
  whole = np.asarray(corruptions.corrupt_images(
      name, corruptions.params_of(name, 2), images, seed=3, chunk=4))
  assert whole.dtype == np.uint8 and whole.shape == images.shape
  # Other chunks and subsets: the same draws, to one grey level of rounding.
  again = np.asarray(corruptions.corrupt_images(
      name, corruptions.params_of(name, 2), images, seed=3, chunk=10))
  np.testing.assert_allclose(again, whole, atol=1)
  part = np.asarray(corruptions.corrupt_images(
      name, corruptions.params_of(name, 2), images[[7, 2]], seed=3,
      indices=np.array([7, 2]), chunk=4))
  np.testing.assert_allclose(part, whole[[7, 2]], atol=1)
  # As floats through `apply_each`, rounded like a saved image.
  floats = _run(name, images / 255.0, corruptions.params_of(name, 2), 3)
  np.testing.assert_allclose(np.round(floats * 255), whole, atol=1)
  other = np.asarray(corruptions.corrupt_images(
      name, corruptions.params_of(name, 2), images, seed=4, chunk=4))
  assert np.abs(other.astype(int) - whole).max() > 50
  before = corruptions._corrupt_jit._cache_size()
  for severity in (1, 3):
    corruptions.corrupt_images(name, corruptions.params_of(name, severity),
                               images, seed=3, chunk=4)
  assert corruptions._corrupt_jit._cache_size() == before


def test_apply_splits_one_key_and_defaults_to_the_middle_severity(digits):
  key = jax.random.PRNGKey(0)
  out = corruptions.apply('rotate', key, jnp.asarray(digits))
  keys = jax.random.split(key, len(digits))
  np.testing.assert_allclose(
      out, corruptions.apply_each('rotate', keys, jnp.asarray(digits),
                                  {'degrees': 30.0}), atol=1e-6)
  # Jits and vmaps: over a stack of batches, one key each.
  stacked = jax.jit(jax.vmap(lambda k, x: corruptions.apply(
      'gaussian_noise', k, x, sigma=0.2)))(
          jax.random.split(key, 2), jnp.stack([digits, digits]))
  assert stacked.shape == (2, *digits.shape)
  assert not np.array_equal(stacked[0], stacked[1])


def test_unknown_kind_and_severity_are_clear():
  with pytest.raises(CnnJaxError, match="unknown corruption 'blur'"):
    corruptions.get('blur')
  with pytest.raises(ValueError, match='severities 1..3'):
    corruptions.params_of('rotate', 4)
  with pytest.raises(ValueError, match='severities 1..1'):
    corruptions.params_of('canny_edges', 0)
