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
The page is driven with `experiments.explore_browser`, as the browser test
drives it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import tempfile
import time
from typing import Any, Sequence

from absl import app, flags

from experiments import explore_browser as browser

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


# Measuring ----------------------------------------------------------------
def _summary(seconds: Sequence[float]) -> dict[str, float]:
  ms = sorted(1000 * s for s in seconds)
  p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
  return {'n': len(ms), 'median_ms': round(statistics.median(ms), 1),
          'p90_ms': round(p90, 1), 'max_ms': round(ms[-1], 1)}


def _canvas_png(points: Sequence[tuple[float, float]]) -> str:
  """The canvas after one stroke, as the page sends it."""
  from PIL import Image, ImageDraw
  img = Image.new('RGB', (browser.CANVAS, browser.CANVAS), 'white')
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
  shapes = list(browser.DIGITS.values())
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
  shapes = list(browser.DIGITS.values())
  times = []
  with browser.serve(workdir, port, compare) as server, \
      tempfile.TemporaryDirectory() as profile, \
      browser.chromium(executable, server.url, profile) as (page, blocked):
    browser.stroke_and_wait(page, shapes[0], runs)  # Warm: first render.
    for i in range(strokes):
      browser.clear(page)
      times.append(browser.stroke_and_wait(page, shapes[i % len(shapes)],
                                           runs))
    if screenshot:
      browser.clear(page)
      browser.stroke_and_wait(page, browser.DIGITS['7'], runs)
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
