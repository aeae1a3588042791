"""Training: jitted chunks of steps over a device-resident dataset.

`train_and_evaluate(config, workdir)` is the whole run: build data and model
(`setup`), resume from the latest checkpoint if there is one, run epochs of
jitted chunks of steps (a `lax.scan` over batches gathered on device),
validate each epoch, keep each network's best params by its validation
metric, and finally test them. With ``num_models=K`` the K networks (the
members) train at once, `jax.vmap`ped over their states.

Data parallelism uses `jax.jit` with shardings over a 1-D ``data`` mesh of all
devices: batches are sharded on ``data``, params and optimizer state are
replicated. On one CPU this is the same code with a mesh of one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from cnn_jax import (augment, distributed, evaluate, inference, input_pipeline,
                     losses, metrics_writer, models, optim,
                     phases as phases_lib, registry, stopping)
from cnn_jax import progress as progress_lib
from cnn_jax import results as results_lib
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax import config as config_lib
from cnn_jax.config import Config, CnnJaxError

# Called before each chunk of steps with (the step it starts at, its steps):
# a test can record, delay or interrupt training without patching it.
Hook = Callable[[int, int], None]


class TrainState(train_state.TrainState):
  """Params, optimizer state and BN statistics, plus the run's PRNG key.

  Dropout and augmentation keys are `fold_in(key, step)`, so they depend only
  on the seed and the step, also across a resume.
  """

  batch_stats: Any
  key: jax.Array


# XLA:CPU compiles an init (mostly the threefry hash of every parameter's
# random bits) about 4x faster at backend optimization level 1 than at the
# default 3, with bit-identical parameters (tests/test_train.py); an init
# runs once, so its own speed does not matter.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def create_train_state(config: Config, model: nn.Module,
                       image_shape: tuple[int, ...], steps_per_epoch: int
                       ) -> TrainState:
  """Initial state for ``config.seed`` (init key split from the run key).

  With ``num_models=K`` the K members' states (`Config.member_seeds`, each
  exactly the state a one-member run of that seed starts from) are stacked
  on a leading axis.
  """
  tx = optim.make_optimizer(config, steps_per_epoch)
  x = jnp.zeros((1, *image_shape), jnp.float32)

  def member(seed: jax.Array) -> TrainState:
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({'params': init_key}, x, train=False)
    return TrainState.create(
        apply_fn=model.apply, params=variables['params'],
        batch_stats=variables.get('batch_stats', {}), tx=tx, key=run_key)

  init = member if config.num_models == 1 else jax.vmap(member)
  seeds = jnp.asarray(config.member_seeds() if config.num_models > 1
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
  """The key of the data order, separate from init/dropout keys; the
  members' keys stacked when there are several."""
  keys = [jax.random.fold_in(jax.random.PRNGKey(seed), 0x0DA7A)
          for seed in config.member_seeds()]
  return keys[0] if len(keys) == 1 else jnp.stack(keys)


def state_step(state: TrainState) -> int:
  """The step of a (possibly many-member) state: members step together."""
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def variables_of(state: TrainState) -> dict[str, Any]:
  out = {'params': state.params}
  if state.batch_stats:
    out['batch_stats'] = state.batch_stats
  return out


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               config: Config, num_classes: int
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a uint8 batch; pure, so it can be jitted/scanned."""
  step_key = jax.random.fold_in(state.key, state.step)
  aug_key, dropout_key = jax.random.split(step_key)
  x = input_pipeline.normalize(images)
  aug = augment.Augmentation.from_config(config)
  if aug.active:
    x = augment.apply(aug_key, x, aug)

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


class Trainer:
  """Jitted, sharded training chunks and validation for one config.

  Training uses the model with the kernels ``config.kernels`` selects;
  validation the same model with stock Flax layers (same params). With
  ``num_models=K`` the state holds K stacked members and each step is
  `jax.vmap` of `train_step` over them, each member on its own batch.
  """

  def __init__(self, config: Config, num_classes: int,
               mesh: Mesh | None = None, model: nn.Module | None = None):
    """``model`` (default: the registry's, with ``config.kernels``) is the
    training model; it must compute the stock model's function."""
    self.config, self.num_classes = config, num_classes
    self.members = config.num_models if config.num_models > 1 else 0
    self.model = model or registry.create_model(config, num_classes)
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
    self.train_chunk = jax.jit(self._train_chunk, donate_argnums=(0,),
                               out_shardings=self.replicated)
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
    return state, jax.tree_util.tree_map(lambda a: a.sum(0), metrics)

  def compile(self, state: TrainState, images: jax.Array, labels: jax.Array,
              chunk: int) -> None:
    """Compiles the training chunk ahead of the first step (or loads it
    from the persistent compilation cache), so step times exclude it."""
    lead = (self.members,) if self.members else ()
    idx = jax.ShapeDtypeStruct((chunk, *lead, self.config.batch_size),
                               jnp.int32, sharding=self.index_sharding)
    self.train_chunk.lower(state, images, labels, idx).compile()

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def rows(self, idx: jax.Array, start: int | jax.Array, count: int
           ) -> jax.Array:
    """``idx[start:start + count]``, one program for every ``start``
    (slicing compiles one per start)."""
    return jax.lax.with_sharding_constraint(
        jax.lax.dynamic_slice_in_dim(idx, start, count), self.index_sharding)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def epoch_indices(self, key: jax.Array, epoch: int | jax.Array,
                    num_examples: int) -> jax.Array:
    """[steps_per_epoch, batch] example indices of one epoch, sharded
    ([steps_per_epoch, members, batch] with members, from their keys)."""
    bs = self.config.batch_size
    steps = num_examples // bs

    def order(key: jax.Array) -> jax.Array:
      perm = input_pipeline.epoch_permutation(key, epoch, num_examples)
      return perm[:steps * bs].reshape(steps, bs)

    idx = jnp.swapaxes(jax.vmap(order)(key), 0, 1) if self.members else (
        order(key))
    return jax.lax.with_sharding_constraint(idx, self.index_sharding)


def chunk_size(steps_per_epoch: int, target: int) -> int:
  """Largest divisor of the epoch length <= target: equal chunks, 1 compile."""
  target = max(1, min(target, steps_per_epoch))
  return max(d for d in range(1, target + 1) if steps_per_epoch % d == 0)


@dataclasses.dataclass
class Setup:
  """What a training loop needs on the devices, built by `setup`."""

  config: Config
  trainer: Trainer
  state: TrainState  # The initial state, replicated over the mesh.
  images: jax.Array
  labels: jax.Array
  steps_per_epoch: int
  chunk: int  # Steps per jitted call: divides the epoch.
  key: jax.Array  # The data order's key (the members' keys, stacked).

  def chunks(self, state: TrainState, epoch: int, offset: int = 0,
             hooks: Sequence[Hook] = ()
             ) -> Iterator[tuple[TrainState, dict[str, jax.Array], int]]:
    """Trains epoch ``epoch`` (0-based) from its step ``offset``, one chunk
    at a time; yields ``(state, the chunk's summed metrics, steps of the
    epoch done)`` after each. The data order is a function of the seed and
    the epoch, so a resumed epoch sees the batches it would have seen."""
    idx = self.trainer.epoch_indices(self.key, epoch, len(self.labels))
    for start in range(offset, self.steps_per_epoch, self.chunk):
      for hook in hooks:
        hook(epoch * self.steps_per_epoch + start, self.chunk)
      state, metrics = self.trainer.train_chunk(
          state, self.images, self.labels,
          self.trainer.rows(idx, start, self.chunk))
      yield state, metrics, start + self.chunk


def setup(config: Config, num_classes: int, image_shape: Sequence[int],
          images: np.ndarray, labels: np.ndarray, mesh: Mesh | None = None,
          state: TrainState | None = None,
          model: nn.Module | None = None) -> Setup:
  """The trainer (of ``model``, see `Trainer`), the initial state
  (``state``, else `create_train_state`) and the training data placed on
  the devices, with the epoch's plan."""
  trainer = Trainer(config, num_classes, mesh, model)
  steps = len(labels) // config.batch_size
  if steps == 0:
    raise CnnJaxError(f'--batch_size={config.batch_size} is larger than the '
                      f'{len(labels)} training examples')
  chunk = chunk_size(steps, config.log_every_steps)
  if config.checkpoint_every_steps:
    chunk = math.gcd(chunk, config.checkpoint_every_steps)
  if state is None:
    state = create_train_state(config, trainer.model, tuple(image_shape),
                               steps)
  return Setup(config, trainer, jax.device_put(state, trainer.replicated),
               trainer.put(images), trainer.put(labels), steps, chunk,
               data_key(config))


def train_and_evaluate(config: Config, workdir: str,
                       hooks: Sequence[Hook] = ()) -> dict[str, Any]:
  """Trains, checkpoints and tests one run; returns ``results.json``'s dict.

  Re-running with the same workdir resumes from the latest checkpoint and
  reproduces the uninterrupted run. With ``num_models=K`` the K members
  train together; each keeps its own best epoch. ``hooks`` are called before
  every chunk of steps.
  """
  with phases_lib.compile_time() as compiling:
    results = _train_and_evaluate(config, workdir, hooks, compiling)
  return results.to_json()


def _train_and_evaluate(config: Config, workdir: str, hooks: Sequence[Hook],
                        compiling: dict[str, float]) -> results_lib.Results:
  phases = phases_lib.Phases()  # Where the time goes, logged at the end.
  workdir_lib.prepare(config, workdir)
  registry.create_model(config, 1)  # A bad model fails before data loads.
  for warning in config_lib.warnings(config):
    logging.warning('%s', warning)
  phases.lap('setup')
  data = input_pipeline.load(config)
  info = data.info
  phases.lap('data')
  if jax.process_index() == 0:
    workdir_lib.write_dataset_info(workdir, info)
    logging.info('the model:\n%s', registry.summary(config, info.num_classes,
                                                    info.image_shape))
  run = setup(config, info.num_classes, info.image_shape, data.train.images,
              data.train.labels)
  trainer, state, k = run.trainer, run.state, config.num_models
  total_steps = config.epochs * run.steps_per_epoch
  num_params = models.count_params(state.params) // k
  ckpt = Checkpointer(workdir)
  ckpt.check_space(state)
  progress = progress_lib.Progress.start(k)
  best_vars = None  # Each member's best variables, as saved.
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    progress = progress_lib.Progress.from_json(meta)
    logging.info('Resuming from step %d in %s', state_step(state), workdir)
    if ckpt.has_best():
      best_vars = ckpt.restore_best(variables_of(state))[0]
  val_images, val_labels = trainer.put(data.val.images), data.val.labels
  writer = metrics_writer.MetricsWriter(workdir)
  logging.info('%s on %s: %d params%s, %d train / %d val / %d test, %d steps '
               '(%d per epoch), %d device(s) [%s], kernels %s', config.model,
               info.name, num_params, f' x {k} members' if k > 1 else '',
               len(data.train), len(data.val), len(data.test), total_steps,
               run.steps_per_epoch, trainer.num_devices, jax.default_backend(),
               config.kernels)
  phases.lap('init')
  trainer.compile(state, run.images, run.labels, run.chunk)
  phases.lap('compile')

  def save_latest(step: int, sums: Any) -> None:
    progress.sums = None if sums is None else {
        key: np.asarray(jax.device_get(v)).tolist() for key, v in sums.items()}
    ckpt.save_latest(step, state, progress.to_json())

  def stop_here(step: int, signum: int | None, sums: Any) -> stopping.Stop:
    save_latest(step, sums)
    by = signum or 'to another process'
    return stopping.Stop(f'stopped by signal {by} at step {step}; latest '
                         'state saved, re-run the same command to resume')

  learning_rate = jax.jit(optim.make_schedule(config, run.steps_per_epoch))
  step = state_step(state)
  with stopping.on_signals() as stop:
    while step < total_steps:
      epoch, offset = divmod(step, run.steps_per_epoch)
      t_epoch = time.perf_counter()
      sums = None
      if offset and progress.sums is not None:
        sums = {key: jnp.asarray(v, jnp.float32 if key == 'loss_sum'
                                 else jnp.int32)
                for key, v in progress.sums.items()}
      t_chunk = time.perf_counter()
      for state, m, done in run.chunks(state, epoch, offset, hooks):
        host = jax.device_get(m)  # The one host sync per chunk.
        dt = time.perf_counter() - t_chunk
        progress.train_seconds += dt
        step = epoch * run.steps_per_epoch + done
        loss_sum = np.asarray(host['loss_sum'], np.float64)
        if not np.isfinite(loss_sum).all():
          raise CnnJaxError(
              f'loss became {loss_sum.tolist()} at step {step} (epoch '
              f'{epoch + 1}); training stopped and the last good checkpoints '
              f'are kept in {ckpt.root}; try a lower --learning_rate or '
              '--grad_clip_norm')
        sums = m if sums is None else jax.tree_util.tree_map(jnp.add, sums, m)
        if jax.process_index() == 0:
          count = np.asarray(host['count'], np.float64)
          logging.info('epoch %d/%d step %d/%d  loss %.4f  acc %.2f%%  '
                       '%.0f img/s', epoch + 1, config.epochs, step,
                       total_steps, float((loss_sum / count).mean()),
                       100 * float((host['correct'] / count).mean()),
                       run.chunk * config.batch_size * k / dt)
        if done < run.steps_per_epoch:  # The last chunk stops after val.
          if distributed.any_process(stop['signal'] is not None):
            raise stop_here(step, stop['signal'], sums)
          if (config.checkpoint_every_steps
              and step % config.checkpoint_every_steps == 0):
            save_latest(step, sums)
        t_chunk = time.perf_counter()

      phases.lap('train')
      t0 = time.perf_counter()
      variables = variables_of(state)
      vals = trainer.evaluate(variables, val_images, val_labels)
      ensemble_acc = None
      if k > 1:
        probs = trainer.predictor.probabilities(variables, val_images)
        ensemble_acc = losses.probability_metrics(probs,
                                                  val_labels)['accuracy']
      row = metrics_writer.epoch_row(epoch, step, float(learning_rate(
          step - 1)), sums, vals, ensemble_acc)
      progress.train_seconds += time.perf_counter() - t0
      phases.lap('validate')
      row['epoch_seconds'] = time.perf_counter() - t_epoch
      logging.info('epoch %d: train loss %.4f acc %.2f%% | val loss %.4f acc '
                   '%.2f%% | %.1fs', epoch + 1, row['train_loss'],
                   100 * row['train_accuracy'], row['val_loss'],
                   100 * row['val_accuracy'], row['epoch_seconds'])
      writer.write(row)
      improved = [b.beaten_by(config, val)
                  for b, val in zip(progress.members, vals)]
      for b, val, better in zip(progress.members, vals, improved):
        if better:
          b.epoch, b.val_accuracy, b.val_loss = (epoch + 1, val['accuracy'],
                                                 val['loss'])
      if any(improved):
        best_vars = progress_lib.keep_best(improved, variables, best_vars)
        ckpt.save_best(step, best_vars, progress.best_meta(step))
      save_latest(step, None)
      phases.lap('checkpoint')
      if distributed.any_process(stop['signal'] is not None):
        raise stop_here(step, stop['signal'], None)
  writer.close()

  best, best_meta = ckpt.restore_best(variables_of(state))
  results = evaluate.test_run(
      config, trainer.predictor.model, info, data.test, best, best_meta,
      workdir, trainer.mesh, results_lib.Training(
          epochs=config.epochs, steps=total_steps,
          best_metric=config.best_metric,
          train_seconds=progress.train_seconds,
          train_img_per_s=total_steps * config.batch_size * k / max(
              progress.train_seconds, 1e-9),
          num_devices=trainer.num_devices, backend=jax.default_backend(),
          kernels=config.kernels))
  phases.lap('test')
  ckpt.close()
  phases.lap('finish')
  results = dataclasses.replace(results, timings={
      'phase_seconds': phases.seconds, 'compiling': dict(compiling)})
  if jax.process_index() == 0:
    workdir_lib.write_results(workdir, results)
  logging.info('where the time went: %s; compiling %d programs took %.2fs of '
               'it (%d from the persistent cache)', phases.summary(),
               compiling['programs'], compiling['seconds'],
               compiling['cache_hits'])
  logging.info('test accuracy %.2f%% (loss %.4f) with the best params%s; '
               '%.1fs of training', 100 * results.accuracy, results.loss,
               f' (epoch {results.members[0].best_epoch})' if k == 1 else
               f' of {k} members averaged', progress.train_seconds)
  return results
