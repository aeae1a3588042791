"""``python -m cnn_jax.main ARGS`` on mock MNIST, for tests that kill it.

Runs the real entry point in a fresh process under
`tfds.testing.mock_data`, so a test can send it SIGKILL/SIGTERM/SIGINT and
restart it with the same command. ``CNN_JAX_TEST_CHUNK_DELAY_S`` (seconds,
default 0) sleeps before every chunk of train steps (a training hook given to
`main.main`), which stretches a seconds-long run so a signal lands
mid-training; it changes no result.
"""

from __future__ import annotations

import functools
import os
import time

import tensorflow_datasets as tfds
from absl import app

from cnn_jax import main

MOCK_EXAMPLES = 256  # Per split; matches tests/conftest.py.


def _delay(delay_s: float):
  """A training hook that sleeps before every chunk of steps."""
  def hook(step: int, steps: int) -> None:
    del step, steps
    time.sleep(delay_s)
  return hook


if __name__ == '__main__':
  delay = float(os.environ.get('CNN_JAX_TEST_CHUNK_DELAY_S', '0'))
  hooks = [_delay(delay)] if delay > 0 else []
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    app.run(functools.partial(main.main, hooks=hooks))
