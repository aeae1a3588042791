"""The optax chain and learning-rate schedules (`cnn_jax.optim`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import optim
from cnn_jax.config import Config, CnnJaxError

LR = 0.1


def _optimizer_updates(config: Config, grads: list, params: dict) -> list:
  """The chain's updates for a sequence of gradients, params moving."""
  tx = optim.make_optimizer(config, 10)
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
  sched = optim.make_schedule(config, 10)
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
  tx = optim.make_optimizer(config, 10)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates['kernel']).sum()) > 0
  assert float(jnp.abs(updates['bias']).sum()) == 0


def test_adam_betas_reach_the_optimizer_and_are_validated():
  from cnn_jax.config import validate
  params = {'w': jnp.ones(3)}
  grads = [{'w': jnp.array([1.0, -2.0, 0.5])}, {'w': jnp.array([0.1, 3.0, -1.0])}]

  def second_update(**kw):
    tx = optim.make_optimizer(Config(learning_rate=1e-2, **kw), 10)
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
