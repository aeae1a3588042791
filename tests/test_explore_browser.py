"""``--mode=explore`` as a learner uses it: the real server in a subprocess,
the real page in headless Chromium (Playwright, Debian's /usr/bin/chromium),
offline. One browser session draws a 7, picks a channel, moves and covers
the digit, uploads a PNG and bad files, and stops the server with Ctrl-C.

Under CI=true a missing Gradio, Playwright or Chromium fails these tests
instead of skipping them.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from helpers.images import draw_seven, png_bomb
from helpers.procs import free_port, jax_env
from helpers.requirements import require

CHROMIUM = os.environ.get('CHROMIUM', '/usr/bin/chromium')


@pytest.fixture(scope='module')
def explore_extra() -> None:
  require(importlib.util.find_spec('gradio') is not None,
           'gradio (the explore extra)')


@pytest.fixture(scope='module')
def browser_tools(explore_extra) -> None:
  require(importlib.util.find_spec('playwright') is not None, 'playwright')
  require(os.access(CHROMIUM, os.X_OK), f'Chromium ({CHROMIUM})')


def _png(img: Image.Image) -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, format='PNG')
  return buffer.getvalue()


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'cnn_jax.main',
                         '--mode=explore', *args], capture_output=True,
                        text=True, cwd=REPO, env=jax_env(1), timeout=300)


def _one_error_line(result: subprocess.CompletedProcess, fragment: str
                    ) -> None:
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and fragment in lines[-1], lines
  assert 'Traceback' not in result.stderr


def test_bad_arguments_fail_before_serving(explore_extra, trained_simple,
                                           tmp_path):
  _one_error_line(_cli(f'--workdir={tmp_path / "missing"}'), 'no run found')
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen(1)
    port = s.getsockname()[1]
    _one_error_line(_cli(f'--workdir={trained_simple[1]}', f'--port={port}'),
                    f'port {port} on 127.0.0.1 is in use')
  _one_error_line(_cli(f'--workdir={trained_simple[1]}',
                       f'--port={free_port()}',
                       f'--compare={tmp_path / "nothing"}'),
                  '--compare=')
  assert not os.path.exists(os.path.join(trained_simple[1], 'explore'))


def _upload(page, name: str, data: bytes) -> None:
  """As a user does: the upload button, then a file in the chooser."""
  with page.expect_file_chooser() as chooser:
    page.click('#upload')
  chooser.value.set_files(files=[{'name': name, 'buffer': data,
                                  'mimeType': 'application/octet-stream'}])


def _files(root) -> set[str]:
  return {str(p) for p in root.rglob('*') if '__pycache__' not in p.parts}


def _peak_rss_mb(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def test_draw_pick_upload_in_headless_chromium(browser_tools, trained_simple,
                                               trained_deep, tmp_path):
  from experiments import explore_browser as driver
  home, tmp, cwd = (tmp_path / n for n in ('home', 'tmp', 'cwd'))
  for d in (home, tmp, cwd):
    d.mkdir()
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_simple[1], workdir)
  env = {**jax_env(2), 'HOME': str(home), 'TMPDIR': str(tmp),
         'CNN_JAX_CACHE_DIR': str(tmp_path / 'cache')}
  sources = _files(REPO / 'cnn_jax')
  with driver.serve(workdir, free_port(), compare=trained_deep[1], env=env,
                    cwd=str(cwd)) as server, \
      driver.chromium(CHROMIUM, server.url, str(tmp_path / 'profile')) as (
          page, blocked):
    assert server.url.startswith('http://127.0.0.1:')
    # Draw a 7: the answer, the model's input and every stage appear, for
    # both runs side by side.
    driver.stroke_and_wait(page, driver.DIGITS['7'], runs=2)
    classes = [str(i) for i in range(10)]
    for r in (0, 1):
      assert page.inner_text(f'#members-{r} .prediction') in classes
      assert page.locator(f'#label-{r}').inner_text().strip()
    assert page.locator('#steps figure.step').count() == 5
    assert 'Showing your drawing' in page.inner_text('#message-box')
    stages = page.locator('#inside-0 img.fmap')
    assert stages.count() == 8  # SimpleCNN: conv, ReLU, pool, ..., ReLU.
    assert page.locator('#inside-1 img.fmap').count() >= 10  # DeepCNN.
    assert page.get_attribute('#inside-0 img.fmap >> nth=0',
                              'data-stage') == 'conv1'
    # Pick channel 9 of conv1_relu: it shows beside conv1's filter 9.
    fmap = stages.nth(1)
    cols, cell = (int(fmap.get_attribute(a)) for a in ('data-cols',
                                                         'data-cell'))
    box = fmap.bounding_box()
    natural = fmap.evaluate('e => e.naturalWidth')
    zoom = box['width'] / natural
    fmap.click(position={'x': (9 % cols * cell + 2) * zoom,
                         'y': (9 // cols * cell + 2) * zoom})
    page.wait_for_selector('#channel-0 .panel[data-stage="conv1_relu"]'
                           '[data-channel="9"]')
    assert 'Filter 9 of conv1' in page.inner_text('#channel-0')
    # What if: cover a square.
    size = page.locator('#cover-size input[type=number]')
    size.fill('6')
    size.press('Enter')
    page.wait_for_function('() => document.querySelector("#whatif")'
                           '.innerText.includes("6×6 square")')
    # Upload a PNG.
    driver.note_latest(page)
    _upload(page, 'seven.png', _png(draw_seven()))
    driver.wait_for_update(page, 2)
    assert 'Showing the uploaded file' in page.inner_text('#message-box')
    # Bad uploads: a message in the page; the panels stay; memory bounded.
    before = _peak_rss_mb(server.process.pid)
    transparent = _png(Image.new('RGBA', (64, 64), (0, 0, 0, 0)))
    for name, data, fragment in (
        ('notes.txt', b'this is not an image', 'not an image'),
        ('bomb.png', png_bomb(), 'MP limit'),
        ('empty.png', b'', 'empty'),
        ('clear.png', transparent, 'blank'),
        ('broken.png', _png(draw_seven())[:300], 'cannot decode')):
      _upload(page, name, data)
      page.wait_for_function(
          'f => { const m = document.querySelector("#message-box");'
          ' return m && m.dataset.kind === "error" && m.innerText.includes(f);'
          ' }', arg=fragment)
      assert page.locator('#members-0 .prediction').count() == 1
    assert _peak_rss_mb(server.process.pid) - before < 100
    # It still answers.
    driver.clear(page)
    driver.stroke_and_wait(page, driver.DIGITS['1'], runs=2)
    assert 'Showing your drawing' in page.inner_text('#message-box')
    # The picked channel stays picked for new inputs.
    assert page.get_attribute('#channel-0 .panel', 'data-channel') == '9'
    assert blocked == []
    # Uploads live in the workdir while serving.
    assert os.path.isdir(os.path.join(workdir, 'explore', 'uploads'))
  # Ctrl-C (SIGINT, sent by `serve`) stopped it cleanly.
  assert server.process.returncode == 0, server.output
  assert 'explorer stopped' in server.output
  assert not os.path.exists(os.path.join(workdir, 'explore'))
  for d in (home, tmp, cwd):
    assert not any(d.iterdir()), (d, list(d.iterdir()))
  assert _files(REPO / 'cnn_jax') == sources  # Nor into the package.
