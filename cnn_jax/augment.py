"""On-device data augmentation, inside the jitted train step.

Each image gets its own random draws from the step's key:

* ``--augment``: a small affine warp (rotation, zoom, translation);
* ``--aug_elastic=ALPHA``: an elastic distortion (Simard et al., 2003): a
  random displacement field smoothed by a Gaussian of ``--aug_elastic_sigma``
  pixels and scaled by up to ALPHA pixels, like a hand's wobble; warped in
  the same resampling as the affine part;
* ``--aug_thickness=T``: thicker or thinner strokes, up to T (a fraction of
  one 3x3 grey dilation or erosion step, so 1 is a pixel of ink each side);
* ``--aug_blur=S``: a Gaussian blur of sigma up to S pixels;
* ``--aug_noise=N``: Gaussian pixel noise of standard deviation up to N;
* ``--aug_erase=P``: with probability P, a random rectangle (2-20% of the
  image) of ink or paper erased to the background;
* ``--aug_levels=L``: other ink and paper, applied last: contrast scaled by
  a factor c from 1 - L to 1 and the background lifted by up to 1 - c
  (faint ink, a grey page; ink never above 1).

Strengths are uniform between none and the maximum, per image, so a batch
always holds nearly clean images too. Images are float32 NHWC in [0, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from cnn_jax.config import Config


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """What the train step does to each batch: every setting 0 is off."""

  affine: bool = False
  max_shift: float = 2.0
  max_rotation: float = 10.0
  max_scale: float = 0.1
  elastic: float = 0.0
  elastic_sigma: float = 4.0
  thickness: float = 0.0
  blur: float = 0.0
  noise: float = 0.0
  erase: float = 0.0
  levels: float = 0.0

  @classmethod
  def from_config(cls, config: Config) -> 'Augmentation':
    return cls(config.augment, config.aug_max_shift, config.aug_max_rotation,
               config.aug_max_scale, config.aug_elastic,
               config.aug_elastic_sigma, config.aug_thickness, config.aug_blur,
               config.aug_noise, config.aug_erase, config.aug_levels)

  @property
  def active(self) -> bool:
    return bool(self.affine or self.elastic or self.pixelwise)

  @property
  def pixelwise(self) -> bool:
    """Whether any per-pixel change (not a warp) is on."""
    return bool(self.thickness or self.blur or self.levels or self.noise
                or self.erase)


def _smoothing_matrix(n: int, sigma: float) -> jax.Array:
  """``[n, n]`` rows of a normalized Gaussian: ``G @ v`` blurs a vector."""
  t = jnp.arange(n, dtype=jnp.float32)
  g = jnp.exp(-(t[:, None] - t[None, :]) ** 2 / (2 * sigma ** 2))
  return g / g.sum(1, keepdims=True)


def _warp(image: jax.Array, angle: jax.Array, scale: jax.Array,
          shift: jax.Array, displacement: jax.Array | None) -> jax.Array:
  """One image resampled (bilinearly): each output pixel moved by its
  ``[2, H, W]`` displacement, then mapped back through the affine warp."""
  h, w, _ = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing='ij')
  if displacement is not None:
    yy, xx = yy + displacement[0], xx + displacement[1]
  # Inverse map: output pixel -> source coordinate.
  y, x = yy - cy - shift[0], xx - cx - shift[1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_y = (cos * y + sin * x) / scale + cy
  src_x = (-sin * y + cos * x) / scale + cx
  warp_channel = lambda c: ndimage.map_coordinates(
      c, [src_y, src_x], order=1, mode='constant', cval=0.0)
  return jax.vmap(warp_channel, in_axes=2, out_axes=2)(image)


def _affine_draws(key: jax.Array, n: int, aug: Augmentation
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each image's rotation, zoom and shift (the identity when off)."""
  if not aug.affine:
    return jnp.zeros(n), jnp.ones(n), jnp.zeros((n, 2))
  k_angle, k_scale, k_shift = jax.random.split(key, 3)
  max_rot = jnp.deg2rad(aug.max_rotation)
  angle = jax.random.uniform(k_angle, (n,), minval=-max_rot, maxval=max_rot)
  scale = 1.0 + jax.random.uniform(k_scale, (n,), minval=-aug.max_scale,
                                   maxval=aug.max_scale)
  shift = jax.random.uniform(k_shift, (n, 2), minval=-aug.max_shift,
                             maxval=aug.max_shift)
  return angle, scale, shift


def _elastic_field(key: jax.Array, h: int, w: int, aug: Augmentation
                   ) -> jax.Array:
  """A ``[2, H, W]`` smooth random displacement of up to ``aug.elastic``
  pixels (the peak scaled to a uniform draw of that size)."""
  k_field, k_alpha = jax.random.split(key)
  field = jax.random.uniform(k_field, (2, h, w), minval=-1.0, maxval=1.0)
  smooth = jnp.einsum('ij,cjk,lk->cil', _smoothing_matrix(h, aug.elastic_sigma),
                      field, _smoothing_matrix(w, aug.elastic_sigma))
  smooth = smooth / (jnp.abs(smooth).max() + 1e-6)
  return jax.random.uniform(k_alpha, (), maxval=aug.elastic) * smooth


def _neighbours(x: jax.Array, fill: float) -> list[jax.Array]:
  """The image shifted by one pixel up, down, left and right (HWC)."""
  p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=fill)
  h, w = x.shape[:2]
  return [p[:h, 1:w + 1], p[2:, 1:w + 1], p[1:h + 1, :w], p[1:h + 1, 2:]]


def _thickness(key: jax.Array, x: jax.Array, max_step: float) -> jax.Array:
  """Strokes made thicker (t > 0: toward a 3x3-cross grey dilation) or
  thinner (t < 0: toward an erosion), t uniform in [-max_step, max_step]."""
  t = jax.random.uniform(key, (), minval=-max_step, maxval=max_step)
  near = _neighbours(x, 0.0)
  dilated = jnp.maximum(x, jnp.max(jnp.stack(near), 0))
  eroded = jnp.minimum(x, jnp.min(jnp.stack(_neighbours(x, 1.0)), 0))
  step = jnp.where(t > 0, dilated - x, x - eroded)
  return jnp.clip(x + t * step, 0.0, 1.0)


def _blur(key: jax.Array, x: jax.Array, max_sigma: float) -> jax.Array:
  """A Gaussian blur of sigma uniform in [0, max_sigma] (separable)."""
  sigma = jax.random.uniform(key, (), maxval=max_sigma)
  h, w = x.shape[:2]
  t_h = jnp.arange(h, dtype=jnp.float32)
  t_w = jnp.arange(w, dtype=jnp.float32)
  s2 = 2 * jnp.maximum(sigma, 1e-3) ** 2
  gh = jnp.exp(-(t_h[:, None] - t_h[None, :]) ** 2 / s2)
  gw = jnp.exp(-(t_w[:, None] - t_w[None, :]) ** 2 / s2)
  gh, gw = gh / gh.sum(1, keepdims=True), gw / gw.sum(1, keepdims=True)
  return jnp.einsum('ij,jkc,lk->ilc', gh, x, gw)


def _levels(key: jax.Array, x: jax.Array, max_change: float) -> jax.Array:
  """Other ink and paper: ``p + c * x`` with contrast c uniform in
  [1 - max_change, 1] and paper p uniform in [0, 1 - c]."""
  k_c, k_p = jax.random.split(key)
  c = jax.random.uniform(k_c, (), minval=1.0 - max_change, maxval=1.0)
  p = jax.random.uniform(k_p, (), maxval=1.0 - c)
  return p + c * x


def _noise(key: jax.Array, x: jax.Array, max_std: float) -> jax.Array:
  k_std, k_noise = jax.random.split(key)
  std = jax.random.uniform(k_std, (), maxval=max_std)
  return jnp.clip(x + std * jax.random.normal(k_noise, x.shape), 0.0, 1.0)


def _erase(key: jax.Array, x: jax.Array, prob: float) -> jax.Array:
  """With probability ``prob``, a rectangle of 2-20% of the image set to
  the background (0), at a random place and aspect ratio."""
  h, w = x.shape[:2]
  k_on, k_area, k_aspect, k_y, k_x = jax.random.split(key, 5)
  area = jax.random.uniform(k_area, (), minval=0.02, maxval=0.2) * h * w
  aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=-1.0, maxval=1.0))
  eh = jnp.clip(jnp.sqrt(area * aspect), 1.0, h)
  ew = jnp.clip(jnp.sqrt(area / aspect), 1.0, w)
  top = jax.random.uniform(k_y, ()) * (h - eh)
  left = jax.random.uniform(k_x, ()) * (w - ew)
  yy = jnp.arange(h, dtype=jnp.float32)[:, None]
  xx = jnp.arange(w, dtype=jnp.float32)[None, :]
  inside = ((yy >= top) & (yy < top + eh) & (xx >= left)
            & (xx < left + ew))[..., None]
  on = jax.random.bernoulli(k_on, prob)
  return jnp.where(on & inside, 0.0, x)


def _pixels(key: jax.Array, image: jax.Array, aug: Augmentation
            ) -> jax.Array:
  """The per-pixel augmentations of one image, in the order stroke width,
  blur, noise, erasing, ink and paper levels."""
  k_thick, k_blur, k_noise, k_erase = jax.random.split(key, 4)
  if aug.thickness:
    image = _thickness(k_thick, image, aug.thickness)
  if aug.blur:
    image = _blur(k_blur, image, aug.blur)
  if aug.noise:
    image = _noise(k_noise, image, aug.noise)
  if aug.erase:
    image = _erase(k_erase, image, aug.erase)
  if aug.levels:
    image = _levels(jax.random.fold_in(key, 4), image, aug.levels)
  return image


def apply(key: jax.Array, images: jax.Array, aug: Augmentation) -> jax.Array:
  """A batch of NHWC float images augmented as ``aug`` says.

  The affine draws come from ``key`` itself (as `random_affine` has always
  drawn them, so a recipe with ``--augment`` alone trains as before), the
  elastic fields and per-pixel changes from keys folded from it, one per
  image.
  """
  n, h, w, _ = images.shape
  if aug.affine or aug.elastic:
    angle, scale, shift = _affine_draws(key, n, aug)
    if aug.elastic:
      keys = jax.random.split(jax.random.fold_in(key, 1), n)
      fields = jax.vmap(lambda k: _elastic_field(k, h, w, aug))(keys)
      images = jax.vmap(_warp)(images, angle, scale, shift, fields)
    else:
      images = jax.vmap(lambda x, a, s, t: _warp(x, a, s, t, None))(
          images, angle, scale, shift)
  if aug.pixelwise:
    keys = jax.random.split(jax.random.fold_in(key, 2), n)
    images = jax.vmap(lambda k, x: _pixels(k, x, aug))(keys, images)
  return images


def random_affine(key: jax.Array, images: jax.Array, max_shift: float = 2.0,
                  max_rotation_deg: float = 10.0, max_scale: float = 0.1
                  ) -> jax.Array:
  """Randomly rotates, zooms and shifts a batch of NHWC float images."""
  return apply(key, images, Augmentation(True, max_shift, max_rotation_deg,
                                         max_scale))
