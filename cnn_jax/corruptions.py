"""Corrupted digits for robustness tests: MNIST-C's kinds and stroke width.

Every corruption is a pure `jax.numpy` function of one image,
``fn(key, image, **params)``, with the image float32 ``[H, W, C]`` in
[0, 1], light digit on a dark background (MNIST's polarity). `apply` runs
one on a batch (one key split per image) and `apply_each` with a key per
image; both jit and vmap, and the parameters may be traced values, so one
compiled program serves every severity (and random severities when used as
training augmentation). `corrupt_images` corrupts a uint8 NHWC set on the
device in fixed-size chunks, each image keyed by its index
(`example_keys`), so image ``i`` gets the same random draws whatever the
chunk size or subset (the pixels agree to within one grey level: XLA may
round a differently shaped program differently).

The kinds: all 15 of MNIST-C (Mu and Gilmer, 2019, arXiv:1906.02337,
which has one severity each), Gaussian noise, defocus blur and contrast
from ImageNet-C, and stroke width; here each has the three fixed
severities of `CORRUPTIONS` (edges one):

==============  ============================  ==================================
kind            parameter: severity 1, 2, 3   what it does
==============  ============================  ==================================
gaussian_noise  sigma: 0.1, 0.2, 0.3          add N(0, sigma) to every pixel
shot_noise      photons: 60, 20, 8            Poisson(photons * x) / photons
                                              (normal approximation above a
                                              rate of 20)
impulse_noise   amount: 0.05, 0.15, 0.3       that fraction of pixels -> 0 or 1
defocus_blur    radius: 1, 1.5, 2             mean over an anti-aliased disc
glass_blur      (sigma, delta, iterations):   blur, move pixels up to delta px
                (.5,1,1), (.7,1,2), (.9,2,2)  (iterations times), blur again
motion_blur     length: 3, 5, 7               mean along a line of that length
                                              at a random angle
shear           amount: 0.2, 0.4, 0.6         x += amount * y, random sign
scale           factor: 0.8, 0.65, 0.5        shrink about the centre
rotate          degrees: 15, 30, 45           rotate, random sign
translate       pixels: 2, 4, 6               shift in a random direction
brightness      delta: 0.2, 0.4, 0.6          add delta (background lightens)
contrast        factor: 0.5, 0.3, 0.15        scale contrast about the mean
stripe          width: 2, 4, 6                invert a vertical band (pixels)
fog             strength: 0.5, 1, 2           add smooth fractal noise, rescale
spatter         coverage: 0.03, 0.06, 0.1     bright blobs over that fraction
dotted_line     lines: 1, 2, 3                dotted straight lines across
zigzag          lines: 1, 2, 3                zigzag strokes across the digit
canny_edges     threshold: 0.2 (one level)    thin edge map (Sobel magnitude,
                                              non-maximum suppression)
dilate          radius: 0.5, 1, 1.5           thicker strokes: grey dilation by
                                              a disc, stroke width + 2 * radius
erode           radius: 0.5, 0.75, 1          thinner strokes: grey erosion
==============  ============================  ==================================

Severity 0 (`identity` parameters) leaves an image unchanged for every kind
but shot noise and edges, which have no such setting. Dilation and erosion
work at twice the resolution (bilinear up, 2x2 mean down), so a radius of
half a pixel is a real change. Left out: inverted images
(`--mode=predict` turns dark-on-light digits light-on-dark before the
model sees them), ImageNet-C's JPEG (not an array operation), frost, snow
and colour changes (textures and colour MNIST has no use for), and
elastic distortion (a training augmentation, so no fair test).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.scipy import ndimage, signal
from jax.scipy.special import ndtri
import numpy as np

Params = Mapping[str, float]
MAX_MORPH_RADIUS = 1.5  # Pixels: the largest dilation/erosion radius.
MAX_GLASS_ITERATIONS = 3
MAX_LINES = 3  # Of dotted lines and zigzags.
MOTION_SAMPLES = 9  # Points averaged along a motion blur.
MAX_POISSON_RATE = 20.0  # Exact Poisson up to this rate, normal above.
POISSON_STEPS = 64  # P(count > 64 | rate 20) < 1e-14.


@dataclasses.dataclass(frozen=True)
class Corruption:
  """One kind: its per-image function, severities and what it does."""

  name: str
  fn: Callable[..., jax.Array]  # (key, image [H, W, C], **params) -> image
  severities: tuple[dict[str, float], ...]  # Severity k is severities[k - 1].
  identity: dict[str, float] | None  # Parameters that change nothing.
  description: str


# Helpers ---------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[jax.Array, jax.Array]:
  return jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                      jnp.arange(w, dtype=jnp.float32), indexing='ij')


def _per_channel(fn: Callable[[jax.Array], jax.Array], x: jax.Array
                 ) -> jax.Array:
  return jax.vmap(fn, in_axes=2, out_axes=2)(x)


def _sample(x: jax.Array, ys: jax.Array, xs: jax.Array) -> jax.Array:
  """Bilinear samples of ``x`` at (ys, xs), zero outside."""
  return _per_channel(lambda c: ndimage.map_coordinates(
      c, [ys, xs], order=1, mode='constant', cval=0.0), x)


def _warp(x: jax.Array, inverse: jax.Array, shift: jax.Array) -> jax.Array:
  """Affine warp about the centre: output pixel p samples the input at
  ``inverse @ (p - centre - shift) + centre``."""
  h, w, _ = x.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = _grid(h, w)
  y, x_ = yy - cy - shift[0], xx - cx - shift[1]
  return _sample(x, inverse[0, 0] * y + inverse[0, 1] * x_ + cy,
                 inverse[1, 0] * y + inverse[1, 1] * x_ + cx)


def _sign(key: jax.Array) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key), 1.0, -1.0)


def _convolve(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _per_channel(lambda c: signal.convolve2d(c, kernel, mode='same'), x)


def _gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int = 3
                   ) -> jax.Array:
  """Gaussian blur; sigma near 0 is the identity."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  g = jnp.exp(-t ** 2 / (2 * jnp.maximum(sigma, 1e-3) ** 2))
  g = g / g.sum()
  return _convolve(x, jnp.outer(g, g))


def _smooth_noise(key: jax.Array, h: int, w: int, sigma: float = 1.5
                  ) -> jax.Array:
  """Gaussian noise blurred and rescaled to unit standard deviation."""
  field = _gaussian_blur(jax.random.normal(key, (h, w, 1)), sigma, 4)[..., 0]
  return (field - field.mean()) / (field.std() + 1e-6)


def _segment_distance(yy: jax.Array, xx: jax.Array, a: jax.Array,
                      b: jax.Array) -> jax.Array:
  """Distance of every pixel centre to the segment from a to b (y, x)."""
  d = b - a
  t = ((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / jnp.maximum(d @ d, 1e-6)
  t = jnp.clip(t, 0.0, 1.0)
  return jnp.hypot(yy - a[0] - t * d[0], xx - a[1] - t * d[1])


def _stroke(distance: jax.Array) -> jax.Array:
  """An anti-aliased pen stroke about 1.5 pixels wide."""
  return jnp.clip(1.25 - distance, 0.0, 1.0)


def _shifted(x: jax.Array, dy: int, dx: int, fill: float) -> jax.Array:
  """``x`` moved by (dy, dx) whole pixels (HWC), the border ``fill``."""
  h, w = x.shape[:2]
  r = max(abs(dy), abs(dx))
  padded = jnp.pad(x, ((r, r), (r, r), (0, 0)), constant_values=fill)
  return padded[r - dy:r - dy + h, r - dx:r - dx + w]


def _morphology(x: jax.Array, radius: jax.Array, dilate: bool) -> jax.Array:
  """Grey dilation (max) or erosion (min) by a disc of ``radius`` pixels,
  computed at twice the resolution; radius 0 is the identity."""
  h, w, c = x.shape
  big = jax.image.resize(x, (2 * h, 2 * w, c), 'linear')
  r2 = (2 * radius) ** 2 + 1e-6
  reach = int(2 * MAX_MORPH_RADIUS)
  out = big
  for dy in range(-reach, reach + 1):
    for dx in range(-reach, reach + 1):
      if dy == dx == 0 or dy * dy + dx * dx > reach * reach:
        continue
      moved = _shifted(big, dy, dx, 0.0)
      inside = dy * dy + dx * dx <= r2
      out = (jnp.where(inside, jnp.maximum(out, moved), out) if dilate else
             jnp.where(inside, jnp.minimum(out, moved), out))
  small = out.reshape(h, 2, w, 2, c).mean((1, 3))
  return jnp.where(radius > 0, small, x)



# Noise -------------------------------------------------------------------
def gaussian_noise(key: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
  return jnp.clip(x + sigma * jax.random.normal(key, x.shape), 0.0, 1.0)


def _poisson(key: jax.Array, rate: jax.Array) -> jax.Array:
  """Poisson counts by inverting the CDF in a fixed number of steps (a
  vmapped `jax.random.poisson` runs its rejection loop for the slowest
  pixel); rates above `MAX_POISSON_RATE` use the normal approximation."""
  k_uniform, k_normal = jax.random.split(key)
  u = jax.random.uniform(k_uniform, rate.shape)
  lam = jnp.minimum(rate, MAX_POISSON_RATE)

  def step(k, carry):
    pmf, cdf, count = carry
    count = count + (u > cdf)
    pmf = pmf * lam / (k + 1)
    return pmf, cdf + pmf, count
  pmf = jnp.exp(-lam)
  _, _, count = jax.lax.fori_loop(0, POISSON_STEPS, step,
                                  (pmf, pmf, jnp.zeros_like(lam)))
  normal = rate + jnp.sqrt(rate) * jax.random.normal(k_normal, rate.shape)
  return jnp.where(rate > MAX_POISSON_RATE, jnp.maximum(normal, 0.0), count)


def shot_noise(key: jax.Array, x: jax.Array, photons: float) -> jax.Array:
  return jnp.clip(_poisson(key, x * photons) / photons, 0.0, 1.0)


def impulse_noise(key: jax.Array, x: jax.Array, amount: float) -> jax.Array:
  u = jax.random.uniform(key, x.shape)
  return jnp.where(u < amount / 2, 0.0, jnp.where(u > 1 - amount / 2, 1.0, x))


# Blur --------------------------------------------------------------------
def defocus_blur(key: jax.Array, x: jax.Array, radius: float) -> jax.Array:
  del key
  reach = 3
  yy, xx = _grid(2 * reach + 1, 2 * reach + 1)
  d = jnp.hypot(yy - reach, xx - reach)
  disc = jnp.clip(radius + 0.5 - d, 0.0, 1.0)
  return jnp.clip(_convolve(x, disc / disc.sum()), 0.0, 1.0)


def glass_blur(key: jax.Array, x: jax.Array, sigma: float, delta: float,
               iterations: float) -> jax.Array:
  h, w, _ = x.shape
  yy, xx = _grid(h, w)
  x = _gaussian_blur(x, sigma)
  for i, k in enumerate(jax.random.split(key, MAX_GLASS_ITERATIONS)):
    offsets = jnp.round(jax.random.uniform(k, (2, h, w), minval=-delta,
                                           maxval=delta))
    src_y = jnp.clip(yy + offsets[0], 0, h - 1).astype(jnp.int32)
    src_x = jnp.clip(xx + offsets[1], 0, w - 1).astype(jnp.int32)
    x = jnp.where(i < iterations, x[src_y, src_x], x)
  return jnp.clip(_gaussian_blur(x, sigma), 0.0, 1.0)


def motion_blur(key: jax.Array, x: jax.Array, length: float) -> jax.Array:
  h, w, _ = x.shape
  yy, xx = _grid(h, w)
  angle = jax.random.uniform(key, (), maxval=jnp.pi)
  steps = (jnp.linspace(0.0, 1.0, MOTION_SAMPLES) - 0.5) * length
  views = [_sample(x, yy + t * jnp.sin(angle), xx + t * jnp.cos(angle))
           for t in steps]
  return jnp.clip(sum(views) / MOTION_SAMPLES, 0.0, 1.0)


# Geometry ----------------------------------------------------------------
def shear(key: jax.Array, x: jax.Array, amount: float) -> jax.Array:
  s = _sign(key) * amount
  return _warp(x, jnp.array([[1.0, 0.0], [-s, 1.0]]), jnp.zeros(2))


def scale(key: jax.Array, x: jax.Array, factor: float) -> jax.Array:
  del key
  return _warp(x, jnp.eye(2) / factor, jnp.zeros(2))


def rotate(key: jax.Array, x: jax.Array, degrees: float) -> jax.Array:
  a = _sign(key) * jnp.deg2rad(degrees)
  cos, sin = jnp.cos(a), jnp.sin(a)
  return _warp(x, jnp.array([[cos, sin], [-sin, cos]]), jnp.zeros(2))


def translate(key: jax.Array, x: jax.Array, pixels: float) -> jax.Array:
  a = jax.random.uniform(key, (), maxval=2 * jnp.pi)
  return _warp(x, jnp.eye(2), pixels * jnp.stack([jnp.sin(a), jnp.cos(a)]))


# Light -------------------------------------------------------------------
def brightness(key: jax.Array, x: jax.Array, delta: float) -> jax.Array:
  del key
  return jnp.clip(x + delta, 0.0, 1.0)


def contrast(key: jax.Array, x: jax.Array, factor: float) -> jax.Array:
  del key
  mean = x.mean()
  return jnp.clip((x - mean) * factor + mean, 0.0, 1.0)


# Clutter -----------------------------------------------------------------
def stripe(key: jax.Array, x: jax.Array, width: float) -> jax.Array:
  w = x.shape[1]
  centre = jax.random.uniform(key, (), minval=0.2 * w, maxval=0.8 * w)
  cols = jnp.arange(w, dtype=jnp.float32) + 0.5
  band = (jnp.abs(cols - centre) < width / 2)[None, :, None]
  return jnp.where(band, 1.0 - x, x)


def fog(key: jax.Array, x: jax.Array, strength: float) -> jax.Array:
  h, w, _ = x.shape
  field = jnp.zeros((h, w))
  for octave, k in enumerate(jax.random.split(key, 3)):
    size = 2 ** (octave + 1)
    coarse = jax.random.normal(k, (size + 1, size + 1))
    field = field + jax.image.resize(coarse, (h, w), 'linear') / 2 ** octave
  field = (field - field.min()) / (field.max() - field.min() + 1e-6)
  return jnp.clip((x + strength * field[..., None]) / (1 + strength), 0.0,
                  1.0)


def spatter(key: jax.Array, x: jax.Array, coverage: float) -> jax.Array:
  h, w, _ = x.shape
  field = _smooth_noise(key, h, w)
  threshold = ndtri(1.0 - jnp.asarray(coverage, jnp.float32))
  drops = jnp.clip((field - threshold) * 3.0, 0.0, 1.0)
  return jnp.maximum(x, drops[..., None])


def dotted_line(key: jax.Array, x: jax.Array, lines: float) -> jax.Array:
  h, w, _ = x.shape
  yy, xx = _grid(h, w)
  ink = jnp.zeros((h, w))
  for i, k in enumerate(jax.random.split(key, MAX_LINES)):
    k_point, k_angle = jax.random.split(k)
    p = jax.random.uniform(k_point, (2,), minval=0.25, maxval=0.75) * jnp.array(
        [h, w], jnp.float32)
    a = jax.random.uniform(k_angle, (), maxval=jnp.pi)
    normal_dist = jnp.abs(-(yy - p[0]) * jnp.cos(a) + (xx - p[1]) * jnp.sin(a))
    along = (yy - p[0]) * jnp.sin(a) + (xx - p[1]) * jnp.cos(a)
    dots = jnp.mod(along, 4.0) < 2.0
    ink = jnp.maximum(ink, jnp.where((i < lines) & dots,
                                     _stroke(normal_dist), 0.0))
  return jnp.maximum(x, ink[..., None])


def zigzag(key: jax.Array, x: jax.Array, lines: float) -> jax.Array:
  h, w, _ = x.shape
  yy, xx = _grid(h, w)
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2])
  ink = jnp.zeros((h, w))
  step, amplitude, corners = 0.18 * w, 0.1 * w, 5
  for i, k in enumerate(jax.random.split(key, MAX_LINES)):
    k_point, k_angle = jax.random.split(k)
    a = jax.random.uniform(k_angle, (), maxval=2 * jnp.pi)
    along = jnp.array([jnp.sin(a), jnp.cos(a)])
    across = jnp.array([along[1], -along[0]])
    start = (centre + jax.random.uniform(k_point, (2,), minval=-0.15 * h,
                                         maxval=0.15 * h)
             - along * step * (corners - 1) / 2)
    points = [start + along * step * j + across * amplitude * (-1) ** j
              for j in range(corners)]
    dist = jnp.min(jnp.stack([_segment_distance(yy, xx, p, q)
                              for p, q in zip(points, points[1:])]), 0)
    ink = jnp.maximum(ink, jnp.where(i < lines, _stroke(dist), 0.0))
  return jnp.maximum(x, ink[..., None])


def canny_edges(key: jax.Array, x: jax.Array, threshold: float) -> jax.Array:
  """Canny's steps without hysteresis: smooth, Sobel gradient, keep local
  maxima across the edge above ``threshold`` of the strongest."""
  del key
  gray = _gaussian_blur(x.mean(-1, keepdims=True), 0.8)
  sobel = jnp.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
  gx = _convolve(gray, sobel)[..., 0]
  gy = _convolve(gray, sobel.T)[..., 0]
  mag = jnp.hypot(gx, gy)
  mag = mag / (mag.max() + 1e-6)
  # Gradient direction in 4 bins: 0, 45, 90, 135 degrees.
  direction = jnp.mod(jnp.round(jnp.arctan2(gy, gx) / (jnp.pi / 4)), 4)
  m = mag[..., None]
  keep = jnp.zeros(mag.shape, bool)
  for b, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
    ahead = _shifted(m, dy, dx, 0.0)[..., 0]
    behind = _shifted(m, -dy, -dx, 0.0)[..., 0]
    keep = keep | ((direction == b) & (mag >= ahead) & (mag >= behind))
  edges = (keep & (mag > threshold)).astype(jnp.float32)
  return jnp.broadcast_to(edges[..., None], x.shape)


# Stroke width --------------------------------------------------------------
def dilate(key: jax.Array, x: jax.Array, radius: float) -> jax.Array:
  del key
  return jnp.clip(_morphology(x, jnp.asarray(radius), True), 0.0, 1.0)


def erode(key: jax.Array, x: jax.Array, radius: float) -> jax.Array:
  del key
  return jnp.clip(_morphology(x, jnp.asarray(radius), False), 0.0, 1.0)


def _levels(name: str, values: Sequence[float]) -> tuple[dict[str, float], ...]:
  return tuple({name: float(v)} for v in values)


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption('gaussian_noise', gaussian_noise,
               _levels('sigma', (0.1, 0.2, 0.3)), {'sigma': 0.0},
               'Gaussian noise on every pixel'),
    Corruption('shot_noise', shot_noise,
               _levels('photons', (60, 20, 8)), None,
               'Poisson (photon) noise on the ink'),
    Corruption('impulse_noise', impulse_noise,
               _levels('amount', (0.05, 0.15, 0.3)), {'amount': 0.0},
               'salt-and-pepper pixels'),
    Corruption('defocus_blur', defocus_blur,
               _levels('radius', (1.0, 1.5, 2.0)), {'radius': 0.0},
               'out of focus: mean over a disc'),
    Corruption('glass_blur', glass_blur, tuple(
        {'sigma': s, 'delta': d, 'iterations': float(i)}
        for s, d, i in ((0.5, 1.0, 1), (0.7, 1.0, 2), (0.9, 2.0, 2))),
               {'sigma': 0.0, 'delta': 0.0, 'iterations': 0.0},
               'frosted glass: blur, jitter pixels, blur'),
    Corruption('motion_blur', motion_blur,
               _levels('length', (3.0, 5.0, 7.0)), {'length': 0.0},
               'camera shake along a random direction'),
    Corruption('shear', shear, _levels('amount', (0.2, 0.4, 0.6)),
               {'amount': 0.0}, 'slanted writing'),
    Corruption('scale', scale, _levels('factor', (0.8, 0.65, 0.5)),
               {'factor': 1.0}, 'smaller digits'),
    Corruption('rotate', rotate, _levels('degrees', (15.0, 30.0, 45.0)),
               {'degrees': 0.0}, 'rotated digits'),
    Corruption('translate', translate, _levels('pixels', (2.0, 4.0, 6.0)),
               {'pixels': 0.0}, 'off-centre digits'),
    Corruption('brightness', brightness, _levels('delta', (0.2, 0.4, 0.6)),
               {'delta': 0.0}, 'a lighter background'),
    Corruption('contrast', contrast, _levels('factor', (0.5, 0.3, 0.15)),
               {'factor': 1.0}, 'faint ink'),
    Corruption('stripe', stripe, _levels('width', (2.0, 4.0, 6.0)),
               {'width': 0.0}, 'an inverted vertical band'),
    Corruption('fog', fog, _levels('strength', (0.5, 1.0, 2.0)),
               {'strength': 0.0}, 'smooth haze'),
    Corruption('spatter', spatter, _levels('coverage', (0.03, 0.06, 0.1)),
               {'coverage': 0.0}, 'ink blots'),
    Corruption('dotted_line', dotted_line, _levels('lines', (1, 2, 3)),
               {'lines': 0.0}, 'dotted lines across the image'),
    Corruption('zigzag', zigzag, _levels('lines', (1, 2, 3)), {'lines': 0.0},
               'zigzag strokes across the digit'),
    Corruption('canny_edges', canny_edges, _levels('threshold', (0.2,)),
               None, 'the outline only'),
    Corruption('dilate', dilate, _levels('radius', (0.5, 1.0, 1.5)),
               {'radius': 0.0}, 'thicker strokes (a broad pen)'),
    Corruption('erode', erode, _levels('radius', (0.5, 0.75, 1.0)),
               {'radius': 0.0}, 'thinner strokes (a fine pen)'),
)}


def get(name: str) -> Corruption:
  """The corruption called ``name``; CnnJaxError naming the choices if none."""
  if name not in CORRUPTIONS:
    from cnn_jax.config import CnnJaxError
    raise CnnJaxError(f'unknown corruption {name!r}; choose from: '
                      f'{", ".join(CORRUPTIONS)}')
  return CORRUPTIONS[name]


def params_of(name: str, severity: int) -> dict[str, float]:
  """The parameters of ``name`` at ``severity`` (0 = identity, if any)."""
  c = get(name)
  if severity == 0 and c.identity is not None:
    return dict(c.identity)
  if not 1 <= severity <= len(c.severities):
    raise ValueError(f'{name} has severities 1..{len(c.severities)}'
                     + (' and 0' if c.identity is not None else ''))
  return dict(c.severities[severity - 1])


def apply_each(name: str, keys: jax.Array, images: jax.Array,
               params: Params) -> jax.Array:
  """``name`` on NHWC float images in [0, 1], image i with ``keys[i]``."""
  fn = get(name).fn
  return jax.vmap(lambda k, x: fn(k, x, **params))(keys, images)


def apply(name: str, key: jax.Array, images: jax.Array,
          **params: Any) -> jax.Array:
  """``name`` on a batch of NHWC float images in [0, 1], one key split per
  image; ``params`` default to severity 2 (the middle one)."""
  params = params or params_of(name, min(2, len(get(name).severities)))
  return apply_each(name, jax.random.split(key, images.shape[0]), images,
                    params)


def kind_key(seed: int, name: str) -> jax.Array:
  """The key of one kind: the same for every severity, so a stronger
  severity moves a digit the same way, only further."""
  return jax.random.fold_in(jax.random.PRNGKey(seed),
                            zlib.crc32(name.encode()) & 0x7FFFFFFF)


def example_keys(seed: int, name: str, indices: jax.Array) -> jax.Array:
  """One key per image, from its index in the set."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      kind_key(seed, name), indices)


def _corrupt_chunks(name: str, seed: int, images: jax.Array,
                    positions: jax.Array, indices: jax.Array,
                    params: Params) -> jax.Array:
  def one(chunk):
    pos, idx = chunk
    x = images[pos].astype(jnp.float32) / 255.0
    y = apply_each(name, example_keys(seed, name, idx), x, params)
    return jnp.round(jnp.clip(y, 0.0, 1.0) * 255.0).astype(jnp.uint8)
  out = jax.lax.map(one, (positions, indices))
  return out.reshape(-1, *out.shape[2:])


_corrupt_jit = jax.jit(_corrupt_chunks, static_argnames=('name', 'seed'))


def corrupt_images(name: str, params: Params, images: np.ndarray | jax.Array,
                   seed: int = 0, indices: np.ndarray | None = None,
                   chunk: int = 1000) -> jax.Array:
  """uint8 NHWC ``images`` corrupted by ``name`` with ``params``, as uint8
  (rounded, like a saved image). Image i is keyed by ``indices[i]``
  (default i), so a subset gets the draws it gets within the whole set
  (pixels equal to within one grey level of rounding). Runs
  jitted on the device, ``chunk`` images at a time: one compiled program
  per kind, image shape and chunk size, whatever the severity."""
  images = jnp.asarray(images)
  n = images.shape[0]
  indices = np.arange(n) if indices is None else np.asarray(indices)
  if indices.shape != (n,):
    raise ValueError(f'{n} images but indices of shape {indices.shape}')
  chunk = max(1, min(chunk, n))
  nb = math.ceil(n / chunk)
  # The last chunk is padded with the last image, then cut off.
  positions = np.minimum(np.arange(nb * chunk), n - 1).reshape(nb, chunk)
  params = {k: jnp.float32(v) for k, v in params.items()}
  out = _corrupt_jit(name, seed, images, jnp.asarray(positions),
                     jnp.asarray(indices[positions], jnp.int32), params)
  return out[:n]
