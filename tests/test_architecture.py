"""The layer table: parameter arithmetic and receptive fields of real models,
checked against the parameter count and against input gradients."""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.analysis import architecture, intermediates


def _describe(model: nn.Module, shape=(28, 28, 1), seed: int = 0):
  variables = models.init_variables(model, jax.random.PRNGKey(seed), shape)
  x = jax.random.uniform(jax.random.PRNGKey(seed + 1), (1, *shape))
  return variables, architecture.describe(model, variables, x)


def _support(model: nn.Module, variables, layer: str, unit: tuple[int, int],
             shape=(28, 28, 1), n: int = 8) -> np.ndarray:
  """Input pixels with a nonzero gradient of one unit (all its channels),
  over ``n`` random images: the part of the input the unit depends on."""
  def value(x):
    found = dict(intermediates._capture_raw(model, variables, x))
    return found[layer][:, unit[0], unit[1], :].sum()
  x = jax.random.normal(jax.random.PRNGKey(7), (n, *shape))
  grads = np.asarray(jax.jit(jax.grad(value))(x))
  return (np.abs(grads) > 0).any(axis=(0, 3))


def _mask(field: architecture.Field, unit, hw) -> np.ndarray:
  out = np.zeros(hw, bool)
  out[field.patch(*unit, hw)] = True
  return out


@pytest.fixture(scope='module')
def simple():
  """(variables, layer table) of an untrained SimpleCNN."""
  return _describe(models.SimpleCNN())


def test_simple_cnn_table_adds_up_with_its_arithmetic(simple):
  _, arch = simple
  assert [(s.name, s.kind) for s in arch.stages] == [
      ('input', 'input'), ('conv1', 'convolution'), ('conv1_relu', 'ReLU'),
      ('pool1', 'max-pool'), ('conv2', 'convolution'), ('conv2_relu', 'ReLU'),
      ('pool2', 'max-pool'), ('conv3', 'convolution'), ('conv3_relu', 'ReLU'),
      ('flatten', 'flatten'), ('dense1', 'dense'), ('dense1_relu', 'ReLU'),
      ('logits', 'dense')]
  assert arch.num_params == 93_322
  assert sum(s.params for s in arch.stages) == 93_322
  conv1 = arch.stage('conv1')
  assert conv1.arithmetic == '32 filters × (3×3×1 weights + 1 bias) = 320'
  assert (conv1.in_shape, conv1.out_shape) == ((28, 28, 1), (26, 26, 32))
  for s in arch.stages:
    if s.kind in ('convolution', 'dense'):
      # Every factor of the sentence multiplies out to the row's count.
      n = [int(v.replace(',', '')) for v in re.findall(r'[\d,]+', s.arithmetic)]
      assert n[-1] == s.params
      assert (n[0] * (math.prod(n[1:-2]) + 1) if 'bias)' in s.arithmetic
              else math.prod(n[:-1])) == s.params, s.arithmetic
  flat = arch.stage('flatten')
  assert (flat.in_shape, flat.out_shape) == ((3, 3, 64), (576,))
  assert arch.stage('dense1').in_shape == (576,)
  assert [arch.stage(n).window for n in ('pool1', 'pool2')] == [2, 2]


def test_simple_cnn_receptive_fields_match_input_gradients(simple):
  variables, arch = simple
  fields = {s.name: s.field_text for s in arch.stages}
  assert [fields[n] for n in ('conv1', 'pool1', 'conv2', 'pool2', 'conv3')] == [
      '3×3', '4×4', '8×8', '10×10', '18×18']
  assert fields['dense1'] == 'whole image'
  model = models.SimpleCNN()
  for layer, unit in (('conv1', (5, 9)), ('conv2', (3, 4)), ('conv3', (1, 2)),
                      ('conv3', (0, 0))):
    field = arch.stage(layer).field
    support = _support(model, variables, layer, unit)
    expected = _mask(field, unit, (28, 28))
    assert not (support & ~expected).any(), layer
    # The gradient reaches the field's whole extent (its bounding box).
    rows, cols = np.nonzero(support)
    want_rows, want_cols = field.patch(*unit, (28, 28))
    assert (rows.min(), rows.max() + 1) == (want_rows.start, want_rows.stop)
    assert (cols.min(), cols.max() + 1) == (want_cols.start, want_cols.stop)


def test_deep_cnn_table_has_batch_norm_dropout_and_fields():
  _, arch = _describe(models.DeepCNN())
  assert arch.num_params == 197_802 == sum(s.params for s in arch.stages)
  fields = {s.name: s.field_text for s in arch.stages}
  assert [fields[n] for n in ('conv1_1', 'conv1_2', 'pool1', 'conv2_1',
                              'conv2_2', 'pool2')] == [
      '3×3', '5×5', '6×6', '10×10', '14×14', '16×16']
  bn = arch.stage('bn1_1')
  assert bn.arithmetic == '32 channels × (1 scale + 1 offset) = 64'
  assert bn.statistics == 64
  assert arch.stage('conv1_1').arithmetic == (
      '32 filters × 3×3×1 weights (no bias) = 288')
  drops = [s for s in arch.stages if s.kind == 'dropout']
  assert [s.rate for s in drops] == [0.25, 0.25, 0.25]
  assert arch.output_of(arch.stage('conv1_2')).name == 'conv1_2_relu'
  assert arch.next_pool(arch.stage('conv1_2_relu')).name == 'pool1'
  assert arch.next_pool(arch.stage('conv1_1_relu')) is None


class _StridedSame(nn.Module):
  """SAME padding and a strided conv: fields start before the image."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), padding='SAME', name='a')(x))
    self.sow('intermediates', 'a_relu', x)
    x = nn.Conv(4, (5, 5), strides=(2, 2), padding='SAME', name='b')(x)
    return x.reshape((x.shape[0], -1))


def test_padding_and_strides_follow_the_gradient():
  model = _StridedSame()
  variables, arch = _describe(model, shape=(12, 12, 1))
  b = arch.stage('b')
  assert b.out_shape == (6, 6, 4) and b.field.size == (7, 7)
  assert b.field.jump == (2, 2) and b.field.start == (-2, -2)
  for unit in ((0, 0), (2, 3), (5, 5)):
    support = _support(model, variables, 'b', unit, shape=(12, 12, 1))
    expected = _mask(b.field, unit, (12, 12))
    np.testing.assert_array_equal(support, expected)


@pytest.mark.parametrize('padding, expected', [
    ('VALID', (0, 0)), ('SAME', (1, 1)), (2, (2, 2)),
    (((1, 0), (0, 1)), (1, 0))])
def test_padding_offsets(padding, expected):
  assert architecture._padding_lo(padding, (8, 8), (8, 8), (1, 1),
                                  (3, 3)) == expected


def test_shape_text_and_field_clipping():
  assert architecture.shape_text((26, 26, 32)) == '26×26×32'
  field = architecture.Field((7, 7), (2, 2), (-3, -3))
  assert field.patch(0, 0, (12, 12)) == (slice(0, 4), slice(0, 4))
  assert field.patch(5, 5, (12, 12)) == (slice(7, 12), slice(7, 12))


class _Odd(nn.Module):
  """A conv, an unsown tanh and reshape, a dense layer, a sown square."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = jax.numpy.tanh(nn.Conv(4, (3, 3), padding='SAME', name='conv')(x))
    x = nn.Dense(5, name='hidden')(x.reshape((x.shape[0], -1)))
    x = x * x
    self.sow('intermediates', 'squared', x)
    return nn.Dense(3, name='out')(x)


def test_steps_it_cannot_name_are_listed_plainly_not_guessed():
  _, arch = _describe(_Odd(), shape=(6, 6, 1))
  assert [(s.name, s.kind) for s in arch.stages] == [
      ('input', 'input'), ('conv', 'convolution'),
      ('after conv', 'unrecognised'), ('hidden', 'dense'),
      ('squared', 'unrecognised'), ('out', 'dense')]
  for name, shapes in (('after conv', ((6, 6, 4), (144,))),
                       ('squared', ((5,), (5,)))):
    odd = arch.stage(name)
    assert odd.field is None and 'not a layer it can name' in odd.note
    assert (odd.in_shape, odd.out_shape) == shapes
  assert sum(s.params for s in arch.stages) == arch.num_params == (
      4 * 9 + 4 + 144 * 5 + 5 + 5 * 3 + 3)


def test_a_dense_network_reads_as_flatten_then_dense_layers():
  _, arch = _describe(models.MLP())
  assert [(s.name, s.kind, s.out_shape) for s in arch.stages] == [
      ('input', 'input', (28, 28, 1)), ('flatten', 'flatten', (784,)),
      ('dense1', 'dense', (117,)), ('dense1_relu', 'ReLU', (117,)),
      ('logits', 'dense', (10,))]
  assert arch.num_params == 93_025 and not arch.convs()
