"""The model registry: ``--model`` names, their settings, and how a `Config`
builds each model.

A model is one Flax module class in `cnn_jax.models` and one entry in
`MODELS`. Its settings (``--model_options``) are the module's own dataclass
fields of plain types (ints, floats, bools, strings, lists of ints), read from
the class itself: adding a field to a module makes it settable from flags,
flagfiles and ablation variants, recorded in ``config.json``. Layer-type
fields (``conv``, ``norm``, ...), ``dtype`` and ``num_classes`` are set here,
not by the user.

This is also the one place that swaps in `cnn_jax.kernels` for training
(``--kernels``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import kernels, models
from cnn_jax.config import Config, CnnJaxError


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered model: its Flax module and the field that
  ``--width_multiplier`` scales (empty: the model has no such field)."""

  module: type[nn.Module]
  widths: str = ''


MODELS: dict[str, Entry] = {
    'simple_cnn': Entry(models.SimpleCNN, widths='features'),
    'deep_cnn': Entry(models.DeepCNN, widths='stage_features'),
    'mlp': Entry(models.MLP, widths='hidden'),
}

# Fields a user never sets: the dataset gives the classes, --dtype the dtype.
_SET_HERE = frozenset({'num_classes', 'dtype', 'parent', 'name'})
# Annotation (as written in models.py) -> the kind of value it takes.
_KINDS = {'int': 'int', 'float': 'float', 'bool': 'bool', 'str': 'str',
          'Sequence[int]': 'ints', 'tuple[int, ...]': 'ints'}
_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')


@dataclasses.dataclass(frozen=True)
class Option:
  """One setting of a model: a field of its module."""

  name: str
  kind: str  # int, float, bool, str or ints.
  default: Any

  def text(self, value: Any) -> str:
    """``value`` as written in ``--model_options``."""
    if self.kind == 'ints':
      return ','.join(str(v) for v in value)
    if self.kind == 'bool':
      return str(bool(value)).lower()
    return f'{value:g}' if self.kind == 'float' else str(value)

  def parse(self, model: str, value: Any) -> Any:
    """``value`` (text from a flag, or JSON) as this option's type, checked:
    counts and widths are positive, a ``*rate`` is in [0, 1)."""
    def bad(why: str) -> CnnJaxError:
      return CnnJaxError(f'--model_options: {self.name}={_show(value)} for '
                         f'--model={model} {why}')
    if self.kind == 'ints':
      parts = value.split(',') if isinstance(value, str) else list(value)
      try:
        out = [int(str(p).strip()) for p in parts]
      except ValueError:
        raise bad('must be whole numbers separated by commas') from None
      if not out or min(out) <= 0:
        raise bad('must be positive whole numbers')
      return out
    if self.kind == 'bool':
      if isinstance(value, bool):
        return value
      text = str(value).strip().lower()
      if text not in _TRUE + _FALSE:
        raise bad('must be true or false')
      return text in _TRUE
    if self.kind == 'str':
      return str(value)
    try:
      number = (int(str(value)) if self.kind == 'int' else float(value))
    except ValueError:
      raise bad(f'must be {"a whole number" if self.kind == "int" else "a number"}'
                ) from None
    if self.name.endswith('rate'):
      if not 0 <= number < 1:
        raise bad('must be in [0, 1)')
    elif not (math.isfinite(number) and number > 0):
      raise bad('must be positive')
    return number


def _show(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return ','.join(map(str, value))
  return str(value)


def entry(model: str) -> Entry:
  """The registry entry of ``--model``, or a one-line error listing them."""
  if model not in MODELS:
    raise CnnJaxError(f'unknown --model={model!r}; choose one of: '
                      f'{", ".join(MODELS)}')
  return MODELS[model]


def _annotation(tp: Any) -> str:
  """A field's type as written: ``int``, ``Sequence[int]``, ..."""
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace('typing.', '').replace('collections.abc.', '')


def options(model: str) -> dict[str, Option]:
  """The settings of ``model``: its module's fields of plain types."""
  out = {}
  for f in dataclasses.fields(entry(model).module):
    kind = _KINDS.get(_annotation(f.type))
    if f.name in _SET_HERE or kind is None:
      continue
    default = f.default
    if kind == 'ints':
      default = list(default)
    out[f.name] = Option(f.name, kind, default)
  return out


def options_help() -> str:
  """Every model's settings and defaults, for ``--model_options``'s help."""
  return '; '.join(
      f'{name}: ' + ', '.join(f'{o.name}={o.text(o.default)}'
                              for o in options(name).values())
      for name in MODELS)


def parse_options(text: str | Sequence[str]) -> dict[str, str]:
  """``key=value,key=value`` (one string, or several merged in order, later
  keys winning) as raw ``{key: value}``. A list takes several values:
  ``features=32,64,64,dense_features=128`` (a part without ``=`` continues
  the previous value)."""
  out: dict[str, str] = {}
  for chunk in [text] if isinstance(text, str) else text:
    key = None
    for part in chunk.split(','):
      part = part.strip()
      if not part:
        continue
      if '=' in part:
        key, _, value = part.partition('=')
        key = key.strip()
        if not key.isidentifier():
          raise CnnJaxError(f'--model_options: {part!r} is not key=value')
        out[key] = value.strip()
      elif key is None:
        raise CnnJaxError(f'--model_options={chunk!r}: write key=value '
                          'pairs separated by commas, e.g. dropout_rate=0.5')
      else:
        out[key] += ',' + part
  return out


def normalize_options(model: str, given: Mapping[str, Any]) -> dict[str, Any]:
  """``given`` (text or JSON values) checked against ``model``'s fields and
  typed, without the ones equal to the module's default: the canonical form
  ``config.json`` records, so equal models compare equal."""
  known = options(model)
  unknown = sorted(set(given) - set(known))
  if unknown:
    listed = ', '.join(f'{o.name}={o.text(o.default)}' for o in known.values())
    raise CnnJaxError(f'--model_options: --model={model} has no '
                      f'{", ".join(unknown)}; its options (defaults): '
                      f'{listed or "none"}')
  out = {}
  for name, value in given.items():
    value = known[name].parse(model, value)
    if value != known[name].default:
      out[name] = value
  return dict(sorted(out.items()))


def describe_options(config: Config) -> str:
  """The model's settings as ``key=value`` text, set ones and defaults."""
  if config.model not in MODELS:
    return ''
  return ', '.join(
      f'{o.name}={o.text(config.model_options.get(o.name, o.default))}'
      for o in options(config.model).values())


# Keys of config.json files written before --model_options, and the field
# each became (the entry's width field for conv_features).
LEGACY_KEYS = ('conv_features', 'dense_features', 'batch_norm',
               'dropout_rate')


def upgrade_legacy(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config dict with the pre-``--model_options`` per-model keys
  moved into ``model_options`` (for the fields the model has)."""
  saved = dict(saved)
  legacy = {k: saved.pop(k) for k in LEGACY_KEYS if k in saved}
  if not legacy or saved.get('model') not in MODELS:
    return saved
  model = saved['model']
  fields = options(model)
  moved = dict(saved.get('model_options') or {})
  target = {'conv_features': MODELS[model].widths}
  for key, value in legacy.items():
    name = target.get(key, key)
    unset = value is None or (key == 'conv_features' and not value) or (
        key == 'dense_features' and value == 0)  # The old "default" values.
    if name not in fields or unset:
      continue
    moved.setdefault(name, value)
  saved['model_options'] = normalize_options(model, moved)
  return saved


def _module_kwargs(config: Config, num_classes: int) -> dict[str, Any]:
  """The module's constructor arguments: the options, widths scaled."""
  spec = entry(config.model)
  kwargs = dict(normalize_options(config.model, config.model_options))
  if spec.widths and config.width_multiplier != 1.0:
    base = kwargs.get(spec.widths, options(config.model)[spec.widths].default)
    kwargs[spec.widths] = [max(1, round(w * config.width_multiplier))
                           for w in base]
  for name, value in kwargs.items():
    if isinstance(value, list):
      kwargs[name] = tuple(value)
  return {'num_classes': num_classes, **kwargs}


def create_model(config: Config, num_classes: int, training: bool = True,
                 backend: str | None = None) -> nn.Module:
  """The module ``config.model`` names, for ``num_classes`` classes.

  ``training=True`` swaps in the kernels ``config.kernels`` selects for
  ``backend`` (default: JAX's); forward-only uses get stock Flax layers.
  Either way the parameters are the same, so a checkpoint serves both.
  """
  model = entry(config.model).module(**_module_kwargs(config, num_classes))
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

