"""Measures mixed precision (bf16 compute) against float32; saves the results.

Run as a script (``python tests/helpers/precision_run.py --out=FILE.npz``) in
a process started with `procs.jax_env`. It saves:

* ``logits_f32``, ``logits_bf16``: eval logits of SimpleCNN's float32 and
  bfloat16 variants with the same (float32) variables, on synthetic images;
  ``hidden_dtype_bf16``: the dtype of a hidden activation of the bf16 model;
* ``losses``: per-step losses of a bf16 DeepCNN trained on one fixed batch;
  ``state_dtypes``: the dtypes of its floating-point params, optimizer state
  and BN statistics afterwards; ``num_batch_stats``; ``steps``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_steps  # noqa: E402

STEPS = 6


def logits_of_both_dtypes() -> dict[str, np.ndarray]:
  import jax
  import jax.numpy as jnp
  from cnn_jax import input_pipeline, models, registry
  nets = {dtype: registry.create_model(
      train_steps.make_config('simple_cnn', dtype), train_steps.NUM_CLASSES)
      for dtype in ('float32', 'bfloat16')}
  variables = models.init_variables(nets['float32'], jax.random.PRNGKey(0),
                                    train_steps.IMAGE_SHAPE)
  x = input_pipeline.normalize(jnp.asarray(train_steps.synthetic_data()[0]))
  out = {}
  for dtype, net in nets.items():
    logits, inner = jax.jit(lambda v, x, net=net: net.apply(
        v, x, train=False, mutable=['intermediates']))(variables, x)
    short = 'f32' if dtype == 'float32' else 'bf16'
    out[f'logits_{short}'] = np.asarray(logits)
    if dtype == 'bfloat16':
      out['hidden_dtype_bf16'] = np.array(
          str(inner['intermediates']['pool1'][0].dtype))
  return out


def train_bf16_deep_cnn() -> dict[str, np.ndarray]:
  import jax
  import jax.numpy as jnp
  from cnn_jax import train
  config = train_steps.make_config('deep_cnn', 'bfloat16', learning_rate=1e-2)
  images, labels = train_steps.synthetic_data()
  run = train.setup(config, train_steps.NUM_CLASSES, train_steps.IMAGE_SHAPE,
                    images, labels)
  trainer, state = run.trainer, run.state
  batch = trainer.put(np.arange(config.batch_size)[None])  # Same batch.
  losses = []
  for _ in range(STEPS):
    state, m = trainer.train_chunk(state, run.images, run.labels, batch)
    losses.append(float(m['loss_sum']) / float(m['count']))
  leaves = jax.tree_util.tree_leaves(
      (state.params, state.opt_state, state.batch_stats))
  dtypes = sorted({str(leaf.dtype) for leaf in leaves
                   if jnp.issubdtype(leaf.dtype, jnp.floating)})
  return {'losses': np.array(losses), 'state_dtypes': np.array(dtypes),
          'num_batch_stats': np.array(
              len(jax.tree_util.tree_leaves(state.batch_stats))),
          'steps': np.array(int(state.step))}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  np.savez(args.out, **logits_of_both_dtypes(), **train_bf16_deep_cnn())
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
