"""The named ablation studies run by `ablate.py`.

A study is a list of variants; each variant is a set of `cnn_jax.main` flag
overrides plus where it sits in the study's plot: its `knob` (the x value)
and its `group` (the line it belongs to). Every run starts from the study's
recipe, a flagfile in ``experiments/configs`` (``ablation.flags``: one
shorter recipe for every variant, so a study fits a CPU), then the study's
`base`, then the user's base options, then the variant's overrides.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
from typing import Any, Mapping

CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'
RECIPE = 'ablation.flags'
# Overlaid on the recipe with --quick: a few steps on a small subset.
QUICK_RECIPE = str(CONFIGS / 'quick.flags')
DEFAULT_SEEDS = {'quick': 2, 'full': 3}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One configuration of a study, run once per seed."""

  name: str
  knob: float | str
  overrides: Mapping[str, Any]
  group: str = ''


@dataclasses.dataclass(frozen=True)
class Study:
  """A named set of variants and how to plot them."""

  name: str
  description: str
  knob_label: str
  variants: tuple[Variant, ...]
  base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  log_x: bool = False
  recipe: str = RECIPE  # A flagfile in experiments/configs.

  @property
  def varied_flags(self) -> tuple[str, ...]:
    """Flags set by the variants (they cannot also be base options)."""
    return tuple(sorted({k for v in self.variants for k in v.overrides}))

  @property
  def numeric_knob(self) -> bool:
    return all(isinstance(v.knob, (int, float)) for v in self.variants)

  def variant(self, name: str) -> Variant:
    for v in self.variants:
      if v.name == name:
        return v
    raise KeyError(name)


def _filters() -> Study:
  return Study(
      name='filters',
      description='SimpleCNN conv filter count: --width_multiplier 0.5, 1, 2.',
      knob_label='width multiplier (x filters per conv layer)',
      base={'model': 'simple_cnn'}, log_x=True,
      variants=tuple(Variant(f'width{w:g}', w, {'width_multiplier': w})
                     for w in (0.5, 1.0, 2.0)))


def _layer_filters() -> Study:
  widths = {'base': (32, 64, 64), 'conv1x2': (64, 64, 64),
            'conv2x2': (32, 128, 64), 'conv3x2': (32, 64, 128)}
  return Study(
      name='layer_filters',
      description='SimpleCNN: twice the filters in one conv layer at a time '
                  '(--conv_features 64,64,64 / 32,128,64 / 32,64,128).',
      knob_label='conv layer with twice the filters',
      base={'model': 'simple_cnn'},
      variants=tuple(Variant(name, name.replace('x2', '').replace(
          'base', 'none'), {'conv_features': ','.join(map(str, w))})
                     for name, w in widths.items()))


def _batchnorm_dropout() -> Study:
  return Study(
      name='batchnorm_dropout',
      description='DeepCNN --batch_norm on/off x --dropout_rate 0, 0.25, 0.5.',
      knob_label='dropout rate', base={'model': 'deep_cnn'},
      variants=tuple(
          Variant(f'{"bn" if bn else "nobn"}_drop{d:g}', d,
                  {'batch_norm': bn, 'dropout_rate': d},
                  'batch norm' if bn else 'no batch norm')
          for bn in (True, False) for d in (0.0, 0.25, 0.5)))


def _augmentation() -> Study:
  short = {'simple_cnn': 'simple', 'deep_cnn': 'deep'}
  return Study(
      name='augmentation',
      description='--augment off/on (random shift/rotation/zoom) for '
                  'SimpleCNN and DeepCNN.',
      knob_label='augmentation',
      variants=tuple(
          Variant(f'{short[m]}_{"aug" if a else "noaug"}', 'on' if a else 'off',
                  {'model': m, 'augment': a}, m)
          for m in ('simple_cnn', 'deep_cnn') for a in (False, True)))


# Peak learning rate (and extras) that suit each optimizer on SimpleCNN.
_OPTIMIZERS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({
    'sgd': {'learning_rate': 0.05, 'momentum': 0.9},
    'nesterov': {'learning_rate': 0.05, 'momentum': 0.9},
    'adam': {'learning_rate': 2e-3},
    'adamw': {'learning_rate': 2e-3, 'weight_decay': 0.05},
})


def _optimizer() -> Study:
  variants = []
  for opt, extra in _OPTIMIZERS.items():
    for sched in ('constant', 'cosine', 'onecycle'):
      overrides = {'optimizer': opt, 'lr_schedule': sched,
                   'momentum': 0.9, 'weight_decay': 0.0, **extra}
      variants.append(Variant(f'{opt}_{sched}', sched, overrides, opt))
  return Study(
      name='optimizer',
      description='sgd+momentum, nesterov, adam, adamw x --lr_schedule '
                  'constant, cosine, onecycle.',
      knob_label='learning-rate schedule', base={'model': 'simple_cnn'},
      variants=tuple(variants))


def studies() -> dict[str, Study]:
  """All studies by name, in the order `--study=list` shows them."""
  return {s.name: s for s in (_filters(), _layer_filters(),
                              _batchnorm_dropout(), _augmentation(),
                              _optimizer())}
