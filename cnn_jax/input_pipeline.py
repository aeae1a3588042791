"""MNIST-shaped TFDS image-classification data, held in memory.

TFDS reads and decodes the dataset once, and `cnn_jax.data_cache` keeps
the decoded arrays for later runs (which then import neither TFDS's readers
nor TensorFlow); the arrays (uint8 images, int labels) then live on the
accelerator, and each epoch is a seeded permutation of indices computed on
device. Normalization and one-hot encoding happen inside the jitted step
(`preprocess`), so the input never stalls training.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import data_cache
from cnn_jax.config import Config, CnnJaxError

# The one permutation of --permute_pixels: fixed, whatever the run's seed.
PERMUTATION_SEED = 0x5EED
DATA_DIR_HINT = ('point --tfds_data_dir (or $TFDS_DATA_DIR) at a TFDS data '
                 'dir that holds it (DIR/<dataset>/<version>/)')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What models, analysis and inference need to know about a dataset.

  Training saves it in the workdir, so inference needs no TFDS.
  """

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, ...]
  version: str = ''

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready, with the input contract the models are trained on."""
    return {'name': self.name, 'version': self.version,
            'num_classes': self.num_classes,
            'class_names': list(self.class_names),
            'image_shape': list(self.image_shape),
            'input': INPUT_CONTRACT}

  def same_task(self, other: 'DatasetInfo') -> bool:
    """Whether a model of one classifies the other's images: same classes
    (names, in order) and the same image shape."""
    return (tuple(self.class_names), tuple(self.image_shape)) == (
        tuple(other.class_names), tuple(other.image_shape))

  def describe(self) -> str:
    """``mnist (10 classes, images 28x28x1)``, for error messages."""
    shape = 'x'.join(str(d) for d in self.image_shape)
    return f'{self.name} ({self.num_classes} classes, images {shape})'

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'DatasetInfo':
    return cls(name=str(d['name']), num_classes=int(d['num_classes']),
               class_names=tuple(str(c) for c in d['class_names']),
               image_shape=tuple(int(x) for x in d['image_shape']),
               version=str(d.get('version', '')))


# What `normalize` expects and does, as saved with the dataset info and in
# exported models.
INPUT_CONTRACT = {'dtype': 'uint8', 'layout': 'NHWC', 'value_range': [0, 255],
                  'normalization': 'x / 255 (float32 in [0, 1])'}


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  info: DatasetInfo
  train: Split | None
  val: Split | None
  test: Split | None


def _online(host: str = 'storage.googleapis.com', timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _mocked(builder) -> bool:
  """True under `tfds.testing.mock_data`, which serves data without files."""
  fn = getattr(builder.download_and_prepare, '__name__', '')
  return fn.startswith('mock_')


def _mock_data_active() -> bool:
  """`_mocked` before any builder: only an imported TFDS can be mocked."""
  tfds = sys.modules.get('tensorflow_datasets')
  builder = getattr(getattr(tfds, 'core', None), 'DatasetBuilder', None)
  fn = getattr(builder, 'download_and_prepare', None)
  return getattr(fn, '__name__', '').startswith('mock_')


def get_builder(config: Config):
  """Returns a prepared TFDS builder, downloading only when it can succeed."""
  import tensorflow_datasets as tfds  # Its builders need no TensorFlow.
  data_dir = config.data_dir
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CnnJaxError(f'unknown --dataset={config.dataset!r}: {first}') from e
  if not builder.is_prepared() and not _mocked(builder):
    if not config.download:
      raise CnnJaxError(f'dataset {config.dataset!r} is not prepared in {where} '
                        f'and --nodownload was given; {DATA_DIR_HINT}')
    if not _online():
      raise CnnJaxError(f'dataset {config.dataset!r} is not prepared in {where} '
                        f'and there is no network to download it; {DATA_DIR_HINT}')
    try:
      builder.download_and_prepare()
    except Exception as e:
      raise CnnJaxError(f'could not download {config.dataset!r} into {where} '
                        f'({type(e).__name__}: {str(e)[:200]}); {DATA_DIR_HINT}'
                        ) from e
  return builder


def dataset_info(builder) -> DatasetInfo:
  """Reads classes and image shape from the TFDS info, never from constants."""
  import tensorflow_datasets as tfds
  features = builder.info.features
  name = builder.info.full_name
  if 'image' not in features or 'label' not in features:
    raise CnnJaxError(f'dataset {name!r} is not an image-classification dataset '
                      '(it needs "image" and "label" features)')
  label = features['label']
  if not isinstance(label, tfds.features.ClassLabel):
    raise CnnJaxError(f'dataset {name!r} has no class labels')
  shape = tuple(features['image'].shape)
  if None in shape or len(shape) != 3:
    raise CnnJaxError(f'dataset {name!r} has images of variable shape {shape}; '
                      'only fixed-shape (MNIST-like) images are supported')
  return DatasetInfo(name=builder.info.name, num_classes=label.num_classes,
                     class_names=tuple(label.names), image_shape=shape,
                     version=str(builder.info.version))


def _read_split(builder, split: str, limit: int = 0) -> Split:
  """Decodes a TFDS split (its first ``limit`` examples when > 0)."""
  import tensorflow as tf  # Deferred: importing TF costs seconds.
  import tensorflow_datasets as tfds
  # TF only reads files here: keep it off the GPU/TPU that JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if limit:
    ds = ds.take(limit)
  images, labels = [], []
  for batch in tfds.as_numpy(ds.batch(10_000)):
    images.append(batch['image'])
    labels.append(batch['label'])
  return Split(np.concatenate(images).astype(np.uint8),
               np.concatenate(labels).astype(np.int32))


def load(config: Config, splits: Sequence[str] = ('train', 'val', 'test')
         ) -> Dataset:
  """Loads the requested splits into memory.

  'val' is the last `config.val_examples` examples of the TFDS train split and
  'train' the rest (optionally its first `config.train_examples`), so the two
  never overlap and test is never used for model selection. With
  ``permute_pixels`` every image's pixels are shuffled by one fixed order.
  """
  wanted = (['train'] if 'train' in splits or 'val' in splits else []) + (
      ['test'] if 'test' in splits else [])
  info, read = _read_splits(config, wanted)
  out: dict[str, Split | None] = {'train': None, 'val': None, 'test': None}
  if 'train' in splits or 'val' in splits:
    full = read['train']
    n_val = config.val_examples
    if n_val >= len(full) or (n_val == 0 and 'val' in splits):
      raise CnnJaxError(f'--val_examples={n_val} must be between 1 and '
                        f'{len(full) - 1} (the train split has {len(full)})')
    cut = len(full) - n_val
    train = Split(full.images[:cut], full.labels[:cut])
    if config.train_examples:
      train = Split(train.images[:config.train_examples],
                    train.labels[:config.train_examples])
    out['train'] = train if 'train' in splits else None
    out['val'] = Split(full.images[cut:], full.labels[cut:]) if 'val' in splits else None
  if 'test' in splits:
    test = read['test']
    if config.test_examples:
      test = Split(test.images[:config.test_examples],
                   test.labels[:config.test_examples])
    out['test'] = test
  if config.permute_pixels:
    out = {k: v if v is None else Split(permute_pixels(v.images), v.labels)
           for k, v in out.items()}
  return Dataset(info=info, **out)


def pixel_permutation(image_shape: Sequence[int]) -> np.ndarray:
  """The fixed order of ``--permute_pixels``: a permutation of the H*W
  positions (every channel moves alike), the same for every split and run."""
  h, w = image_shape[:2]
  return np.random.default_rng(PERMUTATION_SEED).permutation(h * w)


def permute_pixels(images: np.ndarray) -> np.ndarray:
  """uint8 NHWC images with their pixel positions shuffled by
  `pixel_permutation`."""
  n, h, w, c = images.shape
  order = pixel_permutation((h, w))
  return images.reshape(n, h * w, c)[:, order].reshape(n, h, w, c)


def _data_cache(config: Config) -> data_cache.DataCache | None:
  """The decoded-data cache of ``config``'s dataset, or None when off.

  Off under `tfds.testing.mock_data` too: its data is not the dataset's,
  and an entry of the real dataset must not stand in for it.
  """
  if (not config.cache or '://' in (config.data_dir or '')
      or _mock_data_active()):
    return None
  cache = data_cache.DataCache(data_cache.resolve_root(config.cache_dir),
                               config.dataset, config.data_dir)
  return cache if cache.usable() else None


def _read_splits(config: Config, names: Sequence[str]
                 ) -> tuple[DatasetInfo, dict[str, Split]]:
  """Whole TFDS splits and the dataset info: from the cache, else TFDS.

  Splits read from TFDS are stored in the cache.
  """
  cache = _data_cache(config)
  info, out = None, {}
  for name in names if cache else ():
    entry = cache.load(name)
    if entry is not None:
      info = DatasetInfo.from_dict(entry.info)
      out[name] = Split(entry.images, entry.labels)
  if info is not None and len(out) == len(names):
    return info, out
  builder = get_builder(config)
  info = dataset_info(builder)
  for name in names:
    if name in out:
      continue
    limit = config.test_examples if name == 'test' and not cache else 0
    out[name] = _read_split(builder, name, limit)
    if cache:
      cache.store(name, out[name].images, out[name].labels, info.to_dict(),
                  builder.data_dir)
  return info, out


def normalize(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1] (what the model sees everywhere)."""
  return images.astype(jnp.float32) / 255.0


def one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """Integer labels -> categorical (one-hot) float targets."""
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def preprocess(images: jax.Array, labels: jax.Array, num_classes: int
               ) -> tuple[jax.Array, jax.Array]:
  """A batch as the model trains on it: normalized images, one-hot labels."""
  return normalize(images), one_hot(labels, num_classes)


def epoch_permutation(data_key: jax.Array, epoch: int | jax.Array,
                      num_examples: int) -> jax.Array:
  """The example order of one epoch: a pure function of (seed key, epoch).

  A resumed run recomputes exactly the order the interrupted run used.
  """
  return jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                num_examples)


