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


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
  """A valid grayscale PNG of width x height black pixels: a few hundred
  KiB that decode to width * height bytes (a decompression bomb)."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))
  rows = 64
  block = b'\x00' * ((width + 1) * rows)  # Filter byte 0, then the pixels.
  packer = zlib.compressobj(9)
  data = b''.join(packer.compress(block) for _ in range(height // rows))
  data += packer.compress(b'\x00' * ((width + 1) * (height % rows)))
  data += packer.flush()
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', data)
          + chunk(b'IEND', b''))
