"""`experiments.benchmark`'s tools run with ``--tiny`` and report sane
figures; the peers are built from the models' own description."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO

FIGURES = ('train_img_per_s', 'eval_img_per_s', 'peak_rss_mb')
PEERS = ('keras', 'torch')


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope='module')
def tiny_results() -> dict:
  # SimpleCNN only: DeepCNN's peers are checked by the layer-table test.
  proc = _benchmark('experiments.benchmark', '--json', '--models=simple_cnn')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


@pytest.mark.slow
def test_tiny_json_is_complete_and_positive(tiny_results):
  settings = tiny_results['settings']
  assert settings['batch_size'] == 8 and settings['steps'] == 2
  installed = [p for p in PEERS
               if importlib.util.find_spec(p) is not None]
  assert sorted(settings['peers_run']) == sorted(installed)
  ours = tiny_results['simple_cnn']
  for key in FIGURES:
    assert _positive(ours[key]), (key, ours[key])
  assert ours['compile_seconds'] > 0  # JAX compiles on the first call.
  for peer in PEERS:
    if peer not in installed:
      assert peer not in ours
      continue
    fig = ours[peer]
    for key in FIGURES:
      assert _positive(fig[key]), (peer, key, fig[key])
    assert math.isfinite(fig['compile_seconds'])
    assert fig['compile_seconds'] >= 0
    assert ours[f'ratio_vs_{peer}'] == pytest.approx(
        ours['train_img_per_s'] / fig['train_img_per_s'])
    # The same architecture in every framework.
    assert fig['num_params'] == ours['num_params']
  assert ours['num_params'] == 93_322


@pytest.mark.slow
def test_profile_lists_the_ops_and_layers_of_a_training_step():
  proc = _benchmark('experiments.benchmark.profile',
                    '--models=simple_cnn,deep_cnn', '--top_ops=40', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout)
  r = results['simple_cnn']
  assert _positive(r['op_ms']) and _positive(r['wall_ms_per_step'])
  ops = r['top_ops']
  assert 0 < len(ops) <= 40
  assert all(_positive(o['ms']) for o in ops)
  assert [o['ms'] for o in ops] == sorted((o['ms'] for o in ops), reverse=True)
  sources = ' '.join(o['source'] for o in ops)
  # Both directions of the model's own layers show up, by name.
  assert 'forward: conv' in sources and 'backward: conv' in sources
  # Per layer: every named layer of each model has both directions, and
  # the rows add up to the step's wall time.
  named = {'simple_cnn': ['conv1', 'conv2', 'conv3', 'dense1', 'logits'],
           'deep_cnn': ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'dense1',
                        'logits', 'batch norm']}
  torch = importlib.util.find_spec('torch') is not None
  for model, layers in named.items():
    r = results[model]
    for layer in layers:
      assert _positive(r['layers'][layer]['forward_ms']), (model, layer)
      assert _positive(r['layers'][layer]['backward_ms']), (model, layer)
    total = sum(sum(t.values()) for t in r['layers'].values())
    assert total == pytest.approx(r['wall_ms_per_step'])
    if not torch:
      assert 'torch_layers' not in r
      continue
    peer = r['torch_layers']
    assert set(layers) <= set(peer)
    assert all(_positive(peer[layer]['forward_ms']) for layer in layers)
    # Hooks cannot time the first conv's backward (its input needs no
    # gradient): it is left out rather than reported as ~0.
    assert 'backward_ms' not in peer[layers[0]]
    assert all(_positive(peer[layer]['backward_ms']) for layer in layers[1:])
    assert sum(sum(t.values()) for t in peer.values()) == pytest.approx(
        r['torch_wall_ms_per_step'])


def _benchmark(tool: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'CUDA_VISIBLE_DEVICES': ''}
  return subprocess.run(
      [sys.executable, '-m', tool, '--tiny', *args], capture_output=True,
      text=True, timeout=300, env=env, cwd=REPO)


@pytest.mark.slow
def test_kernel_sweep_times_stock_flax_all_kernels_and_all_but_one():
  # DeepCNN has a field for every kernel; the dense network has none to leave
  # out (SimpleCNN, between them, would only add four compilations).
  proc = _benchmark('experiments.benchmark.kernel_sweep',
                    '--models=deep_cnn,mlp', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  sweep = json.loads(proc.stdout)['kernel_sweep']
  assert list(sweep['deep_cnn']) == ['flax', 'cpu', 'cpu-conv', 'cpu-pool',
                                     'cpu-norm', 'cpu-dropout']
  assert list(sweep['mlp']) == ['flax', 'cpu']
  assert all(_positive(f['train_img_per_s'])
             for by in sweep.values() for f in by.values())
  # Each variant trains the layers its name says: stock Flax for 'flax',
  # every kernel for 'cpu', every kernel but one for 'cpu-<field>'.
  assert set(sweep['deep_cnn']['flax']['layers']) == {'conv', 'pool', 'norm',
                                                      'dropout'}
  for name, f in sweep['deep_cnn'].items():
    left_out = name.partition('-')[2]
    for field, layer in f['layers'].items():
      expect_kernel = name != 'flax' and field != left_out
      assert layer.startswith('cnn_jax.kernels.') == expect_kernel, (
          name, field, layer)


def test_bad_model_or_kernels_are_one_line():
  proc = _benchmark('experiments.benchmark', '--models=resnet')
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: unknown --models/--peers entries: ['resnet']")
  proc = _benchmark('experiments.benchmark', '--kernels=fast')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr


def test_times_the_checkout_it_is_in_not_the_installed_package(tmp_path):
  """Run from another checkout (a git worktree of an older commit, say), the
  tools import that checkout's cnn_jax, not the installed one."""
  import shutil
  for package in ('cnn_jax', 'experiments'):
    shutil.copytree(REPO / package, tmp_path / package,
                    ignore=shutil.ignore_patterns('__pycache__', 'results'))
  with open(tmp_path / 'cnn_jax' / 'config.py', 'a') as f:
    f.write("\nraise SystemExit('error: imported the other checkout')\n")
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark', '--helpshort'],
      capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: imported the other checkout')


@pytest.mark.parametrize('model', ['simple_cnn', 'deep_cnn', 'mlp'])
def test_peers_are_built_from_the_models_own_layer_table(model):
  """Layer for layer, the parameters of the stock model: nothing in the
  peers is written per model."""
  from cnn_jax import models, registry
  from cnn_jax.config import Config
  from experiments.benchmark import peers
  ours = models.count_params(models.init_variables(
      registry.create_model(Config(model=model), 10), jax.random.PRNGKey(0),
      (28, 28, 1))['params'])
  if importlib.util.find_spec('keras') is not None:
    keras = peers.keras_model(model)
    assert sum(math.prod(w.shape) for w in keras.trainable_weights) == ours
  if importlib.util.find_spec('torch') is not None:
    torch = peers.torch_model(model)
    assert sum(p.numel() for p in torch.parameters()) == ours
    names = [n for n, _ in torch.named_children()]
    assert 'logits' in names and names[-1] == 'logits'
