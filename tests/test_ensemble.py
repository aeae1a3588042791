"""`--mode=ensemble`: combining trained runs into a portable workdir."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax import ensemble, evaluate, export, inference, input_pipeline
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import CnnJaxError
from conftest import MOCK_EXAMPLES, tiny_config


@pytest.fixture(scope='module')
def built(trained_simple, trained_deep, tmp_path_factory):
  """(ensemble workdir, its results, the two member workdirs)."""
  out = str(tmp_path_factory.mktemp('ensemble') / 'out')
  members = [trained_simple[1], trained_deep[1]]
  config = tiny_config(tmp_path_factory.mktemp('tfds'))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    results = ensemble.build(config, members, out)
  return out, results, members


def _test_split(config):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return input_pipeline.load(config, splits=('test',)).test


def test_results_average_the_members_probabilities(built, trained_simple):
  out, results, members = built
  test = _test_split(trained_simple[0])
  probs = np.stack([inference.load(m).probabilities(test.images)
                    for m in members])
  mean = probs.mean(0)
  ens = results.ensemble
  assert ens.test_accuracy == pytest.approx(
      float((mean.argmax(-1) == test.labels).mean()))
  picked = mean[np.arange(len(test.labels)), test.labels]
  assert ens.test_loss == pytest.approx(float(-np.log(picked).mean()),
                                        rel=1e-5)
  votes = np.zeros_like(mean)
  for p in probs:
    votes[np.arange(len(test.labels)), p.argmax(-1)] += 1
  assert ens.vote_accuracy == pytest.approx(
      float((votes.argmax(-1) == test.labels).mean()))
  # One member a network, the same fields as a run's members.
  assert [m.model for m in results.members] == ['simple_cnn', 'deep_cnn']
  assert [m.name for m in results.members] == ['members/0', 'members/1']
  assert [s['workdir'] for s in results.sources] == members
  for m, member_dir in zip(results.members, members):
    own, = workdir_lib.read_results(member_dir).members
    for key in ('test_accuracy', 'best_epoch', 'best_val_accuracy', 'seed',
                'num_params'):
      assert getattr(m, key) == pytest.approx(getattr(own, key)), key
  assert results.training is None and results.test_examples == len(test)
  # Validation split too: every member held out the same one.
  assert 0 <= ens.val_accuracy <= 1 and ens.val_loss > 0
  saved = json.load(open(os.path.join(out, 'results.json')))
  assert saved == results.to_json() and saved['layout'] == 2


def test_the_workdir_is_self_contained_and_every_mode_reads_it(
    built, trained_simple, tmp_path, monkeypatch):
  out, results, _ = built
  moved = tmp_path / 'moved'
  shutil.copytree(out, moved)
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  config = workdir_lib.load_config(str(moved))
  assert config.model == 'ensemble' and config.members == 'members/0,members/1'
  loaded = inference.load(str(moved))
  assert loaded.num_members == 2
  images = _test_split(trained_simple[0]).images[:5]
  exported = export.export(config, str(moved), saved_model=False)
  import jax
  with open(os.path.join(exported, 'model.stablehlo'), 'rb') as f:
    fn = jax.export.deserialize(bytearray(f.read()))
  np.testing.assert_allclose(np.asarray(fn.call(images)),
                             loaded.probabilities(images), atol=1e-5)
  signature = json.load(open(os.path.join(exported, 'signature.json')))
  assert signature['num_members'] == 2
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    evaluated = evaluate.evaluate_workdir(
        str(moved), config.replace(tfds_data_dir=str(tmp_path / 'tfds')))
  assert evaluated.ensemble.test_accuracy == pytest.approx(
      results.ensemble.test_accuracy)
  assert evaluated.ensemble.vote_accuracy == pytest.approx(
      results.ensemble.vote_accuracy)


def test_tta_is_reported_beside_the_plain_figures(built, trained_simple,
                                                  tmp_path):
  out, results, _ = built
  config = workdir_lib.load_config(out).replace(
      tta=2, tfds_data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    evaluated = evaluate.evaluate_workdir(out, config)
  assert evaluated.accuracy == pytest.approx(results.accuracy)
  test = _test_split(trained_simple[0])
  probs = inference.load(out, config).member_probabilities(test.images)
  assert evaluated.tta == 2
  assert evaluated.ensemble.tta_test_accuracy == pytest.approx(
      float((probs.mean(0).argmax(-1) == test.labels).mean()))
  for k, member in enumerate(evaluated.members):
    assert member.tta_test_accuracy == pytest.approx(
        float((probs[k].argmax(-1) == test.labels).mean()))


def test_bad_members_are_one_clear_error(built, trained_simple, tmp_path):
  out, _, members = built
  config = tiny_config(tmp_path / 'tfds')
  cases = [
      ([members[0]], 'at least two'),
      ([members[0], str(tmp_path / 'missing')], 'does not exist'),
      ([members[0], out], 'is itself an ensemble'),
  ]
  empty = tmp_path / 'no_checkpoint'
  shutil.copytree(members[0], empty, ignore=shutil.ignore_patterns(
      'checkpoints'))
  cases.append(([members[0], str(empty)], 'has no checkpoint'))
  for name, change, message in (
      ('five_classes', dict(num_classes=5, class_names=list('abcde')),
       'not like the others'),
      ('fashion', dict(name='fashion_mnist'), 'an ensemble needs one dataset')):
    other = tmp_path / name
    shutil.copytree(members[0], other)
    info = json.load(open(other / 'dataset_info.json'))
    (other / 'dataset_info.json').write_text(json.dumps({**info, **change}))
    cases.append(([members[0], str(other)], message))
  for i, (names, message) in enumerate(cases):
    with pytest.raises(CnnJaxError, match=message):
      ensemble.build(config, names, str(tmp_path / f'out{i}'))
  with pytest.raises(CnnJaxError, match='already holds'):
    ensemble.build(config, members, out)
