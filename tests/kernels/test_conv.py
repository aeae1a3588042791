"""`kernels.conv.Conv` computes what `flax.linen.Conv` does, with its params."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.kernels import conv


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """GPUs and TPUs multiply float32 in lower precision (TF32, bf16 passes) by
  default, differently per algorithm; compare implementations at full."""
  with jax.default_matmul_precision('highest'):
    yield

# (input shape NHWC, features, kernel size): 1, 3 and 32 input channels,
# square and non-square kernels (even sizes make SAME padding asymmetric).
CASES = [((2, 9, 9, 1), 4, (3, 3)),
         ((2, 8, 7, 3), 5, (2, 3)),
         ((1, 7, 7, 32), 8, (3, 3))]


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)


@pytest.mark.parametrize('use_bias', [True, False])
@pytest.mark.parametrize('impl', conv.IMPLS)
def test_param_tree_and_init_match_nn_conv(impl, use_bias):
  key = jax.random.PRNGKey(3)
  x = jnp.zeros((1, 8, 8, 3))
  ours = conv.Conv(6, (3, 3), padding='VALID', impl=impl, use_bias=use_bias)
  ref = nn.Conv(6, (3, 3), padding='VALID', use_bias=use_bias)
  p_ours, p_ref = ours.init(key, x), ref.init(key, x)
  assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(
      p_ref)
  assert _shapes(p_ours) == _shapes(p_ref)
  # Same initializers and names: a checkpoint from one loads into the other.
  jax.tree_util.tree_map(np.testing.assert_array_equal, p_ours, p_ref)


def _outputs_and_grads(module, params, x, cotangent):
  loss = lambda p, x: jnp.sum(module.apply(p, x) * cotangent)
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


@functools.cache
def _reference(case: int, padding: str):
  """Params, input, cotangent and nn.Conv's outputs and gradients."""
  shape, features, kernel_size = CASES[case]
  kx, kp, kb, kg = jax.random.split(jax.random.PRNGKey(case), 4)
  x = jax.random.normal(kx, shape)
  ref = nn.Conv(features, kernel_size, padding=padding)
  params = ref.init(kp, x)
  # A non-zero bias, so the bias path is checked too.
  params['params']['bias'] = jax.random.normal(kb, (features,))
  cotangent = jax.random.normal(kg, ref.apply(params, x).shape)
  return params, x, cotangent, _outputs_and_grads(ref, params, x, cotangent)


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('impl', conv.IMPLS)
@pytest.mark.parametrize('case', range(len(CASES)))
def test_outputs_and_gradients_match_nn_conv(impl, padding, case):
  params, x, cotangent, (y_ref, g_ref) = _reference(case, padding)
  _, features, kernel_size = CASES[case]
  ours = conv.Conv(features, kernel_size, padding=padding, impl=impl)
  y_ours, g_ours = _outputs_and_grads(ours, params, x, cotangent)
  assert y_ours.shape == y_ref.shape
  np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
  # Gradients wrt the kernel, the bias and the input.
  for a, b in zip(jax.tree_util.tree_leaves(g_ours),
                  jax.tree_util.tree_leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', ['im2col', 'im2col_t', 'hybrid'])
def test_bfloat16_compute_keeps_float32_params(impl):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
  ours = conv.Conv(4, padding='SAME', impl=impl, dtype=jnp.bfloat16)
  ref = nn.Conv(4, (3, 3), padding='SAME', dtype=jnp.bfloat16)
  params = ref.init(jax.random.PRNGKey(2), x)
  assert _shapes(ours.init(jax.random.PRNGKey(2), x)) == _shapes(params)
  y_ours, y_ref = ours.apply(params, x), ref.apply(params, x)
  assert y_ours.dtype == y_ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(y_ours.astype(np.float32),
                             y_ref.astype(np.float32), rtol=5e-2, atol=5e-2)


def test_auto_picks_per_layer_shape():
  # Transposed patches for few input channels (a first layer), the hybrid
  # for large outputs (lower threshold without a bias, i.e. feeding batch
  # norm), im2col for the rest.
  for impl in ('im2col', 'im2col_t', 'hybrid'):
    assert conv.resolve_impl(impl, 1, 576) == impl
  assert conv.resolve_impl('auto', 1, 676) == 'im2col_t'
  assert conv.resolve_impl('auto', 32, 576) == 'hybrid'
  assert conv.resolve_impl('auto', 32, 121) == 'im2col'
  assert conv.resolve_impl('auto', 32, 100, use_bias=False) == 'hybrid'
  assert conv.resolve_impl('auto', 64, 64, use_bias=False) == 'hybrid'
  assert conv.resolve_impl('auto', 64, 49, use_bias=False) == 'im2col'
  assert conv.resolve_impl('auto', 64, 64) == 'im2col'
  with pytest.raises(ValueError, match='unknown conv implementation'):
    conv.resolve_impl('winograd', 1, 1)


def test_defaults_are_nn_convs():
  """Called as the models call nn.Conv, it builds the same layer."""
  ours, ref = conv.Conv(4, (3, 3)), nn.Conv(4, (3, 3))
  assert ours.padding == ref.padding and ours.use_bias == ref.use_bias
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 2))
  params = ref.init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x),
                             rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_padding():
  x = jnp.zeros((1, 5, 5, 1))
  with pytest.raises(ValueError, match='padding'):
    conv.conv2d(x, jnp.zeros((3, 3, 1, 2)), padding='CIRCULAR', impl='im2col')


@pytest.mark.parametrize('impl', ['hybrid', 'im2col'])
def test_gradients_inside_a_scan_match_nn_conv(impl):
  """The Trainer runs its steps in `lax.scan`, where XLA:CPU compiles some
  convolutions differently; the custom VJP must give the same there."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 12, 11, 16))
  ours = conv.Conv(8, padding='VALID', impl=impl, use_bias=False)
  ref = nn.Conv(8, (3, 3), padding='VALID', use_bias=False)
  params = ref.init(jax.random.PRNGKey(1), x[0])

  def summed_grads(module):
    def body(acc, xi):
      g = jax.grad(lambda p, xi: jnp.sum(jnp.tanh(module.apply(p, xi))),
                   argnums=(0, 1))(params, xi)
      return jax.tree_util.tree_map(jnp.add, acc, g), None
    zeros = jax.tree_util.tree_map(jnp.zeros_like, (params, x[0]))
    return jax.jit(lambda x: jax.lax.scan(body, zeros, x)[0])(x)

  for a, b in zip(jax.tree_util.tree_leaves(summed_grads(ours)),
                  jax.tree_util.tree_leaves(summed_grads(ref)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
