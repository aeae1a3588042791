"""A drop-in 2-D convolution with a choice of kernel implementation.

XLA:CPU's generic convolution is several times slower than a matmul for the
small, few-channel convolutions of MNIST CNNs. `Conv` keeps exactly the
parameter tree of `flax.linen.Conv` (an HWIO `kernel` and a `bias`, same
initializers), so checkpoints do not depend on the implementation, and lets
the computation be:

* ``xla``: `lax.conv_general_dilated` (best on GPU/TPU);
* ``im2col``: the kh*kw shifted views concatenated on the channel axis, then
  one matmul with the reshaped kernel;
* ``im2col_t``: the same patches laid out transposed, one row per kernel
  tap and input channel. The kernel gradient is then a plain matmul of them
  with the output gradient, where ``im2col`` makes XLA transpose the output
  gradient first: cheaper when the patches are few (few input channels);
* ``shifted``: a sum of kh*kw matmuls of shifted views;
* ``auto``: ``xla`` on GPU/TPU; on CPU ``im2col_t`` for convolutions of few
  input channels (the first layer) and ``im2col`` for the others, the fastest
  whole training step measured (experiments/PERFORMANCE.md). On CPU, ``xla``
  is the one to avoid inside `lax.scan`: XLA:CPU runs the kernel-gradient
  convolution in a loop body with a naive emitter, tens of times slower
  (jax-ml/jax#12868), and the Trainer scans its steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('xla', 'im2col', 'im2col_t', 'shifted', 'auto')
# On CPU, 'auto' uses 'im2col_t' up to this many input channels, else 'im2col'.
TRANSPOSED_MAX_IN_FEATURES = 3


def resolve_impl(impl: str, in_features: int | None = None) -> str:
  """Maps 'auto' to the fastest implementation for the default backend.

  ``in_features`` (the convolution's input channels) refines the CPU choice;
  without it, CPU gets ``im2col``.
  """
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    if in_features is not None and in_features <= TRANSPOSED_MAX_IN_FEATURES:
      return 'im2col_t'
    return 'im2col'
  if impl not in IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; choose from {IMPLS}')
  return impl


def _shifted_views(x: jax.Array, kh: int, kw: int) -> list[jax.Array]:
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return [x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)]


def conv2d(x: jax.Array, kernel: jax.Array, padding: str = 'VALID',
           impl: str = 'auto') -> jax.Array:
  """Stride-1 NHWC convolution with an HWIO kernel, by the chosen impl."""
  kh, kw, cin, cout = kernel.shape
  impl = resolve_impl(impl, cin)
  if impl == 'xla':
    return lax.conv_general_dilated(
        x, kernel, (1, 1), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if padding == 'SAME':
    ph, pw = kh - 1, kw - 1
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                    (0, 0)))
  elif padding != 'VALID':
    raise ValueError(f'padding must be VALID or SAME, got {padding!r}')
  views = _shifted_views(x, kh, kw)
  if impl == 'im2col':
    patches = jnp.concatenate(views, axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)
  if impl == 'im2col_t':
    n, oh, ow, _ = views[0].shape
    patches_t = jnp.stack(views).transpose(0, 4, 1, 2, 3).reshape(
        kh * kw * cin, n * oh * ow)
    y = lax.dot_general(patches_t, kernel.reshape(kh * kw * cin, cout),
                        (((0,), (0,)), ((), ())))
    return y.reshape(n, oh, ow, cout)
  out = None
  for view, w in zip(views, kernel.reshape(kh * kw, cin, cout)):
    y = view @ w
    out = y if out is None else out + y
  return out


class Conv(nn.Module):
  """`nn.Conv` (stride 1, VALID/SAME) with a selectable implementation."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: str = 'VALID'
  use_bias: bool = True
  impl: str = 'auto'
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = conv2d(x.astype(dtype), kernel.astype(dtype), self.padding, self.impl)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y
