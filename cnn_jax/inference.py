"""Forward passes of trained runs, independent of the trainer.

`restore` gives a run's model (stock Flax layers), its best variables and
its dataset info from the workdir alone: no TFDS, no data dir, no network.
`Predictor` computes eval-mode logits of whole splits in batches, sharded
over a 1-D ``data`` mesh of the devices. Evaluation, analysis, prediction
and export use these, and the trainer validates with a `Predictor` too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from cnn_jax import input_pipeline, losses, models, registry
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError


def data_mesh() -> Mesh:
  """A 1-D mesh named ``data`` over every device (of every process)."""
  return Mesh(np.array(jax.devices()), ('data',))


class Predictor:
  """Eval-mode logits of one model over whole arrays of uint8 images."""

  def __init__(self, model: nn.Module, batch_size: int = 1000,
               mesh: Mesh | None = None):
    self.model, self.batch_size = model, batch_size
    self.mesh = mesh or data_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.index_sharding = NamedSharding(self.mesh, P(None, 'data'))
    self.num_devices = self.mesh.devices.size
    self._logits = jax.jit(self._scan_logits, out_shardings=self.replicated)

  def put(self, array: np.ndarray) -> jax.Array:
    """Places a host array, identical on every process, replicated."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, self.replicated,
                                        lambda idx: array[idx])

  def _scan_logits(self, variables: Any, images: jax.Array,
                   idx: jax.Array) -> jax.Array:
    def body(_, batch_idx):
      x = input_pipeline.normalize(images[batch_idx])
      return None, self.model.apply(variables, x, train=False)
    _, logits = jax.lax.scan(body, None, idx)
    return logits.reshape(-1, logits.shape[-1])

  def logits(self, variables: Any, images: np.ndarray | jax.Array
             ) -> jax.Array:
    """``[N, classes]`` logits of every image, batch by batch."""
    if isinstance(images, np.ndarray):
      images = self.put(images)
    n = images.shape[0]
    bs = -(-min(self.batch_size, n) // self.num_devices) * self.num_devices
    nb = -(-n // bs)
    idx = np.minimum(np.arange(nb * bs), n - 1).reshape(nb, bs)
    idx = jax.make_array_from_callback(idx.shape, self.index_sharding,
                                       lambda i: idx[i])
    return self._logits(variables, images, idx)[:n]

  def probabilities(self, variables: Any, images: np.ndarray) -> np.ndarray:
    """Softmax class probabilities, on the host."""
    logits = self.logits(variables, images)
    return np.asarray(jax.device_get(jax.nn.softmax(logits, axis=-1)))

  def evaluate(self, variables: Any, images: np.ndarray | jax.Array,
               labels: np.ndarray | jax.Array) -> dict[str, float]:
    """Mean cross-entropy and accuracy of eval-mode predictions."""
    return losses.summarize(_metrics(self.logits(variables, images), labels))


@jax.jit
def _metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Summed metrics in one program (op by op, each op compiles its own)."""
  return losses.loss_and_metrics(logits, labels, logits.shape[-1])[1]


@dataclasses.dataclass(frozen=True)
class Restored:
  """A run's best checkpoint, ready for forward passes."""

  config: Config
  info: input_pipeline.DatasetInfo
  model: nn.Module
  variables: Any
  meta: dict[str, Any]  # The best epoch's: epoch, step, val loss/accuracy.

  def predictor(self, mesh: Mesh | None = None) -> Predictor:
    return Predictor(self.model, self.config.eval_batch_size, mesh)


def restore(workdir: str, config: Config | None = None,
            mesh: Mesh | None = None) -> Restored:
  """The best variables of ``workdir``, replicated over ``mesh``.

  ``config`` defaults to the workdir's own. Raises CnnJaxError for a
  workdir without a run or checkpoint, or one of another model.
  """
  if not os.path.isdir(workdir):
    raise CnnJaxError(f'--workdir={workdir} does not exist; train first '
                      'with --mode=train and the same --workdir')
  config = config or workdir_lib.load_config(workdir)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if not ckpt.has_best():
      raise CnnJaxError(f'no checkpoint found in {ckpt.root}/best; train '
                        'first with --mode=train and the same --workdir')
    info = workdir_lib.dataset_info(workdir, config)
    model = registry.create_model(config, info.num_classes, training=False)
    sharding = NamedSharding(mesh or data_mesh(), P())
    target = jax.device_put(
        models.init_variables(model, jax.random.PRNGKey(0), info.image_shape),
        sharding)
    variables, meta = ckpt.restore_best(target)
  finally:
    ckpt.close()
  return Restored(config, info, model, variables, meta)
