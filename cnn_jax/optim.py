"""The optimizer: an optax chain and its learning-rate schedule, from a
`Config`."""

from __future__ import annotations

from typing import Any

import jax
import optax

from cnn_jax.config import Config


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule named by ``config.lr_schedule``."""
  lr, total = config.learning_rate, config.epochs * steps_per_epoch
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, 0.0)
  if config.lr_schedule == 'onecycle':
    pct = warmup / total if warmup else 0.25
    return optax.cosine_onecycle_schedule(total, lr, pct_start=pct)
  if config.lr_schedule == 'step':
    main = optax.piecewise_constant_schedule(
        lr, {int(total * 0.5): 0.1, int(total * 0.75): 0.1})
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup),
       lambda s: main(s + warmup)], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay on kernels only, not on biases or BN scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(config: Config, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The optax chain: [clip] -> [weight decay] -> optimizer(schedule)."""
  lr = make_schedule(config, steps_per_epoch)
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'adamw':
    chain.append(optax.adamw(lr, b1=config.adam_b1, b2=config.adam_b2,
                             weight_decay=config.weight_decay,
                             mask=_decay_mask))
  else:
    if config.weight_decay:
      chain.append(optax.add_decayed_weights(config.weight_decay, _decay_mask))
    chain.append({
        'adam': lambda: optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2),
        'sgd': lambda: optax.sgd(lr, momentum=config.momentum or None),
        'nesterov': lambda: optax.sgd(lr, momentum=config.momentum,
                                      nesterov=True),
        'rmsprop': lambda: optax.rmsprop(lr, momentum=config.momentum),
    }[config.optimizer]())
  return optax.chain(*chain)
