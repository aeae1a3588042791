"""The command line: flag errors, an end-to-end run, eval mode, real data."""

import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

from cnn_jax import main as cli
from conftest import REPO, real_tfds_dir


def _cli(*args, env=None, timeout=120):
  return subprocess.run([sys.executable, '-m', 'cnn_jax.main', *args],
                        capture_output=True, text=True, cwd=REPO,
                        timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize('args,message', [
    (['--model=resnet'], "unknown --model='resnet'"),
    (['--optimizer=adagrad'], "unknown --optimizer='adagrad'"),
    (['--epochs=0'], '--epochs must be a positive integer'),
    (['--batch_size=-4'], '--batch_size must be a positive integer'),
    (['--learning_rate=0'], '--learning_rate must be a positive number'),
    (['--learning_rate=nan'], '--learning_rate must be a positive number'),
    (['--dropout_rate=1.5'], '--dropout_rate must be in [0, 1)'),
    (['--mode=serve'], "unknown --mode='serve'"),
    (['--dataset=not_a_dataset'], "unknown --dataset='not_a_dataset'"),
    (['--kernels=fast'], "unknown --kernels='fast'"),
])
def test_bad_flags_fail_with_one_line_and_no_traceback(tmp_path, args,
                                                       message):
  result = _cli(f'--workdir={tmp_path / "w"}', *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')


def test_missing_workdir_and_missing_data_are_clear(tmp_path):
  result = _cli('--epochs=1')
  assert result.returncode != 0 and '--workdir is required' in result.stderr
  result = _cli(f'--workdir={tmp_path / "w"}',
                f'--tfds_data_dir={tmp_path / "nodata"}', '--nodownload')
  assert result.returncode != 0
  assert 'not prepared' in result.stderr and '--tfds_data_dir' in result.stderr
  assert 'Traceback' not in result.stderr


def test_eval_without_a_run_is_clear(tmp_path):
  result = _cli('--mode=eval', f'--workdir={tmp_path}')
  assert result.returncode != 0 and 'no run found' in result.stderr
  assert 'Traceback' not in result.stderr


def test_every_flag_has_help_text():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['prog'])
  text = _cli('--helpfull').stdout
  for name in ('model', 'dataset', 'tfds_data_dir', 'val_examples',
               'optimizer', 'lr_schedule', 'label_smoothing', 'augment',
               'mode', 'workdir'):
    assert f'--{name}' in text or f'--[no]{name}' in text, name
  for flag in flags.FLAGS.get_key_flags_for_module(cli):
    assert flag.help, flag.name


def test_end_to_end_train_then_eval_on_mock_data(mock_tfds, tmp_path,
                                                 capsys):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['prog'])
  workdir = str(tmp_path / 'run')
  common = dict(workdir=workdir, tfds_data_dir=str(tmp_path / 'tfds'),
                download=False, val_examples=64, batch_size=32,
                eval_batch_size=64)
  with flagsaver.flagsaver(epochs=1, **common):
    assert cli.run(['prog']) == 0
  results = json.loads(capsys.readouterr().out)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == results
  with flagsaver.flagsaver(mode='eval', workdir=workdir):
    assert cli.run(['prog']) == 0
  evaluated = json.loads(capsys.readouterr().out)
  assert evaluated['test_accuracy'] == results['test_accuracy']


def test_analyze_compare_without_a_run_is_one_line(trained_simple, tmp_path):
  missing = tmp_path / 'none'
  result = _cli('--mode=analyze', f'--workdir={trained_simple[1]}',
                f'--compare={missing}')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: --compare={missing} does not exist; give the workdir of '
      'another trained run')


@pytest.mark.slow
@pytest.mark.skipif(real_tfds_dir() is None, reason='real MNIST not present')
def test_trains_on_real_mnist_well_above_chance(tmp_path):
  workdir = tmp_path / 'real'
  result = _cli(f'--workdir={workdir}', f'--tfds_data_dir={real_tfds_dir()}',
                '--nodownload', '--epochs=1', '--train_examples=4096',
                '--val_examples=1000', '--test_examples=2000',
                '--learning_rate=3e-3', '--log_every_steps=8', timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['test_examples'] == 2000
  assert results['test_accuracy'] > 0.85, results
  # Eval mode restores the best params and reproduces the test accuracy.
  again = _cli('--mode=eval', f'--workdir={workdir}')
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads(again.stdout)['test_accuracy'] == results['test_accuracy']
