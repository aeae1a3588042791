"""Augmentation: bounded by its flags, new per image and step, training only.

The sampled shift, rotation and zoom are read back from where a small
Gaussian blob lands: warps about the image centre move a blob at the centre
by the shift alone, and turn/scale a blob off the centre by the rotation and
zoom.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import augment, input_pipeline, registry, train
from cnn_jax.config import Config

N = 64  # Images per batch: enough draws to come near each bound.
CENTER = 13.5  # Of a 28x28 image, as `augment` rotates and zooms about it.


def _blobs(dy: float = 0.0, dx: float = 0.0, sigma: float = 1.5) -> jax.Array:
  """N copies of a Gaussian blob at (CENTER + dy, CENTER + dx), NHWC."""
  yy, xx = np.mgrid[:28, :28].astype(np.float32)
  blob = np.exp(-((yy - CENTER - dy)**2 + (xx - CENTER - dx)**2)
                / (2 * sigma**2))
  return jnp.asarray(np.broadcast_to(blob[None, ..., None], (N, 28, 28, 1)))


def _offsets(images: jax.Array) -> np.ndarray:
  """[N, 2] centroid of each image relative to the centre, (dy, dx)."""
  m = np.asarray(images, np.float64)[..., 0]
  yy, xx = np.mgrid[:28, :28]
  total = m.sum((1, 2))
  return np.stack([(m * yy).sum((1, 2)) / total - CENTER,
                   (m * xx).sum((1, 2)) / total - CENTER], 1)


def _warp(images: jax.Array, seed: int = 0, shift: float = 0.0,
          rotation: float = 0.0, scale: float = 0.0) -> jax.Array:
  return augment.random_affine(jax.random.PRNGKey(seed), images, shift,
                               rotation, scale)


def test_shift_stays_within_max_shift_and_spans_it():
  d = _offsets(_warp(_blobs(), shift=3.0))
  assert np.abs(d).max() <= 3.0 + 0.05
  assert np.abs(d).max(0).min() > 2.5  # Both axes use most of the range.


def test_rotation_stays_within_max_rotation_and_spans_it():
  d = _offsets(_warp(_blobs(dx=8.0), rotation=20.0))
  angle = np.degrees(np.arctan2(d[:, 0], d[:, 1]))
  assert np.abs(angle).max() <= 20.0 + 0.5
  assert np.abs(angle).max() > 15.0
  assert (angle > 0).any() and (angle < 0).any()
  np.testing.assert_allclose(np.hypot(d[:, 0], d[:, 1]), 8.0, atol=0.1)


def test_zoom_stays_within_max_scale_and_spans_it():
  d = _offsets(_warp(_blobs(dx=8.0), scale=0.2))
  zoom = d[:, 1] / 8.0
  assert np.abs(zoom - 1).max() <= 0.2 + 0.01
  assert zoom.min() < 0.85 and zoom.max() > 1.15
  np.testing.assert_allclose(d[:, 0], 0.0, atol=0.05)  # No rotation.


def test_rotation_and_zoom_move_nothing_at_the_centre():
  d = _offsets(_warp(_blobs(), shift=2.0, rotation=10.0, scale=0.1))
  assert np.abs(d).max() <= 2.0 + 0.05


def test_zero_bounds_leave_images_unchanged_and_values_stay_in_range():
  x = _blobs(dy=-3.0, dx=2.0)
  np.testing.assert_allclose(_warp(x), x, atol=1e-5)
  y = _warp(x, shift=2.0, rotation=10.0, scale=0.1)
  assert float(y.min()) >= 0.0 and float(y.max()) <= float(x.max()) + 1e-6


def test_each_image_and_each_key_gets_its_own_warp():
  x = _blobs(dx=5.0)  # N identical images.
  a, b = _warp(x, 0, 2.0, 10.0, 0.1), _warp(x, 1, 2.0, 10.0, 0.1)
  flat = np.asarray(a).reshape(N, -1)
  assert len({row.tobytes() for row in flat}) == N
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, _warp(x, 0, 2.0, 10.0, 0.1))


class _Seen(Exception):
  """Stops a train step once the model has been handed its input."""


def _model_inputs(config: Config, steps: tuple[int, ...]):
  """(uint8 images, run key, what the model saw at each train step).

  The model is a stub that records its input and stops the step there.
  """
  seen = []

  def apply(variables, x, **kwargs):
    seen.append(np.asarray(x))
    raise _Seen()
  state = train.TrainState.create(apply_fn=apply, params={'w': jnp.zeros(1)},
                                  tx=optax.identity(), batch_stats={},
                                  key=jax.random.PRNGKey(7))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, 4).astype(np.int32))
  for step in steps:
    with pytest.raises(_Seen):
      train.train_step(state.replace(step=jnp.asarray(step)), images, labels,
                       config, 10)
  return images, state.key, seen


def test_training_inputs_are_exactly_normalized_without_augment():
  images, _, seen = _model_inputs(Config(), (0, 1))
  for x in seen:
    np.testing.assert_array_equal(x, input_pipeline.normalize(images))
    np.testing.assert_allclose(x, np.asarray(images) / 255.0, rtol=1e-6)


def test_training_augments_with_a_new_key_each_step():
  config = Config(augment=True, aug_max_shift=3.0,
                  aug_max_rotation=15.0, aug_max_scale=0.15)
  images, key, seen = _model_inputs(config, (0, 1, 0))
  x = input_pipeline.normalize(images)
  for step, got in zip((0, 1, 0), seen):
    aug_key, _ = jax.random.split(jax.random.fold_in(key, step))
    want = augment.random_affine(aug_key, x, 3.0, 15.0, 0.15)
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert not np.allclose(seen[0], seen[1])
  np.testing.assert_array_equal(seen[0], seen[2])  # Same seed, same step.
  assert not np.allclose(seen[0], x, atol=0.05)


def test_evaluation_never_augments():
  config = Config(augment=True, aug_max_shift=3.0, eval_batch_size=8)
  trainer = train.Trainer(config, 10)
  variables = train.variables_of(train.create_train_state(
      config, trainer.model, (28, 28, 1), 10))
  images = np.random.default_rng(1).integers(0, 256, (8, 28, 28, 1),
                                             dtype=np.uint8)
  eval_model = registry.create_model(config, 10, training=False)
  want = eval_model.apply(variables, input_pipeline.normalize(images),
                          train=False)
  got = trainer.predictor.logits(variables, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  again = trainer.predictor.logits(variables, images)
  np.testing.assert_array_equal(got, again)


@pytest.mark.parametrize('flag,value', [('aug_max_shift', 1.0),
                                        ('aug_max_rotation', 10.0),
                                        ('aug_max_scale', 0.1)])
def test_each_flag_reaches_the_warp(flag, value):
  """The train step passes each flag (not a default) to the warp."""
  base = dict(augment=True, aug_max_shift=0.0,
              aug_max_rotation=0.0, aug_max_scale=0.0)
  images, _, (plain,) = _model_inputs(Config(**base), (0,))
  np.testing.assert_allclose(plain, np.asarray(images) / 255.0, atol=1e-5)
  _, _, (warped,) = _model_inputs(Config(**{**base, flag: value}), (0,))
  assert not np.allclose(warped, plain, atol=1e-3)


def _digit() -> jax.Array:
  """N copies of a 2-pixel-wide bar, like a stroke of a 1."""
  x = np.zeros((N, 28, 28, 1), np.float32)
  x[:, 6:22, 13:15] = 1.0
  return jnp.asarray(x)


def _aug(images: jax.Array, seed: int = 0, **kw) -> np.ndarray:
  return np.asarray(augment.apply(jax.random.PRNGKey(seed), images,
                                  augment.Augmentation(**kw)))


def test_robustness_augmentations_keep_shape_range_and_are_seeded():
  x = _digit()
  kw = dict(elastic=2.0, thickness=1.0, blur=1.0, noise=0.1, erase=0.5,
            levels=0.6)
  out = _aug(x, **kw)
  assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
  np.testing.assert_array_equal(out, _aug(x, **kw))
  assert not np.array_equal(out, _aug(x, seed=1, **kw))
  # Each image its own draw.
  assert len({out[i].tobytes() for i in range(N)}) == N
  # All off: the images as they were.
  np.testing.assert_array_equal(_aug(x), np.asarray(x))


def test_thickness_makes_strokes_thicker_and_thinner_within_a_pixel():
  x = _digit()
  ink = _aug(x, thickness=1.0).sum((1, 2, 3))
  base = float(np.asarray(x[0]).sum())  # 32 pixels of ink.
  assert ink.max() > base * 1.5 and ink.min() < base * 0.6
  # A whole step adds at most one pixel each side: a bar 2 wide -> 4 wide
  # plus the two ends (16 rows x 2 + 2 x 2), or thins it to nothing.
  assert ink.max() <= base + 2 * 16 + 2 * 2 + 1e-3 and ink.min() >= 0


def test_elastic_distortion_is_smooth_and_bounded():
  x = _digit()
  warped = _aug(x, elastic=3.0, elastic_sigma=4.0)
  d = _offsets(jnp.asarray(warped)) - _offsets(x)
  assert np.abs(d).max() <= 3.0 + 0.1  # Never further than alpha.
  assert np.abs(d).max() > 0.3  # But it moves.
  # A smooth field stretches the stroke a little, never tears it apart.
  ink = warped.sum((1, 2, 3)) / float(np.asarray(x[0]).sum())
  assert (ink > 0.6).all() and (ink < 1.4).all()


def test_blur_and_noise_and_erasing_do_what_they_say():
  x = _digit()
  blurred = _aug(x, blur=1.5)
  peaks = blurred.max((1, 2, 3))
  np.testing.assert_allclose(blurred.sum((1, 2, 3)), 32.0, rtol=0.02)
  assert (peaks <= 1.0).all() and (peaks < 1).any()  # Spread, ink kept.
  noisy = _aug(jnp.full((N, 28, 28, 1), 0.5), noise=0.2)
  stds = noisy.reshape(N, -1).std(1)
  assert stds.max() <= 0.2 * 1.15 and stds.max() > 0.12
  erased = _aug(jnp.ones((N, 28, 28, 1)), erase=0.5)
  frac = 1 - erased.reshape(N, -1).mean(1)
  hit = frac > 0
  assert 0.2 < hit.mean() < 0.8  # About half the images.
  assert (frac[hit] >= 0.01).all() and (frac[hit] <= 0.25).all()


def test_levels_give_faint_ink_on_a_grey_page_never_brighter_than_white():
  x = _digit()
  out = _aug(x, levels=0.7)
  paper = out[:, 0, 0, 0]  # A corner: background.
  ink = out[:, 10, 13, 0]  # On the bar.
  contrast = ink - paper
  assert (paper >= 0).all() and (ink <= 1 + 1e-6).all()
  assert paper.max() > 0.1 and (paper > 0).mean() > 0.9  # Grey pages.
  assert contrast.min() >= 0.3 - 1e-6 and contrast.min() < 0.6  # Faint ink.
  assert (contrast <= 1 + 1e-6).all()
  # Every background pixel of an image takes the same level, every ink
  # pixel the same: levels change the page, not the shape.
  np.testing.assert_allclose(out[:, :5].reshape(N, -1).std(1), 0, atol=1e-6)
  # With the other per-pixel options, theirs are drawn as without levels
  # (its key is folded apart) and levels act last: each image is p + c *
  # the image it was.
  base = _aug(x, noise=0.1, erase=0.5).reshape(N, -1)
  both = _aug(x, noise=0.1, erase=0.5, levels=0.5).reshape(N, -1)
  for b, o in zip(base, both):
    a = np.stack([np.ones_like(b), b], 1)
    (p, c), *_ = np.linalg.lstsq(a, o, rcond=None)
    np.testing.assert_allclose(p + c * b, o, atol=1e-5)
    assert 0.5 - 1e-6 <= c <= 1 + 1e-6


def test_augment_alone_draws_as_before_the_robustness_options():
  """`--augment` by itself: the same warp `random_affine` draws, so
  recipes trained before these options reproduce."""
  x = _blobs(dx=4.0)
  key = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(
      augment.apply(key, x, augment.Augmentation(True, 3.0, 15.0, 0.15)),
      augment.random_affine(key, x, 3.0, 15.0, 0.15))


@pytest.mark.parametrize('flag,value', [('aug_elastic', 2.0),
                                        ('aug_thickness', 0.8),
                                        ('aug_blur', 1.0), ('aug_noise', 0.1),
                                        ('aug_erase', 0.9),
                                        ('aug_levels', 0.5)])
def test_each_robustness_flag_reaches_the_train_step(flag, value):
  images, _, (plain,) = _model_inputs(Config(), (0,))
  _, _, (changed,) = _model_inputs(Config(**{flag: value}), (0,))
  assert not np.allclose(changed, plain, atol=1e-3), flag
