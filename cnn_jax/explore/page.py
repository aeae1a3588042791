"""The explorer's panels as HTML, and its drawing canvas.

Each panel is one macro of ``templates/panels.html.j2`` (autoescaped, so
class and run names are always escaped), filled with numbers, names and
inlined PNG pictures (`pictures`). The canvas is a small HTML component of
Gradio (``static/canvas.html`` and ``canvas.js``): the page's only script of
its own; see `app` for why it replaces ``gr.Sketchpad``.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Sequence

import jinja2
import numpy as np

from cnn_jax.analysis.architecture import shape_text
from cnn_jax.explore import networks as networks_lib
from cnn_jax.explore import pictures
from cnn_jax.explore.panels import Answer, Channel, Decision, WhatIf
from cnn_jax.preprocess_image import Steps

INPUT_ZOOM = 7  # The 28x28 model input shown 196 pixels wide.
STEP_SIZE = 120  # Preprocessing steps shown about this many pixels wide.


@functools.lru_cache(maxsize=None)
def _macros() -> Any:
  env = jinja2.Environment(
      loader=jinja2.PackageLoader('cnn_jax.explore', 'templates'),
      autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
      lstrip_blocks=True)
  return env.get_template('panels.html.j2').module


def static(name: str) -> str:
  """A file shipped in ``cnn_jax/explore/static``."""
  return resources.files('cnn_jax.explore').joinpath('static', name).read_text(
      encoding='utf-8')


def message(kind: str, text: str) -> str:
  """The status line: ``kind`` is 'info' or 'error'."""
  return str(_macros().message(kind, text))


def _step(title: str, values: np.ndarray, caption: str) -> dict[str, Any]:
  uri = pictures.gray(values, limit=STEP_SIZE)
  h, w = values.shape
  shown = max(h, w)
  reduced = min(shown, STEP_SIZE)
  zoom = pictures.factor_for((reduced, reduced), STEP_SIZE)
  return {'title': title, 'uri': uri, 'shape': shape_text((h, w)),
          'caption': caption, 'zoom': zoom,
          'width': max(1, round(w * reduced / shown)),
          'height': max(1, round(h * reduced / shown))}


def steps(s: Steps, source: str) -> str:
  """The preprocessing, step by step, from the input to the model's."""
  box = shape_text(s.box)
  field = shape_text(s.image.shape)
  items = [
      _step('your input', s.gray, 'in grayscale, as read'),
      _step('ink', s.ink, ('inverted (it was dark on light), then '
                           if s.inverted else '')
            + 'background set to 0 and the brightest ink to 1'),
      _step('cropped', s.crop, "the digit's bounding box and a margin"),
      _step('fitted', s.fitted, f'scaled to fit the {box} box, '
            'aspect ratio kept'),
      _step('model input', s.image / 255.0, 'its centre of mass at the '
            f'centre of the {field} field: what the model gets'),
  ]
  return str(_macros().steps(items, source))


def members(decision: Decision) -> str:
  """The answer, and each network's when there are several."""
  return str(_macros().members(decision, decision.rows(),
                               decision.agreement()))


def why(answer: Answer, image: np.ndarray) -> str:
  """Integrated gradients and occlusion over the model input."""
  inside = answer.inside
  name = answer.decision.class_names[inside.predicted]
  x = image[..., 0] / 255.0
  several = len(answer.networks.networks) > 1
  return str(_macros().why(
      answer.networks.networks[inside.network].name if several else '', name,
      pictures.overlay(x, inside.saliency, signed=True),
      pictures.overlay(x, np.maximum(inside.occlusion, 0), signed=False),
      inside.logit_gap, float(inside.saliency.sum()),
      networks_lib.OCCLUSION[0], float(inside.occlusion.max()), INPUT_ZOOM))


def inside(answer: Answer, run: int) -> str:
  """Every stage's maps, one clickable grid per stage."""
  stages = [{'name': s.name, 'kind': s.kind, 'shape': shape_text(s.shape),
             'grid': pictures.grid(m)}
            for s, m in zip(answer.inside.stages, answer.inside.maps)]
  return str(_macros().inside(
      answer.networks.networks[answer.inside.network].name, stages, run))


def channel(ch: Channel, run: int) -> str:
  """One channel enlarged, beside its filter's weights."""
  rows, scale = [], 0.0
  if ch.filter is not None:
    scale = float(np.abs(ch.filter).max()) or 1.0
    colours = pictures.palette('RdBu_r')
    idx = pictures.levels(ch.filter, -scale, scale)
    for r in range(ch.filter.shape[0]):
      rows.append([{'value': float(ch.filter[r, c]),
                    'colour': '#%02x%02x%02x' % tuple(
                        colours[3 * int(idx[r, c]):3 * int(idx[r, c]) + 3]),
                    'ink': ('#fff' if abs(ch.filter[r, c]) > 0.6 * scale
                            else '#000')}
                   for c in range(ch.filter.shape[1])])
  zoom = pictures.factor_for(ch.values.shape, 196)
  return str(_macros().channel(ch, pictures.heat(ch.values), zoom, rows,
                               scale, run))


def what_if(w: WhatIf, labels: Sequence[str], top: int = 3) -> str:
  """The edited input, and each workdir's probabilities before and after
  for the classes that lead either way."""
  runs = []
  for label, before, after in zip(labels, w.before, w.after):
    p0, p1 = before.probabilities, after.probabilities
    order = list(dict.fromkeys(list(np.argsort(-p0)[:top])
                               + list(np.argsort(-p1)[:top])))
    runs.append({'label': label,
                 'before': before.class_names[before.prediction],
                 'after': after.class_names[after.prediction],
                 'rows': [{'name': before.class_names[k],
                           'before': float(p0[k]), 'after': float(p1[k])}
                          for k in order]})
  return str(_macros().what_if(pictures.gray(w.image), INPUT_ZOOM,
                               list(w.moves), runs))
