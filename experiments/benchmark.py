r"""Training and evaluation speed of cnn_jax against Keras 3 and PyTorch.

For each model the same architecture, optimizer (Adam, same learning rate)
and batch size are built in each framework, on the same synthetic uint8
MNIST-shaped data held in memory. Ours is timed over the library's own jitted
multi-step `Trainer.train_chunk` (a `lax.scan` of `--steps` steps); Keras over
`train_on_batch` (its TensorFlow backend, default settings, so no XLA on
CPU), PyTorch over a plain eager loop. The frameworks take turns within each
repeat, so load from other processes hits them alike; medians are reported.

  python experiments/benchmark.py                       # both models, table
  python experiments/benchmark.py --json --models=simple_cnn --repeats=5
  python experiments/benchmark.py --kernels=flax --peers=     # ours only
  python experiments/benchmark.py --host_devices=2 --single_thread
  python experiments/benchmark.py --whole_run --tfds_data_dir=DIR  # 1 epoch
  python experiments/benchmark.py --kernel_sweep --repeats=7  # what each
                        # CPU kernel adds: flax, cpu, cpu without each one
  python experiments/benchmark.py --profile --host_devices=2 --single_thread
                        # where ours spends a training step, layer by layer
                        # beside PyTorch; per core: taskset -c 0 ... \
                        #   --host_devices=1 --batch_size=64

Figures per framework: ``train_img_per_s`` (steady state), ``eval_img_per_s``
(batches of 1000, inference mode), ``compile_seconds`` (first training call
minus a steady one: tracing + compilation for JAX, graph tracing for Keras,
~0 for eager PyTorch), ``peak_rss_mb`` (process peak RSS when its warm-up
ended: exact for ours, which is set up first; the peers' include what was
loaded before them) and ``rss_growth_mb`` (resident memory its import, model
and warm-up added).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Time the checkout this script is in (a git worktree of another commit,
# say), not whichever cnn_jax is installed: `python experiments/benchmark.py`
# puts only experiments/ on the path.
sys.path.insert(0, REPO)

# cnn_jax.config imports no JAX, so XLA flags can still be set after this.
from cnn_jax import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['simple_cnn', 'deep_cnn'], 'Models to time.')
flags.DEFINE_integer('batch_size', 128, 'Training batch size (all frameworks).')
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
flags.DEFINE_bool('whole_run', False, 'Instead: time one whole epoch of '
                  'SimpleCNN on real MNIST, input loading included, with '
                  'train_and_evaluate and with the Keras tutorial recipe.')
flags.DEFINE_bool('fast', False, 'With --whole_run: ours runs '
                  'experiments/configs/fast.flags, Keras its tutorial recipe '
                  '(batch 64, 3 epochs): time to 99% test accuracy.')
flags.DEFINE_bool('kernel_sweep', False, 'Instead: time whole training '
                  'steps of each of --models with stock Flax layers, with '
                  'every CPU kernel, and with every CPU kernel but one '
                  '(taking turns; ours only): what each kernel adds.')
flags.DEFINE_bool('profile', False, 'Instead: trace one training chunk of '
                  'ours per model with jax.profiler and print the XLA ops '
                  'that take the most time, with the layer each came from, '
                  'and the time per layer beside the PyTorch peer\'s (timed '
                  'with module hooks) when torch is installed.')
flags.DEFINE_integer('top_ops', 15, 'With --profile: how many ops to list.')
flags.DEFINE_string('tfds_data_dir', '', 'TFDS data dir for --whole_run '
                    '(default: $TFDS_DATA_DIR or ../shared/tensorflow_datasets).')

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# Helpers ----------------------------------------------------------------------
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
  unknown = ([m for m in s['models'] if m not in MODELS]
             + [p for p in s['peers'] if p not in RUNNERS])
  if unknown:
    raise SystemExit(f'error: unknown --models/--peers entries: {unknown}')
  if FLAGS.tiny:
    s.update(batch_size=8, steps=2, warmup=0, repeats=1, eval_examples=32,
             eval_batch_size=16)
  return s


# Runners: setup() once, then train() runs `steps` steps, evaluate() one pass.
class JaxRunner:
  """cnn_jax's own Trainer: jitted `train_chunk` and `logits`."""

  name = 'cnn_jax'

  def __init__(self, model_name: str, s: dict[str, Any], data: tuple,
               layers: dict[str, Any] | None = None):
    """``layers`` (model fields -> layer types) overrides ``--kernels``."""
    import jax
    from cnn_jax import models, train
    self.jax = jax
    self.config = config_lib.Config(
        model=model_name, batch_size=s['batch_size'], optimizer='adam',
        learning_rate=s['learning_rate'], kernels=s['kernels'],
        dtype=s['dtype'], eval_batch_size=s['eval_batch_size'],
        num_models=s['num_models'])
    self.trainer = train.Trainer(self.config, NUM_CLASSES)
    if layers is not None:
      model = self.trainer.model
      fields = set(model.__dataclass_fields__)
      self.trainer.model = model.clone(
          **{k: v for k, v in layers.items() if k in fields})
    self.model = self.trainer.model
    state = train.create_train_state(self.config, self.model, IMAGE_SHAPE,
                                     s['steps'])
    self.state = jax.device_put(state, self.trainer.replicated)
    images, labels, eval_images = data
    self.images = self.trainer.put(images)
    self.labels = self.trainer.put(labels)
    self.eval_images = self.trainer.put(eval_images)
    self.idx = self.trainer.epoch_indices(train.data_key(self.config), 0,
                                          len(labels))
    self.variables_of = train.variables_of
    self.num_params = models.count_params(self.state.params)

  def train(self) -> None:
    import numpy as np
    self.state, metrics = self.trainer.train_chunk(
        self.state, self.images, self.labels, self.idx)
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


def keras_model(model_name: str, rescale: bool = True):
  """SimpleCNN / DeepCNN as a Keras 3 Sequential (same layers as ours).

  With ``rescale`` it takes uint8 pixels and scales them to [0, 1] itself.
  """
  import keras
  from keras import layers
  seq: list[Any] = [keras.Input(IMAGE_SHAPE)]
  if rescale:
    seq.append(layers.Rescaling(1 / 255))
  if model_name == 'simple_cnn':
    seq += [layers.Conv2D(32, 3, activation='relu'), layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation='relu'), layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation='relu'), layers.Flatten(),
            layers.Dense(64, activation='relu'), layers.Dense(NUM_CLASSES)]
  else:
    bn = lambda: layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    for features in (32, 64):
      for _ in range(2):
        seq += [layers.Conv2D(features, 3, use_bias=False), bn(),
                layers.ReLU()]
      seq += [layers.MaxPooling2D(2), layers.Dropout(0.25)]
    seq += [layers.Flatten(), layers.Dense(128, use_bias=False), bn(),
            layers.ReLU(), layers.Dropout(0.25), layers.Dense(NUM_CLASSES)]
  return keras.Sequential(seq, name=model_name)


class KerasRunner:
  """Keras 3 (TensorFlow backend): `train_on_batch` / `predict_on_batch`."""

  name = 'keras'

  def __init__(self, model_name: str, s: dict[str, Any], data: tuple):
    os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
    import keras
    import numpy as np
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')
    self.model = keras_model(model_name)
    self.model.compile(
        optimizer=keras.optimizers.Adam(s['learning_rate']),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'])
    images, labels, eval_images = data
    bs, steps = s['batch_size'], s['steps']
    perm = np.random.default_rng(1).permutation(len(labels))[:steps * bs]
    self.batches = [(tf.constant(images[b]), tf.constant(labels[b]))
                    for b in perm.reshape(steps, bs)]
    ebs = s['eval_batch_size']
    self.eval_batches = [tf.constant(eval_images[i:i + ebs])
                         for i in range(0, len(eval_images), ebs)]
    self.num_params = sum(math.prod(w.shape)
                          for w in self.model.trainable_weights)

  def train(self) -> None:
    for x, y in self.batches:
      loss = self.model.train_on_batch(x, y, return_dict=True)['loss']
    if not math.isfinite(float(loss)):
      raise FloatingPointError(f'{self.name}: loss {loss}')

  def evaluate(self) -> None:
    for x in self.eval_batches:
      self.model.predict_on_batch(x)

  def extra(self) -> dict[str, Any]:
    import keras
    return {'version': keras.__version__, 'backend': keras.backend.backend(),
            'num_params': self.num_params}


def torch_model(model_name: str):
  """SimpleCNN / DeepCNN as a torch.nn.Sequential (NCHW, same layers).

  Modules are named like ours (conv1_1, bn1_1, dense1, logits, ...), so
  ``--profile`` lines the two up layer by layer.
  """
  from collections import OrderedDict
  from torch import nn
  if model_name == 'simple_cnn':
    return nn.Sequential(OrderedDict([
        ('conv1', nn.Conv2d(1, 32, 3)), ('relu1', nn.ReLU()),
        ('pool1', nn.MaxPool2d(2)),
        ('conv2', nn.Conv2d(32, 64, 3)), ('relu2', nn.ReLU()),
        ('pool2', nn.MaxPool2d(2)),
        ('conv3', nn.Conv2d(64, 64, 3)), ('relu3', nn.ReLU()),
        ('flatten', nn.Flatten()),
        ('dense1', nn.Linear(64 * 3 * 3, 64)), ('relu_dense1', nn.ReLU()),
        ('logits', nn.Linear(64, NUM_CLASSES))]))
  mods: list[tuple[str, Any]] = []
  cin, size = 1, IMAGE_SHAPE[0]
  for s, features in enumerate((32, 64), start=1):
    for c in (1, 2):
      mods += [(f'conv{s}_{c}', nn.Conv2d(cin, features, 3, bias=False)),
               (f'bn{s}_{c}', nn.BatchNorm2d(features, eps=1e-5,
                                             momentum=0.1)),
               (f'relu{s}_{c}', nn.ReLU())]
      cin, size = features, size - 2
    mods += [(f'pool{s}', nn.MaxPool2d(2)), (f'dropout{s}', nn.Dropout(0.25))]
    size //= 2
  mods += [('flatten', nn.Flatten()),
           ('dense1', nn.Linear(cin * size * size, 128, bias=False)),
           ('bn_dense1', nn.BatchNorm1d(128, eps=1e-5, momentum=0.1)),
           ('relu_dense1', nn.ReLU()), ('dropout3', nn.Dropout(0.25)),
           ('logits', nn.Linear(128, NUM_CLASSES))]
  return nn.Sequential(OrderedDict(mods))


class TorchRunner:
  """PyTorch eager CPU: the usual zero_grad/backward/step loop."""

  name = 'torch'

  def __init__(self, model_name: str, s: dict[str, Any], data: tuple):
    import numpy as np
    import torch
    self.torch = torch
    torch.manual_seed(0)
    self.model = torch_model(model_name)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=s['learning_rate'])
    self.loss_fn = torch.nn.CrossEntropyLoss()
    images, labels, eval_images = data
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(
        a.transpose(0, 3, 1, 2)))
    self.images, self.labels = nchw(images), torch.from_numpy(labels).long()
    self.eval_images = nchw(eval_images)
    bs, steps = s['batch_size'], s['steps']
    perm = np.random.default_rng(1).permutation(len(labels))[:steps * bs]
    self.idx = torch.from_numpy(perm.reshape(steps, bs))
    self.ebs = s['eval_batch_size']
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def train(self) -> None:
    self.model.train()
    for b in self.idx:
      x = self.images[b].float().div_(255)
      loss = self.loss_fn(self.model(x), self.labels[b])
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
    if not math.isfinite(loss.item()):
      raise FloatingPointError(f'{self.name}: loss {loss.item()}')

  def evaluate(self) -> None:
    self.model.eval()
    with self.torch.inference_mode():
      for i in range(0, len(self.eval_images), self.ebs):
        self.model(self.eval_images[i:i + self.ebs].float().div_(255))

  def layer_times(self) -> tuple[dict[str, dict[str, float]], float]:
    """Per-layer-group forward/backward ms per step, and wall ms per step.

    Timed with module hooks over one `train` (``steps`` steps). Hooks do not
    see the backward pass of a module whose input needs no gradient (the
    first conv), so that lands in ``rest`` with the loss and optimizer.
    """
    start: dict[tuple[str, str], float] = {}
    ms: dict[str, dict[str, float]] = {}

    def begin(key):
      return lambda *_: start.__setitem__(key, time.perf_counter())

    def end(key):
      def hook(module, inputs, outputs):
        seconds = time.perf_counter() - start.pop(key)
        if key[1] == 'backward_ms' and all(g is None for g in inputs):
          return  # No input gradient: the hook fired before the backward.
        group = ms.setdefault(layer_group(key[0]), {})
        group[key[1]] = group.get(key[1], 0.0) + 1e3 * seconds
      return hook

    handles = []
    for name, m in self.model.named_children():
      f, b = (name, 'forward_ms'), (name, 'backward_ms')
      handles += [m.register_forward_pre_hook(begin(f)),
                  m.register_forward_hook(end(f)),
                  m.register_full_backward_pre_hook(begin(b)),
                  m.register_full_backward_hook(end(b))]
    try:
      with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'Full backward hook is firing')
        wall = timed(self.train)
    finally:
      for h in handles:
        h.remove()
    steps = len(self.idx)
    return ({k: {d: v / steps for d, v in t.items()} for k, t in ms.items()},
            1e3 * wall / steps)

  def extra(self) -> dict[str, Any]:
    return {'version': self.torch.__version__,
            'threads': self.torch.get_num_threads(),
            'num_params': self.num_params}


RUNNERS = {'keras': KerasRunner, 'torch': TorchRunner}


def installed(peer: str) -> bool:
  """Whether the peer framework (its module has the peer's name) imports."""
  import importlib.util
  return importlib.util.find_spec(peer) is not None


# Benchmark --------------------------------------------------------------------
def setup(cls: type, model_name: str, s: dict[str, Any], data: tuple
          ) -> tuple[Any, dict[str, Any]]:
  """Builds a runner, runs its first (compiling) and warm-up chunks."""
  rss0 = current_rss_mb()
  runner = cls(model_name, s, data)
  first = timed(runner.train)
  for _ in range(s['warmup']):
    runner.train()
  first_eval = timed(runner.evaluate)
  return runner, {'first_train_seconds': first,
                  'first_eval_seconds': first_eval,
                  'peak_rss_mb': peak_rss_mb(),
                  'rss_growth_mb': current_rss_mb() - rss0}


def benchmark(s: dict[str, Any]) -> dict[str, Any]:
  """Sets every (framework, model) up, then times them in turns."""
  n = s['steps'] * s['batch_size']
  images, labels = synthetic_data(n)
  eval_images, _ = synthetic_data(s['eval_examples'], seed=1)
  data = (images, labels, eval_images)
  peers = [p for p in s['peers'] if installed(p)]
  # Ours first, for all models, so its peak RSS holds no other framework.
  classes = [JaxRunner] + [RUNNERS[p] for p in peers]
  runners: dict[str, dict[str, tuple[Any, dict]]] = {}
  for cls in classes:
    for model_name in s['models']:
      runners.setdefault(model_name, {})[cls.name] = setup(
          cls, model_name, s, data)

  results: dict[str, Any] = {}
  for model_name, by_framework in runners.items():
    train_t: dict[str, list[float]] = {k: [] for k in by_framework}
    eval_t: dict[str, list[float]] = {k: [] for k in by_framework}
    for _ in range(s['repeats']):
      for name, (runner, _) in by_framework.items():
        train_t[name].append(timed(runner.train))
      for name, (runner, _) in by_framework.items():
        eval_t[name].append(timed(runner.evaluate))
    figures = {}
    for name, (runner, info) in by_framework.items():
      t_train = statistics.median(train_t[name])
      t_eval = statistics.median(eval_t[name])
      members = s['num_models'] if name == 'cnn_jax' else 1
      figures[name] = {
          'train_img_per_s': n * members / t_train,
          'eval_img_per_s': s['eval_examples'] * members / t_eval,
          'compile_seconds': max(0.0, info['first_train_seconds'] - t_train),
          'peak_rss_mb': info['peak_rss_mb'],
          'rss_growth_mb': info['rss_growth_mb'],
          'train_seconds_per_chunk': train_t[name],
          **runner.extra()}
    ours = figures.pop('cnn_jax')
    for peer, fig in figures.items():
      ours[peer] = fig
      ours[f'ratio_vs_{peer}'] = (ours['train_img_per_s']
                                  / fig['train_img_per_s'])
      ours[f'eval_ratio_vs_{peer}'] = (ours['eval_img_per_s']
                                       / fig['eval_img_per_s'])
    results[model_name] = ours
  results['settings'] = {**s, 'peers_run': peers,
                         'peers_skipped': [p for p in s['peers']
                                           if p not in peers],
                         'cpu_count': os.cpu_count(),
                         'load_average_1min': os.getloadavg()[0]}
  return results


# Kernel sweep: what each CPU kernel adds to a whole training step ----------
def kernel_variants() -> dict[str, dict[str, Any]]:
  """Layer overrides by name: flax, cpu, and cpu without each kernel."""
  from cnn_jax import kernels
  out: dict[str, dict[str, Any]] = {'flax': {}, 'cpu': kernels.cpu_layers()}
  for left_out in kernels.CPU_LAYERS:
    out[f'cpu-{left_out}'] = kernels.cpu_layers(
        [k for k in kernels.CPU_LAYERS if k != left_out])
  return out


def kernel_sweep(s: dict[str, Any]) -> dict[str, Any]:
  """Training img/s of each model per kernel variant, taking turns."""
  n = s['steps'] * s['batch_size']
  images, labels = synthetic_data(n)
  data = (images, labels, images[:s['eval_batch_size']])  # No eval timed.
  out: dict[str, Any] = {}
  for model_name in s['models']:
    runs = {}
    for name, layers in kernel_variants().items():
      if name == 'cpu-norm' and model_name == 'simple_cnn':
        continue  # SimpleCNN has no batch norm or dropout.
      if name == 'cpu-dropout' and model_name == 'simple_cnn':
        continue
      run = JaxRunner(model_name, s, data, layers).train
      first = timed(run)
      for _ in range(s['warmup']):
        run()
      runs[name] = (run, first, [])
    for _ in range(s['repeats']):
      for run, _, times in runs.values():
        times.append(timed(run))
    out[model_name] = {
        name: {'train_img_per_s': n / statistics.median(times),
               'compile_seconds': max(0.0, first - statistics.median(times)),
               'train_img_per_s_each': [n / x for x in times]}
        for name, (_, first, times) in runs.items()}
  return {'kernel_sweep': out, 'settings': {
      **s, 'load_average_1min': os.getloadavg()[0]}}


# Profile: where one training step's time goes ------------------------------
def _hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, JAX op_name) of compiled HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if m:
      src = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), src.group(1) if src else '')
  return out


def _source(op_name: str) -> str:
  """'forward|backward: <layer path>' from a JAX op_name."""
  first, *more = op_name.split(':')  # Multi-output fusions list several.
  direction = 'backward' if 'transpose(jvp(' in first else 'forward'
  path = re.sub(r'^\(?.*?closed_call/', '', first)
  path = re.sub(r'^(transpose\()?jvp\(\w+\)\)?/', '', path)
  return f'{direction}: {path}' + (f' (+{len(more)} more)' if more else '')


def layer_group(module: str) -> str:
  """A module name (ours or the PyTorch peer's) -> its row in ``layers``."""
  if re.fullmatch(r'conv\d+(_\d+)?|dense\d+|logits', module):
    return module
  if re.fullmatch(r'bn\w*', module):
    return 'batch norm'
  if re.fullmatch(r'(?i)dropout_?\d+', module):
    return 'dropout'
  return 'rest'


def _layers(ops: dict[str, float], sources: dict[str, tuple[str, str]],
            wall_ms: float) -> dict[str, dict[str, float]]:
  """Op times summed by the layer their JAX op_name names; ``rest`` (ReLU,
  pooling, loss, optimizer, waits) is the step's wall time minus the rest."""
  layers: dict[str, dict[str, float]] = {}
  for op, ms in ops.items():
    source = _source(sources[op][1])
    direction, path = source.split(': ', 1)
    group = next((g for g in map(layer_group, re.split(r'[/ ]', path))
                  if g != 'rest'), 'rest')
    if group != 'rest':
      t = layers.setdefault(group, {'forward_ms': 0.0, 'backward_ms': 0.0})
      t[f'{direction}_ms'] += ms
  return _with_rest(layers, wall_ms)


def _with_rest(layers: dict[str, dict[str, float]],
               wall_ms: float) -> dict[str, dict[str, float]]:
  layers = {k: v for k, v in layers.items() if k != 'rest'}
  named = sum(sum(t.values()) for t in layers.values())
  return {**layers, 'rest': {'ms': wall_ms - named}}


def profile(s: dict[str, Any]) -> dict[str, Any]:
  """Per-op and per-layer time of one traced training chunk, per model.

  Op times are XLA:CPU thunk events summed over the traced chunk and divided
  by steps x devices: milliseconds per step on one device. They do not
  include the time devices wait for each other (``sync_ms``: rendezvous and
  waits), so ``op_ms`` + ``sync_ms`` is about one step's wall time.
  ``layers`` sums them per layer and direction; with the PyTorch peer,
  ``torch_layers`` times its modules the same way (hooks), for a layer by
  layer comparison (pin both to one core to compare kernels:
  ``taskset -c 0 ... --host_devices=1 --batch_size=64``).
  """
  import glob
  import jax
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF is a dep.
  n = s['steps'] * s['batch_size']
  images, labels = synthetic_data(n)
  data = (images, labels, synthetic_data(s['eval_batch_size'], seed=1)[0])
  results: dict[str, Any] = {}
  for model_name in s['models']:
    runner = JaxRunner(model_name, s, data)
    for _ in range(1 + s['warmup']):
      runner.train()
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d)
      runner.train()
      jax.profiler.stop_trace()
      space = xplane_pb2.XSpace()
      with open(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0],
                'rb') as f:
        space.ParseFromString(f.read())
    sources = _hlo_sources(runner.trainer.train_chunk.lower(
        runner.state, runner.images, runner.labels,
        runner.idx).compile().as_text())
    per = s['steps'] * jax.device_count()
    ops: dict[str, float] = {}
    sync = 0.0
    for plane in space.planes:
      names = {k: v.name for k, v in plane.event_metadata.items()}
      for line in plane.lines:
        for ev in line.events:
          name = names.get(ev.metadata_id, '')
          ms = ev.duration_ps / 1e9 / per
          if name in sources:
            ops[name] = ops.get(name, 0.0) + ms
          elif name.startswith(('Rendezvous', 'Wait:')):
            sync += ms
    if not ops:
      raise SystemExit('error: --profile found no XLA:CPU op events in the '
                       f'trace (backend {jax.default_backend()!r}); it reads '
                       'CPU traces only')
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:FLAGS.top_ops]
    wall = 1e3 * timed(runner.train) / s['steps']
    results[model_name] = r = {
        'op_ms': sum(ops.values()), 'sync_ms': sync, 'wall_ms_per_step': wall,
        'layers': _layers(ops, sources, wall),
        'top_ops': [{'op': k, 'ms': v, 'shape': sources[k][0],
                     'source': _source(sources[k][1])} for k, v in top]}
    if 'torch' in s['peers'] and installed('torch'):
      peer = TorchRunner(model_name, s, data)
      for _ in range(1 + s['warmup']):
        peer.train()
      layers, r['torch_wall_ms_per_step'] = peer.layer_times()
      r['torch_threads'] = peer.torch.get_num_threads()
      r['torch_layers'] = _with_rest(layers, r['torch_wall_ms_per_step'])
  results['settings'] = {**s, 'num_devices': jax.device_count(),
                         'load_average_1min': os.getloadavg()[0]}
  return results


# Whole run: one real epoch, input loading included -----------------------------
def default_data_dir() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (FLAGS.tfds_data_dir, os.environ.get('TFDS_DATA_DIR', ''),
            os.path.join(here, '..', '..', 'shared', 'tensorflow_datasets')):
    if d and os.path.isdir(os.path.join(d, 'mnist')):
      return os.path.abspath(d)
  raise SystemExit('error: --whole_run needs prepared MNIST: pass '
                   '--tfds_data_dir')


def whole_run(s: dict[str, Any]) -> dict[str, Any]:
  """Real MNIST, input to test accuracy: ours vs the Keras recipe.

  One epoch of each by default; with ``--fast``, ours runs
  ``experiments/configs/fast.flags`` and Keras its tutorial recipe (Adam
  1e-3, batch 64, 3 epochs): time to >= 99% test accuracy.
  """
  data_dir = default_data_dir()
  out: dict[str, Any] = {}
  from cnn_jax import config_flags, train
  from cnn_jax import workdir as workdir_lib
  if FLAGS.fast:
    config = config_flags.config_from_flagfile(
        os.path.join(REPO, 'experiments', 'configs', 'fast.flags'),
        tfds_data_dir=data_dir, download=False)
  else:
    config = config_lib.Config(
        model='simple_cnn', epochs=1, batch_size=s['batch_size'],
        learning_rate=s['learning_rate'], kernels=s['kernels'],
        dtype=s['dtype'], tfds_data_dir=data_dir,
        download=False)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    res = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t0
    epoch = workdir_lib.read_history(workdir)[0]
  out['cnn_jax'] = {'wall_seconds': wall, 'epochs': config.epochs,
                    'epoch_seconds': epoch['epoch_seconds'],
                    'train_img_per_s': res['train_img_per_s'],
                    'test_accuracy': res['test_accuracy']}
  if 'keras' in s['peers'] and installed('keras'):
    keras_settings = (dict(s, batch_size=64, learning_rate=1e-3, epochs=3)
                      if FLAGS.fast else dict(s, epochs=1))
    out['keras'] = keras_recipe(data_dir, config.val_examples,
                                keras_settings)
    out['wall_ratio_vs_keras'] = wall / out['keras']['wall_seconds']
  return {'whole_run': out, 'settings': {
      **s, 'load_average_1min': os.getloadavg()[0]}}


def keras_recipe(data_dir: str, val_examples: int, s: dict[str, Any]
                 ) -> dict[str, Any]:
  """The Keras MNIST convnet recipe: load, fit with val, test."""
  import keras
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], 'GPU')

  class EpochTime(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      self.seconds = time.perf_counter() - self.t0

  t0 = time.perf_counter()
  (x, y), (x_test, y_test) = tfds.as_numpy(tfds.load(
      'mnist', split=['train', 'test'], batch_size=-1, as_supervised=True,
      data_dir=data_dir, download=False))
  x, x_test = x.astype('float32') / 255, x_test.astype('float32') / 255
  n = len(x) - val_examples
  model = keras_model('simple_cnn', rescale=False)
  model.compile(optimizer=keras.optimizers.Adam(s['learning_rate']),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=['accuracy'])
  timer = EpochTime()
  model.fit(x[:n], y[:n], batch_size=s['batch_size'], epochs=s['epochs'],
            verbose=0,
            validation_data=(x[n:], y[n:]), callbacks=[timer])
  _, test_acc = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
  wall = time.perf_counter() - t0
  return {'wall_seconds': wall, 'epochs': s['epochs'],
          'batch_size': s['batch_size'], 'epoch_seconds': timer.seconds,
          'train_img_per_s': (n // s['batch_size']) * s['batch_size']
                             / timer.seconds,
          'test_accuracy': float(test_acc)}


# Output -----------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
  if FLAGS.profile:
    rows = []
    for model_name, r in results.items():
      if model_name == 'settings':
        continue
      rows.append(f'{model_name}: ops {r["op_ms"]:.1f} ms + sync '
                  f'{r["sync_ms"]:.1f} ms per step and device (wall '
                  f'{r["wall_ms_per_step"]:.1f} ms per step)')
      rows += [f'  {o["ms"]:6.2f} ms  {o["shape"][:30]:30s} {o["source"]}'
               for o in r['top_ops']]
      covered = (r['op_ms'] + r['sync_ms']) / r['wall_ms_per_step']
      if covered < 0.9:
        rows.append(f'  (the trace covers {covered:.0%} of the step: with '
                    'several devices some Eigen ops run outside it; for '
                    'per-layer times profile one device on one core)')
      rows += _layer_rows(r)
    return '\n'.join(rows)
  if 'kernel_sweep' in results:
    return '\n'.join(f'{model:10s} {name:12s} {f["train_img_per_s"]:7.0f} '
                     f'img/s  compile {f["compile_seconds"]:.1f}s'
                     for model, by in results['kernel_sweep'].items()
                     for name, f in by.items())
  if 'whole_run' in results:
    w = results['whole_run']
    return '\n'.join(f'{k:8s} ' + '  '.join(f'{m}={v:.4g}' for m, v in
                                            w[k].items())
                     for k in ('cnn_jax', 'keras') if k in w)
  rows = [f'{"model":10s} {"framework":8s} {"train img/s":>11s} '
          f'{"eval img/s":>10s} {"compile s":>9s} {"peak RSS MB":>11s} '
          f'{"+RSS MB":>8s} {"ours/this":>9s}']
  for model_name, fig in results.items():
    if model_name == 'settings':
      continue
    for name, f in [('cnn_jax', fig)] + [(p, fig[p]) for p in ('keras', 'torch')
                                          if p in fig]:
      ratio = fig.get(f'ratio_vs_{name}', 1.0)
      rows.append(f'{model_name:10s} {name:8s} {f["train_img_per_s"]:11.0f} '
                  f'{f["eval_img_per_s"]:10.0f} {f["compile_seconds"]:9.2f} '
                  f'{f["peak_rss_mb"]:11.0f} {f["rss_growth_mb"]:8.0f} '
                  f'{ratio:9.2f}')
  return '\n'.join(rows)


def _layer_rows(r: dict[str, Any]) -> list[str]:
  """Ours vs the PyTorch peer per layer: forward / backward ms per step."""
  peer = r.get('torch_layers', {})
  def fmt(t: dict[str, float] | None) -> str:
    if not t:
      return ''
    if 'ms' in t:
      return f'{t["ms"]:13.2f}'
    return ' '.join(f'{t[d]:6.2f}' if d in t else f'{"-":>6s}'
                    for d in ('forward_ms', 'backward_ms'))

  rows = [f'  {"layer":12s} {"cnn_jax fwd / bwd ms":>20s}'
          + ('   torch fwd / bwd ms' if peer else '')]
  for group in sorted(set(r['layers']) | set(peer), key=lambda g: (
      g == 'rest', g.startswith(('batch', 'drop')), g)):
    rows.append(f'  {group:12s} {fmt(r["layers"].get(group)):>20s}   '
                f'{fmt(peer.get(group)):>18s}'.rstrip())
  rows.append(f'  {"step (wall)":12s} {r["wall_ms_per_step"]:20.2f}   '
              + (f'{r["torch_wall_ms_per_step"]:18.2f}' if peer else ''))
  return rows


def configure_xla() -> None:
  """Sets XLA_FLAGS from the flags and cnn_jax's defaults, before JAX runs."""
  from cnn_jax import runtime
  extra = FLAGS.xla_flags.split()
  if not FLAGS.single_thread:
    extra.append('--xla_cpu_multi_thread_eigen=true')
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', '')] + extra).strip()
  runtime.configure_xla(host_devices=FLAGS.host_devices or 1)


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  configure_xla()
  s = settings()
  if FLAGS.profile:
    results = profile(s)
  elif FLAGS.kernel_sweep:
    results = kernel_sweep(s)
  elif FLAGS.whole_run:
    results = whole_run(s)
  else:
    results = benchmark(s)
  print(json.dumps(results, indent=1) if FLAGS.json else table(results))


if __name__ == '__main__':
  app.run(main)
