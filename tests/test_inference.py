"""`cnn_jax.inference`: restoring from the workdir alone, batched outputs,
many-member runs and test-time augmentation."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import inference, input_pipeline, models, registry
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, CnnJaxError


def _images(n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def test_shift_moves_content_and_fills_with_zeros():
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  down = inference.shift(x, 1, 0)[0, ..., 0]
  np.testing.assert_array_equal(down[0], 0.0)
  np.testing.assert_array_equal(down[1:], x[0, :3, :, 0])
  left = inference.shift(x, 0, -1)[0, ..., 0]
  np.testing.assert_array_equal(left[:, :3], x[0, :, 1:, 0])
  np.testing.assert_array_equal(left[:, 3], 0.0)


@pytest.mark.parametrize('batch_size', [7, 1000])
def test_predictor_batches_give_the_model_outputs(batch_size):
  model = models.SimpleCNN()
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  images = _images(20)
  predictor = inference.Predictor(model, batch_size)
  want = model.apply(variables, input_pipeline.normalize(images))
  np.testing.assert_allclose(predictor.logits(variables, images), want,
                             rtol=1e-5, atol=1e-5)
  probs = predictor.probabilities(variables, images)
  np.testing.assert_allclose(probs, jax.nn.softmax(want), rtol=1e-5,
                             atol=1e-6)


def test_stacked_members_and_tta_average_what_they_say():
  model = models.SimpleCNN(features=(4, 8, 8), dense_features=8)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  each = [models.init_variables(model, k, (28, 28, 1)) for k in keys]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *each)
  images = _images(9)
  x = input_pipeline.normalize(images)
  predictor = inference.Predictor(model, 4, members=3)
  probs = predictor.probabilities(stacked, images, tta=2)
  assert probs.shape == (3, 9, 10)
  for k, v in enumerate(each):
    views = [x, inference.shift(x, 0, 1), inference.shift(x, 0, -1)]
    want = np.mean([jax.nn.softmax(model.apply(v, view)) for view in views], 0)
    np.testing.assert_allclose(probs[k], want, rtol=1e-5, atol=1e-6)
  metrics = predictor.evaluate(stacked, images, np.zeros(9, np.int32))
  assert len(metrics) == 3
  with pytest.raises(CnnJaxError, match='--tta must be between 0 and 8'):
    predictor.probabilities(stacked, images, tta=9)


def test_restore_needs_only_the_workdir(trained_simple, tmp_path,
                                        monkeypatch):
  """Moved elsewhere, with no TFDS data dir and an empty home."""
  _, workdir = trained_simple
  moved = tmp_path / 'moved'
  shutil.copytree(workdir, moved)
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  restored = inference.restore(str(moved))
  assert restored.info.class_names == tuple(str(i) for i in range(10))
  assert restored.info.image_shape == (28, 28, 1)
  original = inference.restore(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.variables,
                         original.variables)
  ensemble = inference.load(str(moved))
  network, = ensemble.networks
  assert (network.model, network.seed) == ('simple_cnn', 0)
  assert network.best_epoch == workdir_lib.read_results(workdir).members[
      0].best_epoch
  # Every run restores as stacked networks: one here.
  assert jax.tree_util.tree_leaves(restored.variables)[0].shape[0] == 1


def test_a_checkpoint_serves_either_kernel_setting(trained_simple):
  """Trained with the CPU kernels, restored with stock Flax (and back):
  the same function."""
  config, workdir = trained_simple
  restored = inference.restore(workdir)
  variables = restored.network_variables(0)
  images = input_pipeline.normalize(_images(16, seed=3))
  stock = restored.model.apply(variables, images)
  for kernels in ('cpu', 'flax'):
    trained = registry.create_model(config.replace(kernels=kernels), 10,
                                    backend='cpu')
    np.testing.assert_allclose(trained.apply(variables, images),
                               stock, rtol=1e-5, atol=1e-5)


def test_restore_errors_are_clear(tmp_path):
  with pytest.raises(CnnJaxError, match='does not exist'):
    inference.restore(str(tmp_path / 'nothing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CnnJaxError, match='no run found'):
    inference.restore(str(tmp_path / 'empty'))
  with pytest.raises(CnnJaxError, match='no checkpoint'):
    inference.restore(str(tmp_path / 'empty'), Config())
