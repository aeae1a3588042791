"""Multi-process data parallelism: two JAX processes on loopback, CPU + Gloo.

Each test starts real processes joined by `jax.distributed.initialize`
(via `cnn_jax.distributed.initialize`) on ``127.0.0.1:<free port>``; every
subprocess has a timeout, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax import distributed
from cnn_jax.config import CnnJaxError, Config
from conftest import real_tfds_dir
from helpers.procs import HELPERS, REPO, free_port, jax_env, run_together


def run_processes(argvs: list[list[str]], logdir: pathlib.Path,
                  devices_per_process: int = 1) -> list[tuple[int, str]]:
  """`run_together` on CPU devices; a hang fails the test."""
  results = run_together(argvs, jax_env(devices_per_process), logdir)
  if any(code is None for code, _ in results):
    tails = '\n---\n'.join(out[-2000:] for _, out in results)
    pytest.fail(f'processes timed out:\n{tails}')
  return results


def _assert_ok(results: list[tuple[int, str]]) -> None:
  for i, (code, out) in enumerate(results):
    assert code == 0, f'process {i} exited {code}:\n{out[-3000:]}'


# Argument handling (no processes started) -----------------------------------
def test_resolve_prefers_arguments_then_environment(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.resolve() == ('10.0.0.1:1234', 4, 3)
  assert distributed.resolve('host:99', 2, 0) == ('host:99', 2, 0)
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
               'JAX_PROCESS_ID'):
    monkeypatch.delenv(name)
  assert distributed.resolve() == (None, None, None)


@pytest.mark.parametrize('args, env, match', [
    (('localhost', 2, 0), {}, 'must be host:port'),
    (('localhost:0', 2, 0), {}, 'must be host:port'),
    (('h:1', 0, 0), {}, '--num_processes must be >= 1'),
    (('h:1', 2, -1), {}, '--process_id must be >= 0'),
    (('h:1', 2, 2), {}, r'--process_id=2 must be less than --num_processes=2'),
    ((None, None, None), {'JAX_NUM_PROCESSES': 'two'},
     r'\$JAX_NUM_PROCESSES=.two. must be an integer'),
    (('h:1', None, None), {'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '5'},
     '--process_id=5 must be less than'),
])
def test_bad_values_raise_clear_errors(monkeypatch, args, env, match):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
               'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(CnnJaxError, match=match):
    distributed.initialize(*args)


def test_initialize_after_jax_started_is_a_clear_error():
  import jax
  jax.devices()  # This (pytest) process has started its backend.
  with pytest.raises(CnnJaxError, match='before any other JAX call'):
    distributed.initialize('127.0.0.1:1', 2, 0)


def test_unreachable_coordinator_is_a_clear_error():
  """Not JAX's process abort: process 1 checks the coordinator first."""
  address = f'127.0.0.1:{free_port()}'  # Nobody listens there.
  with pytest.raises(CnnJaxError, match=f'could not reach the coordinator at '
                     f'{address} within 1s'):
    distributed.initialize(address, 2, 1, timeout_s=1)


def test_any_process_is_the_identity_with_one_process():
  assert distributed.any_process(True) is True
  assert distributed.any_process(False) is False


def test_main_without_coordinator_is_a_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_jax.main', '--distributed',
       f'--workdir={tmp_path}'], cwd=REPO, env=jax_env(1),
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot start the distributed run')
  assert '--coordinator_address=host:port' in last
  assert 'Traceback' not in proc.stderr


# Two processes --------------------------------------------------------------
def test_two_processes_train_like_one(tmp_path):
  """2 processes x 2 CPU devices end with the params of 1 process, 1 device.

  The global batch is split 4 ways, across processes and within each.
  """
  port = free_port()
  helper = str(HELPERS / 'train_steps.py')
  argvs = [[helper, f'--out={tmp_path}', '--devices=all',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
            f'--process_id={i}'] for i in range(2)]
  # The one-process reference runs alongside (it is not part of the group).
  argvs.append([helper, f'--out={tmp_path}', '--devices=1'])
  _assert_ok(run_processes(argvs, tmp_path / 'logs', devices_per_process=2))

  for i in range(2):
    info = json.loads((tmp_path / f'process{i}.json').read_text())
    assert info == {'process_index': i, 'process_count': 2,
                    'device_count': 4, 'any_process_one_true': True,
                    'any_process_all_false': False}
  p0, p1, ref = (dict(np.load(tmp_path / name)) for name in (
      'simple_cnn_4dev_p0.npz', 'simple_cnn_4dev_p1.npz',
      'simple_cnn_1dev.npz'))
  assert sorted(p0) == sorted(p1) == sorted(ref)
  assert np.ptp(ref['loss']) > 1e-3  # It did train.
  for k in p0:
    np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)
    np.testing.assert_allclose(p0[k], ref[k], rtol=1e-4, atol=1e-5,
                               err_msg=k)


@pytest.mark.slow
@pytest.mark.skipif(real_tfds_dir() is None, reason='real MNIST not prepared')
def test_two_process_train_and_evaluate_on_mnist(tmp_path):
  """`main --distributed` x2: one consistent workdir, readable by 1 process."""
  data_dir, workdir = real_tfds_dir(), tmp_path / 'run'
  port = free_port()
  common = ['-m', 'cnn_jax.main', f'--workdir={workdir}',
            f'--tfds_data_dir={data_dir}', '--nodownload',
            '--train_examples=512', '--val_examples=256',
            '--test_examples=256', '--epochs=1', '--batch_size=64',
            '--log_every_steps=4', '--distributed',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  results = run_processes([common + [f'--process_id={i}'] for i in range(2)],
                          tmp_path / 'logs')
  _assert_ok(results)

  decoder = json.JSONDecoder()
  printed = [decoder.raw_decode(out, out.index('{\n'))[0]
             for _, out in results]
  for r in printed:  # Timings differ; everything else must not.
    del r['training']['train_seconds'], r['training']['train_img_per_s']
    del r['timings']
  assert printed[0] == printed[1]
  assert printed[0]['training']['num_devices'] == 2
  assert printed[0]['training']['steps'] == 8
  # Progress is logged by process 0 only.
  assert 'epoch 1/1 step 8/8' in results[0][1]
  assert 'epoch 1/1 step' not in results[1][1]
  # Shared files written once, checkpoints complete.
  rows = [json.loads(line) for line in
          (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in rows] == [1]
  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['members'] == printed[0]['members']
  assert json.loads((workdir / 'config.json').read_text())['batch_size'] == 64
  assert not list(workdir.glob('.write_test*'))
  for name in ('latest', 'best'):
    steps = sorted(p.name for p in (workdir / 'checkpoints' / name).iterdir())
    assert steps == ['8'], (name, steps)

  # One process on one device restores the best params and agrees.
  from cnn_jax import evaluate
  config = Config.from_dict(json.loads((workdir / 'config.json').read_text()))
  evaluated = evaluate.evaluate_workdir(str(workdir), config)
  assert evaluated.test_examples == 256
  assert evaluated.accuracy == pytest.approx(
      printed[0]['members'][0]['test_accuracy'], abs=1e-6)
