"""``--num_models=K``: K members trained at once with jax.vmap, equal to K
single runs, resumable, and read by every mode as an ensemble."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax import evaluate, export, inference, registry, results, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config
from conftest import MOCK_EXAMPLES, tiny_config
from helpers import procs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A 2-member DeepCNN run (dropout, batch norm, augmentation) and the two
  single runs of its seeds: {'k2': (config, workdir, results), 0: ..., 1: ...}."""
  root = tmp_path_factory.mktemp('members')
  config = tiny_config(root / 'tfds', model='deep_cnn', epochs=2,
                       width_multiplier=0.25,
                       model_options={'dense_features': 16}, augment=True,
                       seed=3)
  out = {}
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    for name, c in (('k2', config.replace(num_models=2)), (0, config),
                    (1, config.replace(seed=4))):
      workdir = str(root / str(name))
      out[name] = (c, workdir, train.train_and_evaluate(c, workdir))
  return out


def test_two_members_equal_two_single_runs(runs):
  _, k2_dir, k2 = runs['k2']
  assert [m['seed'] for m in k2['members']] == [3, 4]
  assert [m['name'] for m in k2['members']] == ['seed3', 'seed4']
  history = workdir_lib.read_history(k2_dir)
  for k in (0, 1):
    _, single_dir, single = runs[k]
    member, (one,) = k2['members'][k], single['members']
    # The same fields for a member of a K-run as for a single run.
    assert set(member) == set(one)
    assert member['best_epoch'] == one['best_epoch']
    assert member['test_accuracy'] == pytest.approx(one['test_accuracy'],
                                                    abs=1 / 256 + 1e-9)
    assert member['test_loss'] == pytest.approx(one['test_loss'], rel=1e-4)
    assert member['best_val_loss'] == pytest.approx(one['best_val_loss'],
                                                    rel=1e-4)
    for row, single_row in zip(history, workdir_lib.read_history(single_dir)):
      for key in ('train_loss', 'val_loss', 'val_accuracy'):
        assert row['members'][key][k] == pytest.approx(single_row[key],
                                                       rel=1e-4), key
  # One params count per member; the ensemble's figures are those of the
  # members' averaged probabilities, under their own names.
  assert k2['members'][0]['num_params'] == runs[0][2]['members'][0][
      'num_params']
  assert set(k2['ensemble']) == {'test_accuracy', 'test_loss',
                                 'vote_accuracy'}
  assert 'ensemble' not in runs[0][2]
  assert 'val_ensemble_accuracy' in history[-1]


def test_every_mode_reads_a_many_member_workdir(runs, tmp_path):
  config, k2_dir, k2 = runs['k2']
  loaded = inference.load(k2_dir)
  assert loaded.num_members == 2
  assert [n.seed for n in loaded.networks] == [3, 4]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    evaluated = evaluate.evaluate_workdir(k2_dir, config)
    test = __import__('cnn_jax.input_pipeline').input_pipeline.load(
        config, splits=('test',)).test
  # Eval gives what training reported, in the same layout.
  trained = results.from_json(k2)
  for got, want in zip(evaluated.members, trained.members, strict=True):
    assert (got.name, got.seed, got.best_epoch) == (want.name, want.seed,
                                                    want.best_epoch)
    assert got.test_accuracy == pytest.approx(want.test_accuracy, abs=1e-9)
    assert got.test_loss == pytest.approx(want.test_loss, rel=1e-5)
  assert evaluated.ensemble.test_accuracy == pytest.approx(
      trained.ensemble.test_accuracy)
  assert evaluated.ensemble.vote_accuracy == pytest.approx(
      trained.ensemble.vote_accuracy)
  # The members restored alone are the two single runs' networks.
  probs = loaded.member_probabilities(test.images[:8])
  for k in (0, 1):
    single = inference.load(runs[k][1]).probabilities(test.images[:8])
    np.testing.assert_allclose(probs[k], single, atol=2e-4)
  out = export.export(config, k2_dir, saved_model=False)
  with open(pathlib.Path(out) / 'model.stablehlo', 'rb') as f:
    fn = jax.export.deserialize(bytearray(f.read()))
  np.testing.assert_allclose(np.asarray(fn.call(test.images[:8])),
                             probs.mean(0), atol=1e-5)


def _args(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
  return [str(procs.HELPERS / 'mock_main.py'), f'--workdir={workdir}',
          f'--tfds_data_dir={data_dir}', '--download=false',
          '--model=deep_cnn', '--width_multiplier=0.25',
          '--model_options=dense_features=16', '--augment', '--num_models=2',
          '--epochs=2', '--batch_size=32', '--val_examples=64',
          '--eval_batch_size=64', '--log_every_steps=2',
          '--checkpoint_every_steps=2', '--host_devices=1']


def _final_state(workdir: pathlib.Path):
  config = Config(model='deep_cnn', width_multiplier=0.25,
                  model_options={'dense_features': 16},
                  num_models=2, epochs=2, batch_size=32)
  target = train.create_train_state(
      config, registry.create_model(config, 10), (28, 28, 1), 6)
  ckpt = Checkpointer(str(workdir))
  try:
    return ckpt.restore_latest(target)[0]
  finally:
    ckpt.close()


def test_sigkill_then_rerun_resumes_bit_identically(tmp_path):
  env = procs.jax_env(1)
  reference = tmp_path / 'full'
  done = procs.run_python(_args(reference, tmp_path / 'tfds'), env)
  assert done.returncode == 0, done.stderr[-3000:]
  workdir = tmp_path / 'killed'
  log = tmp_path / 'killed.log'
  with open(log, 'w') as out:
    proc = subprocess.Popen(
        [sys.executable, *_args(workdir, tmp_path / 'tfds')], cwd=procs.REPO,
        env={**env, 'CNN_JAX_TEST_CHUNK_DELAY_S': '0.5'}, stdout=out,
        stderr=subprocess.STDOUT)
  latest = workdir / 'checkpoints' / 'latest'
  deadline = time.monotonic() + procs.TIMEOUT_S
  while not (latest.is_dir() and any(p.name.isdigit()
                                     for p in latest.iterdir())):
    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  saved = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
  assert saved < 12 and not (workdir / 'results.json').exists()
  rerun = procs.run_python(_args(workdir, tmp_path / 'tfds'), env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # It resumed (from the newest checkpoint, or the one before if the kill
  # caught a save half-written) rather than starting over.
  resumed = re.search(r'Resuming from step (\d+)', rerun.stderr)
  assert resumed and 0 < int(resumed.group(1)) <= saved, rerun.stderr[-2000:]
  ra = json.loads((reference / 'results.json').read_text())
  rb = json.loads((workdir / 'results.json').read_text())
  for key in ('ensemble', 'members'):
    assert ra[key] == rb[key], key
  sa, sb = _final_state(reference), _final_state(workdir)
  for x, y in zip(jax.tree_util.tree_leaves((sa.params, sa.opt_state,
                                             sa.batch_stats)),
                  jax.tree_util.tree_leaves((sb.params, sb.opt_state,
                                             sb.batch_stats)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
