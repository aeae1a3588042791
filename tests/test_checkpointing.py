"""Orbax round trips, best-by-validation selection, corruption, mismatch."""

import hashlib
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from cnn_jax import models, registry, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.checkpointing import Checkpointer
from cnn_jax.config import Config, CnnJaxError
from helpers.procs import jax_env, run_python
from helpers.resume import ChunkRecorder, abstract_state, assert_same_run


def _state(config: Config):
  model = registry.create_model(config, 10)
  return train.create_train_state(config, model, (28, 28, 1), 10)


@pytest.fixture(scope='module')
def simple_state():
  """A SimpleCNN train state, created (and its init compiled) once."""
  return _state(Config())


def _shifted(state, by: float = 1.0):
  """The state with different params (as another seed would give)."""
  return state.replace(params=jax.tree_util.tree_map(lambda p: p + by,
                                                     state.params))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_latest_round_trip_restores_state_and_meta(tmp_path):
  config = Config(model='deep_cnn')
  state = _state(config).replace(step=7)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_latest(7, state, {'epoch': 1, 'history': [0.5]})
  restored, meta = Checkpointer(str(tmp_path)).restore_latest(
      abstract_state(config))
  assert int(restored.step) == 7 and meta == {'epoch': 1, 'history': [0.5]}
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.batch_stats, state.batch_stats)
  _assert_trees_equal(restored.opt_state, state.opt_state)
  _assert_trees_equal(restored.key, state.key)


def test_nothing_to_restore_returns_none(tmp_path):
  target = abstract_state(Config())
  assert Checkpointer(str(tmp_path)).restore_latest(target) is None


def test_latest_keeps_two_and_best_keeps_one(tmp_path, simple_state):
  state = simple_state
  ckpt = Checkpointer(str(tmp_path))
  for step in (1, 2, 3):
    ckpt.save_latest(step, state, {})
    ckpt.save_best(step, {'params': state.params}, {'accuracy': step / 10})
  assert ckpt.latest_steps() == [2, 3]
  assert sorted(os.listdir(tmp_path / 'checkpoints' / 'best')) == ['3']


def test_saving_a_step_again_replaces_it(tmp_path, simple_state):
  """A resume redoes steps after the checkpoint it restored: killed between
  the best and the latest save of an epoch, the rerun saves that best step
  again."""
  first, again = simple_state, _shifted(simple_state)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_best(6, {'params': first.params}, {'epoch': 1})
  ckpt.save_best(6, {'params': again.params}, {'epoch': 1, 'again': True})
  target = {'params': first.params}
  variables, meta = Checkpointer(str(tmp_path)).restore_best(target)
  assert meta == {'epoch': 1, 'again': True}
  _assert_trees_equal(variables['params'], again.params)


def _truncate_arrays(step_dir: pathlib.Path) -> None:
  files = [f for f in (step_dir / 'state').rglob('*') if f.is_file()
           and f.parent.name == 'd']
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _garbage_everywhere(step_dir: pathlib.Path) -> None:
  for f in (step_dir / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b'\0garbage')


def _remove(path: str):
  def damage(step_dir: pathlib.Path) -> None:
    target = step_dir / path
    assert target.exists(), target  # Orbax's layout changed: update this.
    shutil.rmtree(target) if target.is_dir() else target.unlink()
  return damage


def _overwrite(path: str, text: str):
  def damage(step_dir: pathlib.Path) -> None:
    assert (step_dir / path).is_file(), step_dir / path
    (step_dir / path).write_text(text)
  return damage


# Ways a checkpoint is found damaged after a crash, a full disk or a copy.
DAMAGE = {
    'truncated array files': _truncate_arrays,
    'garbage in every file': _garbage_everywhere,
    'missing array files': _remove('state/ocdbt.process_0'),
    'missing array metadata': _remove('state/_METADATA'),
    'corrupt array metadata': _overwrite('state/_METADATA', '{"tree": '),
    'corrupt run metadata': _overwrite('meta/metadata', '{"sums": '),
    'missing run metadata': _remove('meta'),
}


def _files(root: pathlib.Path) -> dict[str, str]:
  """Every file under root and a hash of its bytes."""
  return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(root.rglob('*')) if f.is_file()}


@pytest.fixture(scope='module')
def two_saves(tmp_path_factory, simple_state):
  """(workdir with latest steps 1 and 2, state 1, state 2), kept pristine."""
  root = tmp_path_factory.mktemp('two_saves')
  s1 = simple_state.replace(step=1)
  s2 = _shifted(simple_state).replace(step=2)
  ckpt = Checkpointer(str(root))
  ckpt.save_latest(1, s1, {'which': 'old'})
  ckpt.save_latest(2, s2, {'which': 'new'})
  ckpt.close()
  return root, s1, s2


def _copy(two_saves, tmp_path) -> pathlib.Path:
  shutil.copytree(two_saves[0], tmp_path / 'run')
  return tmp_path / 'run'


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_previous(two_saves, tmp_path,
                                                          kind):
  workdir = _copy(two_saves, tmp_path)
  DAMAGE[kind](workdir / 'checkpoints' / 'latest' / '2')
  ckpt = Checkpointer(str(workdir))
  restored, meta = ckpt.restore_latest(abstract_state(Config()))
  assert meta == {'which': 'old'} and int(restored.step) == 1
  _assert_trees_equal(restored.params, two_saves[1].params)
  _assert_trees_equal(restored.opt_state, two_saves[1].opt_state)
  assert ckpt.latest_steps() == [1, 2]  # The damaged one is left in place.


def test_undamaged_checkpoints_restore_the_newest(two_saves, tmp_path):
  restored, meta = Checkpointer(str(_copy(two_saves, tmp_path))).restore_latest(
      abstract_state(Config()))
  assert meta == {'which': 'new'} and int(restored.step) == 2
  _assert_trees_equal(restored.params, two_saves[2].params)


def test_every_checkpoint_unreadable_is_one_error_and_deletes_nothing(
    two_saves, tmp_path):
  workdir = _copy(two_saves, tmp_path)
  DAMAGE['truncated array files'](workdir / 'checkpoints' / 'latest' / '2')
  DAMAGE['corrupt run metadata'](workdir / 'checkpoints' / 'latest' / '1')
  before = _files(workdir)
  with pytest.raises(CnnJaxError) as info:
    Checkpointer(str(workdir)).restore_latest(abstract_state(Config()))
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith('no readable checkpoint among steps [1, 2] in ')
  assert 'remove it to start over' in message
  assert _files(workdir) == before


def test_latest_of_another_model_is_a_mismatch_not_a_fallback(two_saves,
                                                              tmp_path):
  workdir = _copy(two_saves, tmp_path)
  other = abstract_state(Config(width_multiplier=2.0))
  with pytest.raises(CnnJaxError, match='does not match this model'):
    Checkpointer(str(workdir)).restore_latest(other)
  assert _files(workdir) == _files(two_saves[0])


def test_resume_falls_back_past_a_damaged_checkpoint_and_replaces_it(
    interrupted_simple, mock_tfds, tmp_path):
  """A real run: the newest save is damaged; the rerun resumes one earlier.

  With both saves damaged the rerun stops with one line, deleting nothing.
  """
  config, full, crashed, _ = interrupted_simple
  run, all_bad = tmp_path / 'run', tmp_path / 'all_bad'
  shutil.copytree(crashed, run)
  latest = run / 'checkpoints' / 'latest'
  assert sorted(int(p.name) for p in latest.iterdir()) == [8, 10]
  DAMAGE['truncated array files'](latest / '10')
  shutil.copytree(run, all_bad)

  chunks = ChunkRecorder()
  train.train_and_evaluate(config, str(run), hooks=[chunks])
  assert chunks.steps == [9, 10, 11, 12]  # From step 8, not 10 or 0.
  assert sorted(int(p.name) for p in latest.iterdir()) == [10, 12]
  assert_same_run(full, str(run))

  DAMAGE['corrupt array metadata'](all_bad / 'checkpoints' / 'latest' / '8')
  before = _files(all_bad / 'checkpoints')
  chunks = ChunkRecorder()
  with pytest.raises(CnnJaxError) as info:
    train.train_and_evaluate(config, str(all_bad), hooks=[chunks])
  assert str(info.value).startswith('no readable checkpoint among steps '
                                    '[8, 10]')
  assert '\n' not in str(info.value) and chunks.chunks == []
  assert _files(all_bad / 'checkpoints') == before
  assert not (all_bad / 'results.json').exists()


def test_best_checkpoint_of_a_run_is_the_best_validation_epoch(
    trained_simple):
  config, workdir = trained_simple
  history = workdir_lib.read_history(workdir)
  best_epoch = 1 + int(np.argmax([r['val_accuracy'] for r in history]))
  target = models.init_variables(registry.create_model(config, 10),
                                 jax.random.PRNGKey(0), (28, 28, 1))
  _, meta = Checkpointer(workdir, read_only=True).restore_best(target)
  member, = meta['members']
  assert member['epoch'] == best_epoch
  assert member['accuracy'] == max(r['val_accuracy'] for r in history)
  with open(pathlib.Path(workdir) / 'results.json') as f:
    assert json.load(f)['members'][0]['best_epoch'] == best_epoch


def test_mismatched_model_is_a_clear_error(trained_simple):
  _, workdir = trained_simple
  other = registry.create_model(Config(width_multiplier=2.0), 10)
  target = models.init_variables(other, jax.random.PRNGKey(0), (28, 28, 1))
  with pytest.raises(CnnJaxError, match='does not match'):
    Checkpointer(workdir, read_only=True).restore_best(target)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CnnJaxError, match='no checkpoint'):
    Checkpointer(str(tmp_path), read_only=True).restore_best({})


def test_save_on_a_full_disk_is_refused_and_keeps_saved_steps(tmp_path,
                                                              monkeypatch,
                                                              simple_state):
  from cnn_jax import checkpointing
  state = simple_state
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_latest(1, state.replace(step=1), {'n': 1})
  monkeypatch.setattr(checkpointing, 'free_bytes', lambda path: 100_000)
  with pytest.raises(CnnJaxError, match=r'No space left on device.*steps '
                     r'\[1\]\) are kept'):
    ckpt.save_latest(2, state.replace(step=2), {'n': 2})
  with pytest.raises(CnnJaxError, match='not enough free space'):
    ckpt.check_space(state)
  restored, meta = Checkpointer(str(tmp_path)).restore_latest(state)
  assert int(restored.step) == 1 and meta == {'n': 1}


def test_storage_errors_from_orbax_become_one_clear_line(tmp_path,
                                                         monkeypatch,
                                                         simple_state):
  import orbax.checkpoint as ocp
  state = simple_state
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save_latest(1, state.replace(step=1), {})
  # What TensorStore raised here when a tmpfs filled up during a save.
  error = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": '
                     'Failed to write 3671 bytes to file 12: No space left on '
                     "device [os_error_code='28']")

  def full(*args, **kwargs):
    raise error
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
  with pytest.raises(CnnJaxError) as info:
    ckpt.save_best(2, {'params': state.params}, {})
  assert str(info.value).count('\n') == 0
  assert 'No space left on device' in str(info.value)
  assert 'nothing had been saved yet' in str(info.value)
  with pytest.raises(CnnJaxError, match=r'steps \[1\]\) are kept'):
    ckpt.save_latest(2, state.replace(step=2), {})

  def bug(*args, **kwargs):
    raise ValueError('some programming error')
  monkeypatch.setattr(ocp.CheckpointManager, 'save', bug)
  with pytest.raises(ValueError, match='programming error'):
    ckpt.save_latest(3, state.replace(step=3), {})


def test_saving_replicated_arrays_compiles_nothing_and_restores_them(
    tmp_path):
  """On two devices Orbax would slice each replicated leaf per device, one
  compiled program each (~20 ms apiece: most of a small model's save); the
  single-process save writes host copies, which restore replicated again."""
  script = (
      'import sys, jax, numpy as np\n'
      'from jax.sharding import NamedSharding, PartitionSpec as P\n'
      'from cnn_jax import inference, phases\n'
      'from cnn_jax.checkpointing import Checkpointer\n'
      'rep = NamedSharding(inference.data_mesh(), P())\n'
      'tree = {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4),\n'
      '        "b": np.ones(5, np.float32)}\n'
      'tree = jax.device_put(tree, rep)\n'
      'ckpt = Checkpointer(sys.argv[1])\n'
      'with phases.compile_time() as c:\n'
      '  ckpt.save_best(1, tree, {"step": 1})\n'
      '  ckpt.save_latest(1, tree, {})\n'
      'back, meta = ckpt.restore_best(jax.tree_util.tree_map(\n'
      '    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),\n'
      '    tree))\n'
      'same = all(np.array_equal(back[k], tree[k]) and\n'
      '           back[k].sharding == rep for k in tree)\n'
      'print(jax.device_count(), c["programs"], same, meta["step"])\n')
  proc = run_python(['-c', script, str(tmp_path)], jax_env(2), 120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['2', '0', 'True', '1']
