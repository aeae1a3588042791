"""``--mode=robustness`` end to end on mock-trained workdirs: a single run,
a K-member run and an ensemble, each figure checked against the networks'
own predictions."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax import (corruptions, ensemble as ensemble_lib, evaluate,
                     font_digits, inference, input_pipeline, robustness, train)
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import CnnJaxError
from conftest import MOCK_EXAMPLES, REPO, tiny_config
from helpers.fonts import dejavu_dir

KINDS = ('rotate', 'dilate', 'canny_edges')
FONT_EXAMPLES = 20


@pytest.fixture(scope='module')
def fonts(tmp_path_factory) -> str:
  return dejavu_dir(tmp_path_factory.mktemp('fonts'))


def _options(fonts: str, **kw) -> robustness.Options:
  return robustness.Options(**{'font_dirs': (fonts,), 'corruptions': KINDS,
                               'font_examples': FONT_EXAMPLES, **kw})


def _copy(workdir: str, tmp_path: pathlib.Path) -> str:
  out = str(tmp_path / 'run')
  shutil.copytree(workdir, out)
  return out


def _run(workdir: str, options: robustness.Options, **overrides):
  config = workdir_lib.load_config(workdir).replace(**overrides)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return robustness.run(workdir, config, options), config


def _test_split(config):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return input_pipeline.load(config, splits=('test',)).test


def _expected(workdir, config, fonts, seed=0):
  """Every set's member probabilities, computed here from the library."""
  ens = inference.load(workdir, config)
  test = _test_split(config)
  sets = {'clean': (test.images, test.labels)}
  for kind in KINDS:
    levels = corruptions.get(kind).severities
    for s, params in enumerate(levels, start=1):
      images = np.asarray(corruptions.corrupt_images(kind, params,
                                                     test.images, seed))
      sets[f'{kind}/{s}'] = (images, test.labels)
  digits = font_digits.load(FONT_EXAMPLES, seed, [fonts])
  sets['fonts'] = (digits.images, digits.labels)
  return {name: (ens.member_probabilities(images), labels)
          for name, (images, labels) in sets.items()}


def _accuracy(probs, labels):
  return float((probs.argmax(-1) == labels).mean())


def _check_row(row, expected, member=None):
  pick = (lambda p: p.mean(0)) if member is None else (lambda p: p[member])
  acc = {name: _accuracy(pick(p), labels)
         for name, (p, labels) in expected.items()}
  assert row['clean_accuracy'] == pytest.approx(acc['clean'])
  assert row['font_accuracy'] == pytest.approx(acc['fonts'])
  assert row['font_error'] == pytest.approx(1 - acc['fonts'])
  for kind in KINDS:
    levels = len(corruptions.get(kind).severities)
    assert row['corruption_accuracy'][kind] == pytest.approx(
        [acc[f'{kind}/{s}'] for s in range(1, levels + 1)])
  mean = np.mean([np.mean(row['corruption_accuracy'][k]) for k in KINDS])
  assert row['mean_corruption_accuracy'] == pytest.approx(mean)
  assert row['mean_corruption_error'] == pytest.approx(1 - mean)


def test_single_run(trained_simple, fonts, tmp_path):
  workdir = _copy(trained_simple[1], tmp_path)
  out, config = _run(workdir, _options(fonts))
  assert json.loads(pathlib.Path(workdir, robustness.FILE).read_text()) == out
  assert out['format'] == robustness.FORMAT and out['dataset'] == 'mnist'
  assert [c['name'] for c in out['corruptions']] == list(KINDS)
  assert out['corruptions'][0]['severities'] == [
      {'degrees': 15.0}, {'degrees': 30.0}, {'degrees': 45.0}]
  assert out['test_examples'] == MOCK_EXAMPLES and out['tta'] == 0
  assert out['font_set']['examples'] == FONT_EXAMPLES
  assert sum(f['examples'] for f in out['font_set']['fonts']) == FONT_EXAMPLES
  assert [(r['name'], r['role'], r['tta']) for r in out['results']] == [
      ('network', 'network', 0)]
  expected = _expected(workdir, config, fonts)
  row = out['results'][0]
  _check_row(row, expected)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    assert row['clean_accuracy'] == pytest.approx(
        evaluate.evaluate_workdir(workdir, config).accuracy)
  assert out['summary'] == {k: row[k] for k in (
      'clean_accuracy', 'mean_corruption_accuracy', 'mean_corruption_error',
      'font_accuracy')}
  # Worst classes: the lowest per-class accuracies, lowest first.
  per_class = row['per_class']['corruptions']
  worst = row['worst_classes']['corruptions']
  assert [w['accuracy'] for w in worst] == sorted(per_class)[:3]
  assert [int(w['class']) for w in worst] == list(np.argsort(
      per_class, kind='stable')[:3])
  # Mistakes at the highest severity are wrong, their images the set's.
  test = _test_split(config)
  with np.load(os.path.join(workdir, robustness.EXAMPLES_FILE)) as z:
    npz = {k: z[k] for k in z.files}
  kept = out['mistakes']['corruptions']
  assert kept and len(kept) == len(npz['mistake_images'])
  for m, image in zip(kept, npz['mistake_images']):
    probs, labels = expected[f'{m["corruption"]}/{m["severity"]}']
    assert m['label'] == labels[m['index']] != m['prediction']
    assert m['prediction'] == probs.mean(0)[m['index']].argmax()
    np.testing.assert_allclose(image, corruptions.corrupt_images(
        m['corruption'], corruptions.params_of(m['corruption'],
                                               m['severity']),
        test.images[[m['index']]], 0, indices=np.array([m['index']]))[0],
                               atol=1)
  for m in out['mistakes']['fonts']:
    assert m['label'] != m['prediction']
  assert npz['examples'].shape == (3, 4, 2, 28, 28, 1)
  np.testing.assert_array_equal(npz['examples'][:, 0],
                                np.stack([test.images[:2]] * 3))
  assert not npz['examples'][2, 2:].any()  # Edges have one severity.
  table = robustness.format_table(out)
  assert 'rotate             3' in table and 'mean corruption' in table
  assert f'{FONT_EXAMPLES} digits' in table


def test_single_run_with_tta(trained_simple, fonts, tmp_path):
  workdir = _copy(trained_simple[1], tmp_path)
  out, config = _run(workdir, _options(fonts, corruptions=('rotate',)),
                     tta=2)
  assert [(r['role'], r['tta']) for r in out['results']] == [
      ('network', 0), ('network', 2)]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    scores = evaluate.evaluate_workdir(workdir, config)
  assert out['results'][1]['clean_accuracy'] == pytest.approx(
      scores.members[0].tta_test_accuracy)
  assert out['summary']['tta_mean_corruption_accuracy'] == (
      out['results'][1]['mean_corruption_accuracy'])
  assert 'net+tta2' in robustness.format_table(out)


@pytest.fixture(scope='module')
def trained_members(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp('members')
  config = tiny_config(root / 'tfds', num_models=2, epochs=1)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(config, str(root / 'run'))
  return str(root / 'run')


def test_k_member_run(trained_members, fonts, tmp_path):
  workdir = _copy(trained_members, tmp_path)
  out, config = _run(workdir, _options(fonts))
  rows = out['results']
  assert [r['role'] for r in rows] == ['member', 'member', 'ensemble']
  assert [n['seed'] for n in out['networks']] == [0, 1]
  expected = _expected(workdir, config, fonts)
  for k in range(2):
    _check_row(rows[k], expected, member=k)
  _check_row(rows[2], expected)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    scores = evaluate.evaluate_workdir(workdir, config)
  assert rows[2]['clean_accuracy'] == pytest.approx(
      scores.ensemble.test_accuracy)
  assert out['summary']['member_clean_accuracy'] == pytest.approx(
      scores.member_accuracies)
  assert out['summary']['clean_accuracy'] == rows[2]['clean_accuracy']
  table = robustness.format_table(out)
  assert 'm1' in table and 'm2' in table and 'ens' in table


def test_ensemble_workdir(trained_simple, trained_deep, fonts, tmp_path):
  workdir = str(tmp_path / 'ensemble')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    ensemble_lib.build(tiny_config(tmp_path / 'tfds'),
                       [trained_simple[1], trained_deep[1]], workdir)
  out, config = _run(workdir, _options(fonts, corruptions=('dilate',)),
                     tta=1)
  assert [(n['model']) for n in out['networks']] == ['simple_cnn', 'deep_cnn']
  assert [(r['role'], r['tta']) for r in out['results']] == [
      ('member', 0), ('member', 0), ('ensemble', 0), ('member', 1),
      ('member', 1), ('ensemble', 1)]
  ens = inference.load(workdir, config)
  test = _test_split(config)
  probs = ens.member_probabilities(test.images)
  assert out['results'][1]['clean_accuracy'] == pytest.approx(
      _accuracy(probs[1], test.labels))
  tta = ens.member_probabilities(test.images, 1).mean(0)
  assert out['results'][5]['clean_accuracy'] == pytest.approx(
      _accuracy(tta, test.labels))


def test_user_mistakes_are_clear(trained_simple, fonts, tmp_path):
  config = trained_simple[0]
  with pytest.raises(CnnJaxError, match="unknown corruption 'blur'"):
    robustness.run(trained_simple[1], config,
                   _options(fonts, corruptions=('blur',)))
  with pytest.raises(CnnJaxError, match='does not exist'):
    robustness.run(str(tmp_path / 'nothing'), config, _options(fonts))
  # No fonts: the error comes before any test image is read.
  with pytest.raises(CnnJaxError, match='no TrueType/OpenType fonts'):
    robustness.run(trained_simple[1], config,
                   _options(str(tmp_path), corruptions=('rotate',)))


def test_command_line(trained_simple, fonts, tmp_path):
  workdir = _copy(trained_simple[1], tmp_path)
  env = {k: v for k, v in os.environ.items() if k != 'TFDS_DATA_DIR'}
  env['PYTHONPATH'] = str(REPO)  # This checkout's cnn_jax, not another.
  ok = subprocess.run(
      [sys.executable, str(REPO / 'tests' / 'helpers' / 'mock_main.py'),
       '--mode=robustness', f'--workdir={workdir}', '--corruptions=scale',
       '--font_examples=10', f'--font_dirs={fonts}'],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert 'scale              3' in ok.stdout
  assert ok.stdout.strip().endswith(
      f'robustness written: {os.path.join(workdir, robustness.FILE)}')
  assert json.loads(pathlib.Path(workdir, robustness.FILE).read_text())[
      'font_set']['examples'] == 10


def test_corrupted_accuracy_scores_every_kind_and_severity():
  """The validation-side score recipes are chosen by: every kind at each
  severity, the mean of the kinds' means, deterministic by seed."""
  from cnn_jax import corruptions
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
  labels = (images.mean((1, 2, 3)) > 127).astype(np.int32)
  predict = lambda x: (np.asarray(x).mean((1, 2, 3)) > 127).astype(np.int32)
  kinds = ('brightness', 'erode', 'canny_edges')
  out = robustness.corrupted_accuracy(predict, images, labels, seed=1,
                                      kinds=kinds, chunk=16)
  assert out['clean_accuracy'] == 1.0
  assert {k: len(v) for k, v in out['corruption_accuracy'].items()} == {
      k: len(corruptions.get(k).severities) for k in kinds}
  assert out['mean_corruption_accuracy'] == pytest.approx(np.mean(
      [np.mean(v) for v in out['corruption_accuracy'].values()]))
  # Brighter images: the mean-brightness rule calls more of them bright.
  assert out['corruption_accuracy']['brightness'][-1] < 1.0
  again = robustness.corrupted_accuracy(predict, images, labels, seed=1,
                                        kinds=kinds, chunk=16)
  assert again == out
