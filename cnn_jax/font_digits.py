"""Digits 0-9 rendered from installed fonts, as a user's PNG would be.

A test set of printed digits for `cnn_jax.robustness`: example ``i`` has
label ``i % 10`` and is drawn with its own random generator
(``numpy.random.default_rng([seed, i])``), so it is the same whatever the
set's size. Each one picks a font family, then one of its faces, uniformly
(so a family with 18 weights counts as much as one with a single face), and
renders the digit with Pillow:

=================  =============================================
size               20-120 px (the font's em size)
stroke             none (half of them) or 1 to size/15 px wider
affine             rotation +-10 deg, shear +-0.2, width x0.75-1.25
margins            0.05-0.8 x size on each side, independently
polarity, levels   3/4 dark ink (0-0.35) on light paper (0.7-1),
                   1/4 light ink (0.65-1) on dark paper (0-0.3)
softness, noise    Gaussian blur of 0-3% of the size; noise sigma 0-0.03
=================  =============================================

The picture is saved as 8-bit grayscale PNG bytes, read back with
`cnn_jax.predict.read_image` and made an MNIST-style input with
`cnn_jax.preprocess_image.mnist_style`: the path ``--mode=predict`` takes.

Fonts come from ``/usr/share/fonts`` (or the given folders): every
TrueType/OpenType file that maps 0-9, A-Z and a-z (fonts for Latin text,
not a script's or a symbol font) with ten different digit glyphs, once
per full name, without symbol, dingbat, key-cap, drop-cap and hatched
outline faces (`EXCLUDED`). ``.ci/font-packages.txt``
lists the Debian packages CI installs. The set is kept in the cnn_jax cache
(``<cache dir>/fonts/``), keyed on the seed, the size, the fonts (names and
file contents), the Pillow, FreeType and NumPy versions and the code that
draws and preprocesses, so the same seed and fonts give the same images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import string
from typing import Iterable, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

from cnn_jax import data_cache, predict, preprocess_image
from cnn_jax.config import CnnJaxError

FORMAT = 1  # Bump when the rendering or the file layout changes.
DEFAULT_FONT_DIRS = ('/usr/share/fonts',)
FONT_SUFFIXES = ('.ttf', '.otf')
# Faces whose code points 0-9 are not plain digits: symbols, dingbats, key
# caps, drop caps, and Femkeklaver's hatched outlines.
EXCLUDED = re.compile(r'symbol|dingbat|D050000L|keyboard|initials|klaver',
                      re.IGNORECASE)
REQUIRED = string.digits + string.ascii_letters
PACKAGES_FILE = '.ci/font-packages.txt'


@dataclasses.dataclass(frozen=True)
class Font:
  """One font face found on disk."""

  path: str
  name: str  # Full name, e.g. 'DejaVu Sans Bold'.
  family: str

  def label(self) -> str:
    return f'{self.name} ({os.path.basename(self.path)})'


@dataclasses.dataclass(frozen=True)
class FontDigits:
  """The rendered set: model inputs, labels, and the font of each."""

  images: np.ndarray  # uint8 [N, H, W, 1], as the model sees them.
  labels: np.ndarray  # int32 [N]
  font_index: np.ndarray  # int32 [N], into `fonts`.
  fonts: tuple[str, ...]  # 'Full Name (file.ttf)' of every font used.
  families: int
  seed: int
  key: str

  def __len__(self) -> int:
    return len(self.labels)


def _font_files(dirs: Iterable[str]) -> list[str]:
  out = []
  for d in dirs:
    for root, _, names in os.walk(d):
      out.extend(os.path.join(root, n) for n in names
                 if n.lower().endswith(FONT_SUFFIXES))
  return sorted(set(out))


def _describe(path: str) -> Font | None:
  """The face in ``path`` if it is a usable Latin text font, else None."""
  from fontTools.ttLib import TTFont  # Only here: the rest needs Pillow.
  try:
    with TTFont(path, lazy=True) as f:
      cmap = f.getBestCmap() or {}
      names = f['name']
      name = names.getDebugName(4) or os.path.basename(path)
      family = names.getDebugName(16) or names.getDebugName(1) or name
  except Exception:  # A damaged or unusual file is not a font we can use.
    return None
  if (not all(ord(c) in cmap for c in REQUIRED) or EXCLUDED.search(name)
      or not _distinct_digits(path)):
    return None
  return Font(path, name, family)


def _distinct_digits(path: str) -> bool:
  """Whether the ten digits draw as ten different, non-empty glyphs (a
  fallback font such as Last Resort draws one box for all of them)."""
  try:
    face = ImageFont.truetype(path, 32)
  except OSError:
    return False
  shapes = set()
  for digit in string.digits:
    mask = face.getmask(digit)
    pixels = bytes(mask)
    if not any(pixels):
      return False
    shapes.add((mask.size, pixels))
  return len(shapes) == 10


def find_fonts(dirs: Sequence[str] = DEFAULT_FONT_DIRS) -> list[Font]:
  """The usable fonts under ``dirs``, one per full name (first path in
  sorted order), sorted by family and name. Raises CnnJaxError if none."""
  seen: dict[str, Font] = {}
  for path in _font_files(dirs):
    font = _describe(path)
    if font is not None and font.name not in seen:
      seen[font.name] = font
  if not seen:
    raise CnnJaxError(
        f'no TrueType/OpenType fonts with the digits 0-9 found in '
        f'{", ".join(dirs)}; install some (Debian: the packages in '
        f'{PACKAGES_FILE}, e.g. apt-get install fonts-dejavu-core) or point '
        '--font_dirs at a folder of .ttf/.otf files')
  return sorted(seen.values(), key=lambda f: (f.family, f.name))


def _affine(mask: Image.Image, angle: float, shear: float, stretch: float
            ) -> Image.Image:
  """``mask`` rotated, sheared and stretched, on a canvas that holds it."""
  cos, sin = np.cos(angle), np.sin(angle)
  a = (np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear],
                                                        [0.0, 1.0]])
       @ np.diag([stretch, 1.0]))
  w, h = mask.size
  corners = a @ np.array([[0, w, 0, w], [0, 0, h, h]], float)
  low, high = corners.min(1), corners.max(1)
  size = tuple(int(np.ceil(v)) for v in high - low)
  inv = np.linalg.inv(a)
  offset = inv @ low
  return mask.transform(size, Image.Transform.AFFINE,
                        (inv[0, 0], inv[0, 1], offset[0],
                         inv[1, 0], inv[1, 1], offset[1]),
                        resample=Image.Resampling.BICUBIC, fillcolor=0)


def render_png(font: Font, digit: int, rng: np.random.Generator) -> bytes:
  """One digit in ``font`` with random size, stroke, affine, margins, ink
  and paper, softness and noise: 8-bit grayscale PNG bytes."""
  size = int(rng.integers(20, 121))
  stroke = 0 if rng.random() < 0.5 else int(rng.integers(1, max(1, size // 15)
                                                         + 1))
  face = ImageFont.truetype(font.path, size)
  text = str(digit)
  left, top, right, bottom = face.getbbox(text, stroke_width=stroke)
  pad = 2 + stroke
  mask = Image.new('L', (right - left + 2 * pad, bottom - top + 2 * pad), 0)
  ImageDraw.Draw(mask).text((pad - left, pad - top), text, fill=255,
                            font=face, stroke_width=stroke, stroke_fill=255)
  mask = _affine(mask, np.deg2rad(rng.uniform(-10, 10)), rng.uniform(-0.2, 0.2),
                 rng.uniform(0.75, 1.25))
  blur = rng.uniform(0, 0.03) * size
  if blur > 0.2:
    mask = mask.filter(ImageFilter.GaussianBlur(blur))
  ml, mr, mt, mb = (int(m * size) for m in rng.uniform(0.05, 0.8, 4))
  coverage = np.zeros((mask.size[1] + mt + mb, mask.size[0] + ml + mr))
  coverage[mt:mt + mask.size[1], ml:ml + mask.size[0]] = (
      np.asarray(mask, np.float64) / 255.0)
  if rng.random() < 0.75:
    paper, ink = rng.uniform(0.7, 1.0), rng.uniform(0.0, 0.35)
  else:
    paper, ink = rng.uniform(0.0, 0.3), rng.uniform(0.65, 1.0)
  gray = paper + (ink - paper) * coverage
  gray = gray + rng.normal(0, rng.uniform(0, 0.03), gray.shape)
  pixels = np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels, mode='L').save(out, format='PNG')
  return out.getvalue()


def model_input(png: bytes, shape: tuple[int, int]) -> np.ndarray:
  """PNG bytes as ``--mode=predict`` prepares a file: read, then made an
  MNIST-style uint8 ``[H, W, 1]`` input."""
  gray = predict.read_image(io.BytesIO(png))
  return preprocess_image.mnist_style(gray, shape)[..., None]


def generate(fonts: Sequence[Font], examples: int, seed: int,
             shape: tuple[int, int] = (28, 28), key: str = '') -> FontDigits:
  """Renders ``examples`` digits (labels 0, 1, ..., 9, 0, ...)."""
  families: dict[str, list[int]] = {}
  for i, font in enumerate(fonts):
    families.setdefault(font.family, []).append(i)
  groups = list(families.values())
  images = np.zeros((examples, *shape, 1), np.uint8)
  labels = np.arange(examples, dtype=np.int32) % 10
  font_index = np.zeros(examples, np.int32)
  for i in range(examples):
    rng = np.random.default_rng([seed, i])
    group = groups[int(rng.integers(len(groups)))]
    font_index[i] = group[int(rng.integers(len(group)))]
    png = render_png(fonts[font_index[i]], int(labels[i]), rng)
    try:
      images[i] = model_input(png, shape)
    except preprocess_image.PreprocessError as e:
      raise CnnJaxError(f'font digit {i} ({fonts[font_index[i]].label()}): '
                        f'{e}') from e
  return FontDigits(images, labels, font_index,
                    tuple(f.label() for f in fonts), len(groups), seed, key)


def _digest(paths: Iterable[str]) -> str:
  h = hashlib.blake2b(digest_size=16)
  for path in paths:
    with open(path, 'rb') as f:
      h.update(hashlib.blake2b(f.read(), digest_size=16).digest())
  return h.hexdigest()


def cache_key(fonts: Sequence[Font], examples: int, seed: int,
              shape: tuple[int, int]) -> str:
  """What the set depends on, hashed: the seed, size, fonts, libraries and
  the code that draws and preprocesses."""
  code = [m.__file__ for m in (preprocess_image, predict)] + [__file__]
  blob = json.dumps({
      'format': FORMAT, 'examples': examples, 'seed': seed,
      'shape': list(shape), 'fonts': [f.name for f in fonts],
      'font_files': _digest(f.path for f in fonts), 'code': _digest(code),
      'pillow': Image.__version__, 'numpy': np.__version__,
      'freetype': features.version('freetype2')}, sort_keys=True)
  return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


def _read(path: str, key: str, seed: int) -> FontDigits | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z['meta']))
      out = FontDigits(z['images'], z['labels'], z['font_index'],
                       tuple(meta['fonts']), int(meta['families']), seed, key)
  except (OSError, ValueError, KeyError) as e:
    logging.warning('font digits: ignoring unreadable %s (%s)', path, e)
    return None
  if meta.get('key') != key or len(out.images) != len(out.labels):
    return None
  return out


def _write(path: str, digits: FontDigits) -> None:
  tmp = f'{path}.tmp{os.getpid()}.npz'
  meta = json.dumps({'key': digits.key, 'fonts': list(digits.fonts),
                     'families': digits.families})
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(tmp, images=digits.images, labels=digits.labels,
             font_index=digits.font_index, meta=np.array(meta))
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('font digits: could not store %s (%s)', path,
                    e.strerror or e)
    if os.path.exists(tmp):
      os.remove(tmp)


def load(examples: int = 2000, seed: int = 0,
         font_dirs: Sequence[str] = DEFAULT_FONT_DIRS,
         shape: tuple[int, int] = (28, 28), cache_dir: str = '',
         cache: bool = True) -> FontDigits:
  """The font-digit set: from the cache when it holds this seed, size and
  fonts, else rendered (and stored, unless ``cache`` is False)."""
  if examples < 1:
    raise CnnJaxError(f'--font_examples must be positive, got {examples}')
  fonts = find_fonts(font_dirs or DEFAULT_FONT_DIRS)
  key = cache_key(fonts, examples, seed, shape)
  path = os.path.join(data_cache.resolve_root(cache_dir), 'fonts',
                      f'digits-{key}.npz')
  if cache and os.path.exists(path):
    found = _read(path, key, seed)
    if found is not None:
      return found
  logging.info('font digits: rendering %d digits from %d fonts', examples,
               len(fonts))
  digits = generate(fonts, examples, seed, shape, key)
  if cache:
    _write(path, digits)
  return digits
