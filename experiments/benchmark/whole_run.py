r"""One whole run on real MNIST, input loading included: ours
(`train.train_and_evaluate`) against the Keras MNIST convnet recipe.

  python -m experiments.benchmark.whole_run --tfds_data_dir=DIR   # 1 epoch
  python -m experiments.benchmark.whole_run --fast   # time to 99%: ours runs
      # experiments/configs/fast.flags, Keras its tutorial recipe
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from absl import app, flags

from cnn_jax import config as config_lib
from experiments.benchmark import common, peers
from experiments.benchmark.common import FLAGS, installed

flags.DEFINE_bool('fast', False, 'Ours runs experiments/configs/fast.flags, '
                  'Keras its tutorial recipe (batch 64, 3 epochs): time to '
                  '99% test accuracy.')
flags.DEFINE_string('tfds_data_dir', '', 'TFDS data dir (default: '
                    '$TFDS_DATA_DIR or ../shared/tensorflow_datasets).')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

common.define_flags()


def default_data_dir() -> str:
  for d in (FLAGS.tfds_data_dir, os.environ.get('TFDS_DATA_DIR', ''),
            os.path.join(REPO, '..', 'shared', 'tensorflow_datasets')):
    if d and os.path.isdir(os.path.join(d, 'mnist')):
      return os.path.abspath(d)
  raise SystemExit('error: --whole_run needs prepared MNIST: pass '
                   '--tfds_data_dir')


def whole_run(s: dict[str, Any]) -> dict[str, Any]:
  """Real MNIST, input to test accuracy: ours vs the Keras recipe.

  One epoch of each by default; with ``--fast``, ours runs
  ``experiments/configs/fast.flags`` and Keras its tutorial recipe (Adam
  1e-3, batch 64, 3 epochs): time to >= 99% test accuracy.
  """
  data_dir = default_data_dir()
  out: dict[str, Any] = {}
  from cnn_jax import config_flags, train
  from cnn_jax import workdir as workdir_lib
  if FLAGS.fast:
    config = config_flags.config_from_flagfile(
        os.path.join(REPO, 'experiments', 'configs', 'fast.flags'),
        tfds_data_dir=data_dir, download=False)
  else:
    config = config_lib.Config(
        model='simple_cnn', epochs=1, batch_size=s['batch_size'],
        learning_rate=s['learning_rate'], kernels=s['kernels'],
        dtype=s['dtype'], tfds_data_dir=data_dir,
        download=False)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    res = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t0
    epoch = workdir_lib.read_history(workdir)[0]
  out['cnn_jax'] = {'wall_seconds': wall, 'epochs': config.epochs,
                    'epoch_seconds': epoch['epoch_seconds'],
                    'train_img_per_s': res['train_img_per_s'],
                    'test_accuracy': res['test_accuracy']}
  if 'keras' in s['peers'] and installed('keras'):
    keras_settings = (dict(s, batch_size=64, learning_rate=1e-3, epochs=3)
                      if FLAGS.fast else dict(s, epochs=1))
    out['keras'] = keras_recipe(data_dir, config.val_examples,
                                keras_settings)
    out['wall_ratio_vs_keras'] = wall / out['keras']['wall_seconds']
  return {'whole_run': out, 'settings': {
      **s, 'load_average_1min': os.getloadavg()[0]}}


def keras_recipe(data_dir: str, val_examples: int, s: dict[str, Any]
                 ) -> dict[str, Any]:
  """The Keras MNIST convnet recipe: load, fit with val, test."""
  import keras
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], 'GPU')

  class EpochTime(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      self.seconds = time.perf_counter() - self.t0

  t0 = time.perf_counter()
  (x, y), (x_test, y_test) = tfds.as_numpy(tfds.load(
      'mnist', split=['train', 'test'], batch_size=-1, as_supervised=True,
      data_dir=data_dir, download=False))
  x, x_test = x.astype('float32') / 255, x_test.astype('float32') / 255
  n = len(x) - val_examples
  model = peers.keras_model('simple_cnn', rescale=False)
  model.compile(optimizer=keras.optimizers.Adam(s['learning_rate']),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=['accuracy'])
  timer = EpochTime()
  model.fit(x[:n], y[:n], batch_size=s['batch_size'], epochs=s['epochs'],
            verbose=0,
            validation_data=(x[n:], y[n:]), callbacks=[timer])
  _, test_acc = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
  wall = time.perf_counter() - t0
  return {'wall_seconds': wall, 'epochs': s['epochs'],
          'batch_size': s['batch_size'], 'epoch_seconds': timer.seconds,
          'train_img_per_s': (n // s['batch_size']) * s['batch_size']
                             / timer.seconds,
          'test_accuracy': float(test_acc)}


def table(results: dict[str, Any]) -> str:
  w = results['whole_run']
  return '\n'.join(f'{k:8s} ' + '  '.join(f'{m}={v:.4g}' for m, v in
                                          w[k].items())
                   for k in ('cnn_jax', 'keras') if k in w)


def main(argv: list[str]) -> None:
  del argv
  common.run_tool(whole_run, table)


if __name__ == '__main__':
  app.run(main)
