"""absl flags for every `Config` field, and the `Config` they give.

Only entry points (``cnn_jax.main``, the experiment scripts) use this;
library code takes a plain `Config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import flags

from cnn_jax.config import Config, CnnJaxError, validate

# Flags that per-model settings replaced: each now is a --model_options key
# (conv_features: the model's width option, e.g. features or stage_features).
REPLACED_FLAGS = {
    'conv_features': 'the model\'s width option, e.g. '
                     '--model_options=features=64,64,64 (simple_cnn) or '
                     'stage_features=32,64 (deep_cnn)',
    'dense_features': '--model_options=dense_features=N',
    'batch_norm': '--model_options=batch_norm=true|false',
    'dropout_rate': '--model_options=dropout_rate=R',
}


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """One flag per Config field, with the field's default and help text;
  ``--model_options`` may be given several times (later keys win)."""
  from cnn_jax import registry  # Its help lists every model's options.
  definers = {'bool': flags.DEFINE_bool, 'int': flags.DEFINE_integer,
              'float': flags.DEFINE_float, 'str': flags.DEFINE_string}
  for f in dataclasses.fields(Config):
    help_text = f.metadata['help']
    if f.name == 'model_options':
      flags.DEFINE_multi_string(
          f.name, [], f'{help_text} Options (defaults): '
          f'{registry.options_help()}.', flag_values=flag_values)
      continue
    if f.name == 'model':
      help_text = f'{help_text[:-1]}: {", ".join(registry.MODELS)}.'
    definers[f.type](f.name, f.default, help_text, flag_values=flag_values)
  for name, replacement in REPLACED_FLAGS.items():
    define = flags.DEFINE_bool if name == 'batch_norm' else flags.DEFINE_string
    define(name, None, f'Replaced by {replacement}.', flag_values=flag_values)


def _replaced(flag_values: flags.FlagValues) -> None:
  """A one-line error for a replaced flag, naming what replaces it."""
  for name in REPLACED_FLAGS:
    if name in flag_values and flag_values[name].present:
      value = flag_values[name].value
      text = str(value).lower() if isinstance(value, bool) else value
      hint = (f'--model_options={name}={text}' if name != 'conv_features'
              else REPLACED_FLAGS[name])
      raise CnnJaxError(f'--{name} was replaced by --model_options; use '
                        f'{hint}')


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                      **overrides: Any) -> Config:
  """The validated Config given by parsed flags (and flagfiles)."""
  from cnn_jax import registry
  _replaced(flag_values)
  values = {}
  for f in dataclasses.fields(Config):
    value = flag_values[f.name].value
    if f.name == 'model_options':
      value = registry.parse_options(value or [])
    values[f.name] = value
  return validate(Config(**{**values, **overrides}))


def parse_argv(argv: Sequence[str]) -> flags.FlagValues:
  """``--name=value`` and ``--flagfile=PATH`` arguments parsed by absl, as
  ``cnn_jax.main`` parses them (later ones win), into private flags.

  Private `FlagValues`, so callers with flags of their own (a benchmark or
  sweep script) need not define cnn_jax's. Raises absl's `flags.Error`
  (unknown flag, bad value, unreadable flagfile).
  """
  flag_values = flags.FlagValues()
  define_config_flags(flag_values)
  flag_values(['cnn_jax', *argv])
  return flag_values


def config_from_argv(argv: Sequence[str], **overrides: Any) -> Config:
  """The validated Config those arguments give."""
  return config_from_flags(parse_argv(argv), **overrides)


def config_from_flagfile(path: str, **overrides: Any) -> Config:
  """The Config a flagfile gives, read by absl as ``--flagfile`` would be."""
  return config_from_argv([f'--flagfile={path}'], **overrides)
