"""The peers: each registry model built in Keras 3 and in PyTorch from one
description, the stock Flax model's own layer table
(`cnn_jax.analysis.architecture.describe`, read from what the model
computes), and the runners that time them. A new model needs no code here;
a step the table cannot name is an error, not a guess.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from typing import Any

from experiments.benchmark.common import (IMAGE_SHAPE, NUM_CLASSES,
                                          timed)


def layer_group(module: str) -> str:
  """A module name (ours or the PyTorch peer's) -> its row in ``layers``."""
  if re.fullmatch(r'conv\d+(_\d+)?|dense\d+|logits', module):
    return module
  if re.fullmatch(r'bn\w*', module):
    return 'batch norm'
  if re.fullmatch(r'(?i)dropout_?\d+', module):
    return 'dropout'
  return 'rest'


def description(model_name: str) -> Any:
  """The stock model's layer table (an `Architecture`) on MNIST's shape."""
  import jax
  from cnn_jax import models, registry
  from cnn_jax.analysis import architecture
  from cnn_jax.config import Config
  model = registry.create_model(Config(model=model_name), NUM_CLASSES,
                                training=False)
  variables = models.init_variables(model, jax.random.PRNGKey(0), IMAGE_SHAPE)
  x = jax.random.uniform(jax.random.PRNGKey(1), (1, *IMAGE_SHAPE))
  return architecture.describe(model, variables, x)


def _unbuildable(framework: str, stage: Any) -> ValueError:
  return ValueError(f'cannot build a {framework} peer of {stage.name} '
                    f'({stage.kind}, {stage.in_shape} -> {stage.out_shape})')


def _padding(stage: Any) -> str:
  padding = (stage.padding or 'VALID').upper()
  if padding not in ('VALID', 'SAME'):
    raise _unbuildable('Keras/PyTorch', stage)
  return padding.lower()


def keras_model(model_name: str, rescale: bool = True):
  """The model as a Keras 3 Sequential, layer for layer.

  With ``rescale`` it takes uint8 pixels and scales them to [0, 1] itself.
  """
  import keras
  from keras import layers
  seq: list[Any] = [keras.Input(IMAGE_SHAPE)]
  if rescale:
    seq.append(layers.Rescaling(1 / 255))
  for s in description(model_name).stages[1:]:
    if s.kind == 'convolution':
      seq.append(layers.Conv2D(s.kernel[3], s.kernel[:2], strides=s.strides,
                               padding=_padding(s), use_bias=s.bias))
    elif s.kind == 'batch norm':
      seq.append(layers.BatchNormalization(momentum=s.momentum,
                                           epsilon=s.epsilon))
    elif s.kind == 'ReLU':
      seq.append(layers.ReLU())
    elif s.kind in ('max-pool', 'average pool'):
      pool = (layers.MaxPooling2D if s.kind == 'max-pool'
              else layers.AveragePooling2D)
      seq.append(pool(s.window))
    elif s.kind == 'dropout':
      seq.append(layers.Dropout(s.rate))
    elif s.kind == 'flatten':
      seq.append(layers.Flatten())
    elif s.kind == 'dense':
      seq.append(layers.Dense(s.kernel[1], use_bias=s.bias))
    else:
      raise _unbuildable('Keras', s)
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
  """The model as a torch.nn.Sequential (NCHW), layer for layer.

  Modules are named like ours (conv1_1, bn1_1, dense1, logits, ...), so
  ``profile`` lines the two up layer by layer.
  """
  from collections import OrderedDict
  from torch import nn
  mods: list[tuple[str, Any]] = []
  for s in description(model_name).stages[1:]:
    if s.kind == 'convolution':
      kh, kw, cin, cout = s.kernel
      module = nn.Conv2d(cin, cout, (kh, kw), stride=s.strides,
                         padding=0 if _padding(s) == 'valid' else 'same',
                         bias=s.bias)
    elif s.kind == 'batch norm':
      norm = nn.BatchNorm2d if len(s.out_shape) == 3 else nn.BatchNorm1d
      # Flax keeps momentum of the old statistics, PyTorch of the new.
      module = norm(s.out_shape[-1], eps=s.epsilon, momentum=1 - s.momentum)
    elif s.kind == 'ReLU':
      module = nn.ReLU()
    elif s.kind in ('max-pool', 'average pool'):
      module = (nn.MaxPool2d if s.kind == 'max-pool' else nn.AvgPool2d)(
          s.window)
    elif s.kind == 'dropout':
      module = nn.Dropout(s.rate)
    elif s.kind == 'flatten':
      module = nn.Flatten()
    elif s.kind == 'dense':
      module = nn.Linear(*s.kernel, bias=s.bias)
    else:
      raise _unbuildable('PyTorch', s)
    mods.append((s.name, module))
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
