"""The serving artifact: StableHLO via jax.export, its signature and example."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn_jax import export, inference
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import CnnJaxError
from conftest import tiny_config

# Runs a script with `import cnn_jax` made impossible.
WITHOUT_CNN_JAX = '''
import runpy, sys
class NoCnnJax:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'cnn_jax':
      raise ImportError('the exported model must not need cnn_jax')
sys.meta_path.insert(0, NoCnnJax())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
assert not any(m.split('.')[0] == 'cnn_jax' for m in sys.modules)
'''


@pytest.fixture(scope='module')
def exported(trained_simple):
  """(export dir, info, predictor, best variables) of the tiny trained run.

  Exported from the workdir alone: no TFDS (not even mocked) is needed.
  """
  config, workdir = trained_simple
  out = export.export(config, workdir)
  restored = inference.restore(workdir)
  return out, restored.info, restored.predictor(), restored.variables


def in_process(predictor, variables, images: np.ndarray) -> np.ndarray:
  """The restored run's probabilities (of its one network)."""
  return predictor.probabilities(variables, images)[0]


def sample_images(n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  images[: n // 2] = np.where(images[: n // 2] > 200, 255, 0)  # Sparser ones.
  return images


def test_files_are_written(exported):
  out, *_ = exported
  assert sorted(os.listdir(out)) == ['model.stablehlo', 'saved_model',
                                     'serve_example.py', 'signature.json']


@pytest.mark.parametrize('batch', [1, 5, 70])
def test_deserialized_artifact_matches_in_process(exported, batch):
  out, _, trainer, variables = exported
  with open(os.path.join(out, 'model.stablehlo'), 'rb') as f:
    restored = jax.export.deserialize(bytearray(f.read()))
  images = sample_images(batch, seed=batch)
  probs = np.asarray(restored.call(images))
  assert probs.shape == (batch, 10) and probs.dtype == np.float32
  np.testing.assert_allclose(probs, in_process(trainer, variables, images),
                             atol=1e-5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_signature(exported, trained_simple):
  out, info, *_ = exported
  _, workdir = trained_simple
  with open(os.path.join(out, 'signature.json')) as f:
    sig = json.load(f)
  results = workdir_lib.read_results(workdir)
  assert sig['input'] == {'name': 'images', 'shape': ['b', 28, 28, 1],
                          'dtype': 'uint8', 'layout': 'NHWC',
                          'value_range': [0, 255],
                          'normalization': 'x / 255 (float32 in [0, 1])'}
  assert sig['output']['shape'] == ['b', info.num_classes]
  assert sig['class_names'] == list(info.class_names)
  assert sig['model'] == 'simple_cnn' and sig['dataset'] == 'mnist'
  assert sig['test_accuracy'] == results.accuracy
  assert sig['num_params'] == results.members[0].num_params
  assert {'cpu', 'cuda', 'tpu'} <= set(sig['platforms'])
  assert 'centre of mass' in sig['preprocessing']


def test_serve_example_runs_without_cnn_jax(exported, tmp_path):
  out, _, trainer, variables = exported
  script = os.path.join(out, 'serve_example.py')
  with open(script) as f:
    assert 'cnn_jax' not in f.read()
  images = sample_images(4, seed=7)
  np.save(tmp_path / 'images.npy', images)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ''}
  run = subprocess.run(
      [sys.executable, '-c', WITHOUT_CNN_JAX, script,
       str(tmp_path / 'images.npy')],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.splitlines()
  assert len(lines) == 4
  expected = in_process(trainer, variables, images).argmax(-1)
  for i, (line, k) in enumerate(zip(lines, expected)):
    assert line.startswith(f'{tmp_path / "images.npy"}[{i}]: {k} (')
  demo = subprocess.run([sys.executable, script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert demo.returncode == 0, demo.stderr[-2000:]
  assert [l.split(':')[0] for l in demo.stdout.splitlines()] == [
      'synthetic stroke', 'synthetic ring']


def test_saved_model_matches(exported):
  import tensorflow as tf
  out, _, trainer, variables = exported
  loaded = tf.saved_model.load(os.path.join(out, 'saved_model'))
  images = sample_images(3, seed=3)
  result = loaded.signatures['serving_default'](images=tf.constant(images))
  (probs,) = result.values()
  np.testing.assert_allclose(probs.numpy(), in_process(trainer, variables,
                                                       images), atol=1e-5)


def test_export_needs_a_checkpoint(tmp_path):
  config = tiny_config(tmp_path / 'tfds')
  with pytest.raises(CnnJaxError, match='does not exist'):
    export.export(config, str(tmp_path / 'no_run'))
  (tmp_path / 'empty_run').mkdir()
  with pytest.raises(CnnJaxError, match='no checkpoint'):
    export.export(config, str(tmp_path / 'empty_run'))
