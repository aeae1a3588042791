"""The explorer's panels, computed without a browser (`cnn_jax.explore`):
every panel's numbers for a single run, a K-member run, an ensemble and a
non-MNIST class list, checked against the model's own ``apply``, the
report's capture and the predict mode's readers. The page in a real browser
is tested in test_explore_browser.py."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import socket

import jax
import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from cnn_jax import inference, input_pipeline, train
from cnn_jax.analysis import intermediates
from cnn_jax.config import CnnJaxError
from cnn_jax.explore import networks as networks_lib
from cnn_jax.explore import page, panels, pictures, server
from cnn_jax.preprocess_image import mnist_style
from conftest import MOCK_EXAMPLES, tiny_config
from helpers.images import draw_seven, gray, png_bomb
from helpers.requirements import require

FASHION = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
           'Shirt', 'Sneaker', 'Bag', 'Ankle <boot>')


def _png(img: Image.Image) -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, format='PNG')
  return buffer.getvalue()


@pytest.fixture(scope='module')
def seven() -> np.ndarray:
  """A drawn 7, preprocessed: uint8 [28, 28, 1]."""
  return mnist_style(gray(draw_seven()))[..., None]


@pytest.fixture(scope='module')
def simple(trained_simple) -> networks_lib.Networks:
  return networks_lib.load(trained_simple[1])


@pytest.fixture(scope='module')
def two_members(tmp_path_factory) -> str:
  """A tiny ``--num_models=2`` SimpleCNN run."""
  root = tmp_path_factory.mktemp('k2')
  config = tiny_config(root / 'tfds', num_models=2)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train.train_and_evaluate(config, str(root / 'run'))
  return str(root / 'run')


@pytest.fixture(scope='module')
def ensemble_dir(trained_simple, trained_deep, tmp_path_factory) -> str:
  """A ``--mode=ensemble`` workdir of the tiny SimpleCNN and DeepCNN."""
  from cnn_jax import ensemble
  out = str(tmp_path_factory.mktemp('ensemble') / 'both')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    ensemble.build(trained_simple[0], [trained_simple[1], trained_deep[1]],
                   out)
  return out


def _x(image: np.ndarray) -> jax.Array:
  return input_pipeline.normalize(image[None])


def _check_inside(nets: networks_lib.Networks, network: int,
                  image: np.ndarray, model, variables,
                  completeness: bool = False) -> None:
  """The panel's numbers are the model's own, network by network."""
  probs, inside = nets.collect(nets.dispatch(image, network))
  x = _x(image)
  logits = np.asarray(model.apply(variables, x, train=False))[0]
  expected = np.exp(logits - logits.max())
  expected /= expected.sum()
  np.testing.assert_allclose(inside.probabilities, expected, atol=1e-5)
  np.testing.assert_allclose(probs[network], expected, atol=1e-5)
  assert inside.predicted == int(np.argmax(logits))
  # Stage maps: exactly the report's capture (names, order, values).
  captured = intermediates.capture(model, variables, x)
  assert [s.name for s in inside.stages] == [fm.name for fm in captured]
  for stage, values, fm in zip(inside.stages, inside.maps, captured):
    assert stage.shape == values.shape == fm.value.shape[1:]
    np.testing.assert_allclose(values, fm.value[0], atol=1e-5)
  # Integrated gradients: zero where the input is black; they add up to
  # the logit gap between the input and a black image (completeness).
  black = np.asarray(model.apply(variables, np.zeros_like(x), train=False))[0]
  gap = logits[inside.predicted] - black[inside.predicted]
  assert inside.logit_gap == pytest.approx(gap, abs=1e-4)
  assert np.all(inside.saliency[image[..., 0] == 0] == 0)
  cls = jax.numpy.int32(inside.predicted)
  np.testing.assert_allclose(inside.saliency, networks_lib.integrated_gradients(
      model, variables, x, cls, networks_lib.IG_STEPS).sum(-1), atol=1e-5)
  assert inside.saliency.sum() == pytest.approx(gap, rel=0.05, abs=0.01)
  if completeness:  # With a fine path the sum is the gap (one compile more).
    fine = networks_lib.integrated_gradients(model, variables, x, cls, 256)
    assert float(fine.sum()) == pytest.approx(gap, rel=0.01, abs=1e-3)
  # Occlusion: each pixel's mean drop over the squares covering it.
  masks = networks_lib.occlusion_masks((28, 28), *networks_lib.OCCLUSION)
  covered = np.asarray(x) * (1 - masks[..., None])
  p = np.asarray(jax.nn.softmax(model.apply(variables, covered,
                                            train=False)))
  drops = inside.probabilities[inside.predicted] - p[:, inside.predicted]
  expected_map = (drops[:, None, None] * masks).sum(0) / masks.sum(0)
  np.testing.assert_allclose(inside.occlusion, expected_map, atol=1e-5)


def test_occlusion_squares_cover_every_pixel():
  masks = networks_lib.occlusion_masks((28, 28), 7, 3)
  assert masks.shape == (64, 28, 28)
  assert masks.sum((1, 2)).tolist() == [49.0] * 64
  assert masks.sum(0).min() >= 1
  assert masks[-1, 21:, 21:].all()


def test_single_run_panels(trained_simple, simple, seven):
  restored = inference.restore(trained_simple[1])
  assert [n.name for n in simple.networks] == [trained_simple[1]]
  kinds = {s.name: s.kind for s in simple.stages(0)}
  assert kinds == {'conv1': 'convolution', 'conv1_relu': 'ReLU',
                   'pool1': 'max-pool', 'conv2': 'convolution',
                   'conv2_relu': 'ReLU', 'pool2': 'max-pool',
                   'conv3': 'convolution', 'conv3_relu': 'ReLU'}
  assert [s.conv for s in simple.stages(0)][:3] == ['conv1'] * 3
  _check_inside(simple, 0, seven, restored.model,
                restored.network_variables(0), completeness=True)
  # The decision is predict's, from the same preprocessing.
  ens = inference.load(trained_simple[1])
  np.testing.assert_allclose(simple.probabilities(seven),
                             ens.member_probabilities(seven[None])[:, 0],
                             atol=1e-5)


def test_k_member_run_panels(two_members, seven):
  nets = networks_lib.load(two_members)
  restored = inference.restore(two_members)
  assert [n.name for n in nets.networks] == [f'{two_members}#seed0',
                                             f'{two_members}#seed1']
  assert [(n.run, n.member) for n in nets.networks] == [(0, 0), (0, 1)]
  for k in (0, 1):
    member = restored.network_variables(k)
    _check_inside(nets, k, seven, restored.model, member)
    kernel = np.asarray(member['params']['conv2']['kernel'])
    np.testing.assert_array_equal(nets.kernels(k)['conv2'], kernel)
  probs = nets.probabilities(seven)
  expected = inference.load(two_members).member_probabilities(seven[None])
  np.testing.assert_allclose(probs, expected[:, 0], atol=1e-5)
  assert not np.allclose(probs[0], probs[1])  # Two different seeds.


@pytest.fixture(scope='module')
def ensemble_nets(ensemble_dir) -> networks_lib.Networks:
  return networks_lib.load(ensemble_dir)


def test_ensemble_workdir_panels(ensemble_dir, ensemble_nets, trained_deep,
                                 seven):
  nets = ensemble_nets
  assert [n.model for n in nets.networks] == ['simple_cnn', 'deep_cnn']
  assert [s.name for s in nets.stages(0)][0] == 'conv1'
  deep = {s.name: s.kind for s in nets.stages(1)}
  assert deep['bn1_1'] == 'batch norm' and deep['pool2'] == 'max-pool'
  assert 'dropout' not in deep.values()  # Eval-mode identity, dropped.
  restored = inference.restore(trained_deep[1])
  _check_inside(nets, 1, seven, restored.model,
                restored.network_variables(0))
  explorer = panels.Explorer([nets])
  answer = explorer.answer(seven, [1])[0]
  ens = inference.load(ensemble_dir)
  np.testing.assert_allclose(answer.decision.probabilities,
                             ens.probabilities(seven[None])[0], atol=1e-5)
  assert answer.decision.member_names == tuple(n.name for n in ens.networks)


def test_decision_agreement_in_words():
  names = ('a', 'b', 'c')
  probs = np.array([[0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
  d = panels.Decision(('zero', 'one', 'two'), names, probs)
  assert d.prediction == 1 and d.agreeing == 2
  assert d.agreement() == ('2 of 3 networks answer “one” (c says “zero”); '
                           'their probabilities of “one” range from 30% to '
                           '90%.')
  assert [r['agrees'] for r in d.rows()] == [True, True, False]
  assert d.label() == pytest.approx({'zero': 0.3, 'one': 19 / 30,
                                     'two': 0.2 / 3})
  same = panels.Decision(('zero', 'one'), names[:2],
                         np.array([[0.2, 0.8], [0.4, 0.6]]))
  assert same.agreement().startswith('All 2 networks answer “one”')
  assert panels.Decision(('x', 'y'), ('only',),
                         np.array([[0.5, 0.5]])).agreement() == ''


def test_channel_beside_its_filter(simple, seven):
  _, inside = simple.collect(simple.dispatch(seven, 0))
  kernels = simple.kernels(0)
  ch = panels.channel(inside, kernels, 'pool2', 5)
  assert ch.conv == 'conv2' and ch.inputs == 32
  np.testing.assert_allclose(ch.filter, kernels['conv2'][..., 5].mean(2))
  names = [s.name for s in inside.stages]
  np.testing.assert_array_equal(ch.values,
                                inside.maps[names.index('pool2')][..., 5])
  clipped = panels.channel(inside, kernels, 'conv1', 999)
  assert clipped.index == 31 and clipped.inputs == 1
  np.testing.assert_allclose(clipped.filter, kernels['conv1'][:, :, 0, 31])
  html = page.channel(ch, 0)
  assert 'data-stage="pool2"' in html and 'data-channel="5"' in html
  assert 'Filter 5 of conv2' in html and 'over its 32 input channels' in html


def test_what_if_moves_and_covers(simple, seven):
  explorer = panels.Explorer([simple])
  w = explorer.what_if(seven, 1, -2, 5, 6, 4)
  x = seven[..., 0] / 255.0
  expected = np.zeros_like(x)
  expected[1:, :-2] = x[:-1, 2:]  # One down, two left.
  expected[5:9, 6:10] = 0
  np.testing.assert_allclose(w.image, expected, atol=1e-6)
  restored = inference.restore(simple.runs[0].run.workdir)
  logits = restored.model.apply(restored.network_variables(0),
                                expected[None, ..., None], train=False)
  np.testing.assert_allclose(w.after[0].probabilities,
                             np.asarray(jax.nn.softmax(logits))[0],
                             atol=1e-5)
  np.testing.assert_allclose(w.before[0].probabilities,
                             simple.probabilities(seven)[0])
  # Shifts are clipped to what the page offers.
  far = explorer.what_if(seven, 40, 0, 0, 0, 0)
  np.testing.assert_allclose(
      far.image, explorer.what_if(seven, networks_lib.MAX_SHIFT, 0, 0, 0,
                                  0).image)
  html = page.what_if(w, ['simple'])
  assert 'moved -2 right and 1' in html and '4×4 square' in html


def test_other_class_names_everywhere(trained_simple, seven, tmp_path):
  workdir = str(tmp_path / 'fashion_like')
  shutil.copytree(trained_simple[1], workdir)
  path = os.path.join(workdir, 'dataset_info.json')
  info = json.load(open(path))
  info.update(name='fashion_mnist', class_names=list(FASHION))
  with open(path, 'w') as f:
    json.dump(info, f)
  nets = networks_lib.load(workdir)
  explorer = panels.Explorer([nets])
  answer = explorer.answer(seven, [0])[0]
  assert list(answer.decision.label()) == list(FASHION)
  html = (page.members(answer.decision) + page.why(answer, seven)
          + page.what_if(explorer.what_if(seven, 0, 0, 0, 0, 3),
                         ['simple_cnn']))
  name = FASHION[answer.decision.prediction].replace('<', '&lt;').replace(
      '>', '&gt;')
  assert name in html and '<boot>' not in html
  assert 'digit' not in html.lower()


def test_preprocessing_panel_shows_every_step(simple):
  steps = panels.prepare(gray(draw_seven()), simple.image_hw)
  np.testing.assert_array_equal(steps.image, mnist_style(gray(draw_seven())))
  html = page.steps(steps, 'your drawing')
  assert html.count('<figure class="step"') == 5
  for title in ('your input', 'ink', 'cropped', 'fitted', 'model input'):
    assert title in html
  assert 'inverted (it was dark on light)' in html
  assert '220×300' in html and '28×28' in html


def test_drawings_and_uploads_are_read_as_bytes(tmp_path):
  png = _png(draw_seven())
  drawing = panels.read_drawing(panels.DRAWING_PREFIX
                                + base64.b64encode(png).decode())
  np.testing.assert_array_equal(drawing, gray(draw_seven()))
  assert panels.read_drawing('') is None
  transparent = _png(Image.new('RGBA', (50, 50), (0, 0, 0, 0)))
  problems = {
      'empty': (lambda: panels.read_upload(b''), 'empty file'),
      'text': (lambda: panels.read_upload(b'hello, not an image'),
               'not an image'),
      'corrupt': (lambda: panels.read_upload(png[:200]), 'cannot decode'),
      'bomb': (lambda: panels.read_upload(png_bomb()), 'MP limit'),
      'big': (lambda: panels.read_upload(
          b'\0' * (panels.MAX_UPLOAD_BYTES + 1)), 'MiB limit'),
      'transparent': (lambda: panels.prepare(panels.read_upload(transparent),
                                             (28, 28)), 'blank'),
      'jpeg uri': (lambda: panels.read_drawing('data:image/jpeg;base64,AA'),
                   'PNG image'),
      'bad base64': (lambda: panels.read_drawing(panels.DRAWING_PREFIX + '%%'),
                     'PNG image'),
  }
  for name, (read, fragment) in problems.items():
    with pytest.raises(panels.InputProblem, match=fragment):
      read()
  # Nothing was written anywhere, and no path was opened.
  assert not os.listdir(tmp_path)


def test_feature_map_grid_maps_clicks_to_channels():
  maps = np.random.default_rng(0).normal(size=(5, 5, 40)).astype(np.float32)
  g = pictures.grid(maps)
  assert (g.channels, g.cols, g.cell) == (40, 16, 6)
  img = Image.open(io.BytesIO(base64.b64decode(g.uri.split(',', 1)[1])))
  assert img.size == (g.width, g.height) and img.mode == 'P'
  idx = np.asarray(img)
  lo, hi, _ = pictures.scale_for(maps)
  for channel in (0, 17, 39):
    r, c = divmod(channel, g.cols)  # What inside.js computes from a click.
    tile = idx[r * g.cell:r * g.cell + 5, c * g.cell:c * g.cell + 5]
    np.testing.assert_array_equal(
        tile, pictures.levels(maps[..., channel], lo, hi))
  assert g.width * g.zoom <= 440


def test_inside_panel_lists_every_stage(simple, seven):
  explorer = panels.Explorer([simple])
  answer = explorer.answer(seven, [0])[0]
  html = page.inside(answer, 0)
  for s in simple.stages(0):
    assert f'data-stage="{s.name}"' in html
  assert html.count('<img class="px fmap"') == len(simple.stages(0))
  assert '26×26×32' in html and 'max-pool' in html


def test_port_in_use_and_bad_workdirs_fail_before_serving(tmp_path,
                                                          trained_simple):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen(1)
    port = s.getsockname()[1]
    with pytest.raises(CnnJaxError, match=f'port {port} on 127.0.0.1 is in '
                       'use'):
      server.check_port('127.0.0.1', port)
  with pytest.raises(CnnJaxError, match='--port must be between'):
    server.check_port('127.0.0.1', 70000)
  with pytest.raises(CnnJaxError, match='does not exist'):
    networks_lib.load(str(tmp_path / 'missing'))
  with pytest.raises(CnnJaxError, match='no run found'):
    networks_lib.load(str(tmp_path))
  config, workdir = trained_simple
  other = str(tmp_path / 'cifar_like')
  shutil.copytree(workdir, other)
  path = os.path.join(other, 'dataset_info.json')
  info = json.load(open(path))
  info.update(name='cifar10', image_shape=[32, 32, 3])
  with open(path, 'w') as f:
    json.dump(info, f)
  with pytest.raises(CnnJaxError, match='--compare=.*same dataset'):
    server.load_explorer(config, workdir, other)
  with pytest.raises(CnnJaxError, match='--compare=.* holds no run'):
    server.load_explorer(config, workdir, str(tmp_path))
  with pytest.raises(CnnJaxError, match='grayscale'):
    networks_lib.load(other)


def test_page_files_ship_as_package_data():
  """A non-editable install carries the template, canvas and style."""
  import fnmatch
  import pathlib
  import tomllib
  from conftest import REPO
  with open(REPO / 'pyproject.toml', 'rb') as f:
    patterns = tomllib.load(f)['tool']['setuptools']['package-data'][
        'cnn_jax.explore']
  root = REPO / 'cnn_jax' / 'explore'
  files = [str(p.relative_to(root)) for d in ('templates', 'static')
           for p in (root / d).iterdir() if p.is_file()]
  assert {pathlib.Path(f).name for f in files} >= {
      'panels.html.j2', 'canvas.html', 'canvas.js', 'inside.js',
      'explore.css'}
  for name in files:
    assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_page_handlers(ensemble_nets, simple, seven):
  """The events' handlers, without a browser: a drawing, a pick that stays
  across strokes, another network, a what-if move, a bad upload."""
  require(importlib.util.find_spec('gradio') is not None,
          'gradio (the explore extra)')
  from cnn_jax.explore import app
  import gradio as gr
  handlers = app.Page(panels.Explorer([ensemble_nets, simple]),
                      ['both', 'simple'], 'test')
  uri = panels.DRAWING_PREFIX + base64.b64encode(_png(draw_seven())).decode()
  moves = [0, 0, 9, 9, 0]
  out = handlers.on_draw(uri, None, 0, 0, *moves)
  assert len(out) == 2 + 5 * 2 + 2
  assert 'Showing your drawing (220×300 pixels)' in out[0]
  assert all('data-update="1"' in out[i] for i in (1, 3, 4, 5, 6, 12))
  label, state = out[2], out[-1]
  assert list(label) == [str(i) for i in range(10)]
  np.testing.assert_array_equal(state['image'], seven)
  assert 'data-stage="conv1"' in out[6]  # Channel: first stage, channel 0.
  pick = gr.EventData(None, {'stage': 'pool1', 'channel': 3})
  channel, state = handlers.on_pick(state, 0, 0, pick)
  assert 'data-stage="pool1"' in channel and 'data-channel="3"' in channel
  out = handlers.on_draw(uri, state, 0, 0, *moves)
  assert 'data-stage="pool1"' in out[6] and 'data-update="2"' in out[6]
  why, inside, _ = handlers.on_network(state, 1, 0)  # The DeepCNN member.
  assert 'data-stage="bn1_1"' in inside and 'alone' in why
  assert '5×5 square' in handlers.on_what_if(state, 0, 0, 3, 3, 5)
  bad = handlers.on_upload(b'not an image', state, 0, 0, *moves)
  assert 'not an image' in bad[0] and 'error' in bad[0]
  assert len(bad) == len(out)
  assert all(isinstance(o, dict) and o.get('__type__') == 'update'
             for o in bad[1:])


def test_ctrl_c_does_not_wait_forever_for_the_web_server(monkeypatch):
  """A Gradio close that never returns (a request still open) leaves
  Ctrl-C a bounded wait, with a warning; a prompt close is waited for."""
  import threading
  import time
  from absl import logging as absl_logging
  warnings = []
  monkeypatch.setattr(absl_logging, 'warning',
                      lambda msg, *a: warnings.append(msg % a))
  monkeypatch.setattr(server, 'CLOSE_SECONDS', 0.2)
  stuck, closed = threading.Event(), []

  class Stuck:
    def close(self):
      stuck.wait()

  class Quick:
    def close(self):
      closed.append(True)

  started = time.perf_counter()
  server._close(Stuck())
  assert time.perf_counter() - started < 5
  assert len(warnings) == 1 and 'did not close' in warnings[0]
  stuck.set()
  warnings.clear()
  server._close(Quick())
  assert closed == [True] and warnings == []
