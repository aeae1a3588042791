"""The registry builds models from configs and swaps in the CPU kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import kernels, models, registry
from cnn_jax.config import Config, CnnJaxError
from cnn_jax.kernels import batch_norm, conv, dropout, pool


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """GPUs and TPUs multiply float32 in lower precision (TF32, bf16 passes) by
  default, differently per algorithm; compare implementations at full."""
  with jax.default_matmul_precision('highest'):
    yield


def test_kernels_are_chosen_by_setting_and_backend():
  cpu = registry.create_model(Config(model='deep_cnn'), 10, backend='cpu')
  assert (cpu.conv, cpu.norm, cpu.dropout, cpu.pool) == (
      conv.Conv, batch_norm.BatchNorm, dropout.Dropout, pool.max_pool_2x2)
  stock = models.DeepCNN()
  for model in (registry.create_model(Config(model='deep_cnn'), 10,
                                      backend='gpu'),
                registry.create_model(Config(model='deep_cnn', kernels='flax'),
                                      10, backend='cpu'),
                registry.create_model(Config(model='deep_cnn', kernels='cpu'),
                                      10, training=False, backend='cpu')):
    assert (model.conv, model.norm, model.dropout, model.pool) == (
        stock.conv, stock.norm, stock.dropout, stock.pool)
  simple = registry.create_model(Config(), 10, backend='cpu')
  assert (simple.conv, simple.pool) == (conv.Conv, pool.max_pool_2x2)


def test_config_fields_reach_the_model():
  m = registry.create_model(
      Config(model='deep_cnn', width_multiplier=0.5, dtype='bfloat16',
             model_options={'dense_features': 16, 'dropout_rate': 0.1,
                            'batch_norm': False}), 7)
  assert (m.num_classes, tuple(m.stage_features), m.dense_features,
          m.dropout_rate, m.batch_norm, m.dtype) == (
              7, (16, 32), 16, 0.1, False, jnp.bfloat16)
  s = registry.create_model(Config(width_multiplier=2.0), 10)
  assert tuple(s.features) == (64, 128, 128) and s.dense_features == 64
  assert models.count_params(models.init_variables(
      registry.create_model(Config(), 10), jax.random.PRNGKey(0),
      (28, 28, 1))['params']) == 93_322


def test_unknown_model_is_a_clear_error():
  with pytest.raises(CnnJaxError, match='unknown --model'):
    registry.create_model(Config(model='resnet9000'), 10)


@pytest.mark.parametrize('name', sorted(registry.MODELS))
def test_cpu_kernels_compute_the_stock_model(name):
  """Same params, logits, gradients and batch statistics with either set.

  Dropout off: the CPU kernel draws other masks than Flax's (its own test
  checks its semantics).
  """
  config = Config(model=name, model_options=(
      {'dropout_rate': 0.0} if 'dropout_rate' in registry.options(name)
      else {}))
  fast = registry.create_model(config.replace(kernels='cpu'), 10)
  stock = registry.create_model(config.replace(kernels='flax'), 10)
  variables = models.init_variables(stock, jax.random.PRNGKey(0), (28, 28, 1))
  fast_vars = models.init_variables(fast, jax.random.PRNGKey(0), (28, 28, 1))
  jax.tree_util.tree_map(np.testing.assert_array_equal, fast_vars, variables)
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))

  def loss(model):
    def f(params):
      logits, state = model.apply({**variables, 'params': params}, x,
                                  train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)), state
    return jax.jit(jax.value_and_grad(f, has_aux=True))(variables['params'])

  (v_fast, s_fast), g_fast = loss(fast)
  (v_stock, s_stock), g_stock = loss(stock)
  np.testing.assert_allclose(v_fast, v_stock, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((g_fast, s_fast)),
                  jax.tree_util.tree_leaves((g_stock, s_stock)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  # Evaluation: the same function.
  np.testing.assert_allclose(fast.apply(variables, x), stock.apply(variables, x),
                             rtol=1e-5, atol=1e-6)


def test_kernel_names_live_in_one_place():
  from cnn_jax import config
  assert config.KERNELS is kernels.KERNELS


def test_width_options_set_each_layer_and_the_multiplier_scales_them():
  m = registry.create_model(Config(model_options={'features': '64,64,128'}),
                            10)
  assert tuple(m.features) == (64, 64, 128)
  half = registry.create_model(Config(model_options={'features': [64, 64, 128]},
                                      width_multiplier=0.5), 10)
  assert tuple(half.features) == (32, 32, 64)
  d = registry.create_model(
      Config(model='deep_cnn', model_options={'stage_features': '8,16'}), 10)
  assert tuple(d.stage_features) == (8, 16)


def test_options_are_the_modules_plain_fields():
  assert {name: o.kind for name, o in registry.options('deep_cnn').items()} == {
      'stage_features': 'ints', 'convs_per_stage': 'int',
      'dense_features': 'int', 'dropout_rate': 'float', 'batch_norm': 'bool'}
  assert registry.options('simple_cnn')['features'].default == [32, 64, 64]
  assert {n: o.default for n, o in registry.options('mlp').items()} == {
      'hidden': [117]}
  for name in registry.MODELS:
    assert not {'num_classes', 'dtype', 'conv', 'pool', 'norm',
                'dropout'} & set(registry.options(name))


def test_options_parse_merge_and_normalize():
  raw = registry.parse_options(['features=16,32,32,dense_features=8',
                                'dense_features=64'])
  assert raw == {'features': '16,32,32', 'dense_features': '64'}
  # Typed, checked, and the value equal to the default left out.
  assert registry.normalize_options('simple_cnn', raw) == {
      'features': [16, 32, 32]}
  assert registry.normalize_options('deep_cnn', {
      'batch_norm': 'false', 'dropout_rate': '0.25'}) == {'batch_norm': False}


@pytest.mark.parametrize('model,given,match', [
    ('simple_cnn', {'dropout_rate': '0.5'},
     'simple_cnn has no dropout_rate; its options'),
    ('deep_cnn', {'dropout_rate': '1'}, r'must be in \[0, 1\)'),
    ('deep_cnn', {'batch_norm': 'maybe'}, 'must be true or false'),
    ('deep_cnn', {'convs_per_stage': '1.5'}, 'must be a whole number'),
    ('simple_cnn', {'features': '32,0'}, 'must be positive whole numbers'),
    ('simple_cnn', {'dense_features': '-3'}, 'must be positive'),
])
def test_bad_options_are_one_line_errors(model, given, match):
  with pytest.raises(CnnJaxError, match=match):
    registry.normalize_options(model, given)


@pytest.mark.parametrize('text', ['5', '=3', 'a b=1'])
def test_options_that_are_not_pairs_are_errors(text):
  with pytest.raises(CnnJaxError, match='--model_options'):
    registry.parse_options(text)


def test_legacy_keys_of_older_config_files_become_options():
  old = {'model': 'deep_cnn', 'conv_features': '16,32', 'dense_features': 0,
         'batch_norm': False, 'dropout_rate': 0.25, 'seed': 3}
  assert registry.upgrade_legacy(old) == {
      'model': 'deep_cnn', 'seed': 3,
      'model_options': {'batch_norm': False, 'stage_features': [16, 32]}}
  simple = registry.upgrade_legacy({'model': 'simple_cnn', 'conv_features': '',
                                    'dense_features': 32, 'batch_norm': True,
                                    'dropout_rate': 0.25})
  assert simple == {'model': 'simple_cnn',
                    'model_options': {'dense_features': 32}}
  assert Config.from_dict(old).model_options == {
      'batch_norm': False, 'stage_features': [16, 32]}


def test_summary_tabulates_layers_shapes_and_params():
  text = registry.summary(Config(), 10, (28, 28, 1))
  for row in ('conv1', 'conv2', 'conv3', 'dense1', 'logits',
              'float32[1,26,26,32]', 'float32[1,13,13,32]', 'float32[1,10]',
              'kernel: float32[576,64]', '93,322'):
    assert row in text, row
  assert '\x1b[' not in text  # Plain text for logs and reports.
  deep = registry.summary(Config(model='deep_cnn'), 10, (28, 28, 1))
  assert 'batch_stats' in deep and 'bn1_1' in deep and '197,802' in deep


def test_the_dense_baseline_is_registered_with_its_width_option():
  mlp = registry.create_model(Config(model='mlp', width_multiplier=2.0), 10)
  assert tuple(mlp.hidden) == (234,)
  deeper = registry.create_model(
      Config(model='mlp', model_options={'hidden': '256,128'}), 10)
  assert tuple(deeper.hidden) == (256, 128)
  assert models.count_params(models.init_variables(
      registry.create_model(Config(model='mlp'), 10), jax.random.PRNGKey(0),
      (28, 28, 1))['params']) == 93_025
