"""The report page: a Jinja2 template filled with the report's parts.

The template (``templates/report.html.j2``, with its stylesheet inlined)
holds all the markup; Python only gathers numbers, captions and figure
paths. Autoescaping is on, so class names and paths are always escaped.
"""

from __future__ import annotations

from typing import Any, Sequence

import jinja2

from cnn_jax.analysis import captions
from cnn_jax.analysis.architecture import shape_text

TEMPLATE = 'report.html.j2'


def environment() -> jinja2.Environment:
  """The templates shipped with the package, strict about missing values."""
  env = jinja2.Environment(
      loader=jinja2.PackageLoader('cnn_jax.analysis', 'templates'),
      autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
      lstrip_blocks=True)
  env.filters.update(pct=captions.pct, num=captions.num,
                     shape=lambda s: shape_text(s) if s else '—')
  return env


def render(context: dict[str, Any]) -> str:
  """The HTML page of ``context`` (see `report.analyze` for its keys)."""
  return environment().get_template(TEMPLATE).render(**context)


def write(path: str, context: dict[str, Any]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(render(context))


def section_ids(has_compare: bool, has_members: bool = False,
                has_robustness: bool = False) -> Sequence[str]:
  """The ids of the page's sections, top to bottom."""
  ids = ['summary', 'data', 'architecture', 'filter-to-decision',
         'early-vs-deep', 'training', 'results', 'mistakes']
  return (ids + (['ensemble'] if has_members else [])
          + (['robustness'] if has_robustness else [])
          + (['compare'] if has_compare else []) + ['reference'])
