"""The named ablation studies run by `experiments.ablate`.

A study is a list of variants; each variant is a set of `cnn_jax.main` flag
overrides plus where it sits in the study's plot: its `knob` (the x value)
and its `group` (the line it belongs to). Every run starts from a recipe
flagfile in ``experiments/configs``, chosen by the budget:

* ``short``: ``ablation.flags``, one 2-epoch recipe for every variant, so a
  study fits a CPU in about an hour;
* ``full``: the recipe each variant varies, at its own length: the
  model's own flagfile (``simple_cnn.flags``, 12 epochs; ``deep_cnn.flags``,
  18 epochs), or the study's `full_recipe` where the variants compare models
  under one recipe (the dense baseline has none of its own).

Then come the study's `base`, the user's base options and the variant's
overrides.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
from typing import Any, Mapping

CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'
BUDGETS = ('short', 'full')
RECIPE = 'ablation.flags'
# Overlaid on the recipe with --quick: a few steps on a small subset.
QUICK_RECIPE = str(CONFIGS / 'quick.flags')
DEFAULT_SEEDS = {'quick': 2, 'short': 3, 'full': 3}
# Training images of MNIST once the validation split is held out: the
# `same_steps` studies give smaller sets as many steps as the whole set.
MNIST_TRAIN = 55_000


@dataclasses.dataclass(frozen=True)
class Variant:
  """One configuration of a study, run once per seed."""

  name: str
  knob: float | str
  overrides: Mapping[str, Any]
  group: str = ''

  def columns(self) -> dict[str, Any]:
    """The overrides as table columns: each model option its own."""
    out = {k: v for k, v in self.overrides.items() if k != 'model_options'}
    out.update(self.overrides.get('model_options', {}))
    return out


@dataclasses.dataclass(frozen=True)
class Study:
  """A named set of variants and how to plot them."""

  name: str
  description: str
  knob_label: str
  variants: tuple[Variant, ...]
  base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  log_x: bool = False
  full_recipe: str = ''  # Empty: each variant's model's own flagfile.
  same_steps: bool = False  # Fewer --train_examples, more epochs.

  @property
  def varied_flags(self) -> tuple[str, ...]:
    """Flags set by the variants (they cannot also be base options)."""
    return tuple(sorted({k for v in self.variants for k in v.overrides}))

  @property
  def columns(self) -> tuple[str, ...]:
    """The table columns the variants set (model options one by one)."""
    return tuple(sorted({k for v in self.variants for k in v.columns()}))

  @property
  def numeric_knob(self) -> bool:
    return all(isinstance(v.knob, (int, float)) for v in self.variants)

  def variant(self, name: str) -> Variant:
    for v in self.variants:
      if v.name == name:
        return v
    raise KeyError(name)

  def model(self, variant: Variant) -> str:
    return variant.overrides.get('model', self.base.get('model',
                                                        'simple_cnn'))

  def recipe(self, budget: str, variant: Variant) -> str:
    """The recipe flagfile of ``variant`` at ``budget``."""
    if budget == 'short':
      return str(CONFIGS / RECIPE)
    return str(CONFIGS / (self.full_recipe or f'{self.model(variant)}.flags'))

  def epochs(self, variant: Variant, recipe_epochs: int) -> int | None:
    """With `same_steps`, the epochs that give ``variant``'s smaller
    training set the steps of the recipe on all of MNIST; else None."""
    n = variant.overrides.get('train_examples', 0)
    if not self.same_steps or not n:
      return None
    return max(1, round(recipe_epochs * MNIST_TRAIN / n))


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
                  '(--model_options=features=64,64,64 / 32,128,64 / '
                  '32,64,128).',
      knob_label='conv layer with twice the filters',
      base={'model': 'simple_cnn'},
      variants=tuple(Variant(name, name.replace('x2', '').replace(
          'base', 'none'), {'model_options': {'features': list(w)}})
                     for name, w in widths.items()))


def _batchnorm_dropout() -> Study:
  return Study(
      name='batchnorm_dropout',
      description='DeepCNN batch norm on/off x dropout rate 0, 0.25, 0.5 '
                  '(--model_options=batch_norm=...,dropout_rate=...).',
      knob_label='dropout rate', base={'model': 'deep_cnn'},
      variants=tuple(
          Variant(f'{"bn" if bn else "nobn"}_drop{d:g}', d,
                  {'model_options': {'batch_norm': bn, 'dropout_rate': d}},
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


_SHORT_NAMES = {'simple_cnn': 'simple', 'mlp': 'mlp'}


def _why_conv() -> Study:
  return Study(
      name='why_conv',
      description='SimpleCNN vs the dense baseline (--model=mlp, about the '
                  'same parameters) on MNIST and on MNIST with its pixels '
                  'shuffled by one fixed permutation (--permute_pixels); '
                  'no augmentation, one recipe for both.',
      knob_label='pixels', base={'augment': False},
      full_recipe='simple_cnn.flags',
      variants=tuple(
          Variant(f'{_SHORT_NAMES[m]}_{"permuted" if p else "in_order"}',
                  'permuted' if p else 'in order',
                  {'model': m, 'permute_pixels': p}, m)
          for m in ('simple_cnn', 'mlp') for p in (False, True)))


def _data_size() -> Study:
  sizes = (1_000, 5_000, 15_000, 0)
  return Study(
      name='data_size',
      description='SimpleCNN vs the dense baseline trained on the first '
                  '1,000, 5,000, 15,000 or all 55,000 training images '
                  '(--train_examples), each with the steps of the whole set '
                  '(more epochs on fewer images); the same validation and '
                  'test splits; no augmentation, one recipe for both.',
      knob_label='training images', base={'augment': False}, log_x=True,
      full_recipe='simple_cnn.flags', same_steps=True,
      variants=tuple(
          Variant(f'{_SHORT_NAMES[m]}_{n or "all"}', n or MNIST_TRAIN,
                  {'model': m, 'train_examples': n}, m)
          for m in ('simple_cnn', 'mlp') for n in sizes))


def studies() -> dict[str, Study]:
  """All studies by name, in the order `--study=list` shows them."""
  return {s.name: s for s in (_filters(), _layer_filters(),
                              _batchnorm_dropout(), _augmentation(),
                              _optimizer(), _why_conv(), _data_size())}
