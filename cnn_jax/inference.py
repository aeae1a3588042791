"""Forward passes of trained runs, independent of the trainer.

`restore` gives a run's model (stock Flax layers), its best variables and
its dataset info from the workdir alone: no TFDS, no data dir, no network.
`Predictor` computes eval-mode logits or class probabilities of whole arrays
of images in batches, sharded over a 1-D ``data`` mesh of the devices, for
one network or for the stacked members of a ``--num_models`` run, optionally
averaged over shifted copies of each image (test-time augmentation).
`restore` gives any run as K networks stacked on a leading axis (K = 1 for a
single run), so what follows treats one network and many alike. `Ensemble`
averages the networks of one or more runs, and `load` restores any workdir
(a run, a many-member run or a ``--mode=ensemble`` workdir) as one.
Evaluation, analysis, prediction and export use these, and the trainer
validates with a `Predictor` too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from cnn_jax import input_pipeline, losses, models, registry
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError

# Test-time augmentation: the image itself, then these (dy, dx) pixel
# shifts in order; --tta=N uses the first N of them.
TTA_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1),
              (-1, -1))


def data_mesh() -> Mesh:
  """A 1-D mesh named ``data`` over every device (of every process)."""
  return Mesh(np.array(jax.devices()), ('data',))


def shift(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """NHWC images moved by (dy, dx) pixels, the uncovered border zero."""
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)),
                       (0, 0)))
  top, left = abs(dy) - dy, abs(dx) - dx
  return jax.lax.dynamic_slice(padded, (0, top, left, 0), (n, h, w, c))


class Predictor:
  """Eval-mode outputs of one model over whole arrays of uint8 images.

  With ``members=K`` (K >= 1) the variables carry a leading axis of K
  stacked networks (a ``--num_models`` run; one for a restored single run)
  and every output gets that axis too; ``members=0`` takes one network's
  variables as they are (a training state).
  """

  def __init__(self, model: nn.Module, batch_size: int = 1000,
               mesh: Mesh | None = None, members: int = 0):
    self.model, self.batch_size, self.members = model, batch_size, members
    self.mesh = mesh or data_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.index_sharding = NamedSharding(self.mesh, P(None, 'data'))
    self.num_devices = self.mesh.devices.size
    self._scans: dict[tuple[str, int], Callable] = {}

  def put(self, array: np.ndarray) -> jax.Array:
    """Places a host array, identical on every process, replicated."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, self.replicated,
                                        lambda idx: array[idx])

  def _apply(self, variables: Any, x: jax.Array) -> jax.Array:
    apply = lambda v: self.model.apply(v, x, train=False)
    if not self.members:
      return apply(variables)
    if self.members == 1:
      return apply(jax.tree_util.tree_map(lambda a: a[0], variables))[None]
    # Member by member: vmapped convolutions become grouped ones, which
    # XLA:CPU runs several times slower; forward passes gain nothing here.
    return jax.lax.map(apply, variables)

  def _scan(self, kind: str, tta: int) -> Callable:
    """Jitted scan over batches: logits, or probabilities averaged over
    the image and its first ``tta`` shifted copies."""
    if (kind, tta) in self._scans:
      return self._scans[kind, tta]

    def body(variables, images, batch_idx):
      x = input_pipeline.normalize(images[batch_idx])
      if kind == 'logits':
        return self._apply(variables, x)
      views = [x] + [shift(x, dy, dx) for dy, dx in TTA_SHIFTS[:tta]]
      return sum(jax.nn.softmax(self._apply(variables, v), axis=-1)
                 for v in views) / len(views)

    def scan(variables, images, idx):
      _, out = jax.lax.scan(lambda _, i: (None, body(variables, images, i)),
                            None, idx)
      out = jnp.moveaxis(out, 1, 0) if self.members else out
      return out.reshape(*out.shape[:-3], -1, out.shape[-1])

    self._scans[kind, tta] = jax.jit(scan, out_shardings=self.replicated)
    return self._scans[kind, tta]

  def _run(self, kind: str, tta: int, variables: Any,
           images: np.ndarray | jax.Array) -> jax.Array:
    if isinstance(images, np.ndarray):
      images = self.put(images)
    n = images.shape[0]
    bs = -(-min(self.batch_size, n) // self.num_devices) * self.num_devices
    nb = -(-n // bs)
    idx = np.minimum(np.arange(nb * bs), n - 1).reshape(nb, bs)
    idx = jax.make_array_from_callback(idx.shape, self.index_sharding,
                                       lambda i: idx[i])
    return self._scan(kind, tta)(variables, images, idx)[..., :n, :]

  def logits(self, variables: Any, images: np.ndarray | jax.Array
             ) -> jax.Array:
    """``[N, classes]`` logits (``[K, N, classes]`` for K members)."""
    return self._run('logits', 0, variables, images)

  def probabilities(self, variables: Any, images: np.ndarray | jax.Array,
                    tta: int = 0) -> np.ndarray:
    """Softmax class probabilities on the host, like `logits`; ``tta``
    averages them over that many shifted copies of each image too."""
    if tta < 0 or tta > len(TTA_SHIFTS):
      raise CnnJaxError(f'--tta must be between 0 and {len(TTA_SHIFTS)}, '
                        f'got {tta}')
    if tta:
      return np.asarray(jax.device_get(
          self._run('tta', tta, variables, images)), np.float64)
    # In float64 on the host: float32 softmax can round nearly equal
    # logits to equal probabilities, and argmax must agree with the logits.
    z = np.asarray(jax.device_get(self.logits(variables, images)), np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def evaluate(self, variables: Any, images: np.ndarray | jax.Array,
               labels: np.ndarray | jax.Array) -> list[dict[str, float]]:
    """Mean cross-entropy and accuracy, one dict per member (one if not
    stacked), from the logits."""
    return self.evaluate_logits(self.logits(variables, images), labels)

  def evaluate_logits(self, logits: jax.Array,
                      labels: np.ndarray | jax.Array
                      ) -> list[dict[str, float]]:
    """`evaluate` of logits this predictor computed."""
    if not self.members:
      logits = logits[None]
    return [losses.summarize(_metrics(member, labels)) for member in logits]


@jax.jit
def _metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Summed metrics in one program (op by op, each op compiles its own)."""
  return losses.loss_and_metrics(logits, labels, logits.shape[-1])[1]


@dataclasses.dataclass(frozen=True)
class Network:
  """One trained network of a workdir: where it comes from and how its
  checkpoint was chosen (its variables live in its `Restored` run)."""

  name: str
  model: str
  seed: int
  workdir: str
  best_epoch: int | None
  best_val_accuracy: float | None
  best_val_loss: float | None


def best_members(meta: dict[str, Any]) -> list[dict[str, Any]]:
  """The best checkpoint's per-network metadata (``epoch``, ``loss``,
  ``accuracy``), of either layout: ``{'members': [...]}``, or one network's
  at the top level (single runs saved before the layout was shared)."""
  return list(meta['members']) if 'members' in meta else [meta]


@jax.jit
def stack(variables: Any) -> Any:
  """One network's variables with a leading member axis of 1 (one program
  for the whole tree)."""
  return jax.tree_util.tree_map(lambda a: a[None], variables)


@dataclasses.dataclass(frozen=True)
class Restored:
  """A run's best checkpoint, ready for forward passes: K networks (K = 1
  for a single run), their variables stacked on a leading member axis."""

  config: Config
  info: input_pipeline.DatasetInfo
  model: nn.Module
  variables: Any  # Every leaf [K, ...].
  networks: tuple[Network, ...]
  workdir: str = ''

  @property
  def num_members(self) -> int:
    return len(self.networks)

  def predictor(self, mesh: Mesh | None = None) -> Predictor:
    return Predictor(self.model, self.config.eval_batch_size, mesh,
                     self.num_members)

  def network_variables(self, k: int) -> Any:
    """Network ``k``'s variables, without the member axis."""
    return jax.tree_util.tree_map(lambda a: a[k], self.variables)


def networks_of(config: Config, meta: dict[str, Any], workdir: str
                ) -> tuple[Network, ...]:
  """The networks of a run (seeds from `Config.member_seeds`) with their
  best checkpoint's metadata."""
  seeds = config.member_seeds()
  return tuple(
      Network(name=f'{workdir}#seed{seed}' if len(seeds) > 1 else workdir,
              model=config.model, seed=seed, workdir=workdir,
              best_epoch=m.get('epoch'), best_val_accuracy=m.get('accuracy'),
              best_val_loss=m.get('loss'))
      for seed, m in zip(seeds, best_members(meta)))


def restore(workdir: str, config: Config | None = None,
            mesh: Mesh | None = None) -> Restored:
  """The best variables of the run in ``workdir``, replicated over ``mesh``.

  ``config`` defaults to the workdir's own. Raises CnnJaxError for a
  workdir without a run or checkpoint, or one of another model.
  """
  if not os.path.isdir(workdir):
    raise CnnJaxError(f'--workdir={workdir} does not exist; train first '
                      'with --mode=train and the same --workdir')
  config = config or workdir_lib.load_config(workdir)
  if config.members:
    raise CnnJaxError(f'{workdir} is an ensemble workdir; load it with '
                      'inference.load')
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if not ckpt.has_best():
      raise CnnJaxError(f'no checkpoint found in {ckpt.root}/best; train '
                        'first with --mode=train and the same --workdir')
    info = workdir_lib.dataset_info(workdir, config)
    model = registry.create_model(config, info.num_classes, training=False)
    sharding = NamedSharding(mesh or data_mesh(), P())
    # On disk a single run's variables have no member axis.
    lead = (config.num_models,) if config.num_models > 1 else ()
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((*lead, *s.shape), s.dtype,
                                       sharding=sharding),
        models.abstract_variables(model, info.image_shape))
    variables, meta = ckpt.restore_best(target)
  finally:
    ckpt.close()
  if not lead:
    variables = stack(variables)
  return Restored(config, info, model, variables,
                  networks_of(config, meta, workdir), workdir)


class Ensemble:
  """The networks of one or more restored runs, probabilities averaged.

  A single run is an ensemble of one network; a ``--num_models=K`` run has
  K. All runs must be on the same dataset (classes and image shape).
  """

  def __init__(self, runs: Sequence[Restored], mesh: Mesh | None = None,
               tta: int = 0):
    if not runs:
      raise CnnJaxError('an ensemble needs at least one run')
    self.runs, self.tta = list(runs), tta
    self.info = runs[0].info
    for run in runs[1:]:
      check_same_data(self.info, run.info, run.workdir)
    self.predictors = [run.predictor(mesh) for run in runs]

  @property
  def networks(self) -> list[Network]:
    return [n for run in self.runs for n in run.networks]

  @property
  def num_members(self) -> int:
    return sum(run.num_members for run in self.runs)

  def member_logits(self, images: np.ndarray) -> np.ndarray:
    """``[members, N, classes]`` float32 logits of every network."""
    return np.concatenate([
        np.asarray(jax.device_get(p.logits(run.variables, images)))
        for run, p in zip(self.runs, self.predictors)])

  def member_probabilities(self, images: np.ndarray,
                           tta: int | None = None) -> np.ndarray:
    """``[members, N, classes]`` class probabilities of every network, with
    the ensemble's test-time augmentation unless ``tta`` says otherwise."""
    tta = self.tta if tta is None else tta
    return np.concatenate([p.probabilities(run.variables, images, tta)
                           for run, p in zip(self.runs, self.predictors)])

  def probabilities(self, images: np.ndarray,
                    tta: int | None = None) -> np.ndarray:
    """``[N, classes]``: the networks' probabilities averaged."""
    return self.member_probabilities(images, tta).mean(0)

  def num_params(self) -> int:
    """Parameters of all networks together."""
    return sum(models.count_params(run.variables['params'])
               for run in self.runs)


def check_plain_pixels(config: Config, workdir: str, mode: str) -> None:
  """Refuses to serve images in their own order to a run trained on
  permuted pixels (an experiment setting, ``--permute_pixels``)."""
  if config.permute_pixels:
    raise CnnJaxError(f'{workdir} was trained with --permute_pixels: it '
                      'expects every image\'s pixels in one shuffled order, '
                      f'so --mode={mode} does not serve it; use --mode=eval '
                      'or analyze')


def check_same_data(info: input_pipeline.DatasetInfo,
                    other: input_pipeline.DatasetInfo, where: str) -> None:
  """Fails when runs on ``other`` cannot be combined with runs on ``info``."""
  if not info.same_task(other):
    raise CnnJaxError(f'{where} was trained on {other.describe()}, not like '
                      f'the others on {info.describe()}')


def load(workdir: str, config: Config | None = None,
         mesh: Mesh | None = None) -> Ensemble:
  """Any workdir as an `Ensemble`: a run, a K-member run, or an ensemble
  workdir (whose members are copies kept inside it)."""
  config = config or workdir_lib.load_config(workdir)
  if not config.members:
    return Ensemble([restore(workdir, config, mesh)], mesh, config.tta)
  runs = []
  for member in config.members.split(','):
    path = os.path.join(workdir, member)
    member_config = workdir_lib.load_config(path).replace(
        eval_batch_size=config.eval_batch_size)
    runs.append(restore(path, member_config, mesh))
  return Ensemble(runs, mesh, config.tta)
