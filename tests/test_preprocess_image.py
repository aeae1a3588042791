"""MNIST-style preprocessing of users' images (`cnn_jax.preprocess_image`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnn_jax.preprocess_image import (PreprocessError, light_on_dark,
                                      mnist_style, to_unit_range)
from helpers.images import bbox, center_of_mass, draw_seven, gray


def test_to_unit_range_accepts_8bit_and_unit_floats():
  levels = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(to_unit_range(levels), [[0, 0.2, 1]], atol=1e-6)
  np.testing.assert_allclose(to_unit_range(levels / 255.0), [[0, 0.2, 1]],
                             atol=1e-6)
  np.testing.assert_allclose(to_unit_range(levels.astype(np.float64)),
                             [[0, 0.2, 1]], atol=1e-6)
  np.testing.assert_array_equal(to_unit_range(np.array([[0, 1]])), [[0, 1]])
  for bad in (np.array([[-1.0, 0.5]]), np.array([[0, 300]]),
              np.array([[np.nan, 0.5]]), np.array([['a', 'b']])):
    with pytest.raises(PreprocessError):
      to_unit_range(bad)


def test_dark_on_light_digit_is_inverted_fitted_and_centred():
  page = Image.new('L', (500, 400), 230)  # Grey paper, a '0' off-centre.
  ImageDraw.Draw(page).ellipse([(60, 40), (180, 240)], outline=20, width=16)
  out = mnist_style(gray(page))
  assert out.shape == (28, 28) and out.dtype == np.uint8
  # Light digit on a black background, as MNIST.
  assert out[:3].max() == out[-3:].max() == out[:, :3].max() == 0
  assert out.max() == 255
  # Longest side fills the 20-pixel box; centre of mass at the centre.
  assert max(bbox(out)) == 20
  cy, cx = center_of_mass(out.astype(np.float64))
  assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75


def test_lopsided_digit_is_moved_rather_than_cut():
  out = mnist_style(gray(draw_seven(size=(500, 400), offset=(-60, -30))))
  assert max(bbox(out)) in (20, 21)  # 20 up to anti-aliasing.
  border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
  assert border.max() == 0


def test_aspect_ratio_is_kept():
  canvas = np.zeros((400, 300), np.float32)
  canvas[50:350, 140:170] = 1.0  # A 300x30 stroke: a '1'.
  h, w = bbox(mnist_style(canvas))
  assert h == 20 and w <= 3


def test_polarity_does_not_matter():
  img = gray(draw_seven())
  diff = mnist_style(img).astype(int) - mnist_style(1.0 - img).astype(int)
  assert np.abs(diff).max() <= 1


def test_preprocessing_an_mnist_style_input_changes_nothing():
  once = mnist_style(gray(draw_seven(size=(640, 480))))
  twice = mnist_style(once / 255.0)
  assert np.abs(once.astype(int) - twice.astype(int)).max() <= 1


def test_blank_image_is_rejected():
  for level in (0.0, 1.0, 0.5):
    with pytest.raises(PreprocessError, match='blank'):
      mnist_style(np.full((40, 30), level, np.float32))


def test_light_on_dark_inverts_by_the_border_brightness():
  light_paper = gray(draw_seven())
  np.testing.assert_array_equal(light_on_dark(light_paper), 1.0 - light_paper)
  dark_paper = 1.0 - light_paper
  assert light_on_dark(dark_paper) is dark_paper


def test_other_field_sizes_keep_mnist_proportions():
  out = mnist_style(gray(draw_seven(size=(500, 400))), shape=(56, 42))
  assert out.shape == (56, 42) and out.dtype == np.uint8
  h, w = bbox(out)
  assert h <= 40 and w <= 30 and (h >= 39 or w >= 29)  # The 40x30 box.
  cy, cx = center_of_mass(out.astype(np.float64))
  assert abs(cy - 28) <= 0.75 and abs(cx - 21) <= 0.75


@pytest.mark.parametrize('shape', [(28,), (28, 28, 1), (0, 5)])
def test_only_non_empty_2d_images_are_accepted(shape):
  with pytest.raises(PreprocessError, match='expected a 2-D image'):
    mnist_style(np.ones(shape, np.float32))


def test_ink_and_paper_levels_do_not_matter():
  faint = gray(draw_seven(ink=150, paper=200))  # Low contrast, grey paper.
  bold = gray(draw_seven())
  diff = mnist_style(faint).astype(int) - mnist_style(bold).astype(int)
  assert np.abs(diff).max() <= 2


def test_real_mnist_images_pass_through_unchanged(real_mnist):
  out = np.stack([mnist_style(im / 255.0) for im in real_mnist])
  diff = np.abs(out.astype(int) - real_mnist.astype(int)).max(axis=(1, 2))
  assert np.mean(diff <= 1) >= 0.95
  for o, im in zip(out, real_mnist):
    assert np.corrcoef(o.ravel(), im.ravel())[0, 1] > 0.99


def test_steps_are_the_preprocessing_itself():
  """`mnist_style_steps` keeps each step of `mnist_style`, which returns its
  last one: one implementation for predict and the explorer."""
  from cnn_jax.preprocess_image import mnist_style_steps
  img = gray(draw_seven(size=(500, 400), offset=(-60, -30)))
  steps = mnist_style_steps(img)
  np.testing.assert_array_equal(steps.image, mnist_style(img))
  assert steps.inverted and not mnist_style_steps(1.0 - img).inverted
  np.testing.assert_array_equal(steps.gray, img)
  assert steps.ink.shape == img.shape and steps.ink.max() == 1.0
  assert steps.ink[-50:].max() == 0  # Background removed.
  # The digit fills the box; the fitted patch keeps a pixel of margin.
  assert max(bbox(steps.fitted * 255)) in (20, 21) and steps.box == (20, 20)
  assert max(steps.fitted.shape) <= 22
  assert steps.crop.shape[0] > steps.fitted.shape[0]  # Scaled down.
  assert steps.placed.shape == (28, 28)
  np.testing.assert_array_equal(steps.image,
                                np.round(steps.placed * 255).astype(np.uint8))
  assert steps.placed.sum() == pytest.approx(steps.fitted.sum(), rel=1e-5)
