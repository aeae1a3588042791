"""Arrays -> small PNG pictures for the page, fast (no figures).

The explorer redraws every panel on each stroke, so pictures are made with
numpy and Pillow only: one picture pixel per value (the page enlarges them
without smoothing), values as indices into a palette of the report's colour
maps (sampled once from matplotlib), PNG-encoded with light compression and
inlined as ``data:`` URIs. Nothing is written to disk.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image


LEVELS = 255  # Colour levels of a map; palette entry 255 is white.


@functools.lru_cache(maxsize=None)
def palette(name: str) -> bytes:
  """A PNG palette: `LEVELS` colours of a matplotlib colour map, then
  white (the gaps between tiles)."""
  import matplotlib
  colours = matplotlib.colormaps[name](np.linspace(0, 1, LEVELS))[:, :3]
  rgb = (colours * 255).round().astype(np.uint8)
  return np.concatenate([rgb, [[255, 255, 255]]]).astype(np.uint8).tobytes()


def levels(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """uint8 palette indices of ``values`` on the scale [lo, hi]; NaN -> the
  white entry."""
  span = (hi - lo) or 1.0
  idx = np.clip((np.nan_to_num(values, nan=lo) - lo) / span * (LEVELS - 1)
                + 0.5, 0, LEVELS - 1).astype(np.uint8)
  idx[np.isnan(values)] = LEVELS
  return idx


def indexed_uri(idx: np.ndarray, cmap: str) -> str:
  """uint8 palette indices as a palette PNG ``data:`` URI (one byte a
  pixel: small and quick to encode)."""
  img = Image.fromarray(np.ascontiguousarray(idx), mode='P')
  img.putpalette(palette(cmap))
  return _png_uri(img)


def _png_uri(img: Image.Image) -> str:
  buffer = io.BytesIO()
  img.save(buffer, format='PNG', compress_level=1)
  return 'data:image/png;base64,' + base64.b64encode(
      buffer.getvalue()).decode('ascii')


def scale_for(values: np.ndarray) -> tuple[float, float, str]:
  """The report's convention: diverging colours around 0 for signed
  values, sequential from 0 otherwise (`analysis.plots.value_norm`)."""
  lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
  if lo < 0:
    m = max(abs(lo), abs(hi), 1e-12)
    return -m, m, 'RdBu_r'
  return 0.0, max(hi, 1e-12), 'viridis'


def factor_for(hw: tuple[int, int], target: int) -> int:
  """The whole-pixel enlargement that brings the longer side near
  ``target`` pixels."""
  return max(1, round(target / max(hw)))


def data_uri(rgb: np.ndarray) -> str:
  """A uint8 ``[H, W]`` or ``[H, W, 3]`` image as a PNG ``data:`` URI."""
  return _png_uri(Image.fromarray(np.ascontiguousarray(rgb)))


def gray(values: np.ndarray, limit: int = 160) -> str:
  """A [0, 1] grayscale image; reduced (averaging) to ``limit`` pixels on
  its longer side when larger."""
  values = np.asarray(values, np.float32)
  h, w = values.shape
  if max(h, w) > limit:
    size = (max(1, round(w * limit / max(h, w))),
            max(1, round(h * limit / max(h, w))))
    values = np.asarray(Image.fromarray(values, mode='F').resize(
        size, Image.Resampling.BOX))
  return data_uri((np.clip(values, 0, 1) * 255).round().astype(np.uint8))


def heat(values: np.ndarray) -> str:
  """One 2-D map in the report's colours, one pixel per value (the page
  enlarges it)."""
  lo, hi, cmap = scale_for(values)
  return indexed_uri(levels(values, lo, hi), cmap)


def overlay(image: np.ndarray, values: np.ndarray, signed: bool) -> str:
  """``values`` over a dimmed grayscale ``image`` (both ``[H, W]``):
  red where positive, blue where negative (when ``signed``), more opaque
  the larger the magnitude (as its square root)."""
  m = float(np.abs(values).max()) or 1.0
  # Square root: small but real contributions stay visible.
  alpha = np.sqrt(np.clip(np.abs(values) / m, 0, 1))[..., None]
  base = (0.35 * np.clip(image, 0, 1))[..., None] * np.ones(3)
  red, blue = np.array([1.0, 0.1, 0.1]), np.array([0.1, 0.35, 1.0])
  colour = np.where((values >= 0)[..., None] | (not signed), red, blue)
  rgb = ((1 - alpha) * base + alpha * colour) * 255
  return data_uri(rgb.round().astype(np.uint8))


@dataclasses.dataclass(frozen=True)
class Grid:
  """Every channel of one stage as tiles of one picture, and where each
  tile is (the page maps a click back to its channel)."""

  uri: str
  channels: int
  cols: int
  cell: int  # Side of a tile's cell in picture pixels, gap included.
  width: int  # The picture's size in pixels (one per value).
  height: int
  zoom: int  # Whole-pixel enlargement the page shows it at.


GAP = 1  # Picture pixels between tiles.


def grid(maps: np.ndarray, width: int = 440, max_cols: int = 16) -> Grid:
  """``[H, W, C]`` maps as a grid of C tiles (8 a row, or 16 beyond 32
  channels), one colour scale for the stage (so channels compare); one
  picture pixel per value, shown enlarged by a whole factor to at most
  ``width`` pixels."""
  h, w, c = maps.shape
  cols = min(c, 8 if c <= 32 else max_cols)
  rows = math.ceil(c / cols)
  lo, hi, cmap = scale_for(maps)
  tiles = levels(np.moveaxis(maps, -1, 0), lo, hi)
  cell = max(h, w) + GAP
  out = np.full((rows * cell - GAP, cols * cell - GAP), LEVELS, np.uint8)
  for i in range(c):
    r, q = divmod(i, cols)
    out[r * cell:r * cell + h, q * cell:q * cell + w] = tiles[i]
  return Grid(indexed_uri(out, cmap), c, cols, cell, out.shape[1],
              out.shape[0], max(1, width // out.shape[1]))
