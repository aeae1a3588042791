"""Model shapes, parameter counts, train/eval behaviour and the registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.config import Config, CnnJaxError


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """GPUs and TPUs multiply float32 in lower precision (TF32, bf16 passes) by
  default, differently per algorithm; compare implementations at full."""
  with jax.default_matmul_precision('highest'):
    yield


def _intermediates(model, variables, x, train=False):
  _, state = model.apply(variables, x, train=train, capture_intermediates=True,
                         mutable=['intermediates'])
  out = {}
  for name, value in state['intermediates'].items():
    out[name] = value['__call__'][0] if isinstance(value, dict) else value[0]
  return out


def test_simple_cnn_has_exactly_93322_params_and_layer_shapes():
  model = models.create_model(Config(model='simple_cnn'), 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert set(variables) == {'params'}
  assert models.count_params(variables['params']) == 93_322
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables['params'])
  assert shapes == {
      'conv1': {'kernel': (3, 3, 1, 32), 'bias': (32,)},
      'conv2': {'kernel': (3, 3, 32, 64), 'bias': (64,)},
      'conv3': {'kernel': (3, 3, 64, 64), 'bias': (64,)},
      'dense1': {'kernel': (576, 64), 'bias': (64,)},
      'logits': {'kernel': (64, 10), 'bias': (10,)},
  }
  expected = {'conv1': (2, 26, 26, 32), 'pool1': (2, 13, 13, 32),
              'conv2': (2, 11, 11, 64), 'conv2_relu': (2, 11, 11, 64),
              'pool2': (2, 5, 5, 64), 'conv3': (2, 3, 3, 64),
              'dense1': (2, 64), 'logits': (2, 10)}
  # Collected feature maps are whole, in training too (where conv2 would
  # otherwise skip the row and column its pool drops).
  for train in (False, True):
    acts = _intermediates(model, variables, jnp.zeros((2, 28, 28, 1)), train)
    for name, shape in expected.items():
      assert acts[name].shape == shape, name


def test_simple_cnn_params_match_a_plain_flax_reference():
  """Same tree as a model written with nn.Conv: checkpoints are portable."""

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i, f in enumerate((32, 64, 64), 1):
        x = nn.relu(nn.Conv(f, (3, 3), padding='VALID', name=f'conv{i}')(x))
        if i < 3:
          x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Dense(64, name='dense1')(x.reshape(x.shape[0], -1)))
      return nn.Dense(10, name='logits')(x)

  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  ref_vars = Reference().init(jax.random.PRNGKey(0), x)
  loss = lambda m, **kw: lambda v: jnp.sum(jnp.sin(m.apply(v, x, **kw)))
  ref_grads = jax.grad(loss(Reference()))(ref_vars)
  for impl in ('xla', 'im2col', 'shifted', 'hybrid', 'auto'):
    model = models.create_model(Config(conv_impl=impl), 10)
    # In training conv2 skips the row and column its pool drops.
    for train in (False, True):
      np.testing.assert_allclose(model.apply(ref_vars, x, train=train),
                                 Reference().apply(ref_vars, x),
                                 rtol=1e-4, atol=1e-5, err_msg=impl)
      # It pools before its ReLU (they commute): same gradients too.
      grads = jax.grad(loss(model, train=train))(ref_vars)
      for a, b in zip(jax.tree_util.tree_leaves(grads),
                      jax.tree_util.tree_leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=impl)


def test_deep_cnn_batch_stats_update_only_in_train_mode():
  model = models.create_model(Config(model='deep_cnn'), 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert 'batch_stats' in variables
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
  _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.PRNGKey(2)})
  before = variables['batch_stats']['bn1_1']['mean']
  assert not np.allclose(updated['batch_stats']['bn1_1']['mean'], before)
  # Eval mode: no mutable collection is needed and nothing changes.
  _, same = model.apply(variables, x, train=False, mutable=['batch_stats'])
  np.testing.assert_array_equal(same['batch_stats']['bn1_1']['mean'], before)


def test_deep_cnn_dropout_is_off_in_eval_and_on_in_train():
  model = models.create_model(Config(model='deep_cnn', dropout_rate=0.5), 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  e1 = model.apply(variables, x, train=False)
  e2 = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(e1, e2)
  t1, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.PRNGKey(3)})
  t2, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.PRNGKey(4)})
  assert not np.allclose(t1, t2)


def test_deep_cnn_without_batch_norm_has_no_batch_stats():
  config = Config(model='deep_cnn', batch_norm=False, dropout_rate=0.0)
  model = models.create_model(config, 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert set(variables) == {'params'}
  assert model.apply(variables, jnp.ones((2, 28, 28, 1))).shape == (2, 10)


@pytest.mark.parametrize('mult,expected', [(0.5, (16, 32, 32)), (2.0, (64, 128, 128))])
def test_width_multiplier_scales_filters(mult, expected):
  model = models.create_model(Config(width_multiplier=mult), 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  got = tuple(variables['params'][f'conv{i}']['kernel'].shape[-1]
              for i in (1, 2, 3))
  assert got == expected


def test_models_follow_dataset_shape_and_classes():
  model = models.create_model(Config(model='simple_cnn'), 47)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
  assert model.apply(variables, jnp.ones((3, 32, 32, 3))).shape == (3, 47)


def test_bfloat16_compute_keeps_float32_params():
  model = models.create_model(Config(dtype='bfloat16'), 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert all(p.dtype == jnp.float32
             for p in jax.tree_util.tree_leaves(variables))
  assert model.apply(variables, jnp.ones((2, 28, 28, 1))).dtype == jnp.float32


@pytest.mark.parametrize('name,per_layer', [
    ('simple_cnn', 'im2col_t/hybrid/im2col'),
    ('deep_cnn', 'im2col_t/hybrid/shifted/xla')])
def test_per_layer_conv_impls_give_the_same_model(name, per_layer):
  model = models.create_model(Config(model=name, conv_impl=per_layer), 10)
  ref = models.create_model(Config(model=name, conv_impl='xla'), 10)
  variables = models.init_variables(ref, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1))
  np.testing.assert_allclose(model.apply(variables, x),
                             ref.apply(variables, x), rtol=1e-4, atol=1e-5)
  with pytest.raises(CnnJaxError, match='names 2 implementations; the model '
                     f'has {model.num_convs} conv layers'):
    models.create_model(Config(model=name, conv_impl='xla/xla'), 10)


def test_unknown_model_is_a_clear_error():
  with pytest.raises(CnnJaxError, match='unknown --model'):
    models.create_model(Config(model='resnet9000'), 10)


@pytest.mark.parametrize('shape', [(2, 26, 26, 3), (2, 11, 11, 4),
                                   (1, 5, 8, 2)])
def test_mask_grad_max_pool_matches_reduce_window_values_and_gradients(shape):
  # Distinct values: no ties, where the two gradients may legitimately differ.
  x = jax.random.permutation(jax.random.PRNGKey(0),
                             jnp.arange(np.prod(shape), dtype=jnp.float32))
  x = x.reshape(shape) / x.size
  pools = [lambda v, i=impl: models.max_pool_2x2(v, i)
           for impl in ('mask_grad', 'reduce_window')]
  a, b = (p(x) for p in pools)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  ga, gb = (jax.grad(lambda v, p=p: (p(v) ** 3).sum())(x) for p in pools)
  np.testing.assert_array_equal(ga, gb)


def test_mask_grad_max_pool_shares_the_gradient_of_ties():
  x = jnp.array([[1.0, 1.0], [0.0, -1.0]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda v: models.max_pool_2x2(v, 'mask_grad').sum())(x)
  np.testing.assert_array_equal(g.reshape(2, 2), [[0.5, 0.5], [0.0, 0.0]])
  x = jnp.array([[-1.0, 2.0], [2.0, 2.0]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda v: models.max_pool_2x2(v, 'mask_grad').sum())(x)
  np.testing.assert_allclose(g.reshape(2, 2), [[0.0, 1 / 3], [1 / 3, 1 / 3]])
  with pytest.raises(ValueError, match='pooling'):
    models.max_pool_2x2(x, 'nope')


@pytest.mark.parametrize('name', ['simple_cnn', 'deep_cnn'])
def test_inference_model_uses_the_same_params_and_gives_the_same_logits(name):
  model = models.create_model(Config(model=name), 10)
  fast = models.for_inference(model)
  assert fast.conv_impl == 'xla' and model.conv_impl == 'auto'
  variables = models.init_variables(model, jax.random.PRNGKey(1), (28, 28, 1))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      models.init_variables(fast, jax.random.PRNGKey(1), (28, 28, 1)))
  x = jax.random.uniform(jax.random.PRNGKey(2), (4, 28, 28, 1))
  np.testing.assert_allclose(fast.apply(variables, x, train=False),
                             model.apply(variables, x, train=False),
                             rtol=1e-4, atol=1e-4)
  pinned = models.create_model(Config(model=name, conv_impl='im2col'), 10)
  assert models.for_inference(pinned) is pinned
