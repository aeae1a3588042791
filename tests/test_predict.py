"""Predicting on users' own files: MNIST-style preprocessing, output."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnn_jax import input_pipeline, predict, registry
from cnn_jax.config import Config, CnnJaxError
from cnn_jax.preprocess_image import PreprocessError, mnist_style, to_unit_range
from conftest import real_tfds_dir


# Fixture images, drawn here rather than committed. ---------------------------
def draw_seven(size=(300, 220), ink=0, paper=255, offset=(0, 0),
               mode='L') -> Image.Image:
  """A thick '7' on a plain canvas."""
  img = Image.new(mode, size, paper)
  dx, dy = offset
  ImageDraw.Draw(img).line([(90 + dx, 40 + dy), (190 + dx, 40 + dy),
                            (120 + dx, 190 + dy)], fill=ink, width=14)
  return img


def gray(img: Image.Image) -> np.ndarray:
  return np.asarray(img.convert('L'), np.float32) / 255.0


def bbox(image: np.ndarray, level: int = 64) -> tuple[int, int]:
  rows = np.flatnonzero((image > level).any(1))
  cols = np.flatnonzero((image > level).any(0))
  return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
  ys, xs = np.indices(image.shape)
  total = image.sum()
  return (ys * image).sum() / total, (xs * image).sum() / total


def png_header_only(path: pathlib.Path, width: int, height: int) -> None:
  """A PNG whose header claims width x height (its data is missing)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
                   + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def real_mnist() -> np.ndarray:
  """The first 64 real MNIST test images, uint8 [64, 28, 28]."""
  data_dir = real_tfds_dir()
  if data_dir is None:
    pytest.skip('real MNIST is not prepared')
  config = Config(tfds_data_dir=data_dir, download=False, test_examples=64)
  return input_pipeline.load(config, splits=('test',)).test.images[..., 0]


@pytest.fixture(scope='module')
def classifier(trained_simple) -> predict.Classifier:
  """The tiny trained run, restored once for this module."""
  config, workdir = trained_simple
  return predict.Classifier.restore(config, workdir)


# Preprocessing ------------------------------------------------------------
def test_to_unit_range_accepts_8bit_and_unit_floats():
  levels = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(to_unit_range(levels), [[0, 0.2, 1]], atol=1e-6)
  np.testing.assert_allclose(to_unit_range(levels / 255.0), [[0, 0.2, 1]],
                             atol=1e-6)
  np.testing.assert_allclose(to_unit_range(levels.astype(np.float64)),
                             [[0, 0.2, 1]], atol=1e-6)
  np.testing.assert_array_equal(to_unit_range(np.array([[0, 1]])), [[0, 1]])
  for bad in (np.array([[-1.0, 0.5]]), np.array([[0, 300]]),
              np.array([[np.nan, 0.5]]), np.array([['a', 'b']])):
    with pytest.raises(PreprocessError):
      to_unit_range(bad)


def test_dark_on_light_digit_is_inverted_fitted_and_centred():
  page = Image.new('L', (500, 400), 230)  # Grey paper, a '0' off-centre.
  ImageDraw.Draw(page).ellipse([(60, 40), (180, 240)], outline=20, width=16)
  out = mnist_style(gray(page))
  assert out.shape == (28, 28) and out.dtype == np.uint8
  # Light digit on a black background, as MNIST.
  assert out[:3].max() == out[-3:].max() == out[:, :3].max() == 0
  assert out.max() == 255
  # Longest side fills the 20-pixel box; centre of mass at the centre.
  assert max(bbox(out)) == 20
  cy, cx = center_of_mass(out.astype(np.float64))
  assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75


def test_lopsided_digit_is_moved_rather_than_cut():
  out = mnist_style(gray(draw_seven(size=(500, 400), offset=(-60, -30))))
  assert max(bbox(out)) in (20, 21)  # 20 up to anti-aliasing.
  border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
  assert border.max() == 0


def test_aspect_ratio_is_kept():
  canvas = np.zeros((400, 300), np.float32)
  canvas[50:350, 140:170] = 1.0  # A 300x30 stroke: a '1'.
  h, w = bbox(mnist_style(canvas))
  assert h == 20 and w <= 3


def test_polarity_does_not_matter():
  img = gray(draw_seven())
  diff = mnist_style(img).astype(int) - mnist_style(1.0 - img).astype(int)
  assert np.abs(diff).max() <= 1


def test_preprocessing_an_mnist_style_input_changes_nothing():
  once = mnist_style(gray(draw_seven(size=(640, 480))))
  twice = mnist_style(once / 255.0)
  assert np.abs(once.astype(int) - twice.astype(int)).max() <= 1


def test_blank_image_is_rejected():
  for level in (0.0, 1.0, 0.5):
    with pytest.raises(PreprocessError, match='blank'):
      mnist_style(np.full((40, 30), level, np.float32))


def test_transparent_canvas_reads_like_white_paper(tmp_path):
  on_white = draw_seven()
  rgba = draw_seven(mode='RGBA', ink=(0, 0, 0, 255), paper=(0, 0, 0, 0))
  rgba.save(tmp_path / 'rgba.png')
  on_white.save(tmp_path / 'white.png')
  items = predict.load_inputs([str(tmp_path / 'rgba.png'),
                               str(tmp_path / 'white.png')], (28, 28))
  assert [it.error for it in items] == [None, None]
  diff = items[0].image.astype(int) - items[1].image.astype(int)
  assert np.abs(diff).max() <= 2


def test_real_mnist_images_pass_through_unchanged(real_mnist):
  out = np.stack([mnist_style(im / 255.0) for im in real_mnist])
  diff = np.abs(out.astype(int) - real_mnist.astype(int)).max(axis=(1, 2))
  assert np.mean(diff <= 1) >= 0.95
  for o, im in zip(out, real_mnist):
    assert np.corrcoef(o.ravel(), im.ravel())[0, 1] > 0.99


def test_real_mnist_classified_the_same_after_preprocessing(real_mnist,
                                                            classifier):
  out = np.stack([mnist_style(im / 255.0) for im in real_mnist])
  before = classifier.probabilities(real_mnist[..., None])
  after = classifier.probabilities(out[..., None])
  assert np.abs(before - after).max() < 0.02
  assert np.mean(before.argmax(1) == after.argmax(1)) >= 0.95


@pytest.mark.parametrize('upscale,min_corr', [(1, 0.95), (3, 0.8)])
def test_inverted_png_with_margin_comes_back(real_mnist, tmp_path, upscale,
                                             min_corr):
  paths = []
  for i, im in enumerate(real_mnist[:8]):
    page = Image.fromarray(255 - im).resize((28 * upscale, 28 * upscale),
                                            Image.Resampling.BICUBIC)
    page = np.pad(np.asarray(page), 120, constant_values=255)
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(page).save(paths[-1])
  items = predict.load_inputs(paths, (28, 28))
  corrs = [np.corrcoef(it.image[..., 0].ravel(), im.ravel())[0, 1]
           for it, im in zip(items, real_mnist)]
  assert np.mean(corrs) > min_corr
  assert min(corrs) > 0.6


# Reading files ------------------------------------------------------------
def test_directories_expand_to_their_images_sorted(tmp_path):
  folder = tmp_path / 'digits'
  folder.mkdir()
  draw_seven().save(folder / 'b.png')
  np.save(folder / 'a.npy', np.asarray(draw_seven().resize((28, 28))))
  (folder / 'notes.txt').write_text('not an image')
  draw_seven().save(folder / '.hidden.png')
  (tmp_path / 'empty_dir').mkdir()
  items = predict.load_inputs([str(folder), str(tmp_path / 'empty_dir')],
                              (28, 28))
  assert [os.path.basename(it.path) for it in items] == [
      'a.npy', 'b.png', 'empty_dir']
  assert items[0].error is None and items[1].error is None
  assert 'no image' in items[2].error


def test_bad_files_get_one_line_reasons(tmp_path):
  ok = tmp_path / 'ok.png'
  draw_seven().save(ok)
  (tmp_path / 'garbage.png').write_bytes(os.urandom(2000))
  (tmp_path / 'empty.jpg').write_bytes(b'')
  png_header_only(tmp_path / 'huge.png', 10_000, 8_000)
  (tmp_path / 'truncated.png').write_bytes(ok.read_bytes()[:300])
  np.save(tmp_path / 'wrong.npy', np.zeros((2, 3, 4, 5), np.uint8))
  np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object))
  np.save(tmp_path / 'negative.npy', -np.ones((28, 28)))
  np.save(tmp_path / 'blank.npy', np.zeros((28, 28), np.uint8))
  names = ['ok.png', 'garbage.png', 'empty.jpg', 'huge.png', 'truncated.png',
           'wrong.npy', 'objects.npy', 'negative.npy', 'blank.npy',
           'missing.png']
  items = predict.load_inputs([str(tmp_path / n) for n in names], (28, 28))
  errors = {os.path.basename(it.path): it.error for it in items}
  assert errors['ok.png'] is None
  expected = {'garbage.png': 'not an image', 'empty.jpg': 'empty file',
              'huge.png': 'MP limit', 'truncated.png': 'cannot decode',
              'wrong.npy': 'shape (2, 3, 4, 5)', 'objects.npy': '.npy',
              'negative.npy': 'pixel values', 'blank.npy': 'blank',
              'missing.png': 'no such file'}
  for name, fragment in expected.items():
    assert fragment in errors[name], (name, errors[name])
    assert '\n' not in errors[name]
  big = predict.load_inputs([str(ok)], (28, 28), max_bytes=100)
  assert 'MiB limit' in big[0].error


def test_npy_shapes(tmp_path):
  digit = np.asarray(draw_seven().resize((28, 28)))
  shapes = {'hw.npy': digit, 'hw1.npy': digit[..., None],
            'nhw.npy': np.stack([digit] * 3),
            'nhw1.npy': np.stack([digit] * 2)[..., None] / 255.0}
  for name, array in shapes.items():
    np.save(tmp_path / name, array)
  items = predict.load_inputs([str(tmp_path / n) for n in shapes], (28, 28))
  paths = [os.path.basename(it.path) for it in items]
  assert paths == ['hw.npy', 'hw1.npy', 'nhw.npy[0]', 'nhw.npy[1]',
                   'nhw.npy[2]', 'nhw1.npy[0]', 'nhw1.npy[1]']
  assert all(it.error is None and it.image.shape == (28, 28, 1)
             for it in items)
  np.testing.assert_array_equal(items[0].image, items[-1].image)


# The predict mode ----------------------------------------------------------
def write_inputs(folder: pathlib.Path) -> list[str]:
  """Good and bad inputs, in the order given on a command line."""
  draw_seven().save(folder / 'seven.png')
  draw_seven().convert('RGB').save(folder / 'seven.jpg', quality=90)
  np.save(folder / 'batch.npy', np.stack(
      [np.asarray(draw_seven(offset=(k * 20, 0)).resize((28, 28)))
       for k in range(3)])[..., None])
  (folder / 'garbage.png').write_bytes(os.urandom(500))
  (folder / 'empty.png').write_bytes(b'')
  return [str(folder / n) for n in ('seven.png', 'garbage.png', 'seven.jpg',
                                    'batch.npy', 'empty.png', 'nothere.gif')]


def test_predict_json(trained_simple, classifier, tmp_path, capsys):
  config, workdir = trained_simple
  paths = write_inputs(tmp_path)
  code = predict.main(config, workdir, paths, as_json=True)
  out = capsys.readouterr().out
  records = [json.loads(line) for line in out.splitlines()]
  assert code == predict.EXIT_SOME_FAILED
  assert [os.path.basename(r['path']) for r in records] == [
      'seven.png', 'garbage.png', 'seven.jpg', 'batch.npy[0]', 'batch.npy[1]',
      'batch.npy[2]', 'empty.png', 'nothere.gif']
  bad = {os.path.basename(r['path']): r['error'] for r in records
         if 'error' in r}
  assert set(bad) == {'garbage.png', 'empty.png', 'nothere.gif'}
  good = [r for r in records if 'error' not in r]
  # The same numbers as the model applied directly to the preprocessed input.
  info, variables = classifier.info, classifier.ensemble.runs[0].variables
  model = registry.create_model(config, info.num_classes)
  items = predict.load_inputs(paths, (28, 28))
  images = np.stack([it.image for it in items if it.error is None])
  expected = np.asarray(jax.nn.softmax(model.apply(
      variables, images.astype(np.float32) / 255.0, train=False)))
  for record, p in zip(good, expected):
    assert len(record['probabilities']) == info.num_classes
    np.testing.assert_allclose(record['probabilities'], p, atol=2e-5)
    assert record['prediction'] == int(np.argmax(p))
    assert record['label'] == info.class_names[record['prediction']]


def test_text_mode_reports_bad_files_on_stderr(classifier, tmp_path, capsys):
  paths = write_inputs(tmp_path)
  code = predict.classify_and_report(classifier, paths, top_k=2)
  captured = capsys.readouterr()
  assert code == predict.EXIT_SOME_FAILED
  lines = captured.out.splitlines()
  assert len(lines) == 5
  assert lines[0].startswith(paths[0] + ': ')
  assert all(line.count('%') == 2 for line in lines)
  errors = [line for line in captured.err.splitlines() if ': error: ' in line]
  assert [line.split(': error: ')[0] for line in errors] == [
      paths[1], paths[4], paths[5]]
  assert '3 of 8 inputs' in captured.err
  assert 'Traceback' not in captured.err


def test_all_good_exits_zero_and_saves_figures(classifier, tmp_path, capsys):
  paths = write_inputs(tmp_path)
  good = [paths[0], paths[2], paths[3]]
  figures = tmp_path / 'figures'
  figures.mkdir()
  code = predict.classify_and_report(classifier, good, top_k=99,
                                     save_dir=str(figures))
  out = capsys.readouterr().out.splitlines()
  assert code == 0
  assert len(out) == 5 and all(line.count('%') == 10 for line in out)
  saved = sorted(os.listdir(figures))
  assert saved == ['000_seven_png.png', '001_seven_jpg.png',
                   '002_batch_npy_0.png', '003_batch_npy_1.png',
                   '004_batch_npy_2.png']
  with Image.open(figures / saved[0]) as fig:
    assert fig.size[0] > 500 and fig.size[1] > 200


def test_predict_bad_arguments(trained_simple, tmp_path):
  config, workdir = trained_simple
  with pytest.raises(CnnJaxError, match='needs image'):
    predict.main(config, workdir, [])
  with pytest.raises(CnnJaxError, match='top_k'):
    predict.main(config, workdir, ['x.png'], top_k=0)
  (tmp_path / 'file').write_text('')
  with pytest.raises(CnnJaxError, match='save_preprocessed'):
    predict.main(config, workdir, ['x.png'],
                 save_dir=str(tmp_path / 'file' / 'sub'))
