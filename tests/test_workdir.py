"""A workdir is a portable artifact: everything inference needs is in it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax import evaluate, inference, predict
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import CnnJaxError
from conftest import MOCK_EXAMPLES
from helpers import procs


def _digits(tmp_path, n=3):
  rng = np.random.default_rng(0)
  path = tmp_path / 'digits.npy'
  np.save(path, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
  return path


def test_training_saves_the_dataset_info_and_input_contract(trained_simple):
  _, workdir = trained_simple
  saved = json.load(open(os.path.join(workdir, 'dataset_info.json')))
  assert saved['name'] == 'mnist' and saved['version'] == '3.0.1'
  assert saved['class_names'] == [str(i) for i in range(10)]
  assert saved['image_shape'] == [28, 28, 1] and saved['num_classes'] == 10
  assert saved['input'] == {'dtype': 'uint8', 'layout': 'NHWC',
                            'value_range': [0, 255],
                            'normalization': 'x / 255 (float32 in [0, 1])'}
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert not any(isinstance(v, str) and v.startswith('/') and k not in (
      'tfds_data_dir',) for k, v in config.items())


def test_a_moved_workdir_predicts_and_exports_without_tfds_or_home(
    trained_simple, tmp_path):
  """Through the command line, as a user on another machine would."""
  _, workdir = trained_simple
  moved = tmp_path / 'elsewhere' / 'run'
  shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns(
      'export', 'analysis'))
  home = tmp_path / 'empty_home'
  home.mkdir()
  env = {k: v for k, v in procs.jax_env(1).items() if k != 'TFDS_DATA_DIR'}
  env['HOME'] = str(home)
  digits = _digits(tmp_path)
  for args, expect in (
      (['--mode=predict', '--json', str(digits)], 'prediction'),
      (['--mode=export'], 'exported:')):
    proc = subprocess.run(
        [sys.executable, '-m', 'cnn_jax.main', f'--workdir={moved}', *args],
        capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=procs.TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
  assert len(proc.stdout.splitlines()) >= 1
  # TFDS was not asked for anything (its default data dir stays absent).
  assert not (home / 'tensorflow_datasets').exists()
  assert (moved / 'export' / 'model.stablehlo').exists()


def test_a_run_trained_on_two_devices_is_used_on_one(tmp_path):
  workdir = tmp_path / 'two'
  args = [str(procs.HELPERS / 'mock_main.py'), f'--workdir={workdir}',
          f'--tfds_data_dir={tmp_path / "tfds"}', '--download=false',
          '--epochs=1', '--batch_size=32', '--val_examples=64',
          '--eval_batch_size=64', '--host_devices=2']
  done = procs.run_python(args, procs.jax_env(2))
  assert done.returncode == 0, done.stderr[-3000:]
  results = workdir_lib.read_results(str(workdir))
  assert results.training.num_devices == 2
  config = workdir_lib.load_config(str(workdir))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    evaluated = evaluate.evaluate_workdir(str(workdir), config)
  assert evaluated.accuracy == pytest.approx(results.accuracy)
  classifier = predict.Classifier.restore(config, str(workdir))
  probs = classifier.probabilities(np.zeros((2, 28, 28, 1), np.uint8))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_an_older_workdir_reads_tfds_once_and_saves_the_info(
    trained_simple, tmp_path, caplog):
  """Saved before dataset_info.json existed, with the kernel flags that
  --kernels replaced in its config."""
  _, workdir = trained_simple
  old = tmp_path / 'old'
  shutil.copytree(workdir, old, ignore=shutil.ignore_patterns(
      'dataset_info.json', 'export', 'analysis'))
  saved = json.load(open(old / 'config.json'))
  saved.pop('kernels')
  saved.update(conv_impl='auto', pool_impl='auto',
               tfds_data_dir=str(tmp_path / 'tfds'))
  (old / 'config.json').write_text(json.dumps(saved))
  config = workdir_lib.load_config(str(old))
  # On absl's own logger: once any test parses absl flags, absl's default
  # verbosity leaves that logger at WARNING.
  caplog.set_level(logging.INFO, logger='absl')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    classifier = predict.Classifier.restore(config, str(old))
  assert classifier.info.class_names == tuple(str(i) for i in range(10))
  assert (old / 'dataset_info.json').exists()
  assert 'read it from TFDS and saved it' in caplog.text
  # From now on it needs no TFDS at all.
  assert inference.load(str(old)).info == classifier.info


def test_load_config_overrides_and_a_data_dir_from_another_machine(
    trained_simple, tmp_path):
  _, workdir = trained_simple
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  saved = json.load(open(copy / 'config.json'))
  saved['tfds_data_dir'] = '/data/on/another/machine'
  (copy / 'config.json').write_text(json.dumps(saved))
  config = workdir_lib.load_config(str(copy), {'eval_batch_size': 7,
                                               'tta': 2})
  assert config.tfds_data_dir == '' and config.eval_batch_size == 7
  assert config.tta == 2
  with pytest.raises(ValueError, match='cannot override'):
    workdir_lib.load_config(str(copy), {'epochs': 3})
  (copy / 'dataset_info.json').write_text('{"name": "mnist"}')
  with pytest.raises(CnnJaxError, match='not a valid dataset info'):
    workdir_lib.dataset_info(str(copy), config)
  (copy / 'config.json').write_text('{not json')
  with pytest.raises(CnnJaxError, match='cannot read'):
    workdir_lib.load_config(str(copy))
