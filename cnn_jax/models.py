"""The CNNs, as Flax Linen modules, and a registry that builds them.

Every model is called as ``model.apply(variables, x, train=...)`` on NHWC
float images and returns logits. Post-activation and pooled feature maps are
`sow`n into the ``intermediates`` collection under readable names, so
``capture_intermediates=True, mutable=['intermediates']`` exposes every stage
of any registered model without per-model analysis code.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.config import Config, CnnJaxError
from cnn_jax.conv import Conv
from cnn_jax.layers import BatchNorm, Dropout


def max_pool_2x2(x: jax.Array, impl: str = 'auto') -> jax.Array:
  """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped).

  ``reduce_window`` is ``nn.max_pool`` with its own gradient, which XLA:CPU
  computes with a slow select-and-scatter. ``mask_grad`` has the same
  forward but takes the gradient as a mask of each window's maximum (the
  gradient ``jnp.max`` would give): SimpleCNN trains ~2x faster on CPU
  (experiments/PERFORMANCE.md). The two differ only on exact ties inside a
  window, where ``mask_grad`` shares the gradient instead of giving it to
  one input; after a ReLU the usual ties are zeros, whose gradient is zero
  either way. ``auto`` is ``mask_grad`` on CPU, ``reduce_window`` elsewhere.
  """
  if impl == 'auto':
    impl = 'mask_grad' if jax.default_backend() == 'cpu' else 'reduce_window'
  if impl == 'mask_grad':
    return _max_pool_mask_grad(x)
  if impl == 'reduce_window':
    return _reduce_window_pool(x)
  raise ValueError(f'unknown pooling implementation {impl!r}')


def _reduce_window_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


_max_pool_mask_grad = jax.custom_vjp(_reduce_window_pool)


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _reduce_window_pool(x), x


def _max_pool_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  # The maxima are recomputed from the saved input rather than saved: XLA
  # may recompute the input in a differently fused (differently rounded)
  # way, and a mask against maxima of other bits could be empty (0/0).
  # The four taps of each window are separate strided views combined
  # elementwise, so XLA fuses the whole gradient into one pass; reductions
  # over a window axis ran as separate passes, ~1.2x slower SimpleCNN steps.
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  windows = x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c)
  taps = [windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]
  top = jnp.maximum(jnp.maximum(taps[0], taps[1]),
                    jnp.maximum(taps[2], taps[3]))
  masks = [(t == top).astype(g.dtype) for t in taps]
  share = g / (masks[0] + masks[1] + masks[2] + masks[3])
  gx = jnp.stack([m * share for m in masks], axis=3)  # n, h2, w2, (i, j), c
  gx = gx.reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  gx = gx.reshape(n, 2 * h2, 2 * w2, c)
  return (jnp.pad(gx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


_max_pool_mask_grad.defvjp(_max_pool_fwd, _max_pool_bwd)


def _relu_and_pool(module: nn.Module, x: jax.Array, name: str,
                   pool_impl: str, train: bool) -> jax.Array:
  """``max_pool(relu(x))``, in the order that is faster for the pass.

  ReLU is monotonic, so it commutes with taking a maximum: same values and
  gradients in either order. Forward-only passes pool first, so the ReLU
  runs on a quarter of the elements (11-25% faster evaluation on CPU);
  training steps apply the ReLU first, where XLA fuses it into the pass
  that produces ``x`` (DeepCNN +1.5%, SimpleCNN +3-5% per training step on
  CPU). The full-size ReLU output is sown as ``name`` for feature-map
  analysis; when intermediates are not collected, XLA drops it.
  """
  relu = nn.relu(x)
  module.sow('intermediates', name, relu)
  if train:
    return max_pool_2x2(relu, pool_impl)
  return nn.relu(max_pool_2x2(x, pool_impl))


def layer_conv_impls(conv_impl: str, num_convs: int) -> tuple[str, ...]:
  """Per-layer conv impls from ``'auto'``-style names or ``'a/b/c'`` lists."""
  impls = tuple(conv_impl.split('/'))
  if len(impls) == 1:
    return impls * num_convs
  if len(impls) != num_convs:
    raise CnnJaxError(f'--conv_impl={conv_impl!r} names {len(impls)} '
                      f'implementations; the model has {num_convs} conv layers')
  return impls


class SimpleCNN(nn.Module):
  """The seed model: 3 VALID 3x3 convs (32, 64, 64), 2 max-pools, 2 denses.

  With the default widths on 28x28x1 inputs it has exactly 93,322 params.
  ``conv_impl`` is one implementation name or one per conv layer ('a/b/c').
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 64)
  dense_features: int = 64
  conv_impl: str = 'auto'
  pool_impl: str = 'auto'
  dtype: Any = jnp.float32

  @property
  def num_convs(self) -> int:
    return len(self.features)

  def _conv_relu_pool(self, conv: Conv, x: jax.Array, name: str,
                      train: bool) -> jax.Array:
    """``max_pool(relu(conv(x)))``, computing only what the pool reads.

    The 2x2 pool drops an odd last row and column of the conv's output
    (conv2's 11x11 -> 5x5), so in training, unless feature maps are being
    collected, the conv runs on an input cropped to give an even output:
    ~17% less work in conv2, same values, +14% SimpleCNN training steps on
    CPU. (Not in eval: XLA's forward convolution of the cropped input made
    evaluation ~20% slower.)
    """
    if train and not self.is_mutable_collection('intermediates'):
      kh, kw = conv.kernel_size
      oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
      x = x[:, :oh // 2 * 2 + kh - 1, :ow // 2 * 2 + kw - 1]
    return _relu_and_pool(self, conv(x), name, self.pool_impl, train)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # train only changes how the pooled convs are computed (same values).
    x = x.astype(self.dtype)
    impls = layer_conv_impls(self.conv_impl, self.num_convs)
    for i, (features, impl) in enumerate(zip(self.features, impls), start=1):
      conv = Conv(features, padding='VALID', impl=impl, dtype=self.dtype,
                  name=f'conv{i}')
      if i < len(self.features):
        x = self._conv_relu_pool(conv, x, f'conv{i}_relu', train)
        self.sow('intermediates', f'pool{i}', x)
      else:
        x = nn.relu(conv(x))
        self.sow('intermediates', f'conv{i}_relu', x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype,
                         name='dense1')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


class DeepCNN(nn.Module):
  """Deeper CNN: stages of [conv -> BN -> ReLU] x n, max-pool, dropout.

  Then a hidden dense layer with BN and dropout. Batch statistics live in the
  ``batch_stats`` collection; ``train=True`` updates them and enables dropout
  (needs a ``dropout`` rng), ``train=False`` uses running averages. Batch
  norm and dropout are `cnn_jax.layers`' (Flax's semantics and variables,
  faster gradients and masks).
  """

  num_classes: int = 10
  stage_features: Sequence[int] = (32, 64)
  convs_per_stage: int = 2
  dense_features: int = 128
  dropout_rate: float = 0.25
  batch_norm: bool = True
  conv_impl: str = 'auto'
  pool_impl: str = 'auto'
  dtype: Any = jnp.float32

  @property
  def num_convs(self) -> int:
    return len(self.stage_features) * self.convs_per_stage

  def _norm(self, x: jax.Array, train: bool, name: str) -> jax.Array:
    if not self.batch_norm:
      return x
    return BatchNorm(use_running_average=not train, momentum=0.9,
                     dtype=self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    impls = iter(layer_conv_impls(self.conv_impl, self.num_convs))
    for s, features in enumerate(self.stage_features, start=1):
      for c in range(1, self.convs_per_stage + 1):
        tag = f'{s}_{c}'
        x = Conv(features, padding='VALID', use_bias=not self.batch_norm,
                 impl=next(impls), dtype=self.dtype, name=f'conv{tag}')(x)
        x = self._norm(x, train, f'bn{tag}')
        if c < self.convs_per_stage:
          x = nn.relu(x)
          self.sow('intermediates', f'conv{tag}_relu', x)
      x = _relu_and_pool(self, x, f'conv{tag}_relu', self.pool_impl, train)
      self.sow('intermediates', f'pool{s}', x)
      x = Dropout(self.dropout_rate, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.dense_features, use_bias=not self.batch_norm,
                 dtype=self.dtype, name='dense1')(x)
    x = nn.relu(self._norm(x, train, 'bn_dense1'))
    x = Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


def _widths(base: Sequence[int], multiplier: float) -> tuple[int, ...]:
  return tuple(max(1, round(w * multiplier)) for w in base)


def _simple_cnn(config: Config, num_classes: int, dtype: Any) -> nn.Module:
  return SimpleCNN(num_classes=num_classes,
                   features=_widths((32, 64, 64), config.width_multiplier),
                   dense_features=config.dense_features or 64,
                   conv_impl=config.conv_impl,
                   pool_impl=config.pool_impl, dtype=dtype)


def _deep_cnn(config: Config, num_classes: int, dtype: Any) -> nn.Module:
  return DeepCNN(num_classes=num_classes,
                 stage_features=_widths((32, 64), config.width_multiplier),
                 dense_features=config.dense_features or 128,
                 dropout_rate=config.dropout_rate,
                 batch_norm=config.batch_norm,
                 conv_impl=config.conv_impl,
                 pool_impl=config.pool_impl, dtype=dtype)


MODEL_REGISTRY: dict[str, Callable[[Config, int, Any], nn.Module]] = {
    'simple_cnn': _simple_cnn,
    'deep_cnn': _deep_cnn,
}


def create_model(config: Config, num_classes: int) -> nn.Module:
  """Builds the registered model named by ``config.model``."""
  if config.model not in MODEL_REGISTRY:
    raise CnnJaxError(f'unknown --model={config.model!r}; choose one of: '
                      f'{", ".join(MODEL_REGISTRY)}')
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  model = MODEL_REGISTRY[config.model](config, num_classes, dtype)
  layer_conv_impls(config.conv_impl, model.num_convs)  # Fail now, not at init.
  return model


def for_inference(model: nn.Module) -> nn.Module:
  """The same model (same params) for forward-only passes: eval, predict.

  With ``conv_impl='auto'`` training on CPU uses im2col or hybrid convs,
  because XLA:CPU's kernel gradient of its own convolution is very slow
  inside ``lax.scan``; without gradients XLA's plain convolution is the
  fastest (3x eval throughput for SimpleCNN here, and ~2x the hybrid's
  padded forward; experiments/PERFORMANCE.md). Per-layer lists are kept.
  """
  if getattr(model, 'conv_impl', None) == 'auto':
    return model.clone(conv_impl='xla')
  return model


def init_variables(model: nn.Module, key: jax.Array,
                   image_shape: Sequence[int]) -> dict[str, Any]:
  """Initializes ``{'params': ..., ['batch_stats': ...]}`` for one image shape."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(lambda k: model.init({'params': k}, x, train=False))(key)
  return dict(variables)


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
