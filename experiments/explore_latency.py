r"""How fast the explorer (``--mode=explore``) answers a stroke.

Two figures per workdir, medians and 90th percentiles over the strokes:

* ``handler``: the server's work for one stroke, in this process: decoding
  the canvas PNG, the MNIST-style preprocessing, every network's forward
  pass, the feature maps, integrated gradients, the occlusion map, the
  what-if answers and every panel's HTML (`app.Page.on_draw`), after the
  start-up compilation.
* ``browser``: end to end in headless Chromium against the real server
  (``python -m cnn_jax.main --mode=explore`` in a subprocess): from the
  pointer leaving the canvas (the end of a stroke) until every panel of
  the page shows the new answer. Chromium runs on the same machine, so it
  shares the CPU with the server.

  python -m experiments.explore_latency --workdir=runs/fast
  python -m experiments.explore_latency --workdir=runs/fast3 --strokes=30
  python -m experiments.explore_latency --workdir=runs/simple_cnn \
      --compare=runs/deep_cnn --nobrowser
  python -m experiments.explore_latency --workdir=runs/simple_cnn \
      --screenshot=docs/explore.png --strokes=0   # the README's picture

The browser part needs Playwright for Python and a Chromium
(``/usr/bin/chromium``, or ``--chromium=PATH``); it blocks every request
that does not go to the local server and reports any that was attempted.
The helpers here (`serve`, `chromium`, `draw`, `note_latest`,
`wait_for_update`) are also
what the browser test drives the page with.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run (any kind).')
_COMPARE = flags.DEFINE_string('compare', None, 'A second run, side by side.')
_STROKES = flags.DEFINE_integer('strokes', 20, 'Strokes timed per figure.')
_BROWSER = flags.DEFINE_bool('browser', True, 'Also time end to end in '
                             'headless Chromium.')
_CHROMIUM = flags.DEFINE_string('chromium', '/usr/bin/chromium',
                                'The Chromium executable.')
_PORT = flags.DEFINE_integer('port', 7861, 'Port of the served page.')
_SCREENSHOT = flags.DEFINE_string(
    'screenshot', None, 'Save a PNG of the page after drawing a 7, '
    'picking a channel and covering a square (the README\'s picture).')
_JSON = flags.DEFINE_bool('json', False, 'Print the figures as JSON.')

CANVAS = 280  # The canvas's side in CSS pixels.
# One-stroke digits in canvas coordinates.
DIGITS = {
    '7': [(70, 60), (210, 60), (185, 110), (150, 180), (125, 245)],
    '1': [(150, 40), (140, 140), (135, 245)],
    '2': [(75, 95), (110, 50), (175, 50), (205, 95), (185, 145), (80, 240),
          (215, 240)],
    '3': [(75, 60), (200, 60), (130, 130), (205, 175), (160, 240),
          (70, 225)],
    '0': [(140, 40), (90, 70), (75, 140), (90, 210), (140, 245), (190, 210),
          (205, 140), (190, 70), (140, 40)],
    '4': [(175, 245), (175, 40), (60, 170), (225, 170)],
    '6': [(185, 50), (120, 80), (85, 160), (100, 230), (160, 240),
          (190, 190), (150, 150), (95, 185)],
    '9': [(190, 95), (150, 45), (95, 70), (100, 125), (165, 130),
          (190, 95), (170, 245)],
}
CHROMIUM_ARGS = ('--no-sandbox', '--disable-gpu', '--no-first-run',
                 '--disable-background-networking',
                 '--disable-component-update', '--disable-sync')
PANELS = ('members-{r}', 'why-{r}', 'inside-{r}', 'channel-{r}')


# Driving the page (also used by tests/test_explore_browser.py) -----------
@contextlib.contextmanager
def serve(workdir: str, port: int, compare: str | None = None,
          env: dict[str, str] | None = None, cwd: str | None = None,
          timeout: float = 300.0) -> Iterator[tuple[subprocess.Popen, str]]:
  """``python -m cnn_jax.main --mode=explore`` in a subprocess, until it
  prints its URL; yields (process, URL) and stops it with SIGINT (as
  Ctrl-C) afterwards, killing it only if it does not stop."""
  args = [sys.executable, '-m', 'cnn_jax.main', '--mode=explore',
          f'--workdir={workdir}', f'--port={port}']
  if compare:
    args.append(f'--compare={compare}')
  proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=cwd)
  lines: list[str] = []
  try:
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
      left = deadline - time.monotonic()
      ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
      line = proc.stdout.readline() if ready else ''
      if not line:
        if proc.poll() is not None or left <= 0:
          raise RuntimeError('the explorer did not start:\n'
                             + ''.join(lines[-30:]))
        continue
      lines.append(line)
      found = re.search(r'(http://\S+/) \(Ctrl-C to stop\)', line)
      url = found.group(1) if found else None
    yield proc, url
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGINT)
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def chromium(executable: str, url: str, user_data_dir: str
             ) -> Iterator[tuple[Any, list[str]]]:
  """Headless Chromium (Playwright, a fresh profile) on ``url``: yields
  (page, blocked), where every request that does not go to ``url``'s
  server is aborted and listed in ``blocked``."""
  from playwright.sync_api import sync_playwright
  origin = re.match(r'(https?://[^/]+)', url).group(1)
  blocked: list[str] = []

  def route(r: Any) -> None:
    target = r.request.url
    if target.startswith((origin + '/', 'data:', 'blob:')) or target == origin:
      r.continue_()
    else:
      blocked.append(target)
      r.abort()

  with sync_playwright() as p:
    context = p.chromium.launch_persistent_context(
        user_data_dir, executable_path=executable, headless=True,
        args=list(CHROMIUM_ARGS), viewport={'width': 1400, 'height': 1000})
    try:
      context.route('**/*', route)
      page = context.pages[0] if context.pages else context.new_page()
      page.goto(url)
      page.wait_for_selector('#canvas canvas.pad', timeout=60_000)
      yield page, blocked
    finally:
      context.close()


def note_latest(page: Any) -> None:
  """Notes the latest update the panels show, for `wait_for_update`."""
  page.evaluate('() => window.__seen = Math.max(0, ...Array.from('
                'document.querySelectorAll(".update[data-update]"), '
                'e => Number(e.dataset.update)))')


def _panel_ids(runs: int) -> list[str]:
  return ['steps'] + [p.format(r=r) for r in range(runs)
                      for p in PANELS] + ['whatif']


def wait_for_update(page: Any, runs: int, timeout: float = 60.0) -> None:
  """Until every answer panel shows an update newer than `note_latest`
  saw (the server numbers its updates: `app.stamp`)."""
  page.wait_for_function(
      'ids => ids.every(id => { const e = document.querySelector('
      '`#${id} .update`); return e && Number(e.dataset.update) > '
      '(window.__seen || 0); })',
      arg=_panel_ids(runs), timeout=timeout * 1000)


def draw(page: Any, points: Sequence[tuple[float, float]],
         steps: int = 4) -> None:
  """One stroke through ``points`` (canvas pixels), the button held down;
  leaves the button down: the caller releases it (the end of the stroke)."""
  box = page.locator('#canvas canvas.pad').bounding_box()
  sx, sy = box['width'] / CANVAS, box['height'] / CANVAS

  def at(p: tuple[float, float]) -> tuple[float, float]:
    return box['x'] + p[0] * sx, box['y'] + p[1] * sy
  page.mouse.move(*at(points[0]))
  page.mouse.down()
  for p in points[1:]:
    page.mouse.move(*at(p), steps=steps)


def stroke_and_wait(page: Any, points: Sequence[tuple[float, float]],
                    runs: int) -> float:
  """Draws a stroke; seconds from its end to the last panel updated."""
  note_latest(page)
  draw(page, points)
  start = time.perf_counter()
  page.mouse.up()
  wait_for_update(page, runs)
  return time.perf_counter() - start


def clear(page: Any) -> None:
  page.locator('#canvas button.clear').click()
  page.wait_for_function(
      '() => document.querySelector("#message-box")?.dataset.kind === "info"'
      ' && !document.querySelector("#members-0 .prediction")')


# Measuring ----------------------------------------------------------------
def _summary(seconds: Sequence[float]) -> dict[str, float]:
  ms = sorted(1000 * s for s in seconds)
  p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
  return {'n': len(ms), 'median_ms': round(statistics.median(ms), 1),
          'p90_ms': round(p90, 1), 'max_ms': round(ms[-1], 1)}


def _canvas_png(points: Sequence[tuple[float, float]]) -> str:
  """The canvas after one stroke, as the page sends it."""
  from PIL import Image, ImageDraw
  img = Image.new('RGB', (CANVAS, CANVAS), 'white')
  ImageDraw.Draw(img).line(points, fill='black', width=22, joint='curve')
  buffer = io.BytesIO()
  img.save(buffer, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(
      buffer.getvalue()).decode()


def handler_times(workdir: str, compare: str | None, strokes: int
                  ) -> dict[str, Any]:
  """Seconds `Page.on_draw` takes per stroke, in this process."""
  from cnn_jax import runtime, workdir as workdir_lib
  runtime.configure_xla(0, 128)
  runtime.enable_compilation_cache(runtime.compilation_cache_dir())
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
  from cnn_jax.explore import app as explore_app, server
  started = time.perf_counter()
  explorer, labels = server.load_explorer(
      workdir_lib.load_config(workdir), workdir, compare)
  startup = time.perf_counter() - started
  page = explore_app.Page(explorer, labels, 'latency')
  shapes = list(DIGITS.values())
  uris = [_canvas_png(shapes[i % len(shapes)]) for i in range(strokes)]
  extra = [0] * len(explorer.runs) + [0, 0, 9, 9, 0]
  page.on_draw(uris[0], None, *extra)  # First call: lazy imports.
  times = []
  for uri in uris:
    t = time.perf_counter()
    page.on_draw(uri, None, *extra)
    times.append(time.perf_counter() - t)
  return {'startup_s': round(startup, 2), **_summary(times)}


def browser_times(workdir: str, compare: str | None, strokes: int,
                  executable: str, port: int, screenshot: str | None
                  ) -> dict[str, Any]:
  """End-to-end seconds per stroke in headless Chromium."""
  runs = 2 if compare else 1
  shapes = list(DIGITS.items())
  times = []
  with serve(workdir, port, compare) as (_, url), \
      tempfile.TemporaryDirectory() as profile, \
      chromium(executable, url, profile) as (page, blocked):
    stroke_and_wait(page, DIGITS['7'], runs)  # Warm: first render.
    for i in range(strokes):
      clear(page)
      times.append(stroke_and_wait(page, shapes[i % len(shapes)][1], runs))
    if screenshot:
      clear(page)
      stroke_and_wait(page, DIGITS['7'], runs)
      fmap = page.locator('#inside-0 img.fmap').nth(1)
      stage = fmap.get_attribute('data-stage')
      fmap.click(position={'x': 5, 'y': 5})
      page.wait_for_selector(f'#channel-0 .panel[data-stage="{stage}"]')
      size = page.locator('#cover-size input[type=number]')
      size.fill('7')
      size.press('Enter')
      page.wait_for_function('() => document.querySelector("#whatif")'
                             '.innerText.includes("7×7 square")')
      page.screenshot(path=screenshot, full_page=True)
  out = _summary(times) if times else {}
  out['blocked_requests'] = blocked
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  figures: dict[str, Any] = {'workdir': _WORKDIR.value,
                             'compare': _COMPARE.value}
  if _STROKES.value:
    figures['handler'] = handler_times(_WORKDIR.value, _COMPARE.value,
                                       _STROKES.value)
  if _BROWSER.value or _SCREENSHOT.value:
    figures['browser'] = browser_times(
        _WORKDIR.value, _COMPARE.value, _STROKES.value, _CHROMIUM.value,
        _PORT.value, _SCREENSHOT.value)
  if _JSON.value:
    print(json.dumps(figures, indent=2))
    return
  print(f'explorer latency, {figures["workdir"]}'
        + (f' beside {figures["compare"]}' if figures['compare'] else ''))
  for part in ('handler', 'browser'):
    f = figures.get(part)
    if f and 'n' in f:
      print(f'  {part:8s} median {f["median_ms"]:7.1f} ms   p90 '
            f'{f["p90_ms"]:7.1f} ms   max {f["max_ms"]:7.1f} ms   '
            f'({f["n"]} strokes)')
  if 'handler' in figures:
    print(f'  start-up (restore + compile or cache): '
          f'{figures["handler"]["startup_s"]:.1f} s')
  if 'browser' in figures:
    print(f'  requests blocked (not to the local server): '
          f'{len(figures["browser"]["blocked_requests"])}')
  if _SCREENSHOT.value:
    print(f'  screenshot: {_SCREENSHOT.value}')


if __name__ == '__main__':
  app.run(main)
