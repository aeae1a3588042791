"""The model's architecture as numbers a learner can check.

`describe` runs the real model once in eval mode on one image, with Flax's
`intercept_methods` recording each layer's type, settings and the values
going in and out, and `capture_intermediates` giving every stage in call
order (including what the models `sow`: activations, pooling). It returns
one row per stage: shapes, parameters with their arithmetic (``32 filters ×
(3×3×1 weights + 1 bias) = 320``) and the receptive field on the input
image.

The structure is read from what the model computes, never from names:
stages without a module (activations, pooling, reshapes written as
functions, sown or not) are recognised from their values: a ReLU is a step
equal to ``max(previous, 0)``, a max-pool one equal to the previous stage's
maxima over non-overlapping ``s×s`` blocks, a flatten the same numbers laid
out as a vector. A step between two recorded stages that is none of these
(or a layer type the table does not know) is listed as ``unrecognised``,
with its shapes and no receptive field, rather than guessed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np

from cnn_jax.analysis import intermediates

POINTWISE = ('batch norm', 'ReLU', 'dropout')
UNRECOGNISED = 'unrecognised'


@dataclasses.dataclass(frozen=True)
class Field:
  """Where the units of a spatial stage look in the input image.

  Per axis (rows, columns): the side of the receptive field, the input
  pixels between neighbouring units, and the input coordinate where unit
  0's field starts (negative where padding added pixels outside).
  """

  size: tuple[int, int]
  jump: tuple[int, int]
  start: tuple[int, int]

  def patch(self, row: int, col: int, image_hw: Sequence[int]
            ) -> tuple[slice, slice]:
    """The input pixels unit ``(row, col)`` sees, clipped to the image."""
    out = []
    for pos, size, jump, start, limit in zip((row, col), self.size, self.jump,
                                             self.start, image_hw):
      lo = start + pos * jump
      out.append(slice(max(lo, 0), min(lo + size, limit)))
    return out[0], out[1]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of the layer table (shapes are per example)."""

  name: str
  kind: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  params: int = 0
  arithmetic: str = ''
  field: Field | None = None
  kernel: tuple[int, ...] | None = None  # Conv HWIO or dense (in, out).
  window: int | None = None  # Pooling window (= its stride).
  rate: float | None = None  # Dropout rate.
  statistics: int = 0  # Variables that are not trained (running stats).
  bias: bool = False  # Convolution or dense layer with a bias.
  padding: str = ''  # Convolution: VALID, SAME or explicit pads.
  strides: tuple[int, int] = (1, 1)  # Convolution.
  epsilon: float | None = None  # Batch norm.
  momentum: float | None = None  # Batch norm: of its running statistics.

  @property
  def note(self) -> str:
    """A short remark on what the stage does, from its settings."""
    if self.kind == 'ReLU':
      return 'max(x, 0), element by element'
    if self.window:
      return f'{self.window}×{self.window} window, stride {self.window}'
    if self.kind == 'dropout' and self.rate is not None:
      return f'rate {self.rate:g}, in training only'
    if self.statistics:
      return f'+ {self.statistics:,} running statistics (not trained)'
    if self.kind == 'flatten':
      return 'the maps laid out as one vector'
    if self.kind == UNRECOGNISED:
      return ('a step the table does not know: not a layer it can name, a '
              'ReLU, pooling or flatten; its shapes only')
    return ''

  @property
  def field_text(self) -> str:
    """``18×18``; ``whole image`` once flattened; ``—`` when unknown."""
    if len(self.out_shape) == 1 and self.kind != 'input':
      return 'whole image'
    if self.field is None:
      return '—'
    return '×'.join(str(s) for s in self.field.size)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Every stage of a model on one image shape, and its parameter count."""

  image_shape: tuple[int, ...]
  stages: tuple[Stage, ...]
  num_params: int

  def stage(self, name: str) -> Stage:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(name)

  def convs(self) -> list[Stage]:
    return [s for s in self.stages if s.kind == 'convolution']

  def output_of(self, conv: Stage) -> Stage:
    """The last stage of ``conv``'s pointwise run (its batch norm and
    activation): the feature maps the next layer receives."""
    i = self.stages.index(conv)
    out = conv
    for s in self.stages[i + 1:]:
      if s.kind not in POINTWISE or s.out_shape != conv.out_shape:
        break
      out = s
    return out

  def next_pool(self, stage: Stage) -> Stage | None:
    """The pooling stage right after ``stage``'s pointwise run, if any."""
    i = self.stages.index(stage)
    for s in self.stages[i + 1:]:
      if s.kind in ('max-pool', 'average pool'):
        return s
      if s.kind not in POINTWISE:
        return None
    return None


def shape_text(shape: Sequence[int]) -> str:
  """``(26, 26, 32)`` -> ``26×26×32``."""
  return '×'.join(str(int(d)) for d in shape)


def _settings(module: nn.Module) -> dict[str, Any]:
  """What the table needs of a layer: its kind and spatial settings."""
  kinds = ((nn.Conv, 'convolution'), (nn.Dense, 'dense'),
           (nn.BatchNorm, 'batch norm'), (nn.Dropout, 'dropout'))
  kind = next((k for cls, k in kinds if isinstance(module, cls)),
              type(module).__name__)
  out = {'kind': kind}
  for attr in ('kernel_size', 'strides', 'padding', 'kernel_dilation',
               'input_dilation', 'rate', 'epsilon', 'momentum', 'use_bias'):
    if hasattr(module, attr):
      out[attr] = getattr(module, attr)
  return out


def _pair(value: Any, default: int = 1) -> tuple[int, int] | None:
  if value is None:
    return (default, default)
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) == 2 and all(isinstance(v, int) for v in value):
    return value
  return None


def _padding_lo(padding: Any, in_hw: Sequence[int], out_hw: Sequence[int],
                strides: Sequence[int], extent: Sequence[int]
                ) -> tuple[int, int] | None:
  """Padding added before the first row/column, or None if not plain."""
  if isinstance(padding, str):
    if padding.upper() == 'VALID':
      return (0, 0)
    if padding.upper() == 'SAME':
      return tuple(max((o - 1) * s + k - i, 0) // 2 for i, o, s, k in zip(
          in_hw, out_hw, strides, extent))
    return None
  if isinstance(padding, int):
    return (padding, padding)
  lo = []
  for p in padding:
    lo.append(p if isinstance(p, int) else p[0])
  return tuple(lo) if len(lo) == 2 else None


def _conv_field(field: Field | None, settings: dict[str, Any],
                in_shape: Sequence[int], out_shape: Sequence[int]
                ) -> Field | None:
  kernel = _pair(settings.get('kernel_size'))
  strides = _pair(settings.get('strides'))
  dilation = _pair(settings.get('kernel_dilation'))
  if (field is None or None in (kernel, strides, dilation)
      or _pair(settings.get('input_dilation')) != (1, 1)):
    return None
  extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  pad = _padding_lo(settings.get('padding', 'SAME'), in_shape[:2],
                    out_shape[:2], strides, extent)
  if pad is None:
    return None
  return Field(
      size=tuple(r + (e - 1) * j for r, e, j in zip(field.size, extent,
                                                   field.jump)),
      jump=tuple(j * s for j, s in zip(field.jump, strides)),
      start=tuple(st - p * j for st, p, j in zip(field.start, pad,
                                                 field.jump)))


def _pooling(before: np.ndarray, after: np.ndarray) -> tuple[str, int] | None:
  """('max-pool' | 'average pool', window) if ``after`` is ``before``
  pooled over non-overlapping square windows; else None."""
  if before.ndim != 4 or after.ndim != 4 or before.shape[3] != after.shape[3]:
    return None
  n, big_h, big_w, c = before.shape
  _, h, w, _ = after.shape
  s = big_h // h if h else 0
  if s < 2 or big_w // w != s:
    return None
  blocks = before[:, :h * s, :w * s].reshape(n, h, s, w, s, c)
  if np.allclose(blocks.max(axis=(2, 4)), after, rtol=0, atol=1e-6):
    return 'max-pool', s
  if np.allclose(blocks.mean(axis=(2, 4)), after, rtol=1e-5, atol=1e-5):
    return 'average pool', s
  return None


def _arithmetic(kind: str, params: Any, spatial: bool) -> tuple[int, str]:
  """A layer's parameter count and how it comes about."""
  flat = {'/'.join(k): np.shape(v)
          for k, v in traverse_util.flatten_dict(params or {}).items()}
  n = sum(math.prod(s) for s in flat.values())
  keys = set(flat)
  kernel = flat.get('kernel', ())
  bias = 'bias' in keys
  if not n:
    return 0, ''
  if keys <= {'kernel', 'bias'} and len(kernel) == 4:
    kh, kw, cin, cout = kernel
    if bias:
      return n, (f'{cout} filters × ({kh}×{kw}×{cin} weights + 1 bias) '
                 f'= {n:,}')
    return n, f'{cout} filters × {kh}×{kw}×{cin} weights (no bias) = {n:,}'
  if keys <= {'kernel', 'bias'} and len(kernel) == 2:
    nin, nout = kernel
    if bias:
      return n, f'{nout} units × ({nin} inputs + 1 bias) = {n:,}'
    return n, f'{nout} units × {nin} inputs (no bias) = {n:,}'
  if kind == 'batch norm' and keys == {'scale', 'bias'}:
    c = flat['scale'][-1]
    unit = 'channels' if spatial else 'features'
    return n, f'{c} {unit} × (1 scale + 1 offset) = {n:,}'
  terms = ' + '.join(f'{math.prod(s):,} ({k})' for k, s in flat.items())
  return n, f'{terms} = {n:,}'


def _count(tree: Any) -> int:
  return sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(tree))


def _step(name: str, before: np.ndarray, after: np.ndarray,
          in_shape: tuple[int, ...], field: Field | None, hidden: bool
          ) -> tuple[Stage | None, Field | None]:
  """The stage that turns ``before`` into ``after`` (batch of one),
  recognised from the values; None if they are the same. A ``hidden`` step
  (no module, not sown) is named after the stage ``name`` it follows."""
  out_shape = tuple(after.shape[1:])
  names = {'ReLU': f'{name}_relu', 'pool': f'{name}_pool',
           UNRECOGNISED: f'after {name}'} if hidden else {}
  if before.shape == after.shape and np.array_equal(before, after):
    return None, field
  if (before.shape == after.shape and before.min() < 0
      and np.array_equal(after, np.maximum(before, 0))):
    return Stage(names.get('ReLU', name), 'ReLU', in_shape, out_shape,
                 field=field), field
  if (after.ndim == 2 and before.ndim > 2 and before.size == after.size
      and np.array_equal(before.reshape(after.shape), after)):
    return Stage('flatten', 'flatten', in_shape, out_shape), None
  pooled = _pooling(before, after)
  if pooled:
    kind, s = pooled
    if field is not None:
      field = Field(tuple(r + (s - 1) * j for r, j in zip(field.size,
                                                          field.jump)),
                    tuple(j * s for j in field.jump), field.start)
    return Stage(names.get('pool', name), kind, in_shape, out_shape,
                 field=field, window=s), field
  return Stage(names.get(UNRECOGNISED, name), UNRECOGNISED, in_shape,
               out_shape), None


def describe(model: nn.Module, variables: Any, x: jax.Array) -> Architecture:
  """The layer table of ``model`` on images like ``x`` (``[1, H, W, C]``,
  normalized). Use a real image: steps are recognised by their values."""
  calls: list[tuple[str, dict[str, Any], np.ndarray]] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.scope.path if context.module.scope else ()
    if context.method_name == '__call__' and len(path) == 1 and args:
      calls.append((path[0], _settings(context.module),
                    np.asarray(args[0], np.float32)))
    return next_fun(*args, **kwargs)

  # Eagerly, on one image: the interceptor sees every layer's input values.
  with nn.intercept_methods(record):
    logits, state = model.apply(variables, x, train=False,
                                capture_intermediates=True,
                                mutable=['intermediates'])
  captured = [(n, np.asarray(v, np.float32))
              for n, v in intermediates.named(state['intermediates'])]
  params = variables.get('params', {})
  stats = variables.get('batch_stats', {})
  by_module: dict[str, list[tuple[dict[str, Any], np.ndarray]]] = {}
  for name, settings, value in calls:
    by_module.setdefault(name, []).append((settings, value))

  image_shape = tuple(int(d) for d in x.shape[1:])
  field = Field((1, 1), (1, 1), (0, 0))
  stages = [Stage('input', 'input', (), image_shape, field=field)]
  prev, prev_name = np.asarray(x, np.float32), 'input'
  seen_params: set[str] = set()

  def bridge(target: np.ndarray) -> None:
    """Whatever the model computed between the last stage and ``target``."""
    nonlocal field
    stage, field = _step(prev_name, prev, target, stages[-1].out_shape, field,
                         hidden=True)
    if stage is not None:
      stages.append(stage)

  for full_name, value in captured:
    name = full_name.split('#')[0]
    if '/' in name or name == 'output':
      continue  # Nested modules are counted in their parent's row.
    out_shape = tuple(value.shape[1:])
    if by_module.get(name):
      settings, given = by_module[name].pop(0)
      bridge(given)
      in_shape = tuple(given.shape[1:])
      kind = settings['kind']
      n, arithmetic = (0, '') if name in seen_params else _arithmetic(
          kind, params.get(name), len(out_shape) == 3)
      seen_params.add(name)
      own = params.get(name, {})
      kernel = own.get('kernel')
      kernel_shape = tuple(np.shape(kernel)) if kernel is not None else None
      if kind != 'convolution' and kernel_shape and len(kernel_shape) == 4:
        kind = 'convolution'
        settings.setdefault('kernel_size', kernel_shape[:2])
      if kind == 'convolution':
        field = _conv_field(field, settings, in_shape, out_shape)
      elif kind not in POINTWISE:
        field = None
      known = kind in ('convolution', 'dense') + POINTWISE
      padding = settings.get('padding', '')
      stages.append(Stage(
          name, kind if known else UNRECOGNISED, in_shape, out_shape, n,
          arithmetic, field if len(out_shape) == 3 else None, kernel_shape,
          rate=settings.get('rate'), statistics=_count(stats.get(name)),
          bias='bias' in own and kind in ('convolution', 'dense'),
          padding=padding if isinstance(padding, str) else str(padding),
          strides=_pair(settings.get('strides')) or (1, 1),
          epsilon=settings.get('epsilon') if kind == 'batch norm' else None,
          momentum=settings.get('momentum') if kind == 'batch norm'
          else None))
    else:
      stage, field = _step(name, prev, value, stages[-1].out_shape, field,
                           hidden=False)
      if stage is not None:  # None: the same values as the last stage.
        stages.append(stage)
    prev, prev_name = value, stages[-1].name
  bridge(np.asarray(logits, np.float32))
  total = _count(params)
  listed = sum(s.params for s in stages)
  if total != listed:
    stages.append(Stage('other parameters', 'parameters', (), (),
                        total - listed, f'{total - listed:,} not in a layer'))
  return Architecture(image_shape, tuple(stages), total)
