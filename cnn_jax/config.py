"""Plain, validated configuration for every entry point.

Flags are parsed once in `main.py` and turned into a `Config`; library code
only ever sees this dataclass, so it is callable from Python and tests
without absl. Each field's `help` metadata doubles as its flag's help text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from cnn_jax.kernels import KERNELS  # A light module: no JAX import.


class CnnJaxError(Exception):
  """A user-facing error: `main` prints its message on one line and exits."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # pylint: disable=redefined-builtin
  return dataclasses.field(default=default, metadata={'help': help, **kw})


OPTIMIZERS = ('adam', 'adamw', 'sgd', 'nesterov', 'rmsprop')
SCHEDULES = ('constant', 'cosine', 'onecycle', 'step')
DTYPES = ('float32', 'bfloat16')
BEST_METRICS = ('val_accuracy', 'val_loss')
ENSEMBLE = 'ensemble'  # The --model of a --mode=ensemble workdir's config.

# Fields a resumed run may change: where the data is, how often it logs and
# saves, which kernels and how many host devices compute the same model.
RESUMABLE_FIELDS = frozenset({'tfds_data_dir', 'download', 'log_every_steps',
                              'checkpoint_every_steps', 'kernels', 'tta',
                              'cache', 'cache_dir', 'host_devices'})
# Fields that eval, analyze, predict and export take from the command line
# over the workdir's saved config.
EVAL_OVERRIDE_FIELDS = ('tfds_data_dir', 'download', 'eval_batch_size',
                        'test_examples', 'tta', 'cache', 'cache_dir')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs; saved as `workdir/config.json`."""

  # Data.
  dataset: str = _f('mnist', 'TFDS image-classification dataset of fixed '
                    'image shape (mnist, fashion_mnist, kmnist, emnist/digits, ...).')
  tfds_data_dir: str = _f('', 'TFDS data dir; empty means $TFDS_DATA_DIR or '
                          'the TFDS default (~/tensorflow_datasets).')
  download: bool = _f(True, 'Let TFDS download the dataset when it is not '
                      'prepared in the data dir (needs internet).')
  cache: bool = _f(True, 'Keep the decoded dataset in a cache (--cache_dir) '
                   'after the first read, so later runs skip TFDS decoding; '
                   'a stale or corrupt cache is rebuilt.')
  cache_dir: str = _f('', 'Cache folder for decoded datasets and compiled '
                      'programs; empty means $CNN_JAX_CACHE_DIR, else '
                      '$XDG_CACHE_HOME/cnn_jax, else ~/.cache/cnn_jax.')
  val_examples: int = _f(5000, 'Examples held out of the train split for '
                         'validation and best-checkpoint selection.')
  train_examples: int = _f(0, 'Use only the first N training examples '
                           '(0 = all); for quick runs and tests.')
  test_examples: int = _f(0, 'Evaluate on only the first N test examples '
                          '(0 = all 10,000).')
  permute_pixels: bool = _f(False, 'Shuffle the pixel positions of every '
                            'image (train, validation and test) by one fixed '
                            'random permutation: the same task without the '
                            'neighbourhoods convolutions rely on (the "why '
                            'convolutions" study).')
  best_metric: str = _f('val_accuracy', 'Validation metric that picks the '
                        'best checkpoint: val_accuracy (highest) or val_loss '
                        '(lowest; smoother on a small validation split).')
  augment: bool = _f(False, 'On-device random shifts/rotations/scaling of '
                     'training images, inside jit.')
  aug_max_shift: float = _f(2.0, 'Augmentation: max translation in pixels.')
  aug_max_rotation: float = _f(10.0, 'Augmentation: max rotation in degrees.')
  aug_max_scale: float = _f(0.1, 'Augmentation: max relative zoom in/out.')
  aug_elastic: float = _f(0.0, 'Elastic distortion: a smooth random '
                          'displacement field of up to this many pixels '
                          '(0 = off; with or without --augment).')
  aug_elastic_sigma: float = _f(4.0, 'Elastic distortion: the smoothness '
                                '(Gaussian sigma, pixels) of its field.')
  aug_thickness: float = _f(0.0, 'Stroke width: thicker or thinner by up to '
                            'this fraction of a 3x3 grey dilation/erosion '
                            '(0 = off, 1 = a pixel of ink each side).')
  aug_blur: float = _f(0.0, 'Gaussian blur of sigma up to this many pixels '
                       '(0 = off).')
  aug_noise: float = _f(0.0, 'Gaussian pixel noise of standard deviation up '
                        'to this, on [0, 1] images (0 = off).')
  aug_erase: float = _f(0.0, 'Random erasing: the probability that a '
                        'rectangle of 2-20% of an image is set to the '
                        'background (0 = off).')
  aug_levels: float = _f(0.0, 'Ink and paper levels: contrast scaled by a '
                         'factor from 1 - L to 1 and the background lifted '
                         'by up to what that frees, so faint ink on a grey '
                         'page (0 = off).')

  # Model.
  model: str = _f('simple_cnn', 'Model from the registry '
                  '(cnn_jax/registry.py).')
  model_options: dict[str, Any] = dataclasses.field(
      default_factory=dict, metadata={'help': (
          'Settings of the --model: fields of its Flax module as key=value '
          'pairs separated by commas; a list takes several values, e.g. '
          'features=64,64,64,dense_features=128. Given again (a flagfile, '
          'then the command line), later keys win.')})
  width_multiplier: float = _f(1.0, 'Scales the filters (or units) of every '
                               'layer the model\'s width option lists '
                               '(ablations: 0.5, 1, 2).')
  kernels: str = _f('auto', 'Layers that compute the model in training: '
                    'flax (stock Flax), cpu (cnn_jax.kernels: same params '
                    'and values, faster gradients on CPU) or auto (cpu on '
                    'the CPU backend, flax on GPU/TPU).')
  dtype: str = _f('float32', 'Compute dtype (bfloat16 = mixed precision, '
                  'params stay float32).')
  host_devices: int = _f(0, 'CPU only: split the host into this many XLA '
                         'devices (one thread each) for data-parallel '
                         'training; 0 = as many as CPU cores (the largest '
                         'count <= cores that divides --batch_size). Set by '
                         'the entry points before JAX starts; ignored when '
                         'XLA_FLAGS already sets a device count, and on '
                         'GPU/TPU.')

  # Optimization.
  epochs: int = _f(10, 'Training epochs.')
  batch_size: int = _f(128, 'Global training batch size.')
  eval_batch_size: int = _f(1000, 'Batch size for evaluation.')
  optimizer: str = _f('adam', f'Optimizer: {", ".join(OPTIMIZERS)}.')
  learning_rate: float = _f(1e-3, 'Peak learning rate.')
  lr_schedule: str = _f('constant', f'Schedule: {", ".join(SCHEDULES)}.')
  warmup_epochs: float = _f(0.0, 'Warm-up length: linear from 0 (cosine, '
                            'constant, step) or onecycle\'s rise from lr/25; '
                            '0 = none (onecycle: 25% of the run).')
  momentum: float = _f(0.9, 'Momentum for sgd/nesterov/rmsprop.')
  adam_b1: float = _f(0.9, 'Adam/AdamW: decay rate of the gradient mean.')
  adam_b2: float = _f(0.999, 'Adam/AdamW: decay rate of the squared-gradient '
                      'mean (lower adapts faster: short runs).')
  weight_decay: float = _f(0.0, 'Decoupled weight decay (adamw) or L2 added '
                           'to gradients (others).')
  label_smoothing: float = _f(0.0, 'Label smoothing of the one-hot targets.')
  grad_clip_norm: float = _f(0.0, 'Clip gradients to this global norm '
                             '(0 = off).')
  seed: int = _f(0, 'Fixes init, data order, dropout and augmentation.')
  num_models: int = _f(1, 'Train this many independently initialized '
                       'members at once (seeds --seed, --seed+1, ...), '
                       'vectorized with jax.vmap in one jitted step; their '
                       'averaged probabilities are the run\'s ensemble.')

  # Evaluation.
  tta: int = _f(0, 'Test-time augmentation: also score the test split '
                'with the probabilities of each image and this many copies '
                'shifted by one pixel averaged (0 = off, at most 8); in '
                'training, eval and the other eval-like modes.')
  members: str = _f('', 'ensemble: comma-separated workdirs of trained runs '
                    '(any models, same dataset) whose best checkpoints are '
                    'combined into --workdir.')

  # Bookkeeping.
  log_every_steps: int = _f(100, 'Log a progress line about this often.')
  checkpoint_every_steps: int = _f(0, 'Also save the latest state every N '
                                   'steps within an epoch (0 = each epoch).')

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Config':
    """A config from ``config.json``'s dict; fields it lacks take their
    defaults, unknown ones are dropped, and the per-model keys of older
    files (``dropout_rate``, ``conv_features``, ...) become
    ``model_options``."""
    from cnn_jax.registry import upgrade_legacy  # Imports Flax.
    d = upgrade_legacy(d)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def member_seeds(self) -> list[int]:
    """The seeds of the run's networks: member k has ``seed + k``."""
    return [self.seed + k for k in range(self.num_models)]

  def replace(self, **kw: Any) -> 'Config':
    return dataclasses.replace(self, **kw)

  @property
  def data_dir(self) -> str | None:
    return self.tfds_data_dir or os.environ.get('TFDS_DATA_DIR') or None


def config_changes(saved: dict[str, Any], config: Config) -> list[str]:
  """How ``config`` differs from a saved one (``config.json``'s dict), as
  ``--name=old->new``, for the fields a resumed run may not change.

  Fields added since that file was written take their defaults, removed
  ones are ignored, and older per-model keys become ``model_options``.
  """
  before = json.loads(Config.from_dict(saved).to_json())
  now = json.loads(config.to_json())
  return [f'--{k}={before.get(k)!r}->{now[k]!r}' for k in sorted(now)
          if k not in RESUMABLE_FIELDS and before.get(k) != now[k]]


def warnings(config: Config) -> list[str]:
  """Settings that are valid but likely unwise together, in words."""
  out = []
  if (config.best_metric == 'val_loss' and config.label_smoothing > 0
      and config.epochs > 1):
    # experiments/FINDINGS.md: with smoothing 0.1 the lowest validation loss
    # of DeepCNN fell on epoch 2 of 18 for 2 of 4 seeds.
    out.append(f'--best_metric=val_loss with --label_smoothing='
               f'{config.label_smoothing:g}: a label-smoothed model\'s '
               'validation cross-entropy barely moves once it fits, so the '
               '"best" epoch can be an early, worse one; '
               '--best_metric=val_accuracy is safer')
  return out


def validate(config: Config) -> Config:
  """Raises CnnJaxError naming the first bad value; returns config."""
  def bad(msg: str) -> None:
    raise CnnJaxError(msg)

  from cnn_jax import registry  # Imports Flax; the models live there.
  if config.model == ENSEMBLE and config.members:
    options = {}
    if config.model_options:
      bad('an ensemble workdir has no --model_options')
  else:
    options = registry.normalize_options(config.model, config.model_options)
  choices = {'optimizer': OPTIMIZERS,
             'lr_schedule': SCHEDULES, 'dtype': DTYPES, 'kernels': KERNELS,
             'best_metric': BEST_METRICS}
  for name, allowed in choices.items():
    value = getattr(config, name)
    if value not in allowed:
      bad(f'unknown --{name}={value!r}; choose one of: {", ".join(allowed)}')
  for name in ('epochs', 'batch_size', 'eval_batch_size', 'log_every_steps',
               'num_models'):
    if getattr(config, name) <= 0:
      bad(f'--{name} must be a positive integer, got {getattr(config, name)}')
  for name in ('learning_rate', 'width_multiplier'):
    v = getattr(config, name)
    if not (v > 0 and math.isfinite(v)):
      bad(f'--{name} must be a positive number, got {v}')
  for name in ('val_examples', 'train_examples', 'test_examples',
               'checkpoint_every_steps', 'warmup_epochs', 'host_devices',
               'weight_decay', 'grad_clip_norm', 'aug_max_shift',
               'aug_max_rotation', 'aug_elastic', 'aug_blur', 'aug_noise'):
    v = getattr(config, name)
    if not (v >= 0 and math.isfinite(v)):
      bad(f'--{name} must be >= 0, got {v}')
  for name in ('label_smoothing', 'momentum', 'adam_b1',
               'adam_b2', 'aug_max_scale',  # A zoom of 1 could flip.
               'aug_erase', 'aug_levels'):  # Contrast 0 erases the digit.
    v = getattr(config, name)
    if not 0 <= v < 1:
      bad(f'--{name} must be in [0, 1), got {v}')
  if config.warmup_epochs >= config.epochs and config.lr_schedule in (
      'cosine', 'onecycle'):
    bad(f'--warmup_epochs ({config.warmup_epochs}) must be less than --epochs '
        f'({config.epochs})')
  if not 0 <= config.aug_thickness <= 1:
    bad(f'--aug_thickness must be in [0, 1], got {config.aug_thickness}')
  if not (config.aug_elastic_sigma > 0
          and math.isfinite(config.aug_elastic_sigma)):
    bad('--aug_elastic_sigma must be a positive number, got '
        f'{config.aug_elastic_sigma}')
  spatial = [f for f in ('augment', 'aug_elastic', 'aug_thickness',
                         'aug_blur', 'aug_erase') if getattr(config, f)]
  if config.permute_pixels and spatial:
    bad(f'--{spatial[0]} acts on neighbouring pixels, which means nothing '
        'once --permute_pixels has scattered them; turn it off')
  if not 0 <= config.tta <= 8:
    bad(f'--tta must be between 0 and 8 (shifted copies), got {config.tta}')
  if not config.dataset.strip():
    bad('--dataset must name a TFDS dataset')
  if options == config.model_options:
    return config
  return config.replace(model_options=options)
