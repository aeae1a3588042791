"""Trains a few steps of a tiny model on fixed synthetic data; saves results.

Run as a script in a fresh process, so the caller controls what JAX sees
before it is imported (``XLA_FLAGS=--xla_force_host_platform_device_count``,
``jax.distributed``)::

  python tests/helpers/train_steps.py --out=DIR --models=simple_cnn,deep_cnn \
      --devices=1,8 [--dtype=bfloat16] [--coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=0]

For each model and device count it writes ``DIR/<model>_<n>dev[_p<id>].npz``
holding the final params (``params/...``), BN statistics
(``batch_stats/...``), the per-step losses (``loss``) and eval-mode logits
before and after training (``logits0``, ``logits``), all as seen by this
process. With ``--coordinator_address`` it also writes ``DIR/process<i>.json``
(process index/count, global device count, `distributed.any_process`
results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
NUM_EXAMPLES = 128
BATCH_SIZE = 32
STEPS = 4


def synthetic_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Learnable uint8 images: class k lights up block k, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32)
  images = rng.integers(0, 60, (NUM_EXAMPLES, *IMAGE_SHAPE))
  for i, k in enumerate(labels):
    r, c = divmod(int(k), 5)
    images[i, 4 + 10 * r:10 + 10 * r, 1 + 5 * c:5 + 5 * c, 0] += 180
  return images.astype(np.uint8), labels


def step_indices(seed: int = 1) -> np.ndarray:
  """[STEPS, BATCH_SIZE] example indices, fixed by the seed."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(NUM_EXAMPLES)[:BATCH_SIZE]
                   for _ in range(STEPS)]).astype(np.int32)


def make_config(model: str, dtype: str = 'float32', **overrides: Any):
  from cnn_jax.config import Config
  base = dict(model=model, dtype=dtype, batch_size=BATCH_SIZE,
              eval_batch_size=64, learning_rate=3e-3, seed=0,
              width_multiplier=0.25, model_options=(
                  {'dense_features': 16} if model != 'deep_cnn' else
                  {'dense_features': 16, 'dropout_rate': 0.25}))
  base.update(overrides)
  return Config(**base)


def _local(x) -> np.ndarray:
  """A replicated (possibly multi-process) array as a host numpy array."""
  assert x.is_fully_replicated, x.sharding
  return np.asarray(x.addressable_shards[0].data)


def _flat(prefix: str, tree: Any) -> dict[str, np.ndarray]:
  import jax
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = '/'.join(str(getattr(p, 'key', p)) for p in path)
    out[f'{prefix}/{key}'] = _local(leaf)
  return out


def initial_state(model_name: str, dtype: str) -> Any:
  """The initial TrainState of the model, as host (numpy) arrays."""
  import jax
  from cnn_jax import registry, train
  config = make_config(model_name, dtype)
  model = registry.create_model(config, NUM_CLASSES)
  return jax.device_get(
      train.create_train_state(config, model, IMAGE_SHAPE, STEPS))


def run(model_name: str, num_devices: int, dtype: str, host_state: Any
        ) -> dict[str, np.ndarray]:
  """Trains STEPS steps from ``host_state`` on the first ``num_devices``."""
  import jax
  from jax.sharding import Mesh
  from cnn_jax import train
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ('data',))
  images, labels = synthetic_data()
  setup = train.setup(make_config(model_name, dtype), NUM_CLASSES, IMAGE_SHAPE,
                      images, labels, mesh=mesh, state=host_state)
  trainer, state = setup.trainer, setup.state
  logits0 = trainer.predictor.logits(train.variables_of(state), setup.images)
  idx_np = step_indices()
  losses = []
  for i in range(STEPS):  # One step per chunk: a loss per step.
    idx = jax.make_array_from_callback(
        (1, BATCH_SIZE), trainer.index_sharding,
        lambda index, i=i: idx_np[i:i + 1][index])
    state, m = trainer.train_chunk(state, setup.images, setup.labels, idx)
    losses.append(float(_local(m['loss_sum'])) / float(_local(m['count'])))
  variables = train.variables_of(state)
  out = {'loss': np.array(losses), 'logits0': _local(logits0),
         'logits': _local(trainer.predictor.logits(variables, setup.images)),
         'step': _local(state.step)}
  out.update(_flat('params', state.params))
  if state.batch_stats:
    out.update(_flat('batch_stats', state.batch_stats))
  return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--models', default='simple_cnn')
  parser.add_argument('--devices', default='1')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args(argv)
  suffix = ''
  os.makedirs(args.out, exist_ok=True)
  if args.coordinator_address:
    from cnn_jax import distributed
    index = distributed.initialize(args.coordinator_address,
                                   args.num_processes, args.process_id,
                                   timeout_s=60)
    suffix = f'_p{index}'
    import jax
    with open(os.path.join(args.out, f'process{index}.json'), 'w') as f:
      json.dump({'process_index': jax.process_index(),
                 'process_count': jax.process_count(),
                 'device_count': jax.device_count(),
                 'any_process_one_true': distributed.any_process(index == 1),
                 'any_process_all_false': distributed.any_process(False)}, f)
  import jax
  for model_name in args.models.split(','):
    host_state = initial_state(model_name, args.dtype)
    for n in args.devices.split(','):
      n = jax.device_count() if n == 'all' else int(n)
      out = run(model_name, n, args.dtype, host_state)
      np.savez(os.path.join(args.out, f'{model_name}_{n}dev{suffix}.npz'),
               **out)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
