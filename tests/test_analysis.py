"""Tests of the analysis package: metrics, intermediates and the report."""

from __future__ import annotations

import csv
import dataclasses
import html.parser
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from cnn_jax import inference, input_pipeline
from cnn_jax import workdir as workdir_lib
from cnn_jax.analysis import captions, intermediates, metrics, page, report
from cnn_jax.config import CnnJaxError

from conftest import MOCK_EXAMPLES, REPO

@pytest.fixture(scope='module')
def simple_model(trained_simple):
  """(model, best variables) of the trained SimpleCNN."""
  restored = inference.restore(trained_simple[1])
  return restored.model, restored.network_variables(0)


@pytest.fixture(scope='module')
def deep_model(trained_deep):
  """(model, best variables) of the trained DeepCNN."""
  restored = inference.restore(trained_deep[1])
  return restored.model, restored.network_variables(0)


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
  errors = metrics.errors_only(cm)
  np.testing.assert_array_equal(np.diag(errors), 0)
  assert errors.sum() == (labels != preds).sum() == 2
  assert metrics.confused_pairs(cm, 5) == [(0, 1, 1), (2, 0, 1)]
  assert metrics.confused_pairs(cm, 1) == [(0, 1, 1)]
  probs = np.array([[0.5, 0.5], [0.25, 0.75]])
  assert metrics.nll(probs, np.array([0, 1])) == pytest.approx(
      -(np.log(0.5) + np.log(0.75)) / 2)


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
            'confusion_matrix.png', 'confusion_errors.png',
            'confused_pairs.png',
            'per_class.png', 'predictions_gallery.png', 'saliency.png',
            'calibration.png', 'filters_first_layer.png',
            'filters_deeper_norms.png', 'top_activations.png',
            'receptive_fields.png', 'compare.json', 'compare_per_class.png',
            'compare_disagreements.png']
VOID = {'img', 'meta', 'br', 'link', 'input', 'hr'}


class _Page(html.parser.HTMLParser):
  """What the tests read from index.html: element ids, link targets, the
  text inside each element with an id, layer-table rows, red cells."""

  def __init__(self, path: str):
    super().__init__()
    self.ids: list[str] = []
    self.links: list[str] = []
    self.external: list[str] = []  # The findings page, outside the folder.
    self.text: dict[str, str] = {}
    self.stages: list[dict[str, str]] = []
    self.low: list[str] = []
    self._open: list[tuple[str, str | None, bool]] = []
    with open(path, encoding='utf-8') as f:
      self.feed(f.read())
    self.close()
    assert not self._open, f'unclosed elements: {self._open}'

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if 'id' in a:
      self.ids.append(a['id'])
    if tag == 'img':
      self.links.append(a['src'])
    if tag == 'a' and not a['href'].startswith('#'):
      outside = self._open and self._open[-1][1] == 'findings'
      (self.external if outside else self.links).append(a['href'])
    if tag == 'tr' and 'data-stage' in a:
      self.stages.append(a)
    if tag not in VOID:
      self._open.append((tag, a.get('id'), a.get('class') == 'low'))

  def handle_endtag(self, tag):
    if tag not in VOID:
      assert self._open.pop()[0] == tag, tag

  def handle_data(self, data):
    for _, elem_id, _ in self._open:
      if elem_id:
        self.text[elem_id] = self.text.get(elem_id, '') + data
    if self._open and self._open[-1][2]:
      self.low.append(data)


def _check_pngs(out: str, names: list[str]) -> None:
  for name in names:
    with Image.open(os.path.join(out, name)) as im:
      pixels = np.asarray(im.convert('RGB'), np.float32)
    assert min(pixels.shape[:2]) >= 100, name
    assert pixels.std() > 0, f'{name} is blank'


def _check_links(out: str, doc: _Page) -> None:
  """Every image and link of the page is a file inside the folder."""
  root = os.path.realpath(out)
  assert doc.links
  for link in doc.links:
    assert '://' not in link and not link.startswith('/'), link
    target = os.path.realpath(os.path.join(out, link))
    assert target.startswith(root + os.sep) and os.path.isfile(target), link


def _predictions(workdir: str, images: np.ndarray) -> np.ndarray:
  restored = inference.restore(workdir)
  return np.asarray(restored.predictor().logits(restored.variables,
                                                images))[0].argmax(-1)


def _indices(text: str) -> list[int]:
  return [int(i) for i in text.replace('#', ' ').replace(',', ' ').split()]


def test_analyze_simple_compared_with_deep(trained_simple, trained_deep,
                                           mock_tfds):
  config, workdir = trained_simple
  out = os.path.join(workdir, 'analysis')
  os.makedirs(out, exist_ok=True)
  # Files a previous analysis listed are replaced; other files are kept.
  for name in ('fmap_ex9_01_old.png', 'notes.txt'):
    with open(os.path.join(out, name), 'w') as f:
      f.write('x')
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump({'files': ['fmap_ex9_01_old.png']}, f)
  path = report.analyze(config, workdir, examples=(0, 3),
                        compare=trained_deep[1])
  assert not os.path.exists(os.path.join(out, 'fmap_ex9_01_old.png'))
  assert os.path.exists(os.path.join(out, 'notes.txt'))
  assert path == os.path.join(out, 'index.html')
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert set(EXPECTED) <= set(summary['files'])
  for name in summary['files']:
    assert os.path.isfile(os.path.join(out, name)), name
  layers = summary['feature_map_layers']
  fmaps = [f for f in summary['files'] if f.startswith('fmap_')]
  assert len(fmaps) == 2 * (len(layers) + 1)  # Input + each stage, 2 examples.
  assert 'fmap_ex3_03_pool1.png' in fmaps
  pngs = [f for f in summary['files'] if f.endswith('.png')]
  _check_pngs(out, pngs)

  # The page: well formed, every section, every image and link in the folder.
  doc = _Page(path)
  assert summary['sections'] == list(page.section_ids(True))
  assert set(summary['sections']) <= set(doc.ids)
  assert len(doc.ids) == len(set(doc.ids))
  assert [s for s in doc.ids if s in summary['sections']] == summary['sections']
  _check_links(out, doc)
  assert set(pngs) <= set(doc.links)
  findings = REPO / 'experiments' / 'FINDINGS.md'
  assert doc.external == ([findings.as_uri()] if findings.is_file() else [])
  assert 'experiments/FINDINGS.md' in doc.text['findings']
  assert f'{summary["num_params"]:,}' in doc.text['model-summary']
  assert 'conv1' in doc.text['model-summary']

  # Headline numbers: the run's own final evaluation of the same params.
  results, = workdir_lib.read_results(workdir).members
  labels = input_pipeline.load(config, splits=('test',)).test.labels
  images = input_pipeline.load(config, splits=('test',)).test.images
  assert summary['test_examples'] == MOCK_EXAMPLES
  assert summary['test_accuracy'] == pytest.approx(results.test_accuracy)
  assert summary['test_loss'] == pytest.approx(results.test_loss, rel=1e-4)
  assert summary['num_params'] == results.num_params
  assert summary['best_epoch'] == results.best_epoch
  assert 0 <= summary['ece'] <= 1
  right = round(summary['test_accuracy'] * MOCK_EXAMPLES)
  assert summary['mistakes'] == MOCK_EXAMPLES - right
  assert (f'classifies {right} of the {MOCK_EXAMPLES} mnist test images '
          f'correctly: {captions.pct(summary["test_accuracy"])}, with '
          f'{summary["mistakes"]} mistakes') in doc.text['summary-captions']

  # Training captions read the history.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    history = [json.loads(line) for line in f]
  training = doc.text['training-captions']
  assert f'Training ran {len(history)} epochs' in training
  assert (f'from {captions.pct(history[0]["val_accuracy"])} after epoch 1 to '
          f'{captions.pct(history[-1]["val_accuracy"])}') in training
  assert f'epoch {results.best_epoch} of {len(history)}' in training

  # The layer table adds up, with SimpleCNN's receptive fields.
  params = [int(r['data-params']) for r in doc.stages]
  assert sum(params) == summary['num_params']
  assert doc.text['total-params'].replace(',', '') == str(sum(params))
  fields = {r['data-stage']: r['data-field'] for r in doc.stages}
  assert [fields[n] for n in ('conv1', 'conv2', 'conv3')] == [
      '3×3', '8×8', '18×18']
  lessons = doc.text['architecture-captions']
  assert ('conv2 has 64 filters, each 3×3×32: its depth matches conv1’s 32'
          in lessons)

  # The example's lesson ends in the model's own decision.
  ex0 = doc.text['example-0-captions']
  assert 'Test image #0 belongs to class' in ex0 and 'The decision:' in ex0

  # Tables and the errors-only confusion matrix.
  with open(os.path.join(out, 'per_class.json')) as f:
    rows = json.load(f)
  with open(os.path.join(out, 'per_class.csv')) as f:
    csv_rows = list(csv.DictReader(f))
  with open(os.path.join(out, 'confusion_matrix.json')) as f:
    matrices = json.load(f)
  cm, errors = np.array(matrices['counts']), np.array(matrices['errors_only'])
  assert [r['class_name'] for r in csv_rows] == [r['class_name'] for r in rows]
  support = np.array([r['support'] for r in rows])
  np.testing.assert_array_equal(cm.sum(axis=1), support)
  np.testing.assert_array_equal(support, np.bincount(labels, minlength=10))
  assert np.trace(cm) / cm.sum() == pytest.approx(summary['test_accuracy'])
  np.testing.assert_array_equal(np.diag(errors), 0)
  np.testing.assert_array_equal(errors + np.diag(np.diag(cm)), cm)
  assert errors.sum() == summary['mistakes']
  assert f'got {summary["mistakes"]} of {MOCK_EXAMPLES} test images wrong' in (
      doc.text['mistakes-captions'])
  # Red marks exactly the classes below the overall accuracy.
  low = [captions.pct(r['recall']) for r in rows
         if r['recall'] < summary['test_accuracy']]
  assert doc.low[1:] == low  # The first red span is the legend's.
  results_text = doc.text['results-captions']
  if low:
    assert f'{len(low)} class' in results_text
  else:
    assert 'No class is below' in results_text

  # Side by side: the lists match the two runs' own predictions.
  mine = _predictions(workdir, images)
  theirs = _predictions(trained_deep[1], images)
  a_only = np.flatnonzero((mine == labels) & (theirs != labels))
  b_only = np.flatnonzero((theirs == labels) & (mine != labels))
  assert _indices(doc.text['a-right-b-wrong']) == a_only.tolist()
  assert _indices(doc.text['b-right-a-wrong']) == b_only.tolist()
  with open(os.path.join(out, 'compare.json')) as f:
    compared = json.load(f)
  assert compared['a_right_b_wrong'] == a_only.tolist()
  assert compared['both_wrong'] == np.flatnonzero(
      (mine != labels) & (theirs != labels)).tolist()
  assert (f'simple_cnn gets {len(a_only)} images right that deep_cnn gets '
          f'wrong; deep_cnn gets {len(b_only)} right') in doc.text[
              'compare-captions']


def test_analyze_deep_cnn_with_other_class_names(trained_deep, mock_tfds,
                                                 tmp_path):
  """Class names come from the run's dataset info, in every sentence."""
  config, source = trained_deep
  workdir = str(tmp_path / 'fashion_like')
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns('analysis'))
  info_path = os.path.join(workdir, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  names = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
           'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
  info.update(name='fashion_mnist', class_names=names)
  with open(info_path, 'w') as f:
    json.dump(info, f)
  config = dataclasses.replace(config, dataset='fashion_mnist')
  path = report.analyze(config, workdir, examples=[5])
  out = os.path.dirname(path)
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  layers = summary['feature_map_layers']
  assert {'bn1_1', 'pool1', 'conv2_2_relu', 'pool2'} <= set(layers)
  fmaps = sorted(f for f in summary['files'] if f.startswith('fmap_ex5_'))
  assert len(fmaps) == len(layers) + 1
  _check_pngs(out, fmaps + ['filters_deeper_norms.png',
                            'lesson_ex5_filter_map_pool.png',
                            'lesson_ex5_deeper.png', 'receptive_fields.png'])
  doc = _Page(path)
  assert summary['sections'] == list(page.section_ids(False))
  assert 'compare' not in doc.ids
  assert set(summary['sections']) <= set(doc.ids)
  _check_links(out, doc)
  with open(os.path.join(out, 'per_class.json')) as f:
    assert [r['class_name'] for r in json.load(f)] == names
  text = ' '.join(doc.text.values())
  assert '“T-shirt/top”' in doc.text['data-captions']
  assert 'digit' not in text.lower()
  fields = {r['data-stage']: r['data-field'] for r in doc.stages}
  assert fields['conv2_2'] == '14×14' and fields['pool2'] == '16×16'
  assert sum(int(r['data-params']) for r in doc.stages) == summary['num_params']
  assert 'The 3 dropout layers (rate 0.25)' in doc.text['architecture-captions']
  assert 'Test image #5 belongs to class' in doc.text['example-5-captions']


def test_analyze_without_checkpoint_raises(tmp_path, mock_tfds):
  from conftest import tiny_config
  config = tiny_config(tmp_path / 'tfds')
  with pytest.raises(CnnJaxError, match='no checkpoint'):
    report.analyze(config, str(tmp_path))
  with pytest.raises(CnnJaxError, match='does not exist'):
    report.analyze(config, str(tmp_path / 'missing'))


def test_analyze_rejects_bad_examples_and_compare(trained_simple, mock_tfds,
                                                  tmp_path):
  config, workdir = trained_simple
  with pytest.raises(CnnJaxError, match='out of range'):
    report.analyze(config, workdir, examples=(0, MOCK_EXAMPLES))
  with pytest.raises(CnnJaxError, match='--compare=.* does not exist'):
    report.analyze(config, workdir, compare=str(tmp_path / 'nothing'))
  with pytest.raises(CnnJaxError, match='--compare=.* holds no run'):
    report.analyze(config, workdir, compare=str(tmp_path))
  other = str(tmp_path / 'other')
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns('analysis'))
  info_path = os.path.join(other, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  info.update(name='cifar10', image_shape=[32, 32, 3])
  with open(info_path, 'w') as f:
    json.dump(info, f)
  with pytest.raises(CnnJaxError, match='same dataset'):
    report.analyze(config, workdir, compare=other)


def test_templates_ship_as_package_data():
  """A non-editable install carries every template file."""
  import fnmatch
  import tomllib
  with open(REPO / 'pyproject.toml', 'rb') as f:
    data = tomllib.load(f)['tool']['setuptools']['package-data']
  patterns = data['cnn_jax.analysis']
  templates = REPO / 'cnn_jax' / 'analysis' / 'templates'
  files = [f'templates/{p.name}' for p in templates.iterdir()]
  assert page.TEMPLATE in [p.name for p in templates.iterdir()]
  for name in files:
    assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_analyze_an_ensemble_workdir(trained_simple, trained_deep, mock_tfds,
                                     tmp_path):
  """The results are those of the averaged members; the new section shows
  each member and where they disagree; internals are the first member's."""
  from cnn_jax import ensemble
  config = trained_simple[0]
  out = str(tmp_path / 'ensemble')
  results = ensemble.build(config, [trained_simple[1], trained_deep[1]], out)
  path = report.analyze(workdir_lib.load_config(out).replace(
      tfds_data_dir=config.tfds_data_dir), out, examples=(0,))
  doc = _Page(path)
  summary = json.load(open(os.path.join(out, 'analysis', 'summary.json')))
  assert summary['sections'] == list(page.section_ids(False, True))
  assert [s for s in doc.ids if s in summary['sections']] == summary['sections']
  _check_links(os.path.join(out, 'analysis'), doc)
  assert summary['test_accuracy'] == pytest.approx(results.accuracy)
  assert summary['num_networks'] == 2
  assert captions.pct(results.ensemble.test_accuracy) in doc.text[
      'ensemble-captions']
  assert captions.pct(results.ensemble.vote_accuracy) in doc.text[
      'ensemble-captions']
  test = input_pipeline.load(config, splits=('test',)).test
  preds = [_predictions(w, test.images) for w in (trained_simple[1],
                                                  trained_deep[1])]
  disagree = int((preds[0] != preds[1]).sum())
  assert f'disagree on {captions.plural(disagree, "test image")}' in (
      doc.text['ensemble-captions'])
  for pred in preds:
    assert captions.pct(float((pred == test.labels).mean())) in (
        doc.text['ensemble-members'])
  assert 'holds 2 networks' in doc.text['architecture-members']
  # The layer table is the first member's (SimpleCNN) and adds up.
  assert int(doc.text['total-params'].replace(',', '')) == sum(
      int(s['data-params']) for s in doc.stages)
