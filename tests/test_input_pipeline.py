"""TFDS loading (on mock data), splits, preprocessing and data order."""

import jax
import numpy as np
import pytest

from cnn_jax import input_pipeline
from cnn_jax.config import CnnJaxError
from conftest import MOCK_EXAMPLES, tiny_config


def test_load_shapes_dtypes_and_info(mock_tfds, tmp_path):
  data = input_pipeline.load(tiny_config(tmp_path, val_examples=56))
  assert data.info.num_classes == 10
  assert data.info.class_names == tuple(str(i) for i in range(10))
  assert data.info.image_shape == (28, 28, 1)
  assert data.train.images.shape == (MOCK_EXAMPLES - 56, 28, 28, 1)
  assert data.val.images.shape == (56, 28, 28, 1)
  assert data.test.images.shape == (MOCK_EXAMPLES, 28, 28, 1)
  for split in (data.train, data.val, data.test):
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < 10


def test_val_split_is_held_out_of_train_and_disjoint(mock_tfds, tmp_path):
  data = input_pipeline.load(tiny_config(tmp_path, val_examples=64))
  full = input_pipeline.load(tiny_config(tmp_path, val_examples=1))
  # Train + val are exactly the TFDS train split, in order, without overlap.
  together = np.concatenate([data.train.images, data.val.images])
  np.testing.assert_array_equal(together, np.concatenate(
      [full.train.images, full.val.images]))
  train_rows = {r.tobytes() for r in data.train.images}
  assert not any(r.tobytes() in train_rows for r in data.val.images)


def test_train_examples_and_test_examples_limit(mock_tfds, tmp_path):
  data = input_pipeline.load(tiny_config(tmp_path, train_examples=50,
                                         test_examples=30))
  assert len(data.train) == 50 and len(data.test) == 30


def test_too_many_val_examples_is_an_error(mock_tfds, tmp_path):
  with pytest.raises(CnnJaxError, match='val_examples'):
    input_pipeline.load(tiny_config(tmp_path, val_examples=MOCK_EXAMPLES))


def test_preprocess_normalizes_and_one_hot_encodes():
  images = np.array([[[[0]], [[255]]]], np.uint8)  # 1x2x1x1
  x, y = input_pipeline.preprocess(images, np.array([3]), 10)
  np.testing.assert_allclose(np.asarray(x).ravel(), [0.0, 1.0])
  assert x.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(y), np.eye(10)[[3]])


def test_epoch_permutation_is_seeded_and_changes_per_epoch():
  key = jax.random.PRNGKey(0)
  p0 = np.asarray(input_pipeline.epoch_permutation(key, 0, 100))
  assert sorted(p0) == list(range(100))
  np.testing.assert_array_equal(
      p0, np.asarray(input_pipeline.epoch_permutation(key, 0, 100)))
  assert not np.array_equal(
      p0, np.asarray(input_pipeline.epoch_permutation(key, 1, 100)))
  assert not np.array_equal(p0, np.asarray(input_pipeline.epoch_permutation(
      jax.random.PRNGKey(1), 0, 100)))


def test_missing_dataset_offline_says_how_to_fix(tmp_path):
  config = tiny_config(tmp_path / 'empty', download=False)
  with pytest.raises(CnnJaxError, match='tfds_data_dir'):
    input_pipeline.load(config)
  assert not (tmp_path / 'empty' / 'downloads').exists()


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(CnnJaxError, match='unknown --dataset'):
    input_pipeline.get_builder(tiny_config(tmp_path, dataset='no_such_set'))


def test_non_image_dataset_is_rejected(tmp_path):
  import tensorflow_datasets as tfds
  builder = tfds.builder('imdb_reviews', data_dir=str(tmp_path))
  with pytest.raises(CnnJaxError, match='not an image-classification'):
    input_pipeline.dataset_info(builder)


def test_other_mnist_shaped_datasets_read_their_own_classes(tmp_path):
  import tensorflow_datasets as tfds
  info = input_pipeline.dataset_info(
      tfds.builder('fashion_mnist', data_dir=str(tmp_path)))
  assert info.num_classes == 10 and info.class_names[0] == 'T-shirt/top'


def test_permute_pixels_shuffles_every_split_by_one_fixed_order(mock_tfds,
                                                               tmp_path):
  plain = input_pipeline.load(tiny_config(tmp_path))
  config = tiny_config(tmp_path, permute_pixels=True)
  shuffled = input_pipeline.load(config)
  order = input_pipeline.pixel_permutation((28, 28))
  assert sorted(order) == list(range(28 * 28))
  assert not np.array_equal(order, np.arange(28 * 28))
  for split in ('train', 'val', 'test'):
    a, b = getattr(plain, split), getattr(shuffled, split)
    np.testing.assert_array_equal(a.labels, b.labels)
    n = len(a)
    np.testing.assert_array_equal(
        a.images.reshape(n, -1, 1)[:, order], b.images.reshape(n, -1, 1))
  # The same order for every run, whatever its seed.
  again = input_pipeline.load(config.replace(seed=5))
  np.testing.assert_array_equal(again.test.images, shuffled.test.images)


def test_permuted_pixels_and_augmentation_do_not_mix(tmp_path):
  from cnn_jax.config import validate
  with pytest.raises(CnnJaxError, match='--augment acts on neighbouring '
                     'pixels.*turn it off'):
    validate(tiny_config(tmp_path, permute_pixels=True, augment=True))
