"""Data parallelism over 8 host devices matches 1 device, step for step.

JAX fixes the number of CPU devices when it starts, so the 8-device runs
happen in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; it trains the same
steps from the same initial state on a mesh of the first device and on a mesh
of all 8 (`tests/helpers/train_steps.py`) and saves both results.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from helpers.procs import HELPERS, jax_env, run_python

NUM_DEVICES = 8
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> pathlib.Path:
  """Results of both models trained on 1 and on 8 devices."""
  out = tmp_path_factory.mktemp('sharding')
  proc = run_python([str(HELPERS / 'train_steps.py'), f'--out={out}',
                     '--models=simple_cnn,deep_cnn',
                     f'--devices=1,{NUM_DEVICES}'],
                    jax_env(NUM_DEVICES))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def load(runs: pathlib.Path, model: str, n: int) -> dict[str, np.ndarray]:
  with np.load(runs / f'{model}_{n}dev.npz') as f:
    return dict(f)


def assert_same_training(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                         prefixes: tuple[str, ...]) -> None:
  """Same losses, logits and every array under ``prefixes``."""
  np.testing.assert_allclose(b['loss'], a['loss'], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(b['logits'], a['logits'], rtol=RTOL, atol=ATOL)
  keys = sorted(k for k in a if k.startswith(prefixes))
  assert keys and keys == sorted(k for k in b if k.startswith(prefixes))
  for k in keys:
    np.testing.assert_allclose(b[k], a[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_simple_cnn_on_8_devices_trains_like_1(runs):
  one, eight = load(runs, 'simple_cnn', 1), load(runs, 'simple_cnn', 8)
  assert int(one['step']) == int(eight['step']) == len(one['loss']) > 1
  # The steps did train: the losses and predictions moved.
  assert np.ptp(one['loss']) > 1e-3
  assert np.abs(one['logits'] - one['logits0']).max() > 1e-2
  assert_same_training(one, eight, ('params/',))


def test_deep_cnn_batch_norm_statistics_span_all_shards(runs):
  """BN means/variances over the global batch, as on one device.

  Per-shard statistics (4 examples each) would differ from the global ones
  by far more than the tolerance; dropout masks must match too.
  """
  one, eight = load(runs, 'deep_cnn', 1), load(runs, 'deep_cnn', 8)
  stats = [k for k in one if k.startswith('batch_stats/')]
  assert any(k.endswith('/mean') for k in stats)
  assert all(np.abs(one[k]).max() > 0 for k in stats if k.endswith('/mean'))
  assert_same_training(one, eight, ('params/', 'batch_stats/'))


@pytest.mark.parametrize('model', ['simple_cnn', 'deep_cnn'])
def test_eval_logits_on_8_devices_equal_1(runs, model):
  one, eight = load(runs, model, 1), load(runs, model, 8)
  assert one['logits0'].shape == (128, 10)
  np.testing.assert_allclose(eight['logits0'], one['logits0'], rtol=RTOL,
                             atol=ATOL)


def test_batch_size_must_divide_by_device_count():
  script = (
      'import jax\n'
      'from cnn_jax import train\n'
      'from cnn_jax.config import Config, CnnJaxError\n'
      'config = Config(batch_size=12)\n'
      'try:\n'
      '  train.Trainer(config, 10)\n'
      'except CnnJaxError as e:\n'
      '  print(f"{jax.device_count()}|{e}")\n')
  proc = run_python(['-c', script], jax_env(NUM_DEVICES), 120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  count, message = proc.stdout.strip().split('|', 1)
  assert count == str(NUM_DEVICES)
  assert '--batch_size=12' in message and f'({NUM_DEVICES})' in message
  assert '\n' not in message
