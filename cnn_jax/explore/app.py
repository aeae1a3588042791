"""The explorer's Gradio page: components, layout and events.

Built with stock Gradio components (``gr.Label`` for the probabilities,
``gr.UploadButton`` for uploads, ``gr.Dropdown``, ``gr.Slider``, ``gr.HTML`` for
the panels) and one custom HTML component, `canvas`. Gradio's own
``gr.Sketchpad`` is a full image editor (layers, zoom, history) drawn with
WebGL that uploads the background, each layer and the composite as PNG
files after every stroke before the event runs; `canvas` is a plain 2-D
canvas that sends one small PNG with the event itself, which keeps an update
within the latency the explorer needs and writes no file (README, and
``third_party_notes.md``).

Every event handler takes plain values and returns the panels' HTML, so
nothing the browser sends is ever used as a path. Inputs the explorer cannot
use (no digit, not an image, too large) are reported in the page's message
line and change nothing else.
"""

from __future__ import annotations

import html
import itertools
import logging
import threading
from typing import Any, Sequence

import gradio as gr
import numpy as np

from cnn_jax.explore import networks as networks_lib
from cnn_jax.explore import page, panels
from cnn_jax.explore.panels import Explorer, InputProblem

BRUSH = 22  # Default brush width on the 280-pixel canvas.
HINT = ('Draw a digit on the canvas (it answers at the end of each stroke) '
        'or upload an image file.')


def canvas(brush: int = BRUSH, **kwargs: Any) -> gr.HTML:
  """A drawing canvas (mouse, pen, touch) with brush width and Clear: a
  ``gr.HTML`` with its own template and script (a function, not a
  subclass: Gradio writes a ``.pyi`` stub beside the module of every
  component class).

  Its value is the canvas as a PNG ``data:`` URI, set at the end of each
  stroke ('' after Clear), which fires ``change``.
  """
  return gr.HTML(value='', html_template=page.static('canvas.html'),
                 js_on_load=page.static('canvas.js'), brush=brush, **kwargs)


def stamp(markup: str, update: int) -> str:
  """``markup`` in a wrapper that carries the update's number, so a page
  (or a test) can tell an updated panel from one left as it was."""
  return f'<div class="update" data-update="{update}">{markup}</div>'


def _empty(text: str) -> str:
  return ('<div class="panel empty"><p class="caption">'
          f'{html.escape(text)}</p></div>')


class Page:
  """The Blocks of one `Explorer`, with its event handlers."""

  def __init__(self, explorer: Explorer, labels: Sequence[str],
               title: str):
    self.explorer, self.labels, self.title = explorer, list(labels), title
    # Events skip Gradio's queue (a round trip of its own each update);
    # this lock runs one at a time instead, which bounds memory too.
    self._lock = threading.Lock()
    self._updates = itertools.count(1)

  # Handlers ----------------------------------------------------------------
  # The session's state: {'image': the model input or None, 'picks': {run:
  # (stage, channel) shown beside its filter}}.
  @property
  def _num_outputs(self) -> int:
    """Outputs of the input events: message, steps, five per workdir,
    what-if, state."""
    return 2 + 5 * len(self.explorer.runs) + 2

  def _outputs_for(self, image: np.ndarray | None, steps_html: str,
                   message: str, kind: str, chosen: Sequence[int],
                   moves: Sequence[int], picks: dict[int, Any]
                   ) -> list[Any]:
    """Every panel for one model input (or all empty for None), each
    stamped with this update's number (`stamp`)."""
    n = next(self._updates)
    out: list[Any] = [page.message(kind, message), stamp(steps_html, n)]
    if image is None:
      for _ in self.explorer.runs:
        out += [None] + [stamp(_empty(''), n)] * 4
      return out + [stamp(_empty(''), n), {'image': None, 'picks': picks}]
    answers = self.explorer.answer(image, chosen)
    for run, a in enumerate(answers):
      stage, index = picks.get(run) or (a.inside.stages[0].name, 0)
      ch = panels.channel(a.inside, a.networks.kernels(a.network), stage,
                          index)
      out += [a.decision.label()] + [stamp(panel, n) for panel in (
          page.members(a.decision), page.why(a, image), page.inside(a, run),
          page.channel(ch, run))]
    out.append(stamp(self._what_if(image, moves,
                                   [a.decision for a in answers]), n))
    return out + [{'image': image, 'picks': picks}]

  def _what_if(self, image: np.ndarray, moves: Sequence[int],
               before: Sequence[panels.Decision] | None = None) -> str:
    w = self.explorer.what_if(image, *[int(m) for m in moves], before=before)
    return page.what_if(w, self.labels)

  def _show(self, read: Any, source: str, state: dict[str, Any] | None,
            args: Sequence[Any]) -> list[Any]:
    """Reads an input and shows every panel for it; an input that cannot
    be used changes only the message."""
    n = len(self.explorer.runs)
    chosen = [int(a or 0) for a in args[:n]]
    moves = [int(a or 0) for a in args[n:]]
    picks = dict((state or {}).get('picks') or {})
    with self._lock:
      try:
        gray = read()
        if gray is None:
          return self._outputs_for(None, _empty(HINT), HINT, 'info', chosen,
                                   moves, picks)
        steps = panels.prepare(gray, self.explorer.hw)
      except InputProblem as e:
        return [page.message('error', str(e))] + [gr.skip()] * (
            self._num_outputs - 1)
      return self._outputs_for(
          steps.image[..., None], page.steps(steps, source),
          f'Showing {source} ({gray.shape[0]}×{gray.shape[1]} pixels).',
          'info', chosen, moves, picks)

  def on_draw(self, uri: str, state: dict[str, Any] | None,
              *args: Any) -> list[Any]:
    """The end of a stroke (or Clear): ``uri`` is the canvas as a PNG
    ``data:`` URI ('' when cleared); ``args`` are each workdir's chosen
    network, then the what-if moves."""
    return self._show(lambda: panels.read_drawing(uri or ''),
                      'your drawing', state, args)

  def on_upload(self, data: bytes | None, state: dict[str, Any] | None,
                *args: Any) -> list[Any]:
    """An uploaded file's bytes; ``args`` as for `on_draw`."""
    return self._show(lambda: panels.read_upload(data, 'the uploaded file'),
                      'the uploaded file', state, args)

  def _inside(self, state: dict[str, Any] | None, network: int, run: int
              ) -> tuple[np.ndarray, panels.Answer] | None:
    image = (state or {}).get('image')
    if image is None:
      return None
    chosen = [0] * len(self.explorer.runs)
    chosen[run] = int(network or 0)
    with self._lock:
      return image, self.explorer.answer(image, chosen)[run]

  def _channel(self, state: dict[str, Any] | None, a: panels.Answer,
               run: int) -> str:
    stage, index = ((state or {}).get('picks') or {}).get(run) or (
        a.inside.stages[0].name, 0)
    return page.channel(panels.channel(
        a.inside, a.networks.kernels(a.network), stage, index), run)

  def on_network(self, state: dict[str, Any] | None, network: int,
                 run: int) -> list[Any]:
    """Another network of one workdir: where it looked, its maps."""
    found = self._inside(state, network, run)
    if found is None:
      return [gr.skip()] * 3
    image, a = found
    return [page.why(a, image), page.inside(a, run),
            self._channel(state, a, run)]

  def on_pick(self, state: dict[str, Any] | None, network: int, run: int,
              evt: gr.EventData) -> list[Any]:
    """A click on a feature-map tile: that channel beside its filter (and
    again after later strokes)."""
    data = getattr(evt, '_data', None)
    found = self._inside(state, network, run)
    if found is None or not isinstance(data, dict):
      return [gr.skip(), gr.skip()]
    try:
      pick = (str(data['stage']), int(data['channel']))
    except (KeyError, TypeError, ValueError):
      return [gr.skip(), gr.skip()]
    state = {**state, 'picks': {**(state.get('picks') or {}), run: pick}}
    return [self._channel(state, found[1], run), state]

  def on_what_if(self, state: dict[str, Any] | None, *moves: Any) -> Any:
    """A what-if slider moved: the edited input and the answers."""
    image = (state or {}).get('image')
    if image is None:
      return gr.skip()
    with self._lock:
      return self._what_if(image, moves)

  # Layout ------------------------------------------------------------------
  def build(self) -> gr.Blocks:
    """The page. Outputs of the input events, in order: message, steps,
    then per workdir (label, members, why, inside, channel), what-if,
    state."""
    explorer = self.explorer
    with gr.Blocks(title=self.title, analytics_enabled=False,
                   delete_cache=(60, 600)) as demo:
      gr.Markdown(f'# {self.title}\n{HINT} Each panel below is computed '
                  'by the run\'s own model on this machine.')
      state = gr.State({'image': None, 'picks': {}})
      with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
          gr.Markdown('### Your digit')
          pad = canvas(elem_id='canvas')
          upload = gr.UploadButton('…or upload an image file', type='binary',
                                   file_count='single', elem_id='upload',
                                   size='md')
          message = gr.HTML(page.message('info', HINT), elem_id='message')
        with gr.Column(scale=2, min_width=400):
          gr.Markdown('### What the model sees')
          steps = gr.HTML(_empty(HINT), elem_id='steps')
      runs_out, selectors = [], []
      with gr.Row(equal_height=False):
        for r, (networks, label) in enumerate(zip(explorer.runs,
                                                  self.labels)):
          with gr.Column(min_width=420):
            runs_out += self._run_panels(r, networks, label, selectors)
      gr.Markdown('### What if: cover part of it, or move it\nThe same input '
                  'moved and partly covered (set to background), and the '
                  'answers before and after.')
      with gr.Row():
        dx = gr.Slider(-networks_lib.MAX_SHIFT, networks_lib.MAX_SHIFT, 0,
                       step=1, label='move right (pixels)', elem_id='dx')
        dy = gr.Slider(-networks_lib.MAX_SHIFT, networks_lib.MAX_SHIFT, 0,
                       step=1, label='move down (pixels)', elem_id='dy')
        h, w = explorer.hw
        top = gr.Slider(0, h - 1, h // 3, step=1, label='cover: top row',
                        elem_id='cover-top')
        left = gr.Slider(0, w - 1, w // 3, step=1,
                         label='cover: left column', elem_id='cover-left')
        size = gr.Slider(0, h // 2, 0, step=1,
                         label='cover: square side (0 = none)',
                         elem_id='cover-size')
      what_if = gr.HTML(_empty(''), elem_id='whatif')
      moves = [dy, dx, top, left, size]
      outputs = [message, steps, *runs_out, what_if, state]
      assert len(outputs) == self._num_outputs
      inputs = [state] + [s for s, *_ in selectors] + moves
      common = dict(outputs=outputs, trigger_mode='always_last',
                    show_progress='hidden', queue=False)
      pad.change(self.on_draw, [pad, *inputs], api_name='draw',
                    **common)
      upload.upload(self.on_upload, [upload, *inputs], api_name='upload',
                    **common)
      for r, (selector, why, inside, channel) in enumerate(selectors):
        selector.change(
            lambda s, n, r=r: self.on_network(s, n, r), [state, selector],
            [why, inside, channel], show_progress='hidden', queue=False,
            api_name=False)
        inside.pick(self._picker(r), [state, selector], [channel, state],
                    show_progress='hidden', queue=False, api_name=False)
      for m in moves:
        m.change(self.on_what_if, [state, *moves], what_if,
                 trigger_mode='always_last', show_progress='hidden',
                 queue=False, api_name=False)
    return demo

  def _run_panels(self, r: int, networks: networks_lib.Networks,
                  label: str, selectors: list[Any]) -> list[Any]:
    """One workdir's panels: decision, why, inside. Returns the outputs of
    the input events; adds the network selector and the panels it updates
    to ``selectors``."""
    gr.Markdown(f'## {label}\n{self._describe(networks)}')
    with gr.Row(equal_height=False):
      with gr.Column(min_width=300):
        gr.Markdown('### Decision\nThe probability of every class.')
        decision = gr.Label(num_top_classes=len(networks.class_names),
                            show_label=False, elem_id=f'label-{r}')
        members = gr.HTML(_empty(''), elem_id=f'members-{r}')
      with gr.Column(min_width=300):
        gr.Markdown('### Why: where it looked\nWhich pixels of the model '
                    'input pushed the answer up or down.')
        selector = gr.Dropdown(
            [(n.name, i) for i, n in enumerate(networks.networks)], value=0,
            label='network explained here and below',
            visible=len(networks.networks) > 1, elem_id=f'network-{r}')
        why = gr.HTML(_empty(''), elem_id=f'why-{r}')
    gr.Markdown('### Inside: every layer\'s feature maps')
    with gr.Row(equal_height=False):
      with gr.Column(scale=1, min_width=260):
        channel = gr.HTML(_empty(''), elem_id=f'channel-{r}')
      with gr.Column(scale=3, min_width=460):
        inside = gr.HTML(_empty(''), elem_id=f'inside-{r}',
                         js_on_load=page.static('inside.js'))
    selectors.append((selector, why, inside, channel))
    return [decision, members, why, inside, channel]

  def _picker(self, run: int) -> Any:
    """The pick handler of one workdir's maps (Gradio passes the click's
    data to an argument annotated `gr.EventData`)."""
    def pick(state: dict[str, Any], network: int,
             evt: gr.EventData) -> Any:
      return self.on_pick(state, network, run, evt)
    return pick

  @staticmethod
  def _describe(networks: networks_lib.Networks) -> str:
    n = len(networks.networks)
    models = sorted({net.model for net in networks.networks})
    what = (f'{n} networks ({", ".join(models)}); the decision averages '
            'their probabilities' if n > 1 else f'one {models[0]}')
    return (f'{what}, trained on {networks.info.name} '
            f'({len(networks.class_names)} classes).')


def build(explorer: Explorer, labels: Sequence[str], title: str
          ) -> gr.Blocks:
  """The Gradio Blocks of the explorer (not launched)."""
  logging.getLogger('httpx').setLevel(logging.WARNING)
  return Page(explorer, labels, title).build()
