r"""Tunes a short recipe on the validation split only (the test split is never
loaded): every combination of the ``--grid`` values, for every seed.

  python -m experiments.tune_fast --flagfile=experiments/configs/fast.flags \
      --grid=batch_size=64,128 --grid=learning_rate=3e-3,5e-3 --seeds=0,1 \
      --out=/tmp/tune.jsonl

Each run trains ``--epochs`` like ``cnn_jax.main`` (same steps, same params)
and appends one JSON row to ``--out``: the settings, the seed, validation
accuracy and loss, training seconds and the number of XLA devices it
trained on (``--host_devices``, as in `cnn_jax.main`; one ``--out`` per
count). Rows already in ``--out`` are skipped, so re-running the command
resumes a sweep. One process: the data is read once (from the cnn_jax data
cache) and programs compile once per setting.
With ``--val_tta=N,...`` each row also has the validation accuracy with
that much test-time augmentation. With ``--num_models=K`` a row scores the
K members' averaged probabilities (members' own accuracies beside them).
With ``--val_corruptions=N`` each row also has the mean accuracy of the
first N validation images under every corruption of `cnn_jax.corruptions`
(robustness chosen without the test split or the font set).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any

from absl import app, flags, logging
import numpy as np

from cnn_jax import config_flags, runtime
from cnn_jax.config import CnnJaxError, Config

_GRID = flags.DEFINE_multi_string(
    'grid', [], 'FIELD=V1,V2,...: a Config field and the values to try.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds of every setting.')
_OUT = flags.DEFINE_string('out', None, 'JSON-lines file of results.',
                           required=True)
_VAL_CORRUPTIONS = flags.DEFINE_integer(
    'val_corruptions', 0, 'Also score the first N validation images under '
    'every corruption of cnn_jax.corruptions (seed VAL_CORRUPTION_SEED): '
    'robustness chosen on validation images, never on the test split or '
    'the font set (0 = off).')
_VAL_TTA = flags.DEFINE_list(
    'val_tta', [], 'Also score the validation split with test-time '
    'augmentation: for each N listed (1-8), the probabilities of each image '
    'and its first N shifted copies averaged (`--tta` of cnn_jax.main), as '
    'val_ttaN_accuracy.')
# Not robustness.py's default test seed: other draws on other images.
VAL_CORRUPTION_SEED = 1
config_flags.define_config_flags()
FLAGS = flags.FLAGS
_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
# Fields that decide which data is read: the sweep reads it once, so only
# train_examples (a prefix of the one training split) may vary.
_DATA_FIELDS = ('dataset', 'tfds_data_dir', 'val_examples', 'test_examples',
                'permute_pixels')


def parse_grid(specs: list[str]) -> list[dict[str, Any]]:
  """Every combination of ``FIELD=V1,V2`` specs, as typed overrides."""
  cast = {'int': int, 'float': float, 'str': str,
          'bool': lambda v: v.lower() in ('1', 'true', 'yes')}
  axes = []
  for spec in specs:
    name, _, values = spec.partition('=')
    if name in _DATA_FIELDS:
      raise app.UsageError(f'--grid: {name!r} changes the data the sweep '
                           'reads once; run one sweep per value')
    if name == 'host_devices':
      raise app.UsageError("--grid: 'host_devices' is set once, before JAX "
                           'starts; run one sweep per value')
    if _TYPES.get(name) not in cast:
      raise app.UsageError(f'--grid: {name!r} is not a Config field of one '
                           'number, string or bool')
    axes.append([(name, cast[_TYPES[name]](v)) for v in values.split(',')])
  return [dict(combo) for combo in itertools.product(*axes)]


def validate_run(config: Config, data: Any) -> dict[str, float]:
  """Trains ``config`` like `train.train_and_evaluate`; validation metrics."""
  import jax
  from cnn_jax import train
  n = config.train_examples or None
  run = train.setup(config, data.info.num_classes, data.info.image_shape,
                    data.train.images[:n], data.train.labels[:n])
  run.trainer.compile(run.state, run.images, run.labels, run.chunk)
  state = run.state
  t0 = time.perf_counter()
  for epoch in range(config.epochs):
    for state, metrics, _ in run.chunks(state, epoch):
      # One sync per chunk, as in training: hundreds of chunks queued at once
      # can deadlock XLA:CPU's all-reduce between host devices.
      jax.block_until_ready(metrics)
  seconds = time.perf_counter() - t0
  variables = train.variables_of(state)
  predictor = run.trainer.predictor
  from cnn_jax import losses
  vals = run.trainer.evaluate(variables, data.val.images, data.val.labels)
  row = {'val_accuracy': vals[0]['accuracy'], 'val_loss': vals[0]['loss'],
         'train_seconds': seconds, 'devices': jax.device_count()}
  if config.num_models > 1:  # The members' probabilities averaged.
    ensemble = losses.probability_metrics(
        predictor.probabilities(variables, data.val.images), data.val.labels)
    row.update(val_accuracy=ensemble['accuracy'], val_loss=ensemble['loss'],
               val_member_accuracy=[v['accuracy'] for v in vals])
  for n in map(int, _VAL_TTA.value):
    probs = predictor.probabilities(variables, data.val.images, n)
    row[f'val_tta{n}_accuracy'] = losses.probability_metrics(
        probs, data.val.labels)['accuracy']
  if _VAL_CORRUPTIONS.value:
    from cnn_jax import robustness
    n = _VAL_CORRUPTIONS.value
    scores = robustness.corrupted_accuracy(
        lambda x: np.asarray(predictor.logits(variables, x)).argmax(-1),
        data.val.images[:n], data.val.labels[:n], VAL_CORRUPTION_SEED,
        chunk=config.eval_batch_size)
    row.update(val_mean_corruption_accuracy=scores[
        'mean_corruption_accuracy'], val_corruption_accuracy=scores[
            'corruption_accuracy'])
  return row


def main(argv: list[str]) -> None:
  del argv
  runtime.configure_xla(max(FLAGS.host_devices, 0), FLAGS.batch_size)
  from cnn_jax import input_pipeline
  try:
    base = config_flags.config_from_flags()
  except CnnJaxError as e:
    raise app.UsageError(str(e)) from None
  if _VAL_CORRUPTIONS.value and base.num_models > 1:
    raise app.UsageError('--val_corruptions scores one network; it does not '
                         'take --num_models')
  if not all(v.isdigit() and 1 <= int(v) <= 8 for v in _VAL_TTA.value):
    raise app.UsageError(f'--val_tta takes numbers from 1 to 8, got '
                         f'{",".join(_VAL_TTA.value)}')
  grid = parse_grid(_GRID.value)  # A usage error before any data loads.
  done = set()
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      done = {json.dumps([r['settings'], r['seed']], sort_keys=True)
              for r in map(json.loads, f) if r}
  # The whole training split: each setting's train_examples takes a prefix.
  data = input_pipeline.load(base.replace(train_examples=0),
                             splits=('train', 'val'))
  for settings in grid:
    for seed in map(int, _SEEDS.value):
      key = json.dumps([settings, seed], sort_keys=True)
      if key in done:
        continue
      config = base.replace(seed=seed, **settings)
      row = {'settings': settings, 'seed': seed, **validate_run(config, data)}
      logging.info('%s seed %d: val acc %.2f%% loss %.4f%s (%.1fs)',
                   settings, seed, 100 * row['val_accuracy'], row['val_loss'],
                   '; corrupted val acc %.2f%%' % (
                       100 * row['val_mean_corruption_accuracy'])
                   if 'val_mean_corruption_accuracy' in row else '',
                   row['train_seconds'])
      with open(_OUT.value, 'a') as f:
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  app.run(main)
