"""`cnn_jax.kernels`: one setting picks the training layers."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import pytest

from cnn_jax import kernels
from cnn_jax.kernels import batch_norm, conv, dropout, pool
from conftest import REPO


def test_settings_resolve_per_backend():
  assert kernels.resolve('auto', 'cpu') == 'cpu'
  for backend in ('gpu', 'tpu', 'cuda'):
    assert kernels.resolve('auto', backend) == 'flax'
  for backend in ('cpu', 'gpu'):
    assert kernels.resolve('flax', backend) == 'flax'
    assert kernels.resolve('cpu', backend) == 'cpu'
  with pytest.raises(ValueError, match='unknown kernels'):
    kernels.resolve('fast', 'cpu')


def test_training_layers():
  assert kernels.training_layers('flax', 'cpu') == {}
  assert kernels.training_layers('auto', 'gpu') == {}
  assert kernels.training_layers('auto', 'cpu') == {
      'conv': conv.Conv, 'pool': pool.max_pool_2x2,
      'norm': batch_norm.BatchNorm, 'dropout': dropout.Dropout}
  assert kernels.cpu_layers(['pool']) == {'pool': pool.max_pool_2x2}
  with pytest.raises(ValueError, match='unknown CPU layers'):
    kernels.cpu_layers(['relu'])
  # Each replaces the stock layer the models default to.
  assert set(kernels.CPU_LAYERS) == {'conv', 'pool', 'norm', 'dropout'}
  assert issubclass(conv.Conv, nn.Module)


def test_importing_the_package_imports_no_kernel():
  code = ('import sys, cnn_jax.kernels; '
          'print(any(m.startswith("cnn_jax.kernels.") for m in sys.modules), '
          '"jax" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, cwd=REPO, timeout=120, check=True).stdout
  assert out.split() == ['False', 'False']
