"""A cache of decoded TFDS splits, so later runs skip TFDS and TensorFlow.

Reading MNIST through TFDS decodes 70,000 PNGs (seconds) and imports
TensorFlow (seconds more). The first read of a split stores its uint8 images
and int32 labels as ``.npy`` files beside a JSON manifest; later runs load
them in a fraction of a second. TFDS stays the source: an entry is used only
while everything it was built from is unchanged, and is rebuilt otherwise.

Layout: ``ROOT/data/<dataset>-<hash>/<split>.{json,images.npy,labels.npy}``,
where the hash is of the dataset name and the absolute TFDS data dir. The
manifest holds that key, the dataset version, the TFDS package version, the
shapes, dtypes and blake2b checksums of both arrays, and a fingerprint of the
prepared dataset's files (names, sizes, mtimes) and of its sibling version
folders, so a re-prepared or newly prepared dataset invalidates the entry.
A missing, stale, truncated or corrupt entry is logged in one line and
rebuilt from TFDS, never used. Files are written to a temporary name and
renamed, the manifest last. Nothing is ever written into the data dir.

``ROOT`` is ``--cache_dir``, else ``$CNN_JAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/cnn_jax``, else ``~/.cache/cnn_jax``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from importlib import metadata
from typing import Any

from absl import logging
import numpy as np

FORMAT = 1  # Bump when the layout or manifest changes.
TFDS_DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')
_warned: set[str] = set()  # Cache roots already reported unusable.


def default_root() -> str:
  """The user-level cache dir of cnn_jax (data and compiled programs)."""
  if os.environ.get('CNN_JAX_CACHE_DIR'):
    return os.environ['CNN_JAX_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return os.path.join(os.path.expanduser(base), 'cnn_jax')


def resolve_root(cache_dir: str = '') -> str:
  """``cache_dir`` or the default root, absolute."""
  return os.path.abspath(os.path.expanduser(cache_dir or default_root()))


def tfds_version() -> str:
  """The installed tensorflow_datasets version, without importing it."""
  try:
    return metadata.version('tensorflow-datasets')
  except metadata.PackageNotFoundError:
    return ''


def _within(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def fingerprint(source_dir: str) -> dict[str, Any] | None:
  """Names, sizes and mtimes of a prepared dataset's files and versions.

  ``source_dir`` is the builder's ``DIR/<dataset>/<version>``; its parent's
  folder list is included so preparing another version counts as a change.
  None when the folder is missing.
  """
  try:
    files = []
    for entry in sorted(os.scandir(source_dir), key=lambda e: e.name):
      st = entry.stat()
      files.append([entry.name, st.st_size, st.st_mtime_ns])
    parent = os.path.dirname(source_dir)
    versions = sorted(e.name for e in os.scandir(parent) if e.is_dir())
  except OSError:
    return None
  return {'files': files, 'versions': versions}


def _checksum(array: np.ndarray) -> str:
  return hashlib.blake2b(np.ascontiguousarray(array).data,
                         digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class Entry:
  """One cached split: its arrays and the dataset info it was stored with."""

  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  info: dict[str, Any]


class DataCache:
  """The cached splits of one dataset read from one TFDS data dir."""

  def __init__(self, root: str, dataset: str, data_dir: str | None):
    self.dataset = dataset
    self.data_dir = os.path.abspath(os.path.expanduser(
        data_dir or TFDS_DEFAULT_DATA_DIR))
    digest = hashlib.blake2b(json.dumps([FORMAT, dataset, self.data_dir])
                             .encode(), digest_size=8).hexdigest()
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)
    self.root = root
    self.folder = os.path.join(root, 'data', f'{name}-{digest}')

  def usable(self) -> bool:
    """False (with one warning per root) when the cache cannot be written.

    A cache inside the TFDS data dir is refused: the data dir is never
    written, even when it is writable.
    """
    reason = None
    if _within(self.folder, self.data_dir):
      reason = f'it lies inside the TFDS data dir {self.data_dir}'
    else:
      try:
        os.makedirs(self.folder, exist_ok=True)
        if not os.access(self.folder, os.W_OK | os.X_OK):
          reason = 'it is not writable'
      except OSError as e:
        reason = f'it cannot be created ({e.strerror or e})'
    if reason and self.root not in _warned:
      _warned.add(self.root)
      logging.warning('data cache %s is off: %s; reading TFDS each run '
                      '(set --cache_dir, or --nocache)', self.root, reason)
    return reason is None

  def _path(self, split: str, suffix: str) -> str:
    return os.path.join(self.folder, f'{split}.{suffix}')

  def _key(self, split: str) -> dict[str, Any]:
    return {'format': FORMAT, 'dataset': self.dataset,
            'data_dir': self.data_dir, 'split': split,
            'tfds': tfds_version()}

  def load(self, split: str) -> Entry | None:
    """The verified entry of ``split``, or None (logged) to rebuild it."""
    manifest_path = self._path(split, 'json')
    if not os.path.exists(manifest_path):
      logging.info('data cache: no %s/%s yet in %s; reading TFDS once',
                   self.dataset, split, self.folder)
      return None
    try:
      problem, entry = self._verify(split, manifest_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
      problem, entry = f'unreadable ({type(e).__name__}: {e})', None
    if problem:
      logging.warning('data cache: %s/%s in %s is %s; rebuilding it from '
                      'TFDS', self.dataset, split, self.folder, problem)
      return None
    return entry

  def _verify(self, split: str, manifest_path: str
              ) -> tuple[str | None, Entry | None]:
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get('key') != self._key(split):
      return 'stale (built for another key or TFDS version)', None
    if fingerprint(manifest['source_dir']) != manifest['source']:
      return (f'stale (the prepared dataset in {manifest["source_dir"]} '
              'changed)'), None
    arrays = {}
    for name in ('images', 'labels'):
      want = manifest['arrays'][name]
      array = np.load(self._path(split, f'{name}.npy'), allow_pickle=False)
      if (list(array.shape) != want['shape'] or str(array.dtype) !=
          want['dtype']):
        return (f'corrupt ({name}: {array.dtype}{list(array.shape)}, '
                f'expected {want["dtype"]}{want["shape"]})'), None
      if _checksum(array) != want['blake2b']:
        return f'corrupt ({name} checksum mismatch)', None
      arrays[name] = array
    return None, Entry(arrays['images'], arrays['labels'], manifest['info'])

  def store(self, split: str, images: np.ndarray, labels: np.ndarray,
            info: dict[str, Any], source_dir: str) -> None:
    """Writes ``split`` atomically; a failure only logs a warning."""
    source = fingerprint(source_dir)
    if source is None:
      return
    arrays = {'images': np.ascontiguousarray(images, np.uint8),
              'labels': np.ascontiguousarray(labels, np.int32)}
    manifest = {
        'key': self._key(split), 'version': info.get('version', ''),
        'source_dir': os.path.abspath(source_dir), 'source': source,
        'info': info,
        'arrays': {k: {'shape': list(a.shape), 'dtype': str(a.dtype),
                       'blake2b': _checksum(a)} for k, a in arrays.items()}}
    tmp = f'.tmp{os.getpid()}'
    written = []
    try:
      os.makedirs(self.folder, exist_ok=True)
      if os.path.exists(self._path(split, 'json')):
        os.remove(self._path(split, 'json'))  # Half-replaced = a plain miss.
      for name, array in arrays.items():
        path = self._path(split, f'{name}.npy')
        written.append(path + tmp)
        with open(path + tmp, 'wb') as f:
          np.save(f, array, allow_pickle=False)
        os.replace(path + tmp, path)
      path = self._path(split, 'json')
      written.append(path + tmp)
      with open(path + tmp, 'w') as f:
        json.dump(manifest, f, indent=1)
      os.replace(path + tmp, path)
    except OSError as e:
      for path in written:
        with contextlib.suppress(OSError):
          os.remove(path)
      logging.warning('data cache: could not store %s/%s in %s (%s); the run '
                      'goes on without it', self.dataset, split, self.folder,
                      e.strerror or e)
      return
    logging.info('data cache: stored %s/%s (%d examples) in %s',
                 self.dataset, split, len(labels), self.folder)
