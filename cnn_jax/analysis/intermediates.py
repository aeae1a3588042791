"""What the real model computes inside: feature maps, kernels, saliency.

Feature maps come from Flax's ``capture_intermediates=True`` on the model's
own ``apply`` (plus what the models `sow`), never from a re-implementation of
the forward pass, so this works for every model in the registry: it keeps
all 4-D ``(N, H, W, C)`` intermediates in call order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import input_pipeline


@dataclasses.dataclass(frozen=True)
class FeatureMap:
  """One captured stage: its name (module path or sow name) and activations."""

  name: str
  value: np.ndarray  # float32 [N, H, W, C]


def named(tree: Any) -> list[tuple[str, Any]]:
  """Flattens an ``intermediates`` collection to (name, value), in order."""
  out = []
  for path, values in traverse_util.flatten_dict(tree).items():
    name = '/'.join(str(p) for p in path if p != '__call__') or 'output'
    for i, v in enumerate(values):
      out.append((name if len(values) == 1 else f'{name}#{i}', v))
  return out


def _capture_raw(model: nn.Module, variables: Any, x: jax.Array
                 ) -> list[tuple[str, jax.Array]]:
  """All intermediates of one eval-mode call, in call order, named."""
  _, state = model.apply(variables, x, train=False,
                         capture_intermediates=True,
                         mutable=['intermediates'])
  return named(state['intermediates'])


def traced(model: nn.Module, variables: Any, x: jax.Array
           ) -> list[tuple[str, jax.Array]]:
  """Every intermediate of one eval-mode call, named, in call order, not
  jitted: for callers that trace it inside a larger jitted program (the
  explorer compiles its whole update as one)."""
  return _capture_raw(model, variables, x)


def capture(model: nn.Module, variables: Any, x: jax.Array
            ) -> list[FeatureMap]:
  """Every 4-D intermediate of ``model.apply(variables, x, train=False)``.

  The call is jitted; names are read while tracing, since a jitted dict
  output would come back with sorted keys rather than in call order.
  Stages whose output equals the previous stage's exactly (identity modules
  such as dropout in eval mode) are dropped, as they repeat a map.
  """
  names: list[str] = []

  def run(variables: Any, x: jax.Array) -> list[jax.Array]:
    named = [(n, v) for n, v in _capture_raw(model, variables, x)
             if v.ndim == 4]
    names[:] = [n for n, _ in named]
    return [v.astype(jnp.float32) for _, v in named]

  values = jax.jit(run)(variables, x)
  maps: list[FeatureMap] = []
  for name, v in zip(names, values):
    v = np.asarray(v)
    if maps and maps[-1].value.shape == v.shape and np.array_equal(
        maps[-1].value, v):
      continue
    maps.append(FeatureMap(name, v))
  return maps


def channel_peaks(model: nn.Module, variables: Any, images: np.ndarray,
                  layers: Sequence[str], batch_size: int
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """For each layer: ``([N, C] maxima, [N, C, 2] (row, col) of each max)``.

  Each image's spatial maximum of each channel and where it is, so a
  layer's strongest responses can be traced back to the input patch its
  receptive field covers. ``images`` are uint8 NHWC; ``layers`` are names
  returned by `capture`. One pass over the images serves every layer.
  """
  layers = list(dict.fromkeys(layers))

  @jax.jit
  def peaks(variables: Any, batch: jax.Array) -> list[tuple[jax.Array, ...]]:
    found = dict(_capture_raw(model, variables,
                              input_pipeline.normalize(batch)))
    out = []
    for layer in layers:
      v = found[layer].astype(jnp.float32)
      flat = v.reshape(v.shape[0], -1, v.shape[-1])
      out.append((flat.max(axis=1), flat.argmax(axis=1), v.shape[2]))
    return [(m, a // w, a % w) for m, a, w in out]

  n = len(images)
  batch_size = min(batch_size, n)
  padded = np.concatenate(  # Whole batches: one compilation.
      [images, images[:(-n) % batch_size]]) if n % batch_size else images
  parts = [jax.device_get(peaks(variables, padded[i:i + batch_size]))
           for i in range(0, len(padded), batch_size)]
  result = {}
  for j, layer in enumerate(layers):
    maxima = np.concatenate([p[j][0] for p in parts])[:n]
    rows = np.concatenate([p[j][1] for p in parts])[:n]
    cols = np.concatenate([p[j][2] for p in parts])[:n]
    result[layer] = (maxima, np.stack([rows, cols], axis=-1))
  return result


def conv_kernels(params: Any, order: list[str]) -> list[tuple[str, np.ndarray]]:
  """``(module path, HWIO kernel)`` of every 4-D kernel, in call order.

  ``order`` is a list of stage names in call order (from `capture`); kernels
  of modules absent from it come last, in parameter-tree order.
  """
  rank = {name: i for i, name in enumerate(order)}
  found = [('/'.join(path[:-1]), np.asarray(v, np.float32))
           for path, v in traverse_util.flatten_dict(params).items()
           if path[-1] == 'kernel' and np.ndim(v) == 4]
  return sorted(found, key=lambda kv: rank.get(kv[0], len(rank)))


def saliency(model: nn.Module, variables: Any, x: jax.Array,
             classes: np.ndarray) -> np.ndarray:
  """``[N, H, W]``: |d logit[class] / d input|, max over input channels.

  In eval mode examples do not interact, so the gradient of the summed
  chosen logits gives every example's own input gradient.
  """
  classes = jnp.asarray(classes)

  def chosen_logits(inputs: jax.Array, variables: Any) -> jax.Array:
    logits = model.apply(variables, inputs, train=False)
    return jnp.take_along_axis(logits, classes[:, None], axis=1).sum()

  grads = jax.jit(jax.grad(chosen_logits))(x.astype(jnp.float32), variables)
  return np.asarray(jnp.abs(grads).max(axis=-1), np.float32)
