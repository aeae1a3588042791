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
* ``hybrid``: XLA's convolution for the forward pass and, as a convolution of
  the padded output gradient with the flipped kernel, for the input
  gradient; the kernel gradient is one matmul of kw width-shifted copies of
  the input with kh height-shifted (zero-padded) copies of the output
  gradient, 3+3 copies where im2col makes 9 (a custom VJP);
* ``auto``: ``xla`` on GPU/TPU; on CPU ``im2col_t`` for convolutions of few
  input channels (the first layer), ``hybrid`` for large outputs (and, for
  convolutions without a bias, i.e. feeding batch norm, medium and small
  ones), and ``im2col`` for the rest: the fastest whole training steps
  measured (experiments/PERFORMANCE.md).
  On CPU, ``xla`` is the one to avoid inside `lax.scan`: XLA:CPU runs the
  kernel-gradient convolution in a loop body with a naive emitter, tens of
  times slower (jax-ml/jax#12868), and the Trainer scans its steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('xla', 'im2col', 'im2col_t', 'shifted', 'hybrid', 'auto')
# On CPU, 'auto' uses 'im2col_t' up to this many input channels; 'hybrid'
# from this many output pixels (oh * ow) on, or from the second number on
# for convolutions without a bias; else 'im2col'. Measured: DeepCNN's
# conv1_2 (576 pixels) trains much faster as 'hybrid', its conv2_1 (100, no
# bias, feeding batch norm) ~5% faster and its conv2_2 (64, no bias) 2-4%;
# SimpleCNN's conv2 (121, bias) and DeepCNN's conv2_1 without batch norm no
# faster or 2% slower.
TRANSPOSED_MAX_IN_FEATURES = 3
HYBRID_MIN_OUT_PIXELS = {True: 256, False: 64}  # by use_bias
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str, in_features: int | None = None,
                 out_pixels: int | None = None, use_bias: bool = True) -> str:
  """Maps 'auto' to the fastest implementation for the default backend.

  ``in_features`` (the convolution's input channels), ``out_pixels`` (its
  output height * width) and ``use_bias`` refine the CPU choice; without
  them, CPU gets ``im2col``.
  """
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    if in_features is not None and in_features <= TRANSPOSED_MAX_IN_FEATURES:
      return 'im2col_t'
    threshold = HYBRID_MIN_OUT_PIXELS[bool(use_bias)]
    if out_pixels is not None and out_pixels >= threshold:
      return 'hybrid'
    return 'im2col'
  if impl not in IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; choose from {IMPLS}')
  return impl


def _shifted_views(x: jax.Array, kh: int, kw: int) -> list[jax.Array]:
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return [x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)]


def _xla_valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  # XLA:CPU (jaxlib 0.10) hands an unpadded convolution to YNNPACK, which
  # ran DeepCNN's conv1_2 ~5x slower (28 vs 6 ms a step) than the same
  # convolution with one row of zero padding, whose extra output row is
  # sliced off here.
  y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 0), (0, 0)),
                               dimension_numbers=_DIMENSION_NUMBERS)
  return y[:, 1:]


def _input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """Gradient of a VALID convolution wrt its input, as a convolution.

  The same convolution that autodiff would emit, but written out so that
  XLA:CPU runs it through its fast path inside `lax.scan`: the transposed
  convolution from autodiff ran ~20x slower there.
  """
  kh, kw = kernel.shape[:2]
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  return lax.conv_general_dilated(g, flipped, (1, 1),
                                  ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """Gradient of a VALID convolution wrt its HWIO kernel, as one matmul.

  ``dk[i, j] = sum_{n,h,w} x[n, h+i, w+j]^T g[n, h, w]``. The kw shifts
  along the width are taken on the input and the kh shifts along the
  height on the output gradient, padded with zero rows to the input's
  height: ``(x shifted by j)^T (g shifted down by i)``, summed over every
  row, is the (j, i) block of one matmul. That copies 3 + 3 tensors for a
  3x3 kernel where im2col's patches copy the input 9 times.
  """
  cin, cout = x.shape[-1], g.shape[-1]
  h, ow = x.shape[1], g.shape[2]
  x_shifts = jnp.concatenate([x[:, :, j:j + ow] for j in range(kw)], axis=-1)
  g_shifts = jnp.concatenate(
      [jnp.pad(g, ((0, 0), (i, h - g.shape[1] - i), (0, 0), (0, 0)))
       for i in range(kh)], axis=-1)
  blocks = (x_shifts.reshape(-1, kw * cin).T
            @ g_shifts.reshape(-1, kh * cout))  # [(j, cin), (i, cout)]
  return blocks.reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3)


@jax.custom_vjp
def _hybrid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _xla_valid_conv(x, kernel)


def _hybrid_fwd(x: jax.Array, kernel: jax.Array):
  return _xla_valid_conv(x, kernel), (x, kernel)


def _hybrid_bwd(res, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = res
  kh, kw = kernel.shape[:2]
  return _input_grad(g, kernel), _kernel_grad(x, g, kh, kw)


_hybrid_conv.defvjp(_hybrid_fwd, _hybrid_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, padding: str = 'VALID',
           impl: str = 'auto', use_bias: bool = True) -> jax.Array:
  """Stride-1 NHWC convolution with an HWIO kernel, by the chosen impl.

  ``use_bias`` (whether a bias is added after) only informs ``auto``.
  """
  kh, kw, cin, cout = kernel.shape
  if padding == 'VALID':
    out_pixels = (x.shape[1] - kh + 1) * (x.shape[2] - kw + 1)
  else:
    out_pixels = x.shape[1] * x.shape[2]
  impl = resolve_impl(impl, cin, out_pixels, use_bias)
  if impl == 'xla':
    return lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS)
  if padding == 'SAME':
    ph, pw = kh - 1, kw - 1
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                    (0, 0)))
  elif padding != 'VALID':
    raise ValueError(f'padding must be VALID or SAME, got {padding!r}')
  if impl == 'hybrid':
    return _hybrid_conv(x, kernel)
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
    y = conv2d(x.astype(dtype), kernel.astype(dtype), self.padding, self.impl,
               self.use_bias)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y
