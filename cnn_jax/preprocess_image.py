"""Turns an arbitrary grayscale picture of a digit into an MNIST-style input.

MNIST itself was made by fitting each binary NIST digit into a 20x20 box
(keeping its aspect ratio, with anti-aliasing) and placing that box in a
28x28 field so the digit's centre of mass is at the centre. `mnist_style`
does the same to a user's image: grayscale in [0, 1] -> light-on-dark ->
background removed -> cropped to the digit's bounding box -> scaled to fit
the box -> placed by centre of mass. An image that is already MNIST-like
(dark background, digit filling the box, centred) comes out unchanged up to
rounding.

`mnist_style_steps` keeps every intermediate image (the explorer shows them).
All functions are pure numpy/Pillow; nothing here knows about models.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

# MNIST's digit box inside its 28x28 field.
BOX_FRACTION = 20 / 28
# Pixels above this fraction of the digit's contrast define its bounding box.
INK_THRESHOLD = 0.25
# Below this contrast (of a [0, 1] image) there is no digit to find.
MIN_CONTRAST = 0.05


class PreprocessError(ValueError):
  """An input that cannot be turned into a model input; says why."""


def to_unit_range(array: np.ndarray) -> np.ndarray:
  """A numeric image array as float32 in [0, 1].

  Accepts bool, integers in 0..255 (0/1 when none exceeds 1), floats in
  [0, 1], and floats in [0, 255] (taken as 8-bit levels when any exceeds 1).
  """
  a = np.asarray(array)
  if a.dtype == bool:
    return a.astype(np.float32)
  if not (np.issubdtype(a.dtype, np.integer)
          or np.issubdtype(a.dtype, np.floating)):
    raise PreprocessError(f'array has dtype {a.dtype}; expected uint8 0-255 '
                          'or float 0-1 pixel values')
  a = a.astype(np.float32)
  if a.size == 0:
    raise PreprocessError('array is empty')
  if not np.isfinite(a).all():
    raise PreprocessError('array has NaN or infinite values')
  lo, hi = float(a.min()), float(a.max())
  if lo < 0 or hi > 255:
    raise PreprocessError(f'pixel values span [{lo:g}, {hi:g}]; expected '
                          'uint8 0-255 or float 0-1')
  if hi > 1:
    a = a / 255.0
  return a


def _border(gray: np.ndarray) -> np.ndarray:
  """The outer frame of the image (about 5% of each side, at least 1 px)."""
  h, w = gray.shape
  bh, bw = max(1, h // 20), max(1, w // 20)
  return np.concatenate([gray[:bh].ravel(), gray[-bh:].ravel(),
                         gray[:, :bw].ravel(), gray[:, -bw:].ravel()])


def dark_on_light(gray: np.ndarray) -> bool:
  """Whether the image is dark ink on light paper (median border > 0.5)."""
  return float(np.median(_border(gray))) > 0.5


def light_on_dark(gray: np.ndarray) -> np.ndarray:
  """Inverts dark-on-light images, judged by the median border brightness."""
  return 1.0 - gray if dark_on_light(gray) else gray


def _remove_background(gray: np.ndarray) -> np.ndarray:
  """Background level -> 0 and brightest ink -> 1."""
  background = float(np.median(_border(gray)))
  peak = float(gray.max())
  if peak - background < MIN_CONTRAST:
    raise PreprocessError('no digit found: the image is blank (uniform '
                          'brightness)')
  return np.clip((gray - background) / (peak - background), 0.0, 1.0)


def _bounding_box(ink: np.ndarray) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of pixels above INK_THRESHOLD (exclusive ends)."""
  rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
  cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
  return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _crop(ink: np.ndarray, box: tuple[int, int]) -> tuple[np.ndarray, float]:
  """The digit's bounding box with a margin, and the scale that fits `box`.

  The scale comes from the bounding box of the clear ink; a digit already
  within a pixel of fitting is not resampled (which would only blur it). The
  crop keeps one output pixel of margin around the box so faint anti-aliased
  edges survive.
  """
  top, bottom, left, right = _bounding_box(ink)
  h, w = bottom - top, right - left
  scale = min(box[0] / h, box[1] / w)
  if abs(round(h * scale) - h) <= 1 and abs(round(w * scale) - w) <= 1:
    scale = 1.0
  margin = int(np.ceil(1.0 / scale))
  top, left = max(top - margin, 0), max(left - margin, 0)
  bottom, right = bottom + margin, right + margin
  return ink[top:bottom, left:right], scale


def _fit(patch: np.ndarray, scale: float) -> np.ndarray:
  """`patch` resized by `scale` (anti-aliased), aspect ratio kept."""
  h, w = patch.shape
  size = (max(1, round(h * scale)), max(1, round(w * scale)))
  if size == (h, w):
    return patch
  resized = Image.fromarray(patch.astype(np.float32), mode='F').resize(
      (size[1], size[0]), Image.Resampling.LANCZOS)
  return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _place_by_center_of_mass(patch: np.ndarray, shape: tuple[int, int]
                             ) -> np.ndarray:
  """`patch` in a zero field of `shape`, centre of mass at its centre pixel.

  The shift is clamped so the patch stays inside the field: a lopsided digit
  (say a 7 with a heavy bar) is moved off-centre rather than cut.
  """
  total = float(patch.sum())
  ys, xs = np.indices(patch.shape)
  cy, cx = float((ys * patch).sum()) / total, float((xs * patch).sum()) / total
  top = int(np.floor(shape[0] // 2 - cy + 0.5))
  left = int(np.floor(shape[1] // 2 - cx + 0.5))
  top = min(max(top, 0), max(shape[0] - patch.shape[0], 0))
  left = min(max(left, 0), max(shape[1] - patch.shape[1], 0))
  out = np.zeros(shape, np.float32)
  ph, pw = patch.shape
  y0, x0 = max(top, 0), max(left, 0)
  y1, x1 = min(top + ph, shape[0]), min(left + pw, shape[1])
  out[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
  return out


@dataclasses.dataclass(frozen=True)
class Steps:
  """Every intermediate image of `mnist_style`, for showing how it works.

  All are float32 in [0, 1] except `image`, the uint8 model input.
  """

  gray: np.ndarray  # The input, HxW.
  ink: np.ndarray  # Light-on-dark, background 0, brightest ink 1; HxW.
  crop: np.ndarray  # The digit's bounding box with a margin.
  fitted: np.ndarray  # `crop` scaled to fit the digit box.
  placed: np.ndarray  # `fitted` in the field, centre of mass centred.
  image: np.ndarray  # uint8 `placed`: what the model gets.
  box: tuple[int, int]  # The digit box, e.g. (20, 20) for 28x28.
  inverted: bool  # The input was dark on light.


def mnist_style_steps(gray: np.ndarray, shape: tuple[int, int] = (28, 28)
                      ) -> Steps:
  """`mnist_style`, keeping each step's image.

  Raises PreprocessError when the image holds no digit (it is uniform).
  """
  gray = np.asarray(gray, dtype=np.float32)
  if gray.ndim != 2 or min(gray.shape) < 1:
    raise PreprocessError(f'expected a 2-D image, got shape {gray.shape}')
  ink = _remove_background(light_on_dark(gray))
  box = (max(1, round(shape[0] * BOX_FRACTION)),
         max(1, round(shape[1] * BOX_FRACTION)))
  crop, scale = _crop(ink, box)
  fitted = _fit(crop, scale)
  placed = _place_by_center_of_mass(fitted, shape)
  return Steps(gray, ink, crop, fitted, placed,
               np.round(placed * 255.0).astype(np.uint8), box,
               dark_on_light(gray))


def mnist_style(gray: np.ndarray, shape: tuple[int, int] = (28, 28)
                ) -> np.ndarray:
  """A [0, 1] grayscale HxW image of one digit -> uint8 `shape` MNIST input.

  Raises PreprocessError when the image holds no digit (it is uniform).
  """
  return mnist_style_steps(gray, shape).image
