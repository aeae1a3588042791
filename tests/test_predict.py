"""Predicting on users' own files: reading, classifying, output.

The MNIST-style preprocessing itself is tested in test_preprocess_image.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from cnn_jax import predict, registry
from cnn_jax.config import CnnJaxError
from cnn_jax.preprocess_image import mnist_style
from helpers.images import draw_seven


def png_header_only(path: pathlib.Path, width: int, height: int) -> None:
  """A PNG whose header claims width x height (its data is missing)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
                   + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def classifier(trained_simple) -> predict.Classifier:
  """The tiny trained run, restored once for this module."""
  config, workdir = trained_simple
  return predict.Classifier.restore(config, workdir)


# Reading and preprocessing ------------------------------------------------
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


def test_uploaded_bytes_read_like_files(tmp_path):
  """`read_bytes` gives what the file reader gives, without a path."""
  import io
  path = tmp_path / 'seven.png'
  draw_seven().save(path)
  grays, batch = predict.read_bytes(path.read_bytes())
  assert not batch
  np.testing.assert_array_equal(grays[0], predict.read_image(str(path)))
  buffer = io.BytesIO()
  np.save(buffer, np.zeros((3, 28, 28), np.uint8))
  grays, batch = predict.read_bytes(buffer.getvalue())
  assert batch and len(grays) == 3
  for data, fragment in ((b'', 'empty file'), (b'x' * 50, 'not an image'),
                         (path.read_bytes()[:300], 'cannot decode')):
    with pytest.raises(predict.InputError, match=fragment):
      predict.read_bytes(data)
  with pytest.raises(predict.InputError, match='MiB limit'):
    predict.read_bytes(path.read_bytes(), max_bytes=100)


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
  info = classifier.info
  variables = classifier.ensemble.runs[0].network_variables(0)
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


def test_a_run_on_permuted_pixels_is_not_served(trained_simple, tmp_path):
  import shutil
  from cnn_jax import export
  from cnn_jax import workdir as workdir_lib
  _, workdir = trained_simple
  copy = tmp_path / 'permuted'
  shutil.copytree(workdir, copy)
  saved = json.loads((copy / 'config.json').read_text())
  (copy / 'config.json').write_text(json.dumps({**saved,
                                                'permute_pixels': True}))
  config = workdir_lib.load_config(str(copy))
  for call in (lambda: predict.Classifier.restore(config, str(copy)),
               lambda: export.export(config, str(copy))):
    with pytest.raises(CnnJaxError, match='trained with --permute_pixels'):
      call()
