"""`cnn_jax.progress`: the best-epoch rule, the saved progress record."""

import math

import jax.numpy as jnp
import numpy as np

from cnn_jax import phases, progress
from cnn_jax.config import Config


def test_best_follows_the_chosen_metric():
  best = progress.Best(epoch=3, val_accuracy=0.99, val_loss=0.05)
  lower_loss_lower_acc = {'accuracy': 0.98, 'loss': 0.04}
  assert best.beaten_by(Config(best_metric='val_loss'), lower_loss_lower_acc)
  assert not best.beaten_by(Config(), lower_loss_lower_acc)
  assert best.beaten_by(Config(), {'accuracy': 0.995, 'loss': 0.09})
  assert not best.beaten_by(Config(), {'accuracy': 0.99, 'loss': 0.01})
  # Anything beats no best at all.
  assert progress.Best().beaten_by(Config(), {'accuracy': 0.0, 'loss': 9.0})


def test_progress_json_round_trip_and_the_layout_before_it():
  p = progress.Progress([progress.Best(2, 0.9, 0.3), progress.Best()],
                        train_seconds=4.5, sums={'count': [1, 2]})
  saved = p.to_json()
  assert saved['members'][1]['val_loss'] is None  # JSON has no infinity.
  back = progress.Progress.from_json(saved)
  assert back == p and math.isinf(back.members[1].val_loss)
  # One network's run, saved before the layout was shared: best_* on top.
  old = progress.Progress.from_json({'best_epoch': 4, 'best_val_accuracy': 0.8,
                                     'best_val_loss': 0.5, 'sums': None,
                                     'train_seconds': 3.0})
  assert old.members == [progress.Best(4, 0.8, 0.5)]
  # Many members, before: best_* per member, a first run without a loss.
  many = progress.Progress.from_json({'members': [
      {'best_epoch': 1, 'best_val_accuracy': 0.7},
      {'best_epoch': 2, 'best_val_accuracy': 0.6, 'best_val_loss': 0.4}]})
  assert many.members == [progress.Best(1, 0.7, math.inf),
                          progress.Best(2, 0.6, 0.4)]
  assert progress.Progress.start(3).members == [progress.Best()] * 3


def test_best_meta_lists_every_member():
  p = progress.Progress([progress.Best(2, 0.9, 0.3), progress.Best(1, 0.8, .4)])
  assert p.best_meta(20) == {'step': 20, 'members': [
      {'epoch': 2, 'loss': 0.3, 'accuracy': 0.9},
      {'epoch': 1, 'loss': 0.4, 'accuracy': 0.8}]}


def test_keep_best_takes_each_improved_member_and_keeps_the_others():
  old = {'w': jnp.zeros((3, 2))}
  new = {'w': jnp.ones((3, 2))}
  kept = progress.keep_best([True, False, True], new, old)
  np.testing.assert_array_equal(kept['w'], [[1, 1], [0, 0], [1, 1]])
  # One network (no member axis): improved means this epoch's variables.
  one = progress.keep_best([True], {'w': jnp.ones(2)}, {'w': jnp.zeros(2)})
  np.testing.assert_array_equal(one['w'], [1, 1])
  first = progress.keep_best([True], {'w': jnp.ones(2)}, None)
  np.testing.assert_array_equal(first['w'], [1, 1])


def test_keep_best_is_one_program_for_the_whole_tree():
  """Per leaf, each `where` would be its own program to trace and compile
  or look up (~10-20 ms each at the end of every improved epoch)."""
  tree = lambda v: {f'l{i}': jnp.full((i + 7, 3), v) for i in range(6)}
  new, old = tree(1.0), tree(2.0)
  with phases.compile_time() as c:
    kept = progress.keep_best([False], new, old)
  assert c['programs'] == 1
  assert all(np.all(np.asarray(a) == 2.0) for a in kept.values())
