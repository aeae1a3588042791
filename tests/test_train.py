"""Train step, loop, resume, determinism and failure handling."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import losses, models, registry, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError
from conftest import tiny_config
from helpers.resume import (assert_same_run, final_state, record_chunks,
                            steps_run)


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


LR = 0.1


def _optimizer_updates(config: Config, grads: list, params: dict) -> list:
  """The chain's updates for a sequence of gradients, params moving."""
  tx = train.make_optimizer(config, 10)
  opt_state = tx.init(params)
  out = []
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


@pytest.mark.parametrize('optimizer,momentum,factors', [
    ('sgd', 0.0, [1, 1, 1]),  # u = -lr g
    ('sgd', 0.5, [1, 1.5, 1.75]),  # v = m v + g; u = -lr v
    ('nesterov', 0.5, [1.5, 1.75, 1.875]),  # u = -lr (g + m v)
])
def test_momentum_and_nesterov_follow_their_update_rules(optimizer, momentum,
                                                         factors):
  config = Config(optimizer=optimizer, momentum=momentum, learning_rate=LR)
  params = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}
  grads = [jax.tree_util.tree_map(jnp.ones_like, params)] * 3
  updates = _optimizer_updates(config, grads, params)
  for u, factor in zip(updates, factors):
    for leaf in jax.tree_util.tree_leaves(u):
      np.testing.assert_allclose(leaf, -LR * factor, rtol=1e-6)


def _textbook_updates(optimizer: str, grads: list[np.ndarray], p: np.ndarray,
                      decayed: bool, momentum: float, weight_decay: float
                      ) -> list[np.ndarray]:
  """One leaf's updates by the published formulas, in float64."""
  b1, b2, eps, rms_decay = 0.9, 0.999, 1e-8, 0.9
  m = v = np.zeros_like(p)
  out = []
  for t, g in enumerate(grads, 1):
    if optimizer in ('adam', 'adamw'):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      if optimizer == 'adamw' and decayed:
        step = step + weight_decay * p  # Decoupled: not through Adam.
      u = -LR * step
    elif optimizer == 'rmsprop':
      v = rms_decay * v + (1 - rms_decay) * g * g
      m = momentum * m - LR * g / np.sqrt(v + eps)
      u = m
    else:  # sgd with momentum, nesterov.
      m = momentum * m + g
      u = -LR * (g + momentum * m if optimizer == 'nesterov' else m)
    p = p + u
    out.append(u)
  return out


@pytest.mark.parametrize('optimizer,momentum,weight_decay', [
    ('sgd', 0.9, 0.0), ('nesterov', 0.9, 0.0), ('adam', 0.9, 0.0),
    ('adamw', 0.9, 0.05), ('rmsprop', 0.0, 0.0), ('rmsprop', 0.9, 0.0)])
def test_every_optimizer_matches_its_textbook_update(optimizer, momentum,
                                                     weight_decay):
  config = Config(optimizer=optimizer, momentum=momentum,
                  weight_decay=weight_decay, learning_rate=LR)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 2)), 'bias': rng.normal(size=2)}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()}
           for _ in range(4)]
  as_f32 = lambda tree: jax.tree_util.tree_map(jnp.float32, tree)
  got = _optimizer_updates(config, [as_f32(g) for g in grads],
                           as_f32(params))
  for name, p in params.items():
    want = _textbook_updates(optimizer, [g[name] for g in grads], p,
                             decayed=name == 'kernel', momentum=momentum,
                             weight_decay=weight_decay)
    for t, (u, w) in enumerate(zip(got, want)):
      np.testing.assert_allclose(u[name], w, rtol=2e-5, atol=1e-7,
                                 err_msg=f'{name} step {t}')


def _schedule(name: str, warmup_epochs: float = 0.0) -> np.ndarray:
  """Learning rates at steps 0..40 of 4 epochs of 10 steps."""
  config = Config(lr_schedule=name, epochs=4, warmup_epochs=warmup_epochs,
                  learning_rate=LR)
  sched = train.make_schedule(config, 10)
  return np.array([float(sched(s)) for s in range(41)])


def test_constant_and_step_schedules_and_their_warmup():
  steps = np.arange(41)
  np.testing.assert_allclose(_schedule('constant'), LR)
  # Step: x0.1 from 50% (step 20) and again from 75% (step 30) of training.
  step = np.where(steps < 20, LR, np.where(steps < 30, LR / 10, LR / 100))
  np.testing.assert_allclose(_schedule('step'), step, rtol=1e-6)
  # Warm-up: linear from 0 to the peak at warmup_epochs * steps_per_epoch
  # (step 10), then the schedule at the same absolute steps as without it.
  ramp = LR * steps / 10
  np.testing.assert_allclose(_schedule('constant', 1.0),
                             np.where(steps < 10, ramp, LR), rtol=1e-6,
                             atol=1e-9)
  np.testing.assert_allclose(_schedule('step', 1.0),
                             np.where(steps < 10, ramp, step), rtol=1e-6,
                             atol=1e-9)


@pytest.mark.parametrize('warmup', [0, 10])
def test_cosine_schedule_warms_up_then_decays_to_zero(warmup):
  steps = np.arange(41)
  decay = 0.5 * LR * (1 + np.cos(np.pi * (steps - warmup) / (40 - warmup)))
  want = np.where(steps < warmup, LR * steps / max(warmup, 1), decay)
  got = _schedule('cosine', warmup / 10)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  assert got[warmup] == pytest.approx(LR) and got[-1] == pytest.approx(0.0)
  assert got[0] == pytest.approx(0.0 if warmup else LR)


@pytest.mark.parametrize('warmup_epochs,peak_step', [(0.0, 10), (2.0, 20)])
def test_onecycle_peaks_at_the_warmup_end(warmup_epochs, peak_step):
  got = _schedule('onecycle', warmup_epochs)  # Default warm-up: 25%.
  assert int(np.argmax(got)) == peak_step
  assert got[peak_step] == pytest.approx(LR)
  assert got[0] == pytest.approx(LR / 25)  # optax's div_factor.
  assert got[-1] == pytest.approx(LR / 25 / 1e4)  # And final_div_factor.
  assert np.all(np.diff(got[:peak_step + 1]) > 0)
  assert np.all(np.diff(got[peak_step:]) < 0)


def test_grad_clip_norm_limits_the_global_norm_only_when_above():
  config = Config(optimizer='sgd', momentum=0.0, grad_clip_norm=1.0,
                  learning_rate=LR)
  params = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}
  big = {'kernel': jnp.array([[3.0, 0.0], [0.0, 0.0]]),
         'bias': jnp.array([0.0, 4.0])}  # Global norm 5.
  small = jax.tree_util.tree_map(lambda g: g / 10, big)  # Norm 0.5.
  (clipped,), (kept,) = (_optimizer_updates(config, [g], params)
                         for g in (big, small))
  assert float(optax.global_norm(clipped)) == pytest.approx(LR * 1.0)
  for name in params:
    np.testing.assert_allclose(clipped[name], -LR * big[name] / 5, rtol=1e-6)
    np.testing.assert_allclose(kept[name], -LR * small[name], rtol=1e-6)


def test_weight_decay_skips_biases():
  config = Config(optimizer='sgd', weight_decay=0.1, momentum=0.0)
  tx = train.make_optimizer(config, 10)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates['kernel']).sum()) > 0
  assert float(jnp.abs(updates['bias']).sum()) == 0


def test_run_writes_results_metrics_and_checkpoints(mock_tfds, tmp_path):
  config = tiny_config(tmp_path / 'tfds', epochs=2)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  for key in ('test_accuracy', 'test_loss', 'best_val_accuracy', 'epochs',
              'num_params', 'train_seconds'):
    assert key in results
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, 'config.json')) as f:
    assert Config.from_dict(json.load(f)) == config
  history = workdir_lib.read_history(workdir)
  assert [r['epoch'] for r in history] == [1, 2]
  assert results['best_val_accuracy'] == max(r['val_accuracy']
                                             for r in history)
  assert results['num_params'] == 93_322
  assert os.listdir(os.path.join(workdir, 'tb'))


def test_best_metric_val_loss_keeps_the_lowest_val_loss_epoch(mock_tfds,
                                                               tmp_path):
  config = tiny_config(tmp_path / 'tfds', epochs=3, best_metric='val_loss')
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  history = workdir_lib.read_history(workdir)
  best = min(history, key=lambda r: r['val_loss'])
  assert results['best_epoch'] == best['epoch']
  assert results['best_val_loss'] == best['val_loss']
  assert results['best_val_accuracy'] == best['val_accuracy']
  assert results['best_metric'] == 'val_loss'


def test_is_better_follows_the_chosen_metric():
  meta = {'best_epoch': 3, 'best_val_accuracy': 0.99, 'best_val_loss': 0.05}
  lower_loss_lower_acc = {'accuracy': 0.98, 'loss': 0.04}
  assert train.is_better(Config(best_metric='val_loss'), lower_loss_lower_acc,
                         meta)
  assert not train.is_better(Config(), lower_loss_lower_acc, meta)
  assert train.is_better(Config(), {'accuracy': 0.995, 'loss': 0.09}, meta)
  assert train.is_better(Config(), {'accuracy': 0.0, 'loss': 9.0},
                         {'best_epoch': -1, 'best_val_accuracy': -1.0})


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
  assert a['test_loss'] == b['test_loss']
  assert a['test_loss'] != c['test_loss']


def test_interrupted_run_resumes_from_its_checkpoint_to_the_same_state(
    interrupted_simple, mock_tfds, tmp_path, monkeypatch):
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

  chunks = record_chunks(monkeypatch)
  train.train_and_evaluate(config, resumed)
  assert steps_run(chunks) == [11, 12]
  assert_same_run(full, resumed)


def test_stop_signal_in_an_epochs_last_chunk_still_ends_that_epoch(
    interrupted_simple, mock_tfds, tmp_path, monkeypatch):
  """SIGTERM during steps 5-6, the end of epoch 1: the epoch is validated
  and its best params saved before stopping, so the rerun matches too."""
  config, full, _, _ = interrupted_simple
  workdir = str(tmp_path / 'run')
  record_chunks(monkeypatch, sigterm_at=4)
  with pytest.raises(train.Stop, match=r'signal 15 at step 6;'):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert [r['epoch'] for r in workdir_lib.read_history(workdir)] == [1]
  assert Checkpointer(workdir).latest_steps() == [4, 6]
  chunks = record_chunks(monkeypatch)
  train.train_and_evaluate(config, workdir)
  assert steps_run(chunks) == list(range(7, 13))
  assert_same_run(full, workdir)


def test_nan_loss_stops_and_keeps_the_best_checkpoint(mock_tfds, tmp_path):
  config = tiny_config(tmp_path / 'tfds', epochs=2)
  workdir = str(tmp_path / 'run')

  class PoisonAfterEpochOne(train.Trainer):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      chunk = self.train_chunk

      def poisoned(state, *args):
        state, m = chunk(state, *args)
        if int(state.step) > 6:  # Epoch 2 (6 steps per epoch).
          m = dict(m, loss_sum=jnp.asarray(jnp.nan))
        return state, m
      self.train_chunk = poisoned

  import unittest.mock as mock
  with mock.patch.object(train, 'Trainer', PoisonAfterEpochOne):
    with pytest.raises(CnnJaxError, match='loss became nan'):
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
  chunks = record_chunks(monkeypatch)
  results = train.train_and_evaluate(config, workdir)
  assert steps_run(chunks) == list(range(3, 13))  # Resumed from step 2.
  assert results['steps'] == 12
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


def test_adam_betas_reach_the_optimizer_and_are_validated():
  from cnn_jax.config import validate
  params = {'w': jnp.ones(3)}
  grads = [{'w': jnp.array([1.0, -2.0, 0.5])}, {'w': jnp.array([0.1, 3.0, -1.0])}]

  def second_update(**kw):
    tx = train.make_optimizer(Config(learning_rate=1e-2, **kw), 10)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
    return np.asarray(updates['w'])

  default = second_update()
  np.testing.assert_array_equal(default, second_update(adam_b1=0.9,
                                                       adam_b2=0.999))
  assert not np.allclose(default, second_update(adam_b2=0.99))
  assert not np.allclose(default, second_update(adam_b1=0.8))
  with pytest.raises(CnnJaxError, match='adam_b2'):
    validate(Config(adam_b2=1.0))


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
