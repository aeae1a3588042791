"""Digit images drawn for tests (rather than committed), and measures."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def draw_seven(size=(300, 220), ink=0, paper=255, offset=(0, 0),
               mode='L') -> Image.Image:
  """A thick '7' on a plain canvas."""
  img = Image.new(mode, size, paper)
  dx, dy = offset
  ImageDraw.Draw(img).line([(90 + dx, 40 + dy), (190 + dx, 40 + dy),
                            (120 + dx, 190 + dy)], fill=ink, width=14)
  return img


def gray(img: Image.Image) -> np.ndarray:
  return np.asarray(img.convert('L'), np.float32) / 255.0


def bbox(image: np.ndarray, level: int = 64) -> tuple[int, int]:
  rows = np.flatnonzero((image > level).any(1))
  cols = np.flatnonzero((image > level).any(0))
  return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
  ys, xs = np.indices(image.shape)
  total = image.sum()
  return (ys * image).sum() / total, (xs * image).sum() / total
