"""Training and evaluation: jitted steps over a device-resident dataset.

`train_and_evaluate(config, workdir)` is the whole run: build data and model,
resume from the latest checkpoint if there is one, run epochs of jitted
chunks of steps (a `lax.scan` over batches gathered on device), validate each
epoch, keep the best params by validation accuracy, and finally test them.

Data parallelism uses `jax.jit` with shardings over a 1-D ``data`` mesh of all
devices: batches are sharded on ``data``, params and optimizer state are
replicated. On one CPU this is the same code with a mesh of one device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import socket
import time
from typing import Any, Iterator

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from cnn_jax import (augment, distributed, inference, input_pipeline, losses,
                     models, phases as phases_lib, registry)
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError, RESUMABLE_FIELDS


class TrainState(train_state.TrainState):
  """Params, optimizer state and BN statistics, plus the run's PRNG key.

  Dropout and augmentation keys are `fold_in(key, step)`, so they depend only
  on the seed and the step, also across a resume.
  """

  batch_stats: Any
  key: jax.Array


class Stop(Exception):
  """Raised when SIGTERM/SIGINT asked training to stop after a checkpoint."""


# Optimizer --------------------------------------------------------------------
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


# XLA:CPU compiles an init (mostly the threefry hash of every parameter's
# random bits) about 4x faster at backend optimization level 1 than at the
# default 3, with bit-identical parameters (tests/test_train.py); an init
# runs once, so its own speed does not matter.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def member_seeds(config: Config) -> list[int]:
  """The seeds of a run's members: ``seed, seed + 1, ...``."""
  return [config.seed + k for k in range(config.num_models)]


def create_train_state(config: Config, model: nn.Module,
                       image_shape: tuple[int, ...], steps_per_epoch: int
                       ) -> TrainState:
  """Initial state for ``config.seed`` (init key split from the run key).

  With ``num_models=K`` the K members' states (seeds ``seed .. seed+K-1``,
  each exactly the state a one-member run of that seed starts from) are
  stacked on a leading axis.
  """
  tx = make_optimizer(config, steps_per_epoch)
  x = jnp.zeros((1, *image_shape), jnp.float32)

  def member(seed: jax.Array) -> TrainState:
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({'params': init_key}, x, train=False)
    return TrainState.create(
        apply_fn=model.apply, params=variables['params'],
        batch_stats=variables.get('batch_stats', {}), tx=tx, key=run_key)

  init = member if config.num_models == 1 else jax.vmap(member)
  seeds = jnp.asarray(member_seeds(config) if config.num_models > 1
                      else config.seed)
  if isinstance(seeds, jax.core.Tracer):
    # Under a transformation (e.g. ``jax.eval_shape`` for restore targets)
    # there is nothing to compile ahead of time.
    return init(seeds)
  compiled = jax.jit(init).lower(seeds).compile(
      compiler_options=INIT_COMPILER_OPTIONS
      if jax.default_backend() == 'cpu' else None)
  return compiled(seeds)


def data_key(config: Config) -> jax.Array:
  """The key of the data order; separate from init/dropout keys.

  With ``num_models=K``, the K members' keys, stacked.
  """
  keys = [jax.random.fold_in(jax.random.PRNGKey(seed), 0x0DA7A)
          for seed in member_seeds(config)]
  return keys[0] if len(keys) == 1 else jnp.stack(keys)


def state_step(state: TrainState) -> int:
  """The step of a (possibly many-member) state: members step together."""
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def variables_of(state: TrainState) -> dict[str, Any]:
  out = {'params': state.params}
  if state.batch_stats:
    out['batch_stats'] = state.batch_stats
  return out


# Steps -------------------------------------------------------------------------
def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               config: Config, num_classes: int
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a uint8 batch; pure, so it can be jitted/scanned."""
  step_key = jax.random.fold_in(state.key, state.step)
  aug_key, dropout_key = jax.random.split(step_key)
  x = input_pipeline.normalize(images)
  if config.augment:
    x = augment.random_affine(aug_key, x, config.aug_max_shift,
                              config.aug_max_rotation, config.aug_max_scale)

  def loss_fn(params):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    logits, updates = state.apply_fn(
        variables, x, train=True, rngs={'dropout': dropout_key},
        mutable=['batch_stats'])
    loss, metrics = losses.loss_and_metrics(logits, labels, num_classes,
                                            config.label_smoothing)
    return loss, (metrics, updates)

  grads, (metrics, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(
      grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  return state, metrics


def _sum_tree(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda a: a.sum(0), tree)


class Trainer:
  """Jitted, sharded training chunks and validation for one config.

  Training uses the model with the kernels ``config.kernels`` selects;
  validation the same model with stock Flax layers (same params). With
  ``num_models=K`` the state holds K stacked members and each step is
  `jax.vmap` of `train_step` over them, each member on its own batch.
  """

  def __init__(self, config: Config, num_classes: int,
               mesh: Mesh | None = None):
    self.config, self.num_classes = config, num_classes
    self.members = config.num_models if config.num_models > 1 else 0
    self.model = registry.create_model(config, num_classes)
    self.mesh = mesh or inference.data_mesh()
    self.predictor = inference.Predictor(
        registry.create_model(config, num_classes, training=False),
        config.eval_batch_size, self.mesh, self.members)
    self.replicated = self.predictor.replicated
    # Batches are split over devices along their example axis, the last
    # axis of the indices ([steps, batch] or [steps, members, batch]).
    lead = (None,) if self.members else ()
    self.batch_sharding = NamedSharding(self.mesh, P(*lead, 'data'))
    self.index_sharding = NamedSharding(self.mesh, P(None, *lead, 'data'))
    self.num_devices = self.mesh.devices.size
    if config.batch_size % self.num_devices:
      raise CnnJaxError(f'--batch_size={config.batch_size} must divide by the '
                        f'number of devices ({self.num_devices})')
    self.train_chunk = self._jitted_chunk = jax.jit(
        self._train_chunk, donate_argnums=(0,), out_shardings=self.replicated)
    self.put = self.predictor.put
    self.evaluate = self.predictor.evaluate

  def _train_chunk(self, state: TrainState, images: jax.Array,
                   labels: jax.Array, idx: jax.Array):
    """Runs ``idx.shape[0]`` steps; batch ``i`` is ``images[idx[i]]``."""
    step = functools.partial(train_step, config=self.config,
                             num_classes=self.num_classes)
    step = jax.vmap(step) if self.members else step

    def body(state, batch_idx):
      batch_idx = jax.lax.with_sharding_constraint(batch_idx,
                                                   self.batch_sharding)
      return step(state, images[batch_idx], labels[batch_idx])
    state, metrics = jax.lax.scan(body, state, idx)
    return state, _sum_tree(metrics)

  def compile(self, state: TrainState, images: jax.Array, labels: jax.Array,
              chunk: int) -> None:
    """Compiles the training chunk ahead of the first step (or loads it
    from the persistent compilation cache), so step times exclude it."""
    lead = (self.members,) if self.members else ()
    idx = jax.ShapeDtypeStruct((chunk, *lead, self.config.batch_size),
                               jnp.int32, sharding=self.index_sharding)
    self._jitted_chunk.lower(state, images, labels, idx).compile()

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def rows(self, idx: jax.Array, start: int | jax.Array, count: int
           ) -> jax.Array:
    """``idx[start:start + count]``, one program for every ``start``
    (slicing compiles one per start)."""
    return jax.lax.with_sharding_constraint(
        jax.lax.dynamic_slice_in_dim(idx, start, count), self.index_sharding)

  def epoch_indices(self, key: jax.Array, epoch: int, num_examples: int
                    ) -> jax.Array:
    """[steps_per_epoch, batch] example indices of one epoch, sharded
    ([steps_per_epoch, members, batch] with members, from their keys)."""
    return self._epoch_indices(key, epoch, num_examples)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def _epoch_indices(self, key: jax.Array, epoch: jax.Array,
                     num_examples: int) -> jax.Array:
    bs = self.config.batch_size
    steps = num_examples // bs

    def order(key: jax.Array) -> jax.Array:
      perm = input_pipeline.epoch_permutation(key, epoch, num_examples)
      return perm[:steps * bs].reshape(steps, bs)

    idx = jnp.swapaxes(jax.vmap(order)(key), 0, 1) if self.members else (
        order(key))
    return jax.lax.with_sharding_constraint(idx, self.index_sharding)


def _chunk_size(steps_per_epoch: int, target: int) -> int:
  """Largest divisor of the epoch length <= target: equal chunks, 1 compile."""
  target = max(1, min(target, steps_per_epoch))
  return max(d for d in range(1, target + 1) if steps_per_epoch % d == 0)


# Run ----------------------------------------------------------------------------
@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
  """Turns SIGTERM/SIGINT into a flag checked between chunks of steps."""
  flag: dict[str, Any] = {'signal': None}
  handled = (signal.SIGTERM, signal.SIGINT)
  try:
    previous = {s: signal.signal(s, lambda num, _: flag.update(signal=num))
                for s in handled}
  except ValueError:  # Not the main thread: no signal handling.
    previous = {}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _check_workdir(config: Config, workdir: str) -> None:
  """Refuses to mix runs: a workdir's config must match on resume."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CnnJaxError(f'--workdir={workdir} is not writable: '
                      f'{e.strerror or e}') from e
  path = os.path.join(workdir, workdir_lib.CONFIG)
  new = json.loads(config.to_json())
  if os.path.exists(path):
    # Fields added since that run take their defaults; removed ones (such
    # as the kernel flags --kernels replaced) are ignored.
    old = {**json.loads(Config().to_json()), **workdir_lib.read_json(path)}
    diff = sorted(k for k in new
                  if k not in RESUMABLE_FIELDS and old.get(k) != new[k])
    if diff:
      shown = ', '.join(f'--{k}={old.get(k)!r}->{new.get(k)!r}'
                        for k in diff[:4])
      raise CnnJaxError(f'--workdir={workdir} holds a run with a different '
                        f'config ({shown}); use a new --workdir to start '
                        'another run')
  if jax.process_index() == 0:
    workdir_lib.write_json(path, new)


class _TensorBoard:
  """Scalar summaries for TensorBoard, written without TensorFlow.

  TensorBoard's own ``EventFileWriter`` opens files through
  ``tensorboard.compat.tf``, which imports TensorFlow (seconds) whenever it
  is installed; the event file is just records of ``Event`` protos.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event, self._summary = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time()):010d}.'
            f'{socket.gethostname()}.{os.getpid()}.cnn_jax')
    self._writer = RecordWriter(open(os.path.join(logdir, name), 'wb'))
    self._write(event_pb2.Event(wall_time=time.time(),
                                file_version='brain.Event:2'))

  def _write(self, event: Any) -> None:
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def scalars(self, values: dict[str, float], step: int) -> None:
    summary = self._summary.Summary(value=[
        self._summary.Summary.Value(tag=k, simple_value=float(v))
        for k, v in values.items()])
    self._write(self._event.Event(step=step, summary=summary,
                                  wall_time=time.time()))

  def close(self) -> None:
    self._writer.close()


class _Metrics:
  """Per-epoch metrics to ``metrics.jsonl`` and TensorBoard (process 0)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, workdir_lib.METRICS)
    self.tb = None
    if self.enabled:
      try:
        self.tb = _TensorBoard(os.path.join(workdir, 'tb'))
      except ImportError:  # TensorBoard summaries are optional.
        self.tb = None

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self.tb:
      self.tb.scalars({k: v for k, v in row.items()
                       if k not in ('epoch', 'step')
                       and isinstance(v, (int, float))}, row['step'])

  def close(self) -> None:
    if self.tb:
      self.tb.close()


def is_better(config: Config, val: dict[str, float],
              meta: dict[str, Any]) -> bool:
  """Whether this epoch's validation metrics beat the best so far.

  ``val_loss`` exists because on a 5,000-image split accuracy moves in steps
  of one image, so a single lucky epoch at a high learning rate can win.
  """
  if meta.get('best_epoch', -1) < 0:
    return True
  if config.best_metric == 'val_loss':
    return val['loss'] < meta.get('best_val_loss', math.inf)
  return val['accuracy'] > meta['best_val_accuracy']


def _best_so_far(meta: dict[str, Any], k: int) -> dict[str, Any]:
  """Member ``k``'s best validation metrics so far, as `is_better` reads
  them (a one-member run keeps them at the top level of ``meta``)."""
  return meta['members'][k] if 'members' in meta else meta


def _mean(values: list[float]) -> float:
  return float(np.mean(values))


def _stacked_where(mask: np.ndarray, new: Any, old: Any) -> Any:
  """Member-stacked trees: member k from ``new`` where ``mask[k]``."""
  def pick(a, b):
    m = jnp.asarray(mask).reshape((-1,) + (1,) * (a.ndim - 1))
    return jnp.where(m, a, b)
  return jax.tree_util.tree_map(pick, new, old)


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains, checkpoints and tests one run; returns ``results.json``'s dict.

  Re-running with the same workdir resumes from the latest checkpoint and
  reproduces the uninterrupted run. With ``num_models=K`` the K members
  train together; each keeps its own best epoch, and the results give each
  member's test metrics and those of their averaged probabilities.
  """
  with phases_lib.compile_time() as compiling:
    return _train_and_evaluate(config, workdir, compiling)


def _train_and_evaluate(config: Config, workdir: str,
                        compiling: dict[str, float]) -> dict[str, Any]:
  phases = phases_lib.Phases()  # Where the time goes, logged at the end.
  _check_workdir(config, workdir)
  registry.create_model(config, 1)  # A bad model fails before data loads.
  if (config.best_metric == 'val_loss' and config.label_smoothing > 0
      and config.epochs > 1):
    # experiments/FINDINGS.md: with smoothing 0.1 the lowest validation loss
    # of DeepCNN fell on epoch 2 of 18 for 2 of 4 seeds.
    logging.warning('--best_metric=val_loss with --label_smoothing=%g: a '
                    'label-smoothed model\'s validation cross-entropy barely '
                    'moves once it fits, so the "best" epoch can be an early, '
                    'worse one; --best_metric=val_accuracy is safer',
                    config.label_smoothing)
  phases.lap('setup')
  data = input_pipeline.load(config)
  phases.lap('data')
  info = data.info
  if jax.process_index() == 0:
    workdir_lib.write_dataset_info(workdir, info)
    logging.info('the model:\n%s', registry.summary(config, info.num_classes,
                                                    info.image_shape))
  trainer = Trainer(config, info.num_classes)
  n_members = config.num_models
  n_train = len(data.train)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise CnnJaxError(f'--batch_size={config.batch_size} is larger than the '
                      f'{n_train} training examples')
  total_steps = config.epochs * steps_per_epoch
  chunk = _chunk_size(steps_per_epoch, config.log_every_steps)
  if config.checkpoint_every_steps:
    chunk = math.gcd(chunk, config.checkpoint_every_steps)

  state = create_train_state(config, trainer.model, info.image_shape,
                             steps_per_epoch)
  num_params = models.count_params(state.params) // n_members
  ckpt = Checkpointer(workdir)
  ckpt.check_space(state)
  meta: dict[str, Any] = {'best_val_accuracy': -1.0, 'best_epoch': -1,
                          'train_seconds': 0.0, 'sums': None}
  if n_members > 1:
    meta['members'] = [{'best_val_accuracy': -1.0, 'best_epoch': -1}
                       for _ in range(n_members)]
  # Replicated before restoring, so Orbax restores onto the (multi-host) mesh.
  state = jax.device_put(state, trainer.replicated)
  restored = ckpt.restore_latest(state)
  best_vars = None  # The members' best variables (many-member runs).
  if restored is not None:
    state, meta = restored
    logging.info('Resuming from step %d in %s', state_step(state), workdir)
    if n_members > 1 and ckpt.has_best():
      best_vars = ckpt.restore_best(variables_of(state))[0]

  images, labels = trainer.put(data.train.images), trainer.put(data.train.labels)
  val_images, val_labels = trainer.put(data.val.images), trainer.put(data.val.labels)
  metrics_out = _Metrics(workdir)
  dkey = data_key(config)
  logging.info('%s on %s: %d params%s, %d train / %d val / %d test, %d steps '
               '(%d per epoch), %d device(s) [%s], kernels %s', config.model,
               info.name, num_params,
               f' x {n_members} members' if n_members > 1 else '', n_train,
               len(data.val), len(data.test), total_steps, steps_per_epoch,
               trainer.num_devices, jax.default_backend(), config.kernels)
  phases.lap('init')
  trainer.compile(state, images, labels, chunk)
  phases.lap('compile')

  def save_latest(step: int, sums: Any) -> None:
    meta['sums'] = None if sums is None else {
        k: np.asarray(jax.device_get(v)).tolist() for k, v in sums.items()}
    ckpt.save_latest(step, state, meta)

  def stopped_at(step: int, signum: int | None) -> str:
    by = signum or 'to another process'
    return (f'stopped by signal {by} at step {step}; latest state saved, '
            're-run the same command to resume')

  learning_rate = jax.jit(make_schedule(config, steps_per_epoch))  # 1 program.
  step = state_step(state)
  with _stop_on_signals() as stop:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      t_epoch = time.perf_counter()
      idx = trainer.epoch_indices(dkey, epoch, n_train)
      sums = meta.get('sums') if offset else None
      sums = None if sums is None else {
          k: jnp.asarray(v, dtype=jnp.float32 if k == 'loss_sum' else
                         jnp.int32) for k, v in sums.items()}
      for start in range(offset, steps_per_epoch, chunk):
        t0 = time.perf_counter()
        state, m = trainer.train_chunk(state, images, labels,
                                       trainer.rows(idx, start, chunk))
        host = jax.device_get(m)  # The one host sync per chunk.
        loss_sum = np.asarray(host['loss_sum'], np.float64)
        dt = time.perf_counter() - t0
        meta['train_seconds'] += dt
        step += chunk
        if not np.isfinite(loss_sum).all():
          raise CnnJaxError(
              f'loss became {loss_sum.tolist()} at step {step} (epoch '
              f'{epoch + 1}); training stopped and the last good checkpoints '
              f'are kept in {ckpt.root}; try a lower --learning_rate or '
              '--grad_clip_norm')
        sums = m if sums is None else jax.tree_util.tree_map(
            jnp.add, sums, m)
        if jax.process_index() == 0:
          count = np.asarray(host['count'], np.float64)
          logging.info('epoch %d/%d step %d/%d  loss %.4f  acc %.2f%%  '
                       '%.0f img/s', epoch + 1, config.epochs, step,
                       total_steps, float((loss_sum / count).mean()),
                       100 * float((host['correct'] / count).mean()),
                       chunk * config.batch_size * n_members / dt)
        # An epoch's last chunk stops after the epoch's validation below.
        if start + chunk < steps_per_epoch and distributed.any_process(
            stop['signal'] is not None):
          save_latest(step, sums)
          raise Stop(stopped_at(step, stop['signal']))
        if (config.checkpoint_every_steps and start + chunk < steps_per_epoch
            and step % config.checkpoint_every_steps == 0):
          save_latest(step, sums)

      phases.lap('train')
      t0 = time.perf_counter()
      variables = variables_of(state)
      vals = trainer.evaluate(variables, val_images, val_labels)
      row = _epoch_row(trainer, epoch, step, learning_rate, sums, vals,
                       variables, val_images, data.val.labels)
      meta['train_seconds'] += time.perf_counter() - t0
      phases.lap('validate')
      row['epoch_seconds'] = time.perf_counter() - t_epoch
      logging.info('epoch %d: train loss %.4f acc %.2f%% | val loss %.4f acc '
                   '%.2f%% | %.1fs', epoch + 1, row['train_loss'],
                   100 * row['train_accuracy'], row['val_loss'],
                   100 * row['val_accuracy'], row['epoch_seconds'])
      metrics_out.write(row)
      improved = [is_better(config, val, _best_so_far(meta, k))
                  for k, val in enumerate(vals)]
      for k, val in enumerate(vals):
        if improved[k]:
          _best_so_far(meta, k).update(
              best_val_accuracy=val['accuracy'], best_val_loss=val['loss'],
              best_epoch=epoch + 1)
      if any(improved):
        if n_members == 1:
          ckpt.save_best(step, variables,
                         {'epoch': epoch + 1, 'step': step, **vals[0]})
        else:
          # New arrays: the state's own are donated to the next chunk.
          best_vars = _stacked_where(
              np.asarray(improved), variables,
              variables if best_vars is None else best_vars)
          members = [{'epoch': b['best_epoch'], 'loss': b['best_val_loss'],
                      'accuracy': b['best_val_accuracy']}
                     for b in meta['members']]
          ckpt.save_best(step, best_vars, {'step': step, 'members': members})
      save_latest(step, None)
      phases.lap('checkpoint')
      if distributed.any_process(stop['signal'] is not None):
        raise Stop(stopped_at(step, stop['signal']))
  metrics_out.close()

  best, best_meta = ckpt.restore_best(variables_of(state))
  results = _test_results(config, trainer, info, data, best, best_meta, meta,
                          total_steps, num_params)
  phases.lap('test')
  ckpt.close()
  phases.lap('finish')
  results['timings'] = {'phase_seconds': phases.seconds,
                        'compiling': dict(compiling)}
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS), results)
  logging.info('where the time went: %s; compiling %d programs took %.2fs of '
               'it (%d from the persistent cache)', phases.summary(),
               compiling['programs'], compiling['seconds'],
               compiling['cache_hits'])
  logging.info('test accuracy %.2f%% (loss %.4f) with the best params%s; '
               '%.1fs of training', 100 * results['test_accuracy'],
               results['test_loss'],
               f' (epoch {best_meta["epoch"]})' if n_members == 1 else
               f' of {n_members} members averaged', meta['train_seconds'])
  return results


def _epoch_row(trainer: Trainer, epoch: int, step: int,
               learning_rate: optax.Schedule, sums: Any,
               vals: list[dict[str, float]], variables: Any,
               val_images: jax.Array, val_labels: np.ndarray
               ) -> dict[str, Any]:
  """One ``metrics.jsonl`` row: member means, and per member when many."""
  s = jax.device_get(sums)
  train_loss = np.atleast_1d(s['loss_sum'] / s['count'])
  train_acc = np.atleast_1d(s['correct'] / s['count'])
  row = {'epoch': epoch + 1, 'step': step,
         'train_loss': _mean(train_loss), 'train_accuracy': _mean(train_acc),
         'val_loss': _mean([v['loss'] for v in vals]),
         'val_accuracy': _mean([v['accuracy'] for v in vals]),
         'learning_rate': float(learning_rate(step - 1))}
  if len(vals) > 1:
    probs = trainer.predictor.probabilities(variables, val_images)
    row['val_ensemble_accuracy'] = losses.probability_metrics(
        probs, val_labels)['accuracy']
    row['members'] = {
        'train_loss': train_loss.tolist(), 'train_accuracy': train_acc.tolist(),
        'val_loss': [v['loss'] for v in vals],
        'val_accuracy': [v['accuracy'] for v in vals]}
  return row


def _test_results(config: Config, trainer: Trainer,
                  info: input_pipeline.DatasetInfo,
                  data: input_pipeline.Dataset, best: Any,
                  best_meta: dict[str, Any], meta: dict[str, Any],
                  total_steps: int, num_params: int) -> dict[str, Any]:
  """``results.json``: the best params on the test split."""
  n_members = config.num_models
  tests = trainer.evaluate(best, data.test.images, data.test.labels)
  results: dict[str, Any] = {
      'model': config.model, 'dataset': info.name,
      'test_accuracy': tests[0]['accuracy'], 'test_loss': tests[0]['loss'],
      'best_val_accuracy': meta['best_val_accuracy'],
      'best_val_loss': meta.get('best_val_loss'),
      'best_metric': config.best_metric, 'best_epoch': best_meta.get('epoch'),
      'epochs': config.epochs, 'steps': total_steps, 'num_params': num_params,
      'num_models': n_members, 'train_seconds': meta['train_seconds'],
      'train_img_per_s': total_steps * config.batch_size * n_members / max(
          meta['train_seconds'], 1e-9),
      'num_devices': trainer.num_devices, 'backend': jax.default_backend(),
      'kernels': config.kernels, 'test_examples': len(data.test),
  }
  if n_members > 1:
    probs = trainer.predictor.probabilities(best, data.test.images)
    ensemble = losses.probability_metrics(probs, data.test.labels)
    accs = [t['accuracy'] for t in tests]
    results.update(
        test_accuracy=ensemble['accuracy'], test_loss=ensemble['loss'],
        vote_accuracy=ensemble['vote_accuracy'],
        member_test_accuracy_mean=_mean(accs),
        member_test_accuracy_std=float(np.std(accs, ddof=1)),
        best_val_accuracy=_mean([b['best_val_accuracy']
                                 for b in meta['members']]),
        best_val_loss=_mean([b['best_val_loss'] for b in meta['members']]),
        members=[{'seed': seed, 'test_accuracy': t['accuracy'],
                  'test_loss': t['loss'], 'best_epoch': b['best_epoch'],
                  'best_val_accuracy': b['best_val_accuracy'],
                  'best_val_loss': b['best_val_loss']}
                 for seed, t, b in zip(member_seeds(config), tests,
                                       meta['members'])])
  return results
