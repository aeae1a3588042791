"""The decoded-data cache: round trips, invalidation, corruption, bypass.

TFDS is replaced by a fake builder over a fake prepared layout
(``ROOT/mnist/<version>/`` with placeholder files), so every case is fast
and its reads of "TFDS" can be counted.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax import data_cache, input_pipeline
from conftest import MOCK_EXAMPLES, REPO, tiny_config

INFO = input_pipeline.DatasetInfo(
    name='mnist', num_classes=10, class_names=tuple(str(i) for i in range(10)),
    image_shape=(28, 28, 1), version='3.0.1')
SIZES = {'train': 96, 'test': 40}


def prepare(root: pathlib.Path, version: str = '3.0.1') -> pathlib.Path:
  """A fake prepared TFDS dataset: ROOT/mnist/VERSION/ with two files."""
  source = root / 'mnist' / version
  source.mkdir(parents=True, exist_ok=True)
  (source / 'dataset_info.json').write_text(json.dumps({'version': version}))
  (source / 'mnist-train.tfrecord-00000-of-00001').write_bytes(b'x' * 100)
  return source


def split_arrays(split: str, seed: int = 0) -> input_pipeline.Split:
  rng = np.random.default_rng([seed, len(split)])
  n = SIZES[split]
  return input_pipeline.Split(
      rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
      rng.integers(0, 10, n, dtype=np.int32))


class FakeTfds:
  """Stands in for TFDS in `input_pipeline`: counts the splits it decodes."""

  def __init__(self, monkeypatch, root: pathlib.Path, version='3.0.1',
               seed=0):
    self.reads: list[str] = []
    self.root, self.version, self.seed = root, version, seed
    monkeypatch.setattr(input_pipeline, 'get_builder', self.builder)
    monkeypatch.setattr(input_pipeline, 'dataset_info', self.info)
    monkeypatch.setattr(input_pipeline, '_read_split', self.read)
    monkeypatch.setattr(input_pipeline, '_mocked', lambda b: False)

  def builder(self, config):
    assert config.data_dir == str(self.root)
    return self

  @property
  def data_dir(self) -> str:
    return str(self.root / 'mnist' / self.version)

  def info(self, builder):
    return INFO.__class__(**{**INFO.__dict__, 'version': self.version})

  def read(self, builder, split, limit=0):
    self.reads.append(split)
    return split_arrays(split, self.seed)


@pytest.fixture
def setup(tmp_path, monkeypatch):
  """(config, fake TFDS) with the data and cache dirs under tmp_path."""
  root = tmp_path / 'tfds'
  prepare(root)
  config = tiny_config(root, val_examples=16, cache_dir=str(tmp_path / 'cache'))
  return config, FakeTfds(monkeypatch, root)


def assert_same(a: input_pipeline.Dataset, b: input_pipeline.Dataset) -> None:
  assert a.info == b.info
  for name in ('train', 'val', 'test'):
    x, y = getattr(a, name), getattr(b, name)
    for u, v in ((x.images, y.images), (x.labels, y.labels)):
      assert u.dtype == v.dtype and u.shape == v.shape
      assert u.tobytes() == v.tobytes()


def test_round_trip_is_bit_identical_and_skips_tfds(setup):
  config, tfds = setup
  first = input_pipeline.load(config)
  assert tfds.reads == ['train', 'test']
  second = input_pipeline.load(config)
  assert tfds.reads == ['train', 'test']  # Nothing decoded the second time.
  assert_same(first, second)
  uncached = input_pipeline.load(config.replace(cache=False))
  assert_same(first, uncached)


def test_nocache_neither_reads_nor_writes_the_cache(setup, tmp_path):
  config, tfds = setup
  input_pipeline.load(config)
  # A valid entry holding other data: used with the cache, ignored without.
  cache = input_pipeline._data_cache(config)
  other = split_arrays('test', seed=7)
  cache.store('test', other.images, other.labels, INFO.to_dict(),
              tfds.data_dir)
  assert input_pipeline.load(config).test.images.tobytes() == (
      other.images.tobytes())
  fresh = input_pipeline.load(config.replace(cache=False))
  assert fresh.test.images.tobytes() == split_arrays('test').images.tobytes()
  off = config.replace(cache=False, cache_dir=str(tmp_path / 'unused'))
  input_pipeline.load(off)
  assert not (tmp_path / 'unused').exists()


def test_test_examples_slices_the_cached_split(setup):
  config, _ = setup
  input_pipeline.load(config)
  data = input_pipeline.load(config.replace(test_examples=7, train_examples=9))
  assert len(data.test) == 7 and len(data.train) == 9
  assert data.test.images.tobytes() == (
      split_arrays('test').images[:7].tobytes())


def test_a_new_dataset_version_rebuilds(setup, caplog):
  config, tfds = setup
  input_pipeline.load(config)
  # Another version prepared beside the cached one, which TFDS now picks.
  prepare(tfds.root, '3.0.2')
  tfds.version, tfds.seed = '3.0.2', 1
  with caplog.at_level(logging.INFO, logger='absl'):
    data = input_pipeline.load(config)
  assert tfds.reads == ['train', 'test'] * 2
  assert 'stale' in caplog.text and 'rebuilding' in caplog.text
  assert data.info.version == '3.0.2'
  assert data.test.images.tobytes() == (
      split_arrays('test', 1).images.tobytes())
  manifest = json.loads((pathlib.Path(input_pipeline._data_cache(
      config).folder) / 'test.json').read_text())
  assert manifest['version'] == '3.0.2'


def test_re_prepared_files_and_a_tfds_upgrade_rebuild(setup, monkeypatch):
  config, tfds = setup
  input_pipeline.load(config)
  record = pathlib.Path(tfds.data_dir) / 'mnist-train.tfrecord-00000-of-00001'
  record.write_bytes(b'y' * 101)
  input_pipeline.load(config)
  assert tfds.reads == ['train', 'test'] * 2
  monkeypatch.setattr(data_cache, 'tfds_version', lambda: '99.0')
  input_pipeline.load(config)
  assert tfds.reads == ['train', 'test'] * 3
  input_pipeline.load(config)
  assert tfds.reads == ['train', 'test'] * 3


def test_another_data_dir_is_another_key(setup, tmp_path, monkeypatch):
  config, tfds = setup
  input_pipeline.load(config)
  other_root = tmp_path / 'copy'
  prepare(other_root)
  other = config.replace(tfds_data_dir=str(other_root))
  assert (input_pipeline._data_cache(other).folder
          != input_pipeline._data_cache(config).folder)
  other_tfds = FakeTfds(monkeypatch, other_root)
  input_pipeline.load(other)
  assert other_tfds.reads == ['train', 'test']


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'manifest'])
def test_a_damaged_entry_is_rebuilt_with_a_log_line(setup, caplog, damage):
  config, tfds = setup
  first = input_pipeline.load(config)
  folder = pathlib.Path(input_pipeline._data_cache(config).folder)
  images = folder / 'train.images.npy'
  if damage == 'truncate':
    images.write_bytes(images.read_bytes()[:-1000])
  elif damage == 'flip':
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF
    images.write_bytes(bytes(raw))
  else:
    (folder / 'train.json').write_text('{"key": ')
  with caplog.at_level(logging.INFO, logger='absl'):
    again = input_pipeline.load(config)
  assert tfds.reads == ['train', 'test', 'train']
  assert 'mnist/train' in caplog.text and 'rebuilding' in caplog.text
  assert_same(first, again)
  input_pipeline.load(config)  # Rebuilt: served from the cache again.
  assert tfds.reads == ['train', 'test', 'train']


def snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*'))}


def test_the_data_dir_is_never_written(setup, tmp_path, caplog):
  config, tfds = setup
  before = snapshot(tfds.root)
  os.chmod(tfds.data_dir, 0o555)
  try:
    input_pipeline.load(config)
    input_pipeline.load(config)
    # Even a --cache_dir inside the data dir is refused, not written.
    inside = config.replace(cache_dir=str(tfds.root / 'cache'))
    with caplog.at_level(logging.WARNING, logger='absl'):
      input_pipeline.load(inside)
  finally:
    os.chmod(tfds.data_dir, 0o755)
  assert snapshot(tfds.root) == before
  assert 'inside the TFDS data dir' in caplog.text
  assert tfds.reads == ['train', 'test'] * 2


def test_an_unusable_cache_dir_warns_once_and_the_run_goes_on(setup, tmp_path,
                                                               caplog):
  config, tfds = setup
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  config = config.replace(cache_dir=str(blocker / 'cache'))
  with caplog.at_level(logging.WARNING, logger='absl'):
    first = input_pipeline.load(config)
    input_pipeline.load(config)
  assert caplog.text.count('is off') == 1
  assert len(first.train) == SIZES['train'] - 16
  assert tfds.reads == ['train', 'test'] * 2


def test_mock_data_neither_uses_nor_fills_the_cache(mock_tfds, tmp_path):
  root = tmp_path / 'tfds'
  config = tiny_config(root, cache_dir=str(tmp_path / 'cache'))
  # An entry of the "real" dataset in this data dir must not replace mocks.
  real = split_arrays('test')
  data_cache.DataCache(config.cache_dir, 'mnist', str(root)).store(
      'test', real.images, real.labels, INFO.to_dict(), str(prepare(root)))
  before = snapshot(tmp_path / 'cache')
  data = input_pipeline.load(config)
  assert len(data.test) == MOCK_EXAMPLES
  assert snapshot(tmp_path / 'cache') == before


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv('CNN_JAX_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert data_cache.default_root() == str(tmp_path / 'xdg' / 'cnn_jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert data_cache.default_root() == os.path.expanduser(
      os.path.join('~', '.cache', 'cnn_jax'))
  monkeypatch.setenv('CNN_JAX_CACHE_DIR', str(tmp_path / 'mine'))
  assert data_cache.resolve_root() == str(tmp_path / 'mine')
  assert data_cache.resolve_root(str(tmp_path / 'flag')) == str(
      tmp_path / 'flag')


# A whole run from a warm cache: no TFDS decoding, no TensorFlow.
_RUN = r'''
import atexit, json, sys
from absl import app
from cnn_jax import main
atexit.register(lambda: print('MODULES ' + json.dumps(
    sorted(m for m in ('tensorflow', 'matplotlib', 'keras') if m in sys.modules))))
app.run(main.main)
'''


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', _RUN, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_a_warm_cache_trains_without_tensorflow_and_caches_programs(tmp_path):
  root, cache = tmp_path / 'tfds', tmp_path / 'cache'
  source = prepare(root)
  config = tiny_config(root, cache_dir=str(cache))
  entries = data_cache.DataCache(str(cache), 'mnist', str(root))
  for split, n in (('train', 160), ('test', 64)):
    rng = np.random.default_rng(len(split))
    entries.store(split, rng.integers(0, 256, (n, 28, 28, 1), np.uint8),
                  rng.integers(0, 10, n, np.int32), INFO.to_dict(),
                  str(source))
  args = [f'--tfds_data_dir={root}', f'--cache_dir={cache}', '--nodownload',
          '--val_examples=32', '--batch_size=32', '--eval_batch_size=64',
          '--epochs=1', '--host_devices=1']
  # --nocompilation_cache: nothing under CACHE/xla.
  off = _main(f'--workdir={tmp_path / "a"}', '--nocompilation_cache', *args)
  assert off.returncode == 0, off.stderr[-3000:]
  assert off.stdout.strip().splitlines()[-1] == 'MODULES []'
  assert not (cache / 'xla').exists()
  assert config.cache  # On by default.
  # On by default: the first run stores programs, the second loads them.
  runs = [_main(f'--workdir={tmp_path / w}', *args) for w in ('b', 'c')]
  for run in runs:
    assert run.returncode == 0, run.stderr[-3000:]
  assert any((cache / 'xla').iterdir())
  first, second = (json.loads((tmp_path / w / 'results.json').read_text())
                   for w in ('b', 'c'))
  assert first['members'] == second['members']
  hits = [re.search(r'\((\d+) from the persistent cache\)', r.stderr)
          for r in runs]
  assert hits[0] and hits[1], runs[1].stderr[-3000:]
  assert int(hits[1].group(1)) > int(hits[0].group(1)), [h.group(0) for h in hits]
