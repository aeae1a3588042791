"""`Conv`: a drop-in for `flax.linen.Conv` with faster gradients on CPU.

XLA:CPU's own convolution is fast forward, but its gradients are slow for the
small, few-channel convolutions of MNIST CNNs, and tens of times slower inside
`lax.scan`, where the trainer runs its steps (jax-ml/jax#12868). `Conv` has
exactly the parameters of `nn.Conv` (an HWIO ``kernel`` and a ``bias``, same
names, shapes and initializers), so checkpoints do not depend on it, and
computes the same values by one of:

* ``im2col``: the kh*kw shifted views of the input concatenated on the
  channel axis, then one matmul with the reshaped kernel; autodiff's
  gradients are matmuls too;
* ``im2col_t``: the same patches laid out transposed, one row per kernel tap
  and input channel, so the kernel gradient is a plain matmul with the output
  gradient (``im2col`` makes XLA transpose the output gradient first): the
  cheaper layout when the patches are few (few input channels);
* ``hybrid``: XLA's convolution forward, and as a convolution of the padded
  output gradient with the flipped kernel for the input gradient; the kernel
  gradient is one matmul of kw width-shifted copies of the input with kh
  height-shifted copies of the output gradient (3 + 3 copies where im2col
  makes 9), all in a custom VJP (its convolutions run member by member
  under `jax.vmap`, where XLA:CPU's grouped convolutions are slow);
* ``auto`` (the default) picks per layer from its shape: ``im2col_t`` for few
  input channels, ``hybrid`` for large outputs, ``im2col`` otherwise.

Stride 1 and VALID or SAME padding only: what the models use.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_batching, lax

IMPLS = ('im2col', 'im2col_t', 'hybrid', 'auto')
# 'auto': 'im2col_t' up to this many input channels; 'hybrid' from this many
# output pixels (oh * ow) on, by whether the convolution has a bias (without
# one it feeds batch norm, whose fused gradient leaves the convolution a
# larger share of the step); else 'im2col'. From whole-step timings of both
# models (experiments/PERFORMANCE.md).
TRANSPOSED_MAX_IN_FEATURES = 3
HYBRID_MIN_OUT_PIXELS = {True: 256, False: 64}
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str, in_features: int, out_pixels: int,
                 use_bias: bool = True) -> str:
  """The implementation ``auto`` stands for at this layer's shape."""
  if impl not in IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; choose from '
                     f'{IMPLS}')
  if impl != 'auto':
    return impl
  if in_features <= TRANSPOSED_MAX_IN_FEATURES:
    return 'im2col_t'
  if out_pixels >= HYBRID_MIN_OUT_PIXELS[bool(use_bias)]:
    return 'hybrid'
  return 'im2col'


def _shifted_views(x: jax.Array, kh: int, kw: int) -> list[jax.Array]:
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return [x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)]


def _per_member(f):
  """``f(x, kernel)``, batched by `jax.vmap` one member at a time.

  Under `jax.vmap` over both operands (the members of a ``--num_models``
  run), XLA's convolution becomes a grouped convolution, which XLA:CPU runs
  several times slower than the members' convolutions one after another.
  A batched input alone folds into the image batch.
  """
  g = custom_batching.custom_vmap(f)

  @g.def_vmap
  def rule(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if kernel_batched:
      if not x_batched:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
      return lax.map(lambda a: f(*a), (x, kernel)), True
    y = f(x.reshape(-1, *x.shape[2:]), kernel)
    return y.reshape(axis_size, -1, *y.shape[1:]), True

  return g


@_per_member
def _xla_valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  # XLA:CPU hands an unpadded convolution to YNNPACK, which runs it several
  # times slower in a training step than the same convolution with one row
  # of zero padding, whose extra output row is sliced off here.
  y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 0), (0, 0)),
                               dimension_numbers=_DIMENSION_NUMBERS)
  return y[:, 1:]


@_per_member
def _input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """Gradient of a VALID convolution wrt its input, as a convolution.

  What autodiff would compute, written out so that XLA:CPU runs it through
  its fast path inside `lax.scan` instead of a transposed convolution.
  """
  kh, kw = kernel.shape[:2]
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  return lax.conv_general_dilated(g, flipped, (1, 1),
                                  ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """Gradient of a VALID convolution wrt its HWIO kernel, as one matmul.

  ``dk[i, j] = sum_{n,h,w} x[n, h+i, w+j]^T g[n, h, w]``: the kw shifts along
  the width are taken on the input and the kh shifts along the height on the
  output gradient, zero-padded to the input's height, so ``(x shifted by
  j)^T (g shifted down by i)`` summed over every row is the (j, i) block of
  one matmul.
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
  if padding == 'SAME':
    ph, pw = kh - 1, kw - 1
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                    (0, 0)))
  elif padding != 'VALID':
    raise ValueError(f'padding must be VALID or SAME, got {padding!r}')
  n, oh, ow = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
  impl = resolve_impl(impl, cin, oh * ow, use_bias)
  if impl == 'hybrid':
    return _hybrid_conv(x, kernel)
  views = _shifted_views(x, kh, kw)
  if impl == 'im2col':
    patches = jnp.concatenate(views, axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)
  patches_t = jnp.stack(views).transpose(0, 4, 1, 2, 3).reshape(
      kh * kw * cin, n * oh * ow)
  y = lax.dot_general(patches_t, kernel.reshape(kh * kw * cin, cout),
                      (((0,), (0,)), ((), ())))
  return y.reshape(n, oh, ow, cout)


class Conv(nn.Module):
  """`nn.Conv` (stride 1, VALID/SAME padding) computed by `conv2d`."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: str = 'SAME'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  impl: str = 'auto'

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
