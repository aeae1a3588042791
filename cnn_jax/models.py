"""The CNNs, as plain Flax Linen modules.

Each is called as ``model.apply(variables, x, train=...)`` on NHWC float
images and returns float32 logits. ``train`` switches batch norm to batch
statistics (updating ``batch_stats``) and enables dropout (which needs a
``dropout`` rng). The layer types are fields with stock Flax defaults, as in
the Flax ImageNet example; `cnn_jax.kernels` has CPU drop-ins for them.

Every stage's activations are `sow`n into ``intermediates`` under readable
names (``conv1_relu``, ``pool1``, ...), so ``capture_intermediates=True,
mutable=['intermediates']`` exposes them all for analysis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2 (an odd last row or column is dropped)."""
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class SimpleCNN(nn.Module):
  """The seed model: Conv 32 -> pool -> Conv 64 -> pool -> Conv 64 -> Dense 64.

  3x3 VALID convolutions with ReLU; 93,322 params on 28x28x1 images.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 64)
  dense_features: int = 64
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  pool: Callable[[jax.Array], jax.Array] = max_pool_2x2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No batch norm or dropout.
    x = x.astype(self.dtype)
    for i, features in enumerate(self.features, start=1):
      x = self.conv(features, (3, 3), padding='VALID', dtype=self.dtype,
                    name=f'conv{i}')(x)
      x = nn.relu(x)
      self.sow('intermediates', f'conv{i}_relu', x)
      if i < len(self.features):
        x = self.pool(x)
        self.sow('intermediates', f'pool{i}', x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype,
                         name='dense1')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


class DeepCNN(nn.Module):
  """Stages of [Conv 3x3 -> BatchNorm -> ReLU] x 2, max-pool, dropout; then
  Dense -> BatchNorm -> ReLU -> dropout -> Dense.

  Convolutions feeding batch norm have no bias (its ``bias`` replaces it).
  """

  num_classes: int = 10
  stage_features: Sequence[int] = (32, 64)
  convs_per_stage: int = 2
  dense_features: int = 128
  dropout_rate: float = 0.25
  batch_norm: bool = True
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  dropout: ModuleDef = nn.Dropout
  pool: Callable[[jax.Array], jax.Array] = max_pool_2x2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(self.norm, use_running_average=not train,
                             momentum=0.9, dtype=self.dtype)
    dropout = functools.partial(self.dropout, self.dropout_rate,
                                deterministic=not train)
    x = x.astype(self.dtype)
    for s, features in enumerate(self.stage_features, start=1):
      for c in range(1, self.convs_per_stage + 1):
        x = self.conv(features, (3, 3), padding='VALID',
                      use_bias=not self.batch_norm, dtype=self.dtype,
                      name=f'conv{s}_{c}')(x)
        if self.batch_norm:
          x = norm(name=f'bn{s}_{c}')(x)
        x = nn.relu(x)
        self.sow('intermediates', f'conv{s}_{c}_relu', x)
      x = self.pool(x)
      self.sow('intermediates', f'pool{s}', x)
      x = dropout()(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.dense_features, use_bias=not self.batch_norm,
                 dtype=self.dtype, name='dense1')(x)
    if self.batch_norm:
      x = norm(name='bn_dense1')(x)
    x = dropout()(nn.relu(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


class MLP(nn.Module):
  """A dense baseline: flatten -> [Dense -> ReLU] per hidden layer -> Dense.

  No layer knows which pixels are neighbours, so any fixed permutation of the
  pixels is the same problem to it. One hidden layer of 117 units has 93,025
  params on 28x28x1 images, about SimpleCNN's 93,322.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (117,)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No batch norm or dropout.
    x = x.astype(self.dtype).reshape((x.shape[0], -1))
    for i, features in enumerate(self.hidden, start=1):
      x = nn.relu(nn.Dense(features, dtype=self.dtype, name=f'dense{i}')(x))
      self.sow('intermediates', f'dense{i}_relu', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)


def init_variables(model: nn.Module, key: jax.Array,
                   image_shape: Sequence[int]) -> dict[str, Any]:
  """``{'params': ..., ['batch_stats': ...]}`` for images of this shape."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return dict(jax.jit(lambda k: model.init({'params': k}, x, train=False))(
      key))


def abstract_variables(model: nn.Module, image_shape: Sequence[int]
                       ) -> dict[str, Any]:
  """The shapes and dtypes of `init_variables`'s tree, without computing it.

  Restoring a checkpoint only needs these; tracing is much cheaper than
  compiling the random initializers.
  """
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return dict(jax.eval_shape(
      lambda k, x: model.init({'params': k}, x, train=False), key, x))


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
