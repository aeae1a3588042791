"""Shared fixtures: mock TFDS data, tiny configs and a trained tiny run."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Caches of decoded data and compiled programs go to a fresh folder, never ~.
os.environ['CNN_JAX_CACHE_DIR'] = tempfile.mkdtemp(prefix='cnn_jax_test_cache_')

import tensorflow_datasets as tfds  # noqa: E402

from cnn_jax import runtime  # noqa: E402
from cnn_jax.config import Config  # noqa: E402

# The entry points' XLA defaults, one device per test process (tests that
# need several set them in a subprocess).
runtime.configure_xla(host_devices=1)

REPO = pathlib.Path(__file__).resolve().parents[1]
MOCK_EXAMPLES = 256  # Per split under mock_data.


def real_tfds_dir() -> str | None:
  """A data dir holding prepared MNIST ($TFDS_DATA_DIR or ../shared), or None."""
  for d in (os.environ.get('TFDS_DATA_DIR'),
            str(REPO.parent / 'shared' / 'tensorflow_datasets')):
    if d and (pathlib.Path(d) / 'mnist' / '3.0.1' / 'dataset_info.json').exists():
      return d
  return None


@pytest.fixture
def mock_tfds():
  """Random MNIST-shaped data from `tfds.testing.mock_data`, no files read."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


def tiny_config(data_dir: str | os.PathLike, **overrides) -> Config:
  """A config that trains in seconds on mock data."""
  base = dict(tfds_data_dir=str(data_dir), download=False, val_examples=64,
              epochs=1, batch_size=32, eval_batch_size=64, log_every_steps=3,
              learning_rate=1e-3)
  base.update(overrides)
  return Config(**base)


def _train_tiny(root: pathlib.Path, **overrides) -> tuple[Config, str]:
  from cnn_jax import train
  config = tiny_config(root / 'tfds', **overrides)
  workdir = str(root / 'run')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='session')
def trained_simple(tmp_path_factory) -> tuple[Config, str]:
  """(config, workdir) of a SimpleCNN trained 2 epochs on mock data."""
  return _train_tiny(tmp_path_factory.mktemp('simple'), epochs=2)


@pytest.fixture(scope='session')
def trained_deep(tmp_path_factory) -> tuple[Config, str]:
  """(config, workdir) of a small DeepCNN trained 1 epoch on mock data."""
  return _train_tiny(tmp_path_factory.mktemp('deep'), model='deep_cnn',
                     width_multiplier=0.25, dense_features=16)
