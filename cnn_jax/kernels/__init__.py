"""CPU speed kernels, each a drop-in for the Flax layer it replaces.

The models (`cnn_jax.models`) are stock Flax and take their layer types as
fields. On the CPU backend XLA computes some of those layers' gradients
slowly; this package has replacements with the same parameters, the same
forward values and the same semantics, and faster training steps:

=========  ==============================  ====================================
field      stock Flax                      CPU kernel
=========  ==============================  ====================================
conv       ``nn.Conv``                     `conv.Conv`: im2col / hybrid gradients
pool       ``nn.max_pool`` 2x2             `pool.max_pool_2x2`: mask gradient
norm       ``nn.BatchNorm``                `batch_norm.BatchNorm`: fused gradient
dropout    ``nn.Dropout``                  `dropout.Dropout`: 4 draws per word
=========  ==============================  ====================================

`training_layers` is the one place that chooses them, from one setting
(``--kernels``): ``flax`` uses stock Flax, ``cpu`` the kernels, ``auto`` the
kernels on the CPU backend and stock Flax on GPU/TPU. Forward-only passes
(evaluation, analysis, prediction, export) always use stock Flax: the
kernels only change gradients and training-mode dropout, and XLA's own
convolution is the fastest forward pass on every backend.

Importing this package imports no kernel and changes no global state.
"""

from __future__ import annotations

from typing import Any, Sequence

KERNELS = ('auto', 'flax', 'cpu')
CPU_LAYERS = ('conv', 'pool', 'norm', 'dropout')


def resolve(setting: str, backend: str) -> str:
  """``flax`` or ``cpu``: what ``setting`` means on ``backend``."""
  if setting not in KERNELS:
    raise ValueError(f'unknown kernels {setting!r}; choose from {KERNELS}')
  if setting == 'auto':
    return 'cpu' if backend == 'cpu' else 'flax'
  return setting


def cpu_layers(only: Sequence[str] = CPU_LAYERS) -> dict[str, Any]:
  """The CPU kernels by model field (``conv``, ``pool``, ...), or a subset."""
  from cnn_jax.kernels import batch_norm, conv, dropout, pool
  every = {'conv': conv.Conv, 'pool': pool.max_pool_2x2,
           'norm': batch_norm.BatchNorm, 'dropout': dropout.Dropout}
  unknown = set(only) - set(every)
  if unknown:
    raise ValueError(f'unknown CPU layers {sorted(unknown)}; choose from '
                     f'{CPU_LAYERS}')
  return {name: every[name] for name in only}


def training_layers(setting: str, backend: str) -> dict[str, Any]:
  """Model fields to override for training: ``{}`` means stock Flax."""
  return cpu_layers() if resolve(setting, backend) == 'cpu' else {}
