"""The model registry: ``--model`` names and how a `Config` builds each model.

This is the one place that turns a config into a module, and the one place
that swaps in `cnn_jax.kernels` for training (``--kernels``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import kernels, models
from cnn_jax.config import Config, CnnJaxError


def _widths(config: Config, base: Sequence[int]) -> tuple[int, ...]:
  """Filters per layer: ``--conv_features``, else the default widths
  scaled by ``--width_multiplier``."""
  if config.conv_features:
    widths = tuple(int(w) for w in config.conv_features.split(','))
    if len(widths) != len(base):
      raise CnnJaxError(
          f'--conv_features={config.conv_features!r} gives {len(widths)} '
          f'widths; --model={config.model} takes {len(base)} (default '
          f'{",".join(map(str, base))})')
    return widths
  return tuple(max(1, round(w * config.width_multiplier)) for w in base)


def _simple_cnn(config: Config, num_classes: int) -> nn.Module:
  return models.SimpleCNN(
      num_classes=num_classes,
      features=_widths(config, (32, 64, 64)),
      dense_features=config.dense_features or 64)


def _deep_cnn(config: Config, num_classes: int) -> nn.Module:
  return models.DeepCNN(
      num_classes=num_classes,
      stage_features=_widths(config, (32, 64)),
      dense_features=config.dense_features or 128,
      dropout_rate=config.dropout_rate, batch_norm=config.batch_norm)


MODELS: dict[str, Callable[[Config, int], nn.Module]] = {
    'simple_cnn': _simple_cnn,
    'deep_cnn': _deep_cnn,
}


def create_model(config: Config, num_classes: int, training: bool = True,
                 backend: str | None = None) -> nn.Module:
  """The module ``config.model`` names, for ``num_classes`` classes.

  ``training=True`` swaps in the kernels ``config.kernels`` selects for
  ``backend`` (default: JAX's); forward-only uses get stock Flax layers.
  Either way the parameters are the same, so a checkpoint serves both.
  """
  if config.model not in MODELS:
    raise CnnJaxError(f'unknown --model={config.model!r}; choose one of: '
                      f'{", ".join(MODELS)}')
  model = MODELS[config.model](config, num_classes)
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  overrides: dict[str, Any] = {'dtype': dtype}
  if training:
    fields = {f.name for f in dataclasses.fields(model)}
    layers = kernels.training_layers(config.kernels,
                                     backend or jax.default_backend())
    overrides.update((k, v) for k, v in layers.items() if k in fields)
  return model.clone(**overrides)


def summary(config: Config, num_classes: int, image_shape: Sequence[int],
            width: int = 120) -> str:
  """The stock model as a table: each layer's input and output shapes and
  parameters, and the totals (Flax's ``nn.tabulate``, plain text).

  Traced with abstract values (``jax.eval_shape``): nothing is computed or
  compiled. Pooling and activations are functions, not modules, so they
  show only as the change of shape from one layer's output to the next
  one's input.
  """
  model = create_model(config, num_classes, training=False)
  x = np.zeros((1, *image_shape), np.float32)
  return nn.tabulate(model, jax.random.PRNGKey(0),
                     console_kwargs={'width': width, 'force_terminal': False}
                     )(x, train=False)
