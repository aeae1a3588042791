"""The plain Flax models: shapes, parameter counts, train/eval behaviour."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import models


def _init(model, shape=(28, 28, 1)):
  return models.init_variables(model, jax.random.PRNGKey(0), shape)


def _intermediates(model, variables, x, train=False, **kw):
  _, state = model.apply(variables, x, train=train, capture_intermediates=True,
                         mutable=['intermediates', 'batch_stats'], **kw)
  out = {}
  for name, value in state['intermediates'].items():
    out[name] = value['__call__'][0] if isinstance(value, dict) else value[0]
  return out


def test_simple_cnn_has_exactly_93322_params_and_the_seed_shapes():
  model = models.SimpleCNN()
  variables = _init(model)
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
  expected = {'conv1': (2, 26, 26, 32), 'conv1_relu': (2, 26, 26, 32),
              'pool1': (2, 13, 13, 32), 'conv2': (2, 11, 11, 64),
              'conv2_relu': (2, 11, 11, 64), 'pool2': (2, 5, 5, 64),
              'conv3': (2, 3, 3, 64), 'conv3_relu': (2, 3, 3, 64),
              'dense1': (2, 64), 'logits': (2, 10)}
  acts = _intermediates(model, variables, jnp.zeros((2, 28, 28, 1)))
  assert {k: v.shape for k, v in acts.items() if k in expected} == expected


def test_simple_cnn_is_the_same_function_in_train_and_eval():
  model = models.SimpleCNN()
  variables = _init(model)
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
  np.testing.assert_array_equal(model.apply(variables, x, train=True),
                                model.apply(variables, x, train=False))


def test_sown_maps_are_the_relu_and_pool_outputs():
  model = models.SimpleCNN()
  variables = _init(model)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1))
  acts = _intermediates(model, variables, x)
  np.testing.assert_array_equal(acts['conv1_relu'], jax.nn.relu(acts['conv1']))
  np.testing.assert_array_equal(acts['pool1'],
                                models.max_pool_2x2(acts['conv1_relu']))


def test_deep_cnn_layers_and_batch_stats_update_only_in_train_mode():
  model = models.DeepCNN()
  variables = _init(model)
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {
      'conv1_1', 'bn1_1', 'conv1_2', 'bn1_2', 'conv2_1', 'bn2_1', 'conv2_2',
      'bn2_2', 'dense1', 'bn_dense1', 'logits'}
  assert 'bias' not in variables['params']['conv1_1']  # Batch norm's bias.
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
  _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.PRNGKey(2)})
  before = variables['batch_stats']['bn1_1']['mean']
  assert not np.allclose(updated['batch_stats']['bn1_1']['mean'], before)
  _, same = model.apply(variables, x, train=False, mutable=['batch_stats'])
  np.testing.assert_array_equal(same['batch_stats']['bn1_1']['mean'], before)
  acts = _intermediates(model, variables, x)
  assert acts['pool1'].shape == (8, 12, 12, 32)
  assert acts['pool2'].shape == (8, 4, 4, 64)
  # The abstract tree (what a checkpoint restores into) matches, untraced.
  abstract = models.abstract_variables(model, (28, 28, 1))
  assert jax.tree_util.tree_structure(abstract) == (
      jax.tree_util.tree_structure(variables))
  for a, v in zip(jax.tree_util.tree_leaves(abstract),
                  jax.tree_util.tree_leaves(variables)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (v.shape, v.dtype)


def test_deep_cnn_dropout_is_off_in_eval_and_on_in_train():
  model = models.DeepCNN(dropout_rate=0.5)
  variables = _init(model)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  np.testing.assert_array_equal(model.apply(variables, x),
                                model.apply(variables, x))
  t1, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.PRNGKey(3)})
  t2, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.PRNGKey(4)})
  assert not np.allclose(t1, t2)


def test_deep_cnn_without_batch_norm_has_biases_and_no_batch_stats():
  model = models.DeepCNN(batch_norm=False, dropout_rate=0.0)
  variables = _init(model)
  assert set(variables) == {'params'}
  assert 'bias' in variables['params']['conv1_1']
  x = jnp.ones((2, 28, 28, 1))
  np.testing.assert_array_equal(model.apply(variables, x, train=True),
                                model.apply(variables, x))


def test_forward_mode_autodiff_through_train_mode_deep_cnn():
  """Stock Flax layers: jvp and hessian work (custom VJPs would raise)."""
  model = models.DeepCNN(stage_features=(4, 8), dense_features=8)
  variables = _init(model)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  rngs = {'dropout': jax.random.PRNGKey(2)}

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'], rngs=rngs)
    return jnp.sum(logits ** 2)

  tangent = jax.tree_util.tree_map(jnp.ones_like, variables['params'])
  # One jitted program for both (their forward passes are shared): one
  # compile instead of two, or hundreds of eager ops.
  (value, directional), grad = jax.jit(
      lambda p, t: (jax.jvp(loss, (p,), (t,)), jax.grad(loss)(p)))(
          variables['params'], tangent)
  flat = jax.flatten_util.ravel_pytree(grad)[0]
  flat_t = jax.flatten_util.ravel_pytree(tangent)[0]
  np.testing.assert_allclose(directional, flat @ flat_t, rtol=1e-3)
  assert np.isfinite(value)
  last = variables['params']['logits']['bias']
  hessian = jax.jit(jax.hessian(lambda b: loss(
      {**variables['params'], 'logits': {**variables['params']['logits'],
                                         'bias': b}})))(last)
  # d2/db2 sum((z + b)^2) over a batch of 4: 2 * 4 * identity.
  np.testing.assert_allclose(hessian, 8 * np.eye(10), atol=1e-4)


@pytest.mark.parametrize('model,shape,classes', [
    (models.SimpleCNN, (32, 32, 3), 47), (models.DeepCNN, (32, 32, 3), 5),
    (models.MLP, (32, 32, 3), 7)])
def test_models_follow_image_shape_and_classes(model, shape, classes):
  m = model(num_classes=classes)
  variables = _init(m, shape)
  assert m.apply(variables, jnp.ones((3, *shape))).shape == (3, classes)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  for model in (models.SimpleCNN(dtype=jnp.bfloat16),
                models.DeepCNN(dtype=jnp.bfloat16)):
    variables = _init(model)
    assert all(p.dtype == jnp.float32
               for p in jax.tree_util.tree_leaves(variables))
    assert model.apply(variables, jnp.ones((2, 28, 28, 1))).dtype == jnp.float32


def test_mlp_is_a_dense_baseline_the_size_of_simple_cnn():
  model = models.MLP()
  variables = _init(model)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables['params'])
  assert shapes == {'dense1': {'kernel': (784, 117), 'bias': (117,)},
                    'logits': {'kernel': (117, 10), 'bias': (10,)}}
  assert models.count_params(variables['params']) == 93_025  # SimpleCNN: 93,322.
  two = _init(models.MLP(hidden=(64, 32)))
  assert models.count_params(two['params']) == 784 * 64 + 64 + 64 * 32 + 32 + 330


def test_mlp_computes_the_same_on_permuted_pixels_with_permuted_weights():
  """Why a dense net does not care where pixels are: permuting the input
  and the first layer's rows alike gives the same function."""
  model = models.MLP()
  variables = _init(model)
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 28, 28, 1))
  perm = np.random.default_rng(0).permutation(784)
  permuted_x = x.reshape(4, -1)[:, perm].reshape(x.shape)
  params = jax.tree_util.tree_map(lambda a: a, variables['params'])
  params['dense1']['kernel'] = params['dense1']['kernel'][perm]
  np.testing.assert_allclose(model.apply({'params': params}, permuted_x),
                             model.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_count_params():
  assert models.count_params({'a': jnp.zeros((2, 3)), 'b': [jnp.zeros(4)]}) == 10
