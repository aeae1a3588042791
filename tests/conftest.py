"""Shared fixtures (mock TFDS data, tiny configs, trained tiny runs, real
MNIST) and the rule that a test may skip for missing MNIST only outside CI."""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import tempfile

import numpy as np
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Caches of decoded data and compiled programs go to a fresh folder, never ~.
os.environ['CNN_JAX_CACHE_DIR'] = tempfile.mkdtemp(prefix='cnn_jax_test_cache_')

import tensorflow_datasets as tfds  # noqa: E402
# Imported now, not on first use: a module first compiled while Orbax's
# threads are busy (after a test restores a damaged checkpoint) can fail
# with CPython 3.11's spurious 'AST constructor recursion depth mismatch'
# (python/cpython#106905), and tfds.testing's modules are compiled by
# pytest's assertion rewriting.
from tensorflow_datasets.testing import mocking as _  # noqa: E402,F401

from cnn_jax import runtime  # noqa: E402
from cnn_jax.config import Config  # noqa: E402

# The entry points' XLA defaults, one device per test process (tests that
# need several set them in a subprocess).
runtime.configure_xla(host_devices=1)
# Compiled programs are kept in that folder, as `cnn_jax.main` keeps them:
# the many tiny runs of the suite compile the same few programs, and a test
# that needs a cold cache sets its own CNN_JAX_CACHE_DIR.
runtime.enable_compilation_cache(runtime.compilation_cache_dir())

REPO = pathlib.Path(__file__).resolve().parents[1]
MOCK_EXAMPLES = 256  # Per split under mock_data.
# CI has prepared MNIST (../shared beside the clone): there, a test that
# would skip for want of it fails instead (`pytest_runtest_makereport`).
IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')
MNIST_MISSING = ('prepared MNIST not found ($TFDS_DATA_DIR or '
                 '../shared/tensorflow_datasets)')


def real_tfds_dir() -> str | None:
  """A data dir holding prepared MNIST ($TFDS_DATA_DIR or ../shared), or None."""
  for d in (os.environ.get('TFDS_DATA_DIR'),
            str(REPO.parent / 'shared' / 'tensorflow_datasets')):
    if d and (pathlib.Path(d) / 'mnist' / '3.0.1' / 'dataset_info.json').exists():
      return d
  return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under CI=true a skip for missing MNIST is a failure, not a skip."""
  del item, call
  report = (yield).get_result()
  if not (IN_CI and report.skipped and not hasattr(report, 'wasxfail')):
    return
  reason = (report.longrepr[2] if isinstance(report.longrepr, tuple)
            else str(report.longrepr))
  if 'MNIST' in reason:
    report.outcome = 'failed'
    report.longrepr = (f'{reason}: CI=true, where prepared MNIST must be '
                       'present, so this test fails instead of skipping')


@pytest.fixture(autouse=True)
def _same_absl_log_level():
  """Every test starts with absl's logger at the level the session began
  with: parsing or restoring absl flags (its --verbosity) changes it for the
  whole process, which made log assertions depend on the tests run before."""
  logger = std_logging.getLogger('absl')
  level = logger.level
  yield
  logger.setLevel(level)


@pytest.fixture(scope='session')
def real_mnist_dir() -> str:
  """The prepared-MNIST data dir; the test skips without it (fails in CI)."""
  data_dir = real_tfds_dir()
  if data_dir is None:
    pytest.skip(MNIST_MISSING)
  return data_dir


@pytest.fixture(scope='session')
def real_mnist(real_mnist_dir) -> np.ndarray:
  """The first 64 real MNIST test images, uint8 [64, 28, 28]."""
  from cnn_jax import input_pipeline
  config = Config(tfds_data_dir=real_mnist_dir, download=False,
                  test_examples=64)
  return input_pipeline.load(config, splits=('test',)).test.images[..., 0]


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
                     width_multiplier=0.25,
                     model_options={'dense_features': 16})


@pytest.fixture(scope='session')
def interrupted_simple(tmp_path_factory):
  """A SimpleCNN run that crashed after step 10 of 12, and the same run whole.

  Returns (config, uninterrupted workdir, crashed workdir, the steps the
  crashed run trained). The crashed one saved latest steps 8 and 10, in
  epoch 2 of 6 steps each: copy it before resuming it.
  """
  from cnn_jax import train
  from helpers.resume import ChunkRecorder, SimulatedCrash
  root = tmp_path_factory.mktemp('interrupted')
  config = tiny_config(root / 'tfds', epochs=2, log_every_steps=2,
                       checkpoint_every_steps=2)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(config, str(root / 'full'))
    crash = ChunkRecorder(crash_after=5)
    with pytest.raises(SimulatedCrash):
      train.train_and_evaluate(config, str(root / 'crashed'), hooks=[crash])
  return config, str(root / 'full'), root / 'crashed', crash.steps
