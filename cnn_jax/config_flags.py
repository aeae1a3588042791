"""absl flags for every `Config` field, and the `Config` they give.

Only entry points (``cnn_jax.main``, experiments/benchmark.py) use this;
library code takes a plain `Config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import flags

from cnn_jax.config import Config, validate


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """One flag per Config field, with the field's default and help text."""
  definers = {'bool': flags.DEFINE_bool, 'int': flags.DEFINE_integer,
              'float': flags.DEFINE_float, 'str': flags.DEFINE_string}
  for f in dataclasses.fields(Config):
    definers[f.type](f.name, f.default, f.metadata['help'],
                     flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                      **overrides: Any) -> Config:
  """The validated Config given by parsed flags (and flagfiles)."""
  return validate(Config(**{**{f.name: flag_values[f.name].value
                               for f in dataclasses.fields(Config)},
                            **overrides}))


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
