"""`cnn_jax.results`: one layout for every workdir, and the earlier ones."""

import dataclasses
import math

from cnn_jax import results


def _member(name='seed0', seed=0, acc=0.99, **kw):
  return results.Member(name=name, model='simple_cnn', seed=seed,
                        num_params=93_322, best_epoch=3,
                        best_val_accuracy=0.98, best_val_loss=0.05,
                        test_accuracy=acc, test_loss=0.04, **kw)


def test_json_round_trip_and_the_headline_accuracy():
  one = results.Results(model='simple_cnn', dataset='mnist',
                        test_examples=10_000, members=(_member(),))
  saved = one.to_json()
  assert 'ensemble' not in saved and 'tta_test_accuracy' not in saved[
      'members'][0]  # What does not apply is left out.
  assert results.from_json(saved) == one
  assert one.accuracy == 0.99 and math.isnan(one.member_accuracy_std())
  two = dataclasses.replace(
      one, members=(_member(), _member('seed1', 1, 0.97)),
      ensemble=results.EnsembleScores(0.995, 0.03, 0.993))
  assert results.from_json(two.to_json()) == two
  assert two.accuracy == 0.995  # The ensemble's, under its own name.
  assert two.member_accuracies == [0.99, 0.97]


def test_the_three_earlier_layouts_read_as_this_one():
  single = results.from_json(
      {'model': 'deep_cnn', 'dataset': 'mnist', 'test_accuracy': 0.996,
       'test_loss': 0.02, 'best_val_accuracy': 0.995, 'best_val_loss': 0.03,
       'best_epoch': 17, 'epochs': 18, 'steps': 7722, 'num_params': 197_802,
       'num_models': 1, 'train_seconds': 600.0, 'train_img_per_s': 1700.0,
       'num_devices': 2, 'backend': 'cpu', 'kernels': 'auto',
       'test_examples': 10_000}, seeds=[4])
  member, = single.members
  assert (member.name, member.seed, member.best_epoch, member.num_params,
          member.test_accuracy) == ('seed4', 4, 17, 197_802, 0.996)
  assert single.ensemble is None and single.training.steps == 7722
  assert single.layout == 1
  many = results.from_json(
      {'model': 'deep_cnn', 'dataset': 'mnist', 'test_accuracy': 0.9975,
       'test_loss': 0.01, 'vote_accuracy': 0.9971, 'num_params': 197_802,
       'num_models': 2, 'epochs': 18, 'steps': 7722, 'test_examples': 10_000,
       'members': [{'seed': 0, 'test_accuracy': 0.9969, 'test_loss': 0.02,
                    'best_epoch': 18, 'best_val_accuracy': 0.996,
                    'best_val_loss': 0.02},
                   {'seed': 1, 'test_accuracy': 0.9967, 'test_loss': 0.02,
                    'best_epoch': 16, 'best_val_accuracy': 0.995,
                    'best_val_loss': 0.02}]})
  assert [m.name for m in many.members] == ['seed0', 'seed1']
  assert many.ensemble.test_accuracy == many.accuracy == 0.9975
  assert many.ensemble.vote_accuracy == 0.9971
  ensemble = results.from_json(
      {'model': 'ensemble', 'dataset': 'mnist', 'test_accuracy': 0.9975,
       'test_loss': 0.01, 'vote_accuracy': 0.997, 'test_examples': 10_000,
       'num_members': 3,
       'members': [{'workdir': 'runs/a', 'copy': 'members/0',
                    'model': 'simple_cnn', 'num_models': 1, 'seeds': [0],
                    'test_accuracy': 0.9957},
                   {'workdir': 'runs/b', 'copy': 'members/1',
                    'model': 'deep_cnn', 'num_models': 2, 'seeds': [0, 1],
                    'test_accuracy': [0.9969, 0.9967]}]})
  assert [(m.name, m.test_accuracy) for m in ensemble.members] == [
      ('members/0', 0.9957), ('members/1#seed0', 0.9969),
      ('members/1#seed1', 0.9967)]
  assert ensemble.training is None
  assert [s['workdir'] for s in ensemble.sources] == ['runs/a', 'runs/b']
