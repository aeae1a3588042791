"""`experiments.tune_fast`: a validation-only sweep, resumable, on mock data."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import MOCK_EXAMPLES, REPO

# Runs the script's main under mock data, and fails if the test split loads.
_RUN = f'''
import tensorflow_datasets as tfds
from absl import app
from cnn_jax import input_pipeline
from experiments import tune_fast
load = input_pipeline.load
def no_test(config, splits=('train', 'val', 'test')):
  assert 'test' not in splits, splits
  return load(config, splits)
input_pipeline.load = no_test
with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}):
  app.run(tune_fast.main)
'''


def _tune(tmp_path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-c', _RUN, f'--tfds_data_dir={tmp_path / "tfds"}',
       '--nodownload', '--val_examples=64', '--batch_size=32', '--epochs=1',
       '--eval_batch_size=64', f'--out={tmp_path / "tune.jsonl"}', *args],
      capture_output=True, text=True, cwd=REPO, timeout=300)


def test_sweep_records_validation_only_and_resumes(tmp_path):
  args = ('--grid=train_examples=32,0', '--grid=adam_b2=0.99', '--seeds=0')
  first = _tune(tmp_path, *args, '--val_tta=2')
  assert first.returncode == 0, first.stderr[-3000:]
  rows = [json.loads(line) for line in
          (tmp_path / 'tune.jsonl').read_text().splitlines()]
  assert [r['settings'] for r in rows] == [
      {'train_examples': 32, 'adam_b2': 0.99},
      {'train_examples': 0, 'adam_b2': 0.99}]
  for r in rows:
    assert r['seed'] == 0 and 0 <= r['val_accuracy'] <= 1
    assert 0 <= r['val_tta2_accuracy'] <= 1
    assert 'test_accuracy' not in r
  # Each setting trains on its own prefix of the training split: one step
  # on 32 images is not the epoch on all of them.
  assert rows[0]['val_loss'] != rows[1]['val_loss']
  # The same command again trains nothing; a new seed adds its rows only.
  again = _tune(tmp_path, *args[:2], '--seeds=0,1')
  assert again.returncode == 0, again.stderr[-3000:]
  lines = (tmp_path / 'tune.jsonl').read_text().splitlines()
  assert [json.loads(line)['seed'] for line in lines] == [0, 0, 1, 1]


def test_unknown_or_data_grid_field_is_a_usage_error(tmp_path):
  proc = _tune(tmp_path, '--grid=learning_rat=1e-3')
  assert proc.returncode != 0 and 'not a Config field' in proc.stderr
  proc = _tune(tmp_path, '--grid=val_examples=32,64')
  assert proc.returncode != 0
  assert 'changes the data the sweep reads once' in proc.stderr
  proc = _tune(tmp_path, '--grid=host_devices=1,2')
  assert proc.returncode != 0 and 'set once, before JAX' in proc.stderr
  proc = _tune(tmp_path, '--host_devices=-1')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert '--host_devices must be >= 0, got -1' in proc.stderr


def test_rows_train_on_the_host_devices_asked_for(tmp_path):
  """``--host_devices`` (a recipe may set it) is the sweep's device count,
  and each row says which it was."""
  for devices in (1, 2):
    out = tmp_path / f'tune{devices}.jsonl'
    proc = _tune(tmp_path, f'--host_devices={devices}', '--seeds=0',
                 f'--out={out}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = [json.loads(line) for line in out.read_text().splitlines()]
    assert row['devices'] == devices


def test_members_are_scored_as_an_ensemble(tmp_path):
  proc = _tune(tmp_path, '--num_models=2', '--val_tta=1', '--seeds=0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  row, = [json.loads(line) for line in
          (tmp_path / 'tune.jsonl').read_text().splitlines()]
  members = row['val_member_accuracy']
  assert len(members) == 2 and all(0 <= a <= 1 for a in members)
  assert 0 <= row['val_accuracy'] <= 1 and 0 <= row['val_tta1_accuracy'] <= 1
  assert _tune(tmp_path, '--num_models=2',
               '--val_corruptions=8').returncode != 0

