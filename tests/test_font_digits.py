"""The font-rendered digit set: fonts found, labels, seed stability, the
predict preprocessing, the cache, and a clear error without fonts."""

from __future__ import annotations

import io
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from cnn_jax import font_digits, predict, preprocess_image
from cnn_jax.config import CnnJaxError
from conftest import IN_CI, REPO
from helpers.fonts import DEJAVU, MPL_TTF, dejavu_dir


@pytest.fixture(scope='module')
def font_dir(tmp_path_factory) -> str:
  """Four DejaVu faces (three families) shipped with matplotlib, a font
  without digit glyphs, and a file that is not a font."""
  d = pathlib.Path(dejavu_dir(tmp_path_factory.mktemp('fonts')))
  shutil.copy(MPL_TTF / 'LastResortHE-Regular.ttf', d / 'box.ttf')
  (d / 'broken.ttf').write_bytes(b'not a font')
  return str(d)


def test_finds_the_usable_fonts_once_each(font_dir, tmp_path):
  fonts = font_digits.find_fonts([font_dir])
  assert sorted(os.path.basename(f.path) for f in fonts) == sorted(DEJAVU)
  assert {f.family for f in fonts} == {'DejaVu Sans', 'DejaVu Serif',
                                       'DejaVu Sans Mono'}
  # The same face twice (another folder) counts once.
  other = tmp_path / 'other'
  other.mkdir()
  shutil.copy(MPL_TTF / 'DejaVuSans.ttf', other / 'copy.ttf')
  assert len(font_digits.find_fonts([font_dir, str(other)])) == len(DEJAVU)


def test_no_fonts_is_one_clear_error(tmp_path):
  (tmp_path / 'readme.txt').write_text('no fonts here')
  with pytest.raises(CnnJaxError, match='no TrueType/OpenType fonts with the '
                     'digits 0-9 found in .*font-packages.txt'):
    font_digits.load(10, font_dirs=[str(tmp_path)], cache=False)


def test_labels_fonts_and_images(font_dir):
  digits = font_digits.load(30, seed=1, font_dirs=[font_dir], cache=False)
  assert len(digits) == 30 and digits.images.shape == (30, 28, 28, 1)
  assert digits.images.dtype == np.uint8
  np.testing.assert_array_equal(digits.labels, np.arange(30) % 10)
  assert digits.families == 3 and len(digits.fonts) == len(DEJAVU)
  assert set(digits.font_index) <= set(range(len(DEJAVU)))
  assert len(set(digits.font_index)) > 1
  # MNIST-style: light digit on black, centred, a different picture each.
  assert (digits.images[:, 0] == 0).all()
  assert (digits.images[:, :, 0] == 0).all()
  assert digits.images.max((1, 2, 3)).min() > 200  # Full contrast.
  assert len({im.tobytes() for im in digits.images}) == 30


def test_same_seed_same_images_and_each_example_its_own(font_dir):
  a = font_digits.load(20, seed=3, font_dirs=[font_dir], cache=False)
  b = font_digits.load(20, seed=3, font_dirs=[font_dir], cache=False)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.font_index, b.font_index)
  assert a.key == b.key
  c = font_digits.load(20, seed=4, font_dirs=[font_dir], cache=False)
  assert not np.array_equal(a.images, c.images) and c.key != a.key
  # Example i does not depend on how many are drawn.
  short = font_digits.load(7, seed=3, font_dirs=[font_dir], cache=False)
  np.testing.assert_array_equal(short.images, a.images[:7])


def test_rendered_as_png_and_preprocessed_like_predict(font_dir, monkeypatch):
  fonts = font_digits.find_fonts([font_dir])
  pngs = [font_digits.render_png(fonts[i % len(fonts)], i % 10,
                                 np.random.default_rng([0, i]))
          for i in range(40)]
  borders = []
  for png in pngs:
    with Image.open(io.BytesIO(png)) as img:
      assert img.format == 'PNG' and img.mode == 'L'
      a = np.asarray(img)
    borders.append(np.median(np.concatenate([a[0], a[-1]])))
  # Both polarities: dark on light paper, and light on dark.
  assert min(borders) < 80 and max(borders) > 170
  # The set goes through predict's reader and preprocessing, once each.
  calls = {'read': 0, 'style': 0}
  read, style = predict.read_image, preprocess_image.mnist_style

  def counting_read(source, *a, **kw):
    calls['read'] += 1
    return read(source, *a, **kw)

  def counting_style(gray, *a, **kw):
    calls['style'] += 1
    return style(gray, *a, **kw)
  monkeypatch.setattr(predict, 'read_image', counting_read)
  monkeypatch.setattr(preprocess_image, 'mnist_style', counting_style)
  digits = font_digits.load(12, seed=0, font_dirs=[font_dir], cache=False)
  assert calls == {'read': 12, 'style': 12}
  # Example 5, by hand: its PNG, read and preprocessed as predict does.
  rng = np.random.default_rng([0, 5])
  groups = {}
  for i, f in enumerate(fonts):
    groups.setdefault(f.family, []).append(i)
  group = list(groups.values())[int(rng.integers(len(groups)))]
  font = fonts[group[int(rng.integers(len(group)))]]
  png = font_digits.render_png(font, 5, rng)
  expected = style(read(io.BytesIO(png)), (28, 28))
  np.testing.assert_array_equal(digits.images[5, ..., 0], expected)


def test_cached_by_seed_and_fonts(font_dir, tmp_path, monkeypatch):
  rendered = []
  generate = font_digits.generate
  monkeypatch.setattr(font_digits, 'generate',
                      lambda *a, **kw: rendered.append(1) or generate(*a, **kw))
  first = font_digits.load(10, seed=0, font_dirs=[font_dir],
                           cache_dir=str(tmp_path))
  files = list((tmp_path / 'fonts').iterdir())
  assert len(files) == 1 and first.key in files[0].name
  second = font_digits.load(10, seed=0, font_dirs=[font_dir],
                            cache_dir=str(tmp_path))
  assert len(rendered) == 1
  np.testing.assert_array_equal(first.images, second.images)
  assert second.fonts == first.fonts
  # Another font set is another key.
  fewer = tmp_path / 'fewer'
  fewer.mkdir()
  shutil.copy(pathlib.Path(font_dir) / DEJAVU[0], fewer / DEJAVU[0])
  font_digits.load(10, seed=0, font_dirs=[str(fewer)],
                   cache_dir=str(tmp_path))
  assert len(rendered) == 2 and len(list((tmp_path / 'fonts').iterdir())) == 2
  # A damaged entry is rendered again, not used.
  files[0].write_bytes(b'damaged')
  again = font_digits.load(10, seed=0, font_dirs=[font_dir],
                           cache_dir=str(tmp_path))
  assert len(rendered) == 3
  np.testing.assert_array_equal(again.images, first.images)


def test_ci_installs_the_font_packages_the_set_is_drawn_from():
  packages = (REPO / font_digits.PACKAGES_FILE).read_text().split()
  assert 'fonts-dejavu-core' in packages and len(packages) >= 15
  assert 'font-packages.txt' in (REPO / '.ci' / 'run').read_text()
  try:
    fonts = font_digits.find_fonts()
  except CnnJaxError:
    if IN_CI:
      raise
    pytest.skip('no system fonts (.ci/font-packages.txt is not installed)')
  families = {f.family for f in fonts}
  if IN_CI or len(families) >= 40:
    assert len(families) >= 40, sorted(families)
    assert {'DejaVu Sans', 'Humor Sans', 'Purisa'} <= families
