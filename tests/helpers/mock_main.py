"""``python -m cnn_jax.main ARGS`` on mock MNIST, for tests that kill it.

Runs the real entry point in a fresh process under
`tfds.testing.mock_data`, so a test can send it SIGKILL/SIGTERM/SIGINT and
restart it with the same command. ``CNN_JAX_TEST_CHUNK_DELAY_S`` (seconds,
default 0) sleeps after every chunk of train steps, which stretches a
seconds-long run so a signal lands mid-training; it changes no result.
"""

from __future__ import annotations

import os
import time

import tensorflow_datasets as tfds
from absl import app

from cnn_jax import main, train

MOCK_EXAMPLES = 256  # Per split; matches tests/conftest.py.


def _slow_down_chunks(delay_s: float) -> None:
  original = train.Trainer.__init__

  def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    chunk = self.train_chunk

    def slow_chunk(*a):
      out = chunk(*a)
      time.sleep(delay_s)
      return out
    self.train_chunk = slow_chunk
  train.Trainer.__init__ = init


if __name__ == '__main__':
  delay = float(os.environ.get('CNN_JAX_TEST_CHUNK_DELAY_S', '0'))
  if delay > 0:
    _slow_down_chunks(delay)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    app.run(main.main)
