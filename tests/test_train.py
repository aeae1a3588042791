"""Train step, loop, resume, determinism and failure handling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import losses, registry, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError
from conftest import tiny_config


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
  config, state, images, labels = _state_and_batch(model_name,
                                                   dropout_rate=0.0)
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


def test_augmentation_changes_images_but_keeps_shapes():
  from cnn_jax import augment
  x = jnp.zeros((4, 28, 28, 1)).at[:, 10:18, 12:16, :].set(1.0)
  y = augment.random_affine(jax.random.PRNGKey(0), x, 3.0, 15.0, 0.1)
  assert y.shape == x.shape
  assert not np.allclose(y, x)
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6
  # Mass is roughly preserved by a small warp (nothing falls off the image).
  np.testing.assert_allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.35)
  z = augment.random_affine(jax.random.PRNGKey(0), x, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(z, x, atol=1e-5)


@pytest.mark.parametrize('optimizer', ['adam', 'adamw', 'sgd', 'nesterov',
                                       'rmsprop'])
@pytest.mark.parametrize('schedule', ['constant', 'cosine', 'onecycle', 'step'])
def test_every_optimizer_and_schedule_builds_and_steps(optimizer, schedule):
  config = Config(optimizer=optimizer, lr_schedule=schedule, epochs=4,
                  warmup_epochs=1.0, weight_decay=1e-4, grad_clip_norm=1.0)
  sched = train.make_schedule(config, 10)
  values = np.array([float(sched(s)) for s in range(40)])
  assert values.max() <= config.learning_rate * (1 + 1e-6)
  assert values.min() >= 0
  if schedule in ('cosine', 'onecycle'):
    assert values[-1] < 0.05 * config.learning_rate
  tx = train.make_optimizer(config, 10)
  params = {'w': jnp.ones((3, 3)), 'b': jnp.ones(3)}
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params),
                         tx.init(params), params)
  assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))


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


def _params_of(workdir: str, config: Config):
  model = registry.create_model(config, 10)
  target = train.create_train_state(config, model, (28, 28, 1), 1)
  state, meta = Checkpointer(workdir).restore_latest(target)
  return state, meta


def test_same_seed_gives_identical_runs_and_other_seed_differs(mock_tfds,
                                                               tmp_path):
  config = tiny_config(tmp_path / 'tfds', model='deep_cnn', augment=True,
                       width_multiplier=0.25, dense_features=16)
  a = train.train_and_evaluate(config, str(tmp_path / 'a'))
  b = train.train_and_evaluate(config, str(tmp_path / 'b'))
  c = train.train_and_evaluate(config.replace(seed=1), str(tmp_path / 'c'))
  assert workdir_lib.read_history(str(tmp_path / 'a'))[0]['train_loss'] == \
      workdir_lib.read_history(str(tmp_path / 'b'))[0]['train_loss']
  assert a['test_loss'] == b['test_loss']
  assert a['test_loss'] != c['test_loss']


def test_interrupted_run_resumes_to_the_same_params(mock_tfds, tmp_path,
                                                    monkeypatch):
  config = tiny_config(tmp_path / 'tfds', epochs=2, log_every_steps=2,
                       checkpoint_every_steps=2)
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))

  calls = {'n': 0}
  original = train.Trainer.__init__

  def crashing_init(self, *a, **kw):
    original(self, *a, **kw)
    chunk = self.train_chunk

    def crash_after_five(*args):
      calls['n'] += 1
      if calls['n'] > 5:
        raise RuntimeError('simulated crash')
      return chunk(*args)
    self.train_chunk = crash_after_five

  monkeypatch.setattr(train.Trainer, '__init__', crashing_init)
  with pytest.raises(RuntimeError, match='simulated crash'):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(train.Trainer, '__init__', original)
  saved_step = max(Checkpointer(str(tmp_path / 'resumed')).latest_steps())
  assert 0 < saved_step < full['steps']
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed['test_loss'] == full['test_loss']
  assert workdir_lib.read_history(str(tmp_path / 'resumed')) [-1]['train_loss'] == \
      workdir_lib.read_history(str(tmp_path / 'full'))[-1]['train_loss']
  a, _ = _params_of(str(tmp_path / 'full'), config)
  b, _ = _params_of(str(tmp_path / 'resumed'), config)
  for x, y in zip(jax.tree_util.tree_leaves(a.params),
                  jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)


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
  results = train.train_and_evaluate(config, workdir)  # Resumes and ends.
  assert results['steps'] == 12
  assert [r['epoch'] for r in workdir_lib.read_history(workdir)] == [1, 2]


def test_batch_larger_than_train_set_is_an_error(mock_tfds, tmp_path):
  with pytest.raises(CnnJaxError, match='batch_size'):
    train.train_and_evaluate(tiny_config(tmp_path, batch_size=4096),
                             str(tmp_path / 'run'))


def test_label_smoothing_raises_loss_of_confident_predictions():
  logits = jnp.array([[20.0, 0.0, 0.0]])
  labels = jnp.array([0])
  plain, _ = losses.loss_and_metrics(logits, labels, 3)
  smooth, _ = losses.loss_and_metrics(logits, labels, 3, label_smoothing=0.1)
  assert float(smooth) > float(plain)
  assert optax  # The loss is optax's softmax cross-entropy.


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
