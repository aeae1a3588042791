"""Train step, loop, resume, determinism and failure handling."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import losses, models, registry, stopping, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError
from conftest import tiny_config
from helpers.resume import (ChunkRecorder, SimulatedCrash, assert_same_run,
                            final_state)


def _state_and_batch(model_name: str, **kw):
  config = Config(model=model_name, learning_rate=3e-3, **kw)
  model = registry.create_model(config, 10)
  state = train.create_train_state(config, model, (28, 28, 1), 10)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, (32,)).astype(np.int32)
  return config, state, jnp.asarray(images), jnp.asarray(labels)


@pytest.mark.parametrize('model_name', ['simple_cnn', 'deep_cnn'])
def test_train_step_lowers_loss_on_a_fixed_batch(model_name):
  config, state, images, labels = _state_and_batch(
      model_name, model_options=({'dropout_rate': 0.0}
                                 if model_name == 'deep_cnn' else {}))
  step = jax.jit(lambda s: train.train_step(s, images, labels, config, 10))
  losses = []
  for _ in range(30):
    state, m = step(state)
    losses.append(float(m['loss_sum'] / m['count']))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 30


def test_deep_cnn_train_step_updates_batch_stats():
  config, state, images, labels = _state_and_batch('deep_cnn')
  new, _ = jax.jit(lambda s: train.train_step(s, images, labels, config,
                                              10))(state)
  assert not np.allclose(new.batch_stats['bn1_1']['mean'],
                         state.batch_stats['bn1_1']['mean'])


def test_run_writes_results_metrics_and_checkpoints(mock_tfds, tmp_path):
  config = tiny_config(tmp_path / 'tfds', epochs=2)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, 'config.json')) as f:
    assert Config.from_dict(json.load(f)) == config
  member, = results['members']
  assert results['layout'] == 2 and 'ensemble' not in results
  assert (member['name'], member['seed'], member['model']) == (
      'seed0', 0, 'simple_cnn')
  assert 0 <= member['test_accuracy'] <= 1 and member['test_loss'] > 0
  assert results['training']['epochs'] == 2
  assert results['training']['train_seconds'] > 0
  history = workdir_lib.read_history(workdir)
  assert [r['epoch'] for r in history] == [1, 2]
  assert member['best_val_accuracy'] == max(r['val_accuracy']
                                            for r in history)
  assert member['num_params'] == 93_322
  assert workdir_lib.read_results(workdir).accuracy == member['test_accuracy']
  assert os.listdir(os.path.join(workdir, 'tb'))


def test_best_metric_val_loss_keeps_the_lowest_val_loss_epoch(mock_tfds,
                                                               tmp_path):
  config = tiny_config(tmp_path / 'tfds', epochs=3, best_metric='val_loss')
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  history = workdir_lib.read_history(workdir)
  best = min(history, key=lambda r: r['val_loss'])
  member, = results['members']
  assert member['best_epoch'] == best['epoch']
  assert member['best_val_loss'] == best['val_loss']
  assert member['best_val_accuracy'] == best['val_accuracy']
  assert results['training']['best_metric'] == 'val_loss'


def test_same_seed_gives_identical_runs_and_other_seed_differs(mock_tfds,
                                                               tmp_path):
  config = tiny_config(tmp_path / 'tfds', model='deep_cnn', augment=True,
                       width_multiplier=0.25,
                     model_options={'dense_features': 16})
  a = train.train_and_evaluate(config, str(tmp_path / 'a'))
  b = train.train_and_evaluate(config, str(tmp_path / 'b'))
  c = train.train_and_evaluate(config.replace(seed=1), str(tmp_path / 'c'))
  assert workdir_lib.read_history(str(tmp_path / 'a'))[0]['train_loss'] == \
      workdir_lib.read_history(str(tmp_path / 'b'))[0]['train_loss']
  loss = lambda r: r['members'][0]['test_loss']
  assert loss(a) == loss(b)
  assert loss(a) != loss(c)


def test_interrupted_run_resumes_from_its_checkpoint_to_the_same_state(
    interrupted_simple, mock_tfds, tmp_path):
  """A crash in epoch 2; the rerun trains only the steps after step 10.

  DeepCNN (batch norm, dropout, augmentation) on 2 devices resumes in
  tests/test_preemption.py.
  """
  config, full, crashed, crashed_steps = interrupted_simple
  assert crashed_steps == list(range(1, 11))
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(crashed, resumed)
  state, meta = final_state(resumed)
  assert int(state.step) == 10 and meta['sums'] is not None  # Mid-epoch.
  assert not os.path.exists(os.path.join(resumed, 'results.json'))

  chunks = ChunkRecorder()
  train.train_and_evaluate(config, resumed, hooks=[chunks])
  assert chunks.steps == [11, 12]
  assert_same_run(full, resumed)


def test_stop_signal_in_an_epochs_last_chunk_still_ends_that_epoch(
    interrupted_simple, mock_tfds, tmp_path):
  """SIGTERM during steps 5-6, the end of epoch 1: the epoch is validated
  and its best params saved before stopping, so the rerun matches too."""
  config, full, _, _ = interrupted_simple
  workdir = str(tmp_path / 'run')
  with pytest.raises(stopping.Stop, match=r'signal 15 at step 6;'):
    train.train_and_evaluate(config, workdir,
                             hooks=[ChunkRecorder(sigterm_at=4)])
  assert [r['epoch'] for r in workdir_lib.read_history(workdir)] == [1]
  assert Checkpointer(workdir).latest_steps() == [4, 6]
  chunks = ChunkRecorder()
  train.train_and_evaluate(config, workdir, hooks=[chunks])
  assert chunks.steps == list(range(7, 13))
  assert_same_run(full, workdir)


def test_nan_loss_stops_and_keeps_the_best_checkpoint(mock_tfds, tmp_path):
  """Epoch 1 trains and is saved; its saved params then hold a NaN, so the
  resumed epoch 2 computes a NaN loss: training stops with one line, saves
  nothing more and keeps the best checkpoint."""
  config = tiny_config(tmp_path / 'tfds', epochs=2)
  workdir = str(tmp_path / 'run')
  with pytest.raises(SimulatedCrash):  # Before epoch 2's first chunk.
    train.train_and_evaluate(config, workdir,
                             hooks=[ChunkRecorder(crash_after=3)])
  state, meta = final_state(workdir)
  assert int(state.step) == 6
  poisoned = state.replace(params=jax.tree_util.tree_map(
      lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
  ckpt = Checkpointer(workdir)
  ckpt.save_latest(6, poisoned, meta)
  ckpt.close()
  with pytest.raises(CnnJaxError,
                     match=r'loss became nan at step 9 \(epoch 2\)'):
    train.train_and_evaluate(config, workdir)
  ckpt = Checkpointer(workdir)
  assert ckpt.has_best()
  assert max(ckpt.latest_steps()) == 6  # Nothing after the NaN was saved.
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


def test_resume_with_a_different_config_is_refused(mock_tfds, tmp_path):
  config = tiny_config(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  with pytest.raises(CnnJaxError, match='different config'):
    train.train_and_evaluate(config.replace(model='deep_cnn'), workdir)


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(CnnJaxError, match='not writable'):
    train.train_and_evaluate(tiny_config(tmp_path), str(blocker / 'run'))


@pytest.fixture
def small_disk(tmp_path):
  """Mounts a tmpfs of 8 MiB under tmp_path (root only; skipped otherwise)."""
  import subprocess
  mount = tmp_path / 'small_disk'
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(mount)],
      capture_output=True).returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def test_real_full_disk_errors_clearly_and_keeps_saved_work(mock_tfds,
                                                            tmp_path,
                                                            small_disk,
                                                            monkeypatch):
  from cnn_jax import checkpointing
  config = tiny_config(tmp_path / 'tfds', epochs=2, log_every_steps=2,
                       checkpoint_every_steps=2)
  ballast = small_disk / 'ballast'

  # Too little space from the start: refused before any training.
  ballast.write_bytes(b'\0' * (checkpointing.free_bytes(str(small_disk))
                               - 3 * 2**20))
  with pytest.raises(CnnJaxError, match='not enough free space'):
    train.train_and_evaluate(config, str(small_disk / 'early'))
  assert not (small_disk / 'early' / 'metrics.jsonl').exists()
  ballast.unlink()

  # The disk fills up (another writer) after the first checkpoint.
  workdir = str(small_disk / 'run')
  original = Checkpointer.save_latest

  def then_fill_disk(self, step, *args):
    original(self, step, *args)
    if not ballast.exists():
      ballast.write_bytes(b'\0' * (checkpointing.free_bytes(workdir)
                                   - 200_000))
  monkeypatch.setattr(Checkpointer, 'save_latest', then_fill_disk)
  with pytest.raises(CnnJaxError, match=r'No space left on device.*steps '
                     r'\[2\]\) are kept'):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert Checkpointer(workdir).latest_steps() == [2]
  ballast.unlink()
  chunks = ChunkRecorder()
  results = train.train_and_evaluate(config, workdir, hooks=[chunks])
  assert chunks.steps == list(range(3, 13))  # Resumed from step 2.
  assert results['training']['steps'] == 12
  assert [r['epoch'] for r in workdir_lib.read_history(workdir)] == [1, 2]


def test_batch_larger_than_train_set_is_an_error(mock_tfds, tmp_path):
  with pytest.raises(CnnJaxError, match='batch_size'):
    train.train_and_evaluate(tiny_config(tmp_path, batch_size=4096),
                             str(tmp_path / 'run'))


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
  logits = jnp.array([[20.0, 0.0, 0.0], [1.0, 2.0, 0.5]])
  labels = jnp.array([0, 2])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  for a in (0.0, 0.1):
    targets = np.eye(3)[np.asarray(labels)] * (1 - a) + a / 3
    loss, m = losses.loss_and_metrics(logits, labels, 3, label_smoothing=a)
    want = -(targets * log_p).sum(1)
    assert float(loss) == pytest.approx(want.mean(), rel=1e-6)
    assert float(m['loss_sum']) == pytest.approx(want.sum(), rel=1e-6)
    assert int(m['correct']) == 1 and int(m['count']) == 2


@pytest.mark.parametrize('model_name', ['simple_cnn', 'deep_cnn'])
def test_initial_state_compiled_for_speed_has_the_default_bits(model_name):
  """`create_train_state` compiles at XLA:CPU optimization level 1; the
  parameters are those of a default compile of the same init."""
  config = Config(model=model_name, seed=1)
  model = registry.create_model(config, 10)
  state = train.create_train_state(config, model, (28, 28, 1), 10)
  init_key, run_key = jax.random.split(jax.random.PRNGKey(1))
  reference = models.init_variables(model, init_key, (28, 28, 1))
  for a, b in zip(jax.tree_util.tree_leaves(
      (state.params, state.batch_stats, state.key)),
                  jax.tree_util.tree_leaves(
                      (reference['params'], reference.get('batch_stats', {}),
                       run_key)), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
