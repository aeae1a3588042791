"""What every benchmark tool shares: its flags, the synthetic data, timing
and memory helpers, and `JaxRunner`, cnn_jax's own training and evaluation
steps as the tools time them (built with `cnn_jax.train.setup`, the loop's
own set-up)."""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Any, Callable

from absl import flags

# cnn_jax.config imports no JAX, so XLA flags can still be set after this.
from cnn_jax import config as config_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The flags every tool takes; each tool's module calls this once.

  Not at import, so the peers can be imported beside cnn_jax's own flags.
  """
  flags.DEFINE_list('models', ['simple_cnn', 'deep_cnn'], 'Models to time.')
  flags.DEFINE_integer('batch_size', 128,
                       'Training batch size (all frameworks).')
  flags.DEFINE_integer('steps', 20, 'Training steps per timed chunk.')
  flags.DEFINE_integer('warmup', 1, 'Untimed chunks after the compiling one.')
  flags.DEFINE_integer('repeats', 3, 'Timed chunks; the median is reported.')
  flags.DEFINE_integer('eval_examples', 4000, 'Images per timed evaluation.')
  flags.DEFINE_integer('eval_batch_size', 1000, 'Evaluation batch size.')
  flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate.')
  flags.DEFINE_list('peers', ['keras', 'torch'],
                    'Other frameworks to time (keras, torch); ones that are not '
                    'installed are skipped.')
  flags.DEFINE_enum('kernels', 'auto', config_lib.KERNELS,
                    'cnn_jax training layers (see cnn_jax/kernels).')
  flags.DEFINE_integer('num_models', 1, 'cnn_jax members trained at once '
                       '(jax.vmap); img/s then counts every member\'s images.')
  flags.DEFINE_enum('dtype', 'float32', config_lib.DTYPES,
                    'cnn_jax compute dtype.')
  flags.DEFINE_integer('host_devices', 0, 'If > 0, split the CPU into this many '
                       'XLA host devices (data parallel over the Trainer mesh).')
  flags.DEFINE_bool('single_thread', True, 'XLA:CPU without its multi-threaded '
                    'Eigen, one thread per device (the cnn_jax default, '
                    'cnn_jax/runtime.py); --nosingle_thread lets XLA use it.')
  flags.DEFINE_string('xla_flags', '', 'Extra XLA_FLAGS for cnn_jax.')
  flags.DEFINE_bool('tiny', False, 'A few steps on small batches (for tests).')
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (Linux: KiB units)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
  """Current resident set size, from /proc (falls back to the peak)."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except OSError:
    return peak_rss_mb()


def timed(fn: Callable[[], Any]) -> float:
  """Seconds one call of ``fn`` takes (``fn`` must block until done)."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def synthetic_data(n: int, seed: int = 0) -> tuple[Any, Any]:
  """Random uint8 images and int32 labels of MNIST's shapes."""
  import numpy as np
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32)
  return images, labels


def settings() -> dict[str, Any]:
  """The run's effective settings (after --tiny)."""
  s = dict(models=list(FLAGS.models), batch_size=FLAGS.batch_size,
           steps=FLAGS.steps, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
           eval_examples=FLAGS.eval_examples,
           eval_batch_size=FLAGS.eval_batch_size,
           learning_rate=FLAGS.learning_rate, kernels=FLAGS.kernels,
           dtype=FLAGS.dtype, num_models=FLAGS.num_models,
           peers=[p for p in FLAGS.peers if p])
  from cnn_jax.registry import MODELS
  from experiments.benchmark import peers
  unknown = ([m for m in s['models'] if m not in MODELS]
             + [p for p in s['peers'] if p not in peers.RUNNERS])
  if unknown:
    raise SystemExit(f'error: unknown --models/--peers entries: {unknown}')
  if FLAGS.tiny:
    s.update(batch_size=8, steps=2, warmup=0, repeats=1, eval_examples=32,
             eval_batch_size=16)
  return s


# Runners: built once, then train() runs `steps` steps, evaluate() one pass.
class JaxRunner:
  """cnn_jax's own `train.setup`: jitted `train_chunk` and `logits`."""

  name = 'cnn_jax'

  def __init__(self, model_name: str, s: dict[str, Any], data: tuple,
               layers: dict[str, Any] | None = None):
    """``layers`` (model fields -> layer types) overrides ``--kernels``:
    the stock model with exactly those layers swapped in."""
    import jax
    from cnn_jax import models, registry, train
    self.jax = jax
    self.config = config_lib.Config(
        model=model_name, batch_size=s['batch_size'], optimizer='adam',
        learning_rate=s['learning_rate'], kernels=s['kernels'],
        dtype=s['dtype'], eval_batch_size=s['eval_batch_size'],
        num_models=s['num_models'], log_every_steps=s['steps'])
    model = None
    if layers is not None:
      model = registry.create_model(self.config, NUM_CLASSES, training=False)
      fields = set(model.__dataclass_fields__)
      model = model.clone(**{k: v for k, v in layers.items() if k in fields})
    images, labels, eval_images = data
    self.run = train.setup(self.config, NUM_CLASSES, IMAGE_SHAPE, images,
                           labels, model=model)
    self.trainer, self.state = self.run.trainer, self.run.state
    self.model = self.trainer.model
    self.eval_images = self.trainer.put(eval_images)
    self.variables_of = train.variables_of
    self.num_params = models.count_params(self.state.params)

  def train(self) -> None:
    """One epoch of the synthetic set: `steps` steps, one jitted chunk."""
    import numpy as np
    for self.state, metrics, _ in self.run.chunks(self.state, 0):
      loss = float(np.sum(metrics['loss_sum']))  # Blocks, as training does.
      if not math.isfinite(loss):
        raise FloatingPointError(f'{self.name}: loss {loss}')

  def evaluate(self) -> None:
    logits = self.trainer.predictor.logits(self.variables_of(self.state),
                                           self.eval_images)
    self.jax.block_until_ready(logits)

  def extra(self) -> dict[str, Any]:
    jax = self.jax
    out: dict[str, Any] = {
        'backend': jax.default_backend(), 'num_devices': jax.device_count(),
        'kernels': self.config.kernels, 'dtype': self.config.dtype,
        'num_params': self.num_params,
        'xla_flags': os.environ.get('XLA_FLAGS', '')}
    stats = jax.local_devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      out['device_peak_mb'] = stats['peak_bytes_in_use'] / 2**20
    return out


def installed(peer: str) -> bool:
  """Whether the peer framework (its module has the peer's name) imports."""
  import importlib.util
  return importlib.util.find_spec(peer) is not None


def configure_xla() -> None:
  """Sets XLA_FLAGS from the flags and cnn_jax's defaults, before JAX runs."""
  from cnn_jax import runtime
  extra = FLAGS.xla_flags.split()
  if not FLAGS.single_thread:
    extra.append('--xla_cpu_multi_thread_eigen=true')
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', '')] + extra).strip()
  runtime.configure_xla(host_devices=FLAGS.host_devices or 1)


def run_tool(tool: Callable[[dict[str, Any]], dict[str, Any]],
             table: Callable[[dict[str, Any]], str]) -> None:
  """A tool's main: XLA settings, then the tool, then JSON or its table."""
  import json
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  configure_xla()
  results = tool(settings())
  print(json.dumps(results, indent=1) if FLAGS.json else table(results))
