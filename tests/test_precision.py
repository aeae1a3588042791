"""Mixed precision (``--dtype=bfloat16``): bf16 compute, float32 state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import input_pipeline, models, train
from helpers import train_steps

NUM_CLASSES = train_steps.NUM_CLASSES
IMAGE_SHAPE = train_steps.IMAGE_SHAPE
STEPS = 6


def _config(model: str, dtype: str):
  return train_steps.make_config(model, dtype, learning_rate=1e-2)


@pytest.fixture(scope='module')
def images() -> np.ndarray:
  return train_steps.synthetic_data()[0]


def test_bf16_logits_close_to_f32_with_the_same_params(images):
  model = 'simple_cnn'
  f32 = models.create_model(_config(model, 'float32'), NUM_CLASSES)
  bf16 = models.create_model(_config(model, 'bfloat16'), NUM_CLASSES)
  variables = models.init_variables(f32, jax.random.PRNGKey(0), IMAGE_SHAPE)
  x = input_pipeline.normalize(jnp.asarray(images))
  apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))
  want = np.asarray(apply(f32)(variables, x))
  got_array, inner = jax.jit(lambda v, x: bf16.apply(
      v, x, train=False, mutable=['intermediates']))(variables, x)
  got = np.asarray(got_array)
  # Computed in bf16 (hidden activations), returned as float32 logits.
  assert inner['intermediates']['pool1'][0].dtype == jnp.bfloat16
  assert got.dtype == np.float32
  scale = np.abs(want).max()
  assert 0 < np.abs(got - want).max() < 0.05 * scale + 0.02
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def test_bf16_training_keeps_float32_state_and_lowers_the_loss(images):
  """DeepCNN: bf16 convs, BN and dropout; params, Adam moments, BN stats f32."""
  config = _config('deep_cnn', 'bfloat16')
  net = models.create_model(config, NUM_CLASSES)
  trainer = train.Trainer(config, net, NUM_CLASSES)
  state = jax.device_put(
      train.create_train_state(config, net, IMAGE_SHAPE, STEPS),
      trainer.replicated)
  labels = train_steps.synthetic_data()[1]
  images_dev, labels_dev = trainer.put(images), trainer.put(labels)
  batch = trainer.put(np.arange(config.batch_size)[None])  # Same batch.
  losses = []
  for _ in range(STEPS):
    state, m = trainer.train_chunk(state, images_dev, labels_dev, batch)
    losses.append(float(m['loss_sum']) / float(m['count']))
  assert int(state.step) == STEPS
  leaves = jax.tree_util.tree_leaves(
      (state.params, state.opt_state, state.batch_stats))
  assert leaves
  floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert {leaf.dtype for leaf in floats} == {jnp.dtype(jnp.float32)}
  assert jax.tree_util.tree_leaves(state.batch_stats)
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
