"""`experiments.speedrun`: whole commands timed per target, judged against
the goals scaled to this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnn_jax import config_flags
from conftest import REPO
from experiments import speedrun


def test_every_target_has_a_recipe_that_parses():
  for target, name in speedrun.TARGETS.items():
    config = config_flags.config_from_flagfile(
        os.path.join(speedrun.CONFIGS, name))
    assert config.epochs >= 1, target
  assert set(speedrun.GOAL_SECONDS) == set(speedrun.TARGETS)


def test_time_target_runs_the_recipe_per_seed(tmp_path, monkeypatch,
                                              real_mnist_dir):
  recipe = tmp_path / 'tiny.flags'
  recipe.write_text('\n'.join([
      '--model=mlp', '--num_models=2', '--epochs=1',
      '--batch_size=64', '--train_examples=256', '--val_examples=128',
      '--test_examples=256', '--eval_batch_size=256']) + '\n')
  monkeypatch.setitem(speedrun.TARGETS, '99.0', str(recipe))
  row = speedrun.time_target('99.0', 2, str(tmp_path / 'runs'),
                             real_mnist_dir)
  # Seeds step by the recipe's member count: no network is timed twice.
  assert [r['seed'] for r in row['runs']] == [0, 2]
  assert row['members'] == 2 and row['images_seen'] == 4 * 64 * 2
  for r in row['runs']:
    with open(tmp_path / 'runs' / f'99.0_seed{r["seed"]}' /
              'results.json') as f:
      ensemble = json.load(f)['ensemble']
    assert r['accuracy'] == ensemble['test_accuracy']
    assert r['wall_seconds'] > 0
  assert row['test_accuracy_worst'] <= row['test_accuracy_mean']
  assert (tmp_path / 'runs' / '99.0_warmup' / 'results.json').exists()


def _row(accuracy: float, seconds: float) -> dict:
  return {'target': 99.5, 'recipe': 'r.flags', 'wall_seconds_min': seconds,
          'wall_seconds_median': seconds, 'test_accuracy_mean': accuracy,
          'test_accuracy_worst': accuracy - 1e-3, 'images_seen': 10}


def test_goals_scale_by_this_machines_keras_speed():
  # Keras at half the reference speed: the 60 s goal becomes 120 s.
  slow = speedrun.judge(_row(0.9952, 100.0),
                        speedrun.KERAS_REFERENCE / 2)
  assert slow['goal_seconds'] == pytest.approx(120.0) and slow['met']
  missed = speedrun.judge(_row(0.9940, 150.0), speedrun.KERAS_REFERENCE)
  assert not missed['met']
  assert missed['accuracy_short_points'] == pytest.approx(0.10)
  assert missed['seconds_over_goal'] == pytest.approx(90.0)
  text = speedrun.table([missed], {'keras': speedrun.KERAS_REFERENCE},
                        {'cpu': 'Some CPU', 'cpu_count': 2})
  assert 'no: 0.10 points short, 90.0 s over' in text
  assert 'scaled here by 1.00' in text
  assert 'Machine: Some CPU, 2 cores.' in text


def test_machine_names_this_cpu():
  where = speedrun.machine()
  assert isinstance(where['cpu'], str) and where['cpu'].strip()
  assert where['cpu_count'] == os.cpu_count()


def test_unknown_target_is_one_error_line():
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.speedrun', '--targets=98'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --targets')
