"""Driving the explorer's page (``--mode=explore``) in headless Chromium.

`serve` starts the real server in a subprocess, `chromium` opens its page
in Chromium through Playwright with every request to anywhere else aborted
and recorded, `draw` strokes the canvas, and `note_latest` with
`wait_for_update` tell when every panel shows the answer to a new input
(the server numbers its updates). Used by `experiments.explore_latency`
and by tests/test_explore_browser.py; it defines no flags, so both can
import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

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


@dataclasses.dataclass
class Server:
  """A running explorer: its process, URL and every line it printed."""

  process: subprocess.Popen
  url: str = ''
  lines: list[str] = dataclasses.field(default_factory=list)

  @property
  def output(self) -> str:
    return ''.join(self.lines)


@contextlib.contextmanager
def serve(workdir: str, port: int, compare: str | None = None,
          env: dict[str, str] | None = None, cwd: str | None = None,
          timeout: float = 300.0) -> Iterator[Server]:
  """``python -m cnn_jax.main --mode=explore`` in a subprocess, until it
  prints its URL; yields it as a `Server` and stops it with SIGINT (as
  Ctrl-C) afterwards, killing it only if it does not stop. Its output is
  read all along (a full pipe would stall it)."""
  args = [sys.executable, '-m', 'cnn_jax.main', '--mode=explore',
          f'--workdir={workdir}', f'--port={port}']
  if compare:
    args.append(f'--compare={compare}')
  server = Server(subprocess.Popen(args, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True,
                                   env=env, cwd=cwd))
  started = threading.Event()

  def read() -> None:
    for line in server.process.stdout:
      server.lines.append(line)
      found = re.search(r'(http://\S+/) \(Ctrl-C to stop\)', line)
      if found:
        server.url = found.group(1)
        started.set()
    started.set()  # The process ended.

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    started.wait(timeout)
    if not server.url:
      raise RuntimeError('the explorer did not start:\n'
                         + ''.join(server.lines[-30:]))
    yield server
  finally:
    if server.process.poll() is None:
      server.process.send_signal(signal.SIGINT)
      try:
        # Closing Gradio's server can take tens of seconds on a loaded CPU.
        server.process.wait(timeout=120)
      except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    reader.join(timeout=10)


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
