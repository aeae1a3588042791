"""On-device data augmentation: small random affine warps, inside jit.

Each image gets its own rotation, zoom and translation, sampled from the key,
and is resampled bilinearly with `jax.scipy.ndimage.map_coordinates`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy import ndimage


def _warp(image: jax.Array, angle: jax.Array, scale: jax.Array,
          shift: jax.Array) -> jax.Array:
  h, w, _ = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing='ij')
  # Inverse map: output pixel -> source coordinate.
  y, x = yy - cy - shift[0], xx - cx - shift[1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_y = (cos * y + sin * x) / scale + cy
  src_x = (-sin * y + cos * x) / scale + cx
  warp_channel = lambda c: ndimage.map_coordinates(
      c, [src_y, src_x], order=1, mode='constant', cval=0.0)
  return jax.vmap(warp_channel, in_axes=2, out_axes=2)(image)


def random_affine(key: jax.Array, images: jax.Array, max_shift: float = 2.0,
                  max_rotation_deg: float = 10.0, max_scale: float = 0.1
                  ) -> jax.Array:
  """Randomly rotates, zooms and shifts a batch of NHWC float images."""
  n = images.shape[0]
  k_angle, k_scale, k_shift = jax.random.split(key, 3)
  max_rot = jnp.deg2rad(max_rotation_deg)
  angle = jax.random.uniform(k_angle, (n,), minval=-max_rot, maxval=max_rot)
  scale = 1.0 + jax.random.uniform(k_scale, (n,), minval=-max_scale,
                                   maxval=max_scale)
  shift = jax.random.uniform(k_shift, (n, 2), minval=-max_shift,
                             maxval=max_shift)
  return jax.vmap(_warp)(images, angle, scale, shift)
