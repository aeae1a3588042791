"""Orbax round trips, best-by-validation selection, corruption, mismatch."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from cnn_jax import models, registry, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError


def _state(config: Config):
  model = registry.create_model(config, 10)
  return train.create_train_state(config, model, (28, 28, 1), 10)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_latest_round_trip_restores_state_and_meta(tmp_path):
  config = Config(model='deep_cnn')
  state = _state(config).replace(step=7)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_latest(7, state, {'epoch': 1, 'history': [0.5]})
  fresh = _state(config.replace(seed=3))
  restored, meta = Checkpointer(str(tmp_path)).restore_latest(fresh)
  assert int(restored.step) == 7 and meta == {'epoch': 1, 'history': [0.5]}
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.batch_stats, state.batch_stats)
  _assert_trees_equal(restored.opt_state, state.opt_state)
  _assert_trees_equal(restored.key, state.key)


def test_nothing_to_restore_returns_none(tmp_path):
  assert Checkpointer(str(tmp_path)).restore_latest(_state(Config())) is None


def test_latest_keeps_two_and_best_keeps_one(tmp_path):
  state = _state(Config())
  ckpt = Checkpointer(str(tmp_path))
  for step in (1, 2, 3):
    ckpt.save_latest(step, state, {})
    ckpt.save_best(step, {'params': state.params}, {'accuracy': step / 10})
  assert ckpt.latest_steps() == [2, 3]
  assert sorted(os.listdir(tmp_path / 'checkpoints' / 'best')) == ['3']


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
  config = Config()
  ckpt = Checkpointer(str(tmp_path))
  s1, s2 = _state(config).replace(step=1), _state(config.replace(seed=9))
  ckpt.save_latest(1, s1, {'which': 'old'})
  ckpt.save_latest(2, s2.replace(step=2), {'which': 'new'})
  newest = tmp_path / 'checkpoints' / 'latest' / '2' / 'state'
  for f in newest.rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b'\0garbage')
  restored, meta = Checkpointer(str(tmp_path)).restore_latest(_state(config))
  assert meta == {'which': 'old'} and int(restored.step) == 1
  _assert_trees_equal(restored.params, s1.params)


def test_best_checkpoint_of_a_run_is_the_best_validation_epoch(
    trained_simple):
  config, workdir = trained_simple
  history = workdir_lib.read_history(workdir)
  best_epoch = 1 + int(np.argmax([r['val_accuracy'] for r in history]))
  target = models.init_variables(registry.create_model(config, 10),
                                 jax.random.PRNGKey(0), (28, 28, 1))
  _, meta = Checkpointer(workdir, read_only=True).restore_best(target)
  assert meta['epoch'] == best_epoch
  assert meta['accuracy'] == max(r['val_accuracy'] for r in history)
  with open(pathlib.Path(workdir) / 'results.json') as f:
    assert json.load(f)['best_epoch'] == best_epoch


def test_mismatched_model_is_a_clear_error(trained_simple):
  _, workdir = trained_simple
  other = registry.create_model(Config(width_multiplier=2.0), 10)
  target = models.init_variables(other, jax.random.PRNGKey(0), (28, 28, 1))
  with pytest.raises(CnnJaxError, match='does not match'):
    Checkpointer(workdir, read_only=True).restore_best(target)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CnnJaxError, match='no checkpoint'):
    Checkpointer(str(tmp_path), read_only=True).restore_best({})


def test_save_on_a_full_disk_is_refused_and_keeps_saved_steps(tmp_path,
                                                              monkeypatch):
  from cnn_jax import checkpointing
  config = Config()
  state = _state(config)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_latest(1, state.replace(step=1), {'n': 1})
  monkeypatch.setattr(checkpointing, 'free_bytes', lambda path: 100_000)
  with pytest.raises(CnnJaxError, match=r'No space left on device.*steps '
                     r'\[1\]\) are kept'):
    ckpt.save_latest(2, state.replace(step=2), {'n': 2})
  with pytest.raises(CnnJaxError, match='not enough free space'):
    ckpt.check_space(state)
  restored, meta = Checkpointer(str(tmp_path)).restore_latest(state)
  assert int(restored.step) == 1 and meta == {'n': 1}


def test_storage_errors_from_orbax_become_one_clear_line(tmp_path,
                                                         monkeypatch):
  import orbax.checkpoint as ocp
  state = _state(Config())
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_latest(1, state.replace(step=1), {})
  # What TensorStore raised here when a tmpfs filled up during a save.
  error = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": '
                     'Failed to write 3671 bytes to file 12: No space left on '
                     "device [os_error_code='28']")

  def full(*args, **kwargs):
    raise error
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
  with pytest.raises(CnnJaxError) as info:
    ckpt.save_best(2, {'params': state.params}, {})
  assert str(info.value).count('\n') == 0
  assert 'No space left on device' in str(info.value)
  assert 'nothing had been saved yet' in str(info.value)
  with pytest.raises(CnnJaxError, match=r'steps \[1\]\) are kept'):
    ckpt.save_latest(2, state.replace(step=2), {})

  def bug(*args, **kwargs):
    raise ValueError('some programming error')
  monkeypatch.setattr(ocp.CheckpointManager, 'save', bug)
  with pytest.raises(ValueError, match='programming error'):
    ckpt.save_latest(3, state.replace(step=3), {})
