"""Tests of the analysis package: metrics, intermediates and the report."""

from __future__ import annotations

import csv
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from cnn_jax import inference, input_pipeline
from cnn_jax.analysis import intermediates, metrics, report
from cnn_jax.config import CnnJaxError

from conftest import MOCK_EXAMPLES

@pytest.fixture(scope='module')
def simple_model(trained_simple):
  """(model, best variables) of the trained SimpleCNN."""
  restored = inference.restore(trained_simple[1])
  return restored.model, restored.variables


@pytest.fixture(scope='module')
def deep_model(trained_deep):
  """(model, best variables) of the trained DeepCNN."""
  restored = inference.restore(trained_deep[1])
  return restored.model, restored.variables


def _images(n: int, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return input_pipeline.normalize(
      jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)))


# Metrics on hand-made examples ------------------------------------------------
def test_confusion_and_per_class_by_hand():
  labels = np.array([0, 0, 1, 2, 2, 2])
  preds = np.array([0, 1, 1, 2, 0, 2])
  cm = metrics.confusion_matrix(labels, preds, 4)
  np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 1, 0, 0],
                                     [1, 0, 2, 0], [0, 0, 0, 0]])
  s = metrics.per_class_metrics(cm)
  np.testing.assert_allclose(s.precision, [1 / 2, 1 / 2, 1, 0])
  np.testing.assert_allclose(s.recall, [1 / 2, 1, 2 / 3, 0])
  np.testing.assert_allclose(s.f1, [1 / 2, 2 / 3, 0.8, 0])
  np.testing.assert_array_equal(s.support, [2, 1, 3, 0])
  np.testing.assert_array_equal(s.predicted, [2, 2, 2, 0])
  assert metrics.accuracy(cm) == pytest.approx(4 / 6)
  np.testing.assert_allclose(metrics.row_normalize(cm)[2], [1 / 3, 0, 2 / 3, 0])
  np.testing.assert_array_equal(metrics.row_normalize(cm)[3], 0)
  rows = s.rows(['a', 'b', 'c', 'd'])
  assert rows[2] == {'class_index': 2, 'class_name': 'c', 'precision': 1.0,
                     'recall': pytest.approx(2 / 3), 'f1': pytest.approx(0.8),
                     'support': 3, 'predicted': 2, 'correct': 2}
  with pytest.raises(ValueError):
    metrics.confusion_matrix(labels, preds[:3], 4)


def test_calibration_by_hand():
  conf = np.array([0.0, 0.1, 0.5, 0.55, 0.95, 1.0])
  correct = np.array([0, 0, 1, 0, 1, 1])
  cal = metrics.calibration(conf, correct, num_bins=2)
  # Bins are (lo, hi]: 0.5 falls in the first, 0 and 1 at the ends.
  np.testing.assert_array_equal(cal.counts, [3, 3])
  np.testing.assert_allclose(cal.accuracy, [1 / 3, 2 / 3])
  np.testing.assert_allclose(cal.confidence, [0.2, 2.5 / 3])
  expected = (abs(1 / 3 - 0.2) * 3 + abs(2 / 3 - 2.5 / 3) * 3) / 6
  assert cal.ece == pytest.approx(expected)
  perfect = metrics.calibration(np.ones(4), np.ones(4), num_bins=10)
  assert perfect.ece == 0.0 and perfect.counts[-1] == 4


def test_softmax_cross_entropy_and_gallery_selection():
  logits = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5], [1e3, 0.0, 0.0]])
  labels = np.array([0, 2, 0])
  np.testing.assert_allclose(metrics.softmax(logits),
                             jax.nn.softmax(jnp.asarray(logits)), rtol=1e-6)
  ref = optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), jnp.asarray(labels)).mean()
  assert metrics.cross_entropy(logits, labels) == pytest.approx(float(ref),
                                                                rel=1e-6)
  right, wrong = metrics.gallery_indices(
      labels=np.array([0, 1, 2, 3, 4, 5]), predictions=np.array([0, 2, 2, 0,
                                                                  4, 1]),
      confidences=np.array([0.9, 0.6, 0.5, 0.99, 0.7, 0.8]), num_correct=2,
      num_mistakes=2)
  np.testing.assert_array_equal(right, [0, 2])
  np.testing.assert_array_equal(wrong, [3, 5])


# Captured intermediates of the real models ------------------------------------
def test_capture_simple_cnn_shapes_and_values(simple_model):
  model, variables = simple_model
  x = _images(3)
  maps = intermediates.capture(model, variables, x)
  shapes = {m.name: m.value.shape for m in maps}
  assert list(shapes) == ['conv1', 'conv1_relu', 'pool1', 'conv2',
                          'conv2_relu', 'pool2', 'conv3', 'conv3_relu']
  assert shapes['conv1'] == (3, 26, 26, 32)
  assert shapes['pool1'] == (3, 13, 13, 32)
  assert shapes['conv2'] == (3, 11, 11, 64)
  assert shapes['pool2'] == (3, 5, 5, 64)
  assert shapes['conv3_relu'] == (3, 3, 3, 64)
  by_name = {m.name: m.value for m in maps}
  # The captured maps are the trained model's own computation.
  p = variables['params']['conv1']
  conv1 = jax.lax.conv_general_dilated(
      x, p['kernel'], (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias']
  np.testing.assert_allclose(by_name['conv1'], conv1, atol=1e-4)
  np.testing.assert_allclose(by_name['conv1_relu'],
                             np.maximum(by_name['conv1'], 0), atol=1e-6)
  np.testing.assert_allclose(
      by_name['pool1'], by_name['conv1_relu'][:, :26, :26].reshape(
          3, 13, 2, 13, 2, 32).max(axis=(2, 4)), atol=1e-6)
  kernels = intermediates.conv_kernels(variables['params'], list(shapes))
  assert [(n, k.shape) for n, k in kernels] == [
      ('conv1', (3, 3, 1, 32)), ('conv2', (3, 3, 32, 64)),
      ('conv3', (3, 3, 64, 64))]


def test_capture_deep_cnn_is_generic(deep_model):
  model, variables = deep_model
  maps = intermediates.capture(model, variables, _images(2))
  shapes = {m.name: m.value.shape for m in maps}
  # width_multiplier=0.25: stages of 8 and 16 channels; eval-mode dropout is
  # an identity and is not repeated.
  assert list(shapes) == [
      'conv1_1', 'bn1_1', 'conv1_1_relu', 'conv1_2', 'bn1_2', 'conv1_2_relu',
      'pool1', 'conv2_1', 'bn2_1', 'conv2_1_relu', 'conv2_2', 'bn2_2',
      'conv2_2_relu', 'pool2']
  assert shapes['bn1_1'] == (2, 26, 26, 8)
  assert shapes['pool1'] == (2, 12, 12, 8)
  assert shapes['conv2_2'] == (2, 8, 8, 16)
  assert shapes['pool2'] == (2, 4, 4, 16)
  assert [n for n, _ in intermediates.conv_kernels(
      variables['params'], list(shapes))] == ['conv1_1', 'conv1_2', 'conv2_1',
                                             'conv2_2']


def test_saliency_is_each_examples_own_input_gradient(deep_model):
  model, variables = deep_model
  x = _images(3, seed=1)
  classes = np.array([4, 0, 9])
  sal = intermediates.saliency(model, variables, x, classes)
  assert sal.shape == (3, 28, 28) and (sal >= 0).all() and sal.max() > 0
  # Central differences on single pixels of example 1 recover |d logit_0 /
  # d pixel| (the model is piecewise linear), and leave the other examples'
  # logits unchanged.
  forward = jax.jit(lambda x: model.apply(variables, x, train=False))
  eps = 1e-3
  for pixel in (np.unravel_index(sal[1].argmax(), sal[1].shape), (14, 9)):
    step = jnp.zeros_like(x).at[(1, *pixel, 0)].set(eps)
    plus, minus = np.asarray(forward(x + step)), np.asarray(forward(x - step))
    np.testing.assert_allclose(plus[[0, 2]], minus[[0, 2]], atol=1e-6)
    slope = abs(plus[1, 0] - minus[1, 0]) / (2 * eps)
    assert slope == pytest.approx(sal[1][pixel], rel=0.02, abs=1e-3)


# The whole report -------------------------------------------------------------
EXPECTED = ['index.html', 'summary.json', 'per_class.csv', 'per_class.json',
            'confusion_matrix.json', 'history.png', 'samples.png',
            'confusion_matrix.png', 'per_class.png', 'predictions_gallery.png',
            'saliency.png', 'calibration.png', 'filters_first_layer.png',
            'filters_deeper_norms.png', 'top_activations.png']


def _check_pngs(out: str, names: list[str]) -> None:
  for name in names:
    with Image.open(os.path.join(out, name)) as im:
      pixels = np.asarray(im.convert('RGB'), np.float32)
    assert min(pixels.shape[:2]) >= 100, name
    assert pixels.std() > 0, f'{name} is blank'


def test_analyze_simple_writes_a_consistent_report(trained_simple, mock_tfds):
  config, workdir = trained_simple
  out = os.path.join(workdir, 'analysis')
  os.makedirs(out, exist_ok=True)
  # Files a previous analysis listed are replaced; other files are kept.
  for name in ('fmap_ex9_01_old.png', 'notes.txt'):
    with open(os.path.join(out, name), 'w') as f:
      f.write('x')
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump({'files': ['fmap_ex9_01_old.png']}, f)
  path = report.analyze(config, workdir, examples=(0, 3))
  assert not os.path.exists(os.path.join(out, 'fmap_ex9_01_old.png'))
  assert os.path.exists(os.path.join(out, 'notes.txt'))
  assert path == os.path.join(out, 'index.html')
  for name in EXPECTED:
    assert os.path.isfile(os.path.join(out, name)), name
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  layers = summary['feature_map_layers']
  fmaps = [f for f in summary['files'] if f.startswith('fmap_')]
  assert len(fmaps) == 2 * (len(layers) + 1)  # Input + each stage, 2 examples.
  assert 'fmap_ex3_03_pool1.png' in fmaps
  pngs = [f for f in summary['files'] if f.endswith('.png')]
  assert set(EXPECTED) <= set(summary['files'])
  _check_pngs(out, pngs)
  with open(path) as f:
    page = f.read()
  assert set(re.findall(r'<img src="([^"]+)"', page)) == set(pngs)

  # Headline numbers: the same best params and test data as the run's own
  # final evaluation, and a trained model's parameter count.
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert summary['test_examples'] == MOCK_EXAMPLES
  assert summary['test_accuracy'] == pytest.approx(results['test_accuracy'])
  assert summary['test_loss'] == pytest.approx(results['test_loss'], rel=1e-4)
  assert summary['num_params'] == results['num_params']
  assert summary['best_epoch'] == results['best_epoch']
  assert 0 <= summary['ece'] <= 1
  assert f"{100 * summary['test_accuracy']:.2f}%" in page

  with open(os.path.join(out, 'per_class.json')) as f:
    rows = json.load(f)
  with open(os.path.join(out, 'per_class.csv')) as f:
    csv_rows = list(csv.DictReader(f))
  with open(os.path.join(out, 'confusion_matrix.json')) as f:
    cm = np.array(json.load(f)['counts'])
  assert [r['class_name'] for r in csv_rows] == [r['class_name'] for r in rows]
  assert [int(r['support']) for r in csv_rows] == [r['support'] for r in rows]
  support = np.array([r['support'] for r in rows])
  labels = input_pipeline.load(config, splits=('test',)).test.labels
  np.testing.assert_array_equal(cm.sum(axis=1), support)
  np.testing.assert_array_equal(support, np.bincount(labels, minlength=10))
  recall = np.array([r['recall'] for r in rows])
  assert (recall * support).sum() / support.sum() == pytest.approx(
      summary['test_accuracy'])
  assert np.trace(cm) / cm.sum() == pytest.approx(summary['test_accuracy'])


def test_analyze_deep_cnn_draws_every_stage(trained_deep, mock_tfds):
  config, workdir = trained_deep
  report.analyze(config, workdir, examples=[5])
  out = os.path.join(workdir, 'analysis')
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  layers = summary['feature_map_layers']
  assert {'bn1_1', 'pool1', 'conv2_2_relu', 'pool2'} <= set(layers)
  fmaps = sorted(f for f in summary['files'] if f.startswith('fmap_ex5_'))
  assert len(fmaps) == len(layers) + 1
  _check_pngs(out, fmaps + ['filters_deeper_norms.png'])


def test_analyze_without_checkpoint_raises(tmp_path, mock_tfds):
  from conftest import tiny_config
  config = tiny_config(tmp_path / 'tfds')
  with pytest.raises(CnnJaxError, match='no checkpoint'):
    report.analyze(config, str(tmp_path))
  with pytest.raises(CnnJaxError, match='does not exist'):
    report.analyze(config, str(tmp_path / 'missing'))


def test_analyze_rejects_out_of_range_examples(trained_simple, mock_tfds):
  config, workdir = trained_simple
  with pytest.raises(CnnJaxError, match='out of range'):
    report.analyze(config, workdir, examples=(0, MOCK_EXAMPLES))
