"""The files of one analysis folder, listed by report section.

Figures are written by the section modules, which register each file here
with its caption; the page links to them by path relative to the folder,
so the folder opens offline and can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class Figure:
  """One file of the report: path relative to the folder, and its caption."""

  src: str
  caption: str = ''


class ReportFiles:
  """Paths of written files, relative to the analysis folder, by section."""

  def __init__(self, root: str):
    self.root = root
    self.sections: dict[str, list[Figure]] = {}

  def path(self, name: str) -> str:
    """Where to write ``name`` inside the folder."""
    return os.path.join(self.root, name)

  def add(self, section: str, path: str, caption: str = '') -> Figure:
    """Registers a written file under ``section``; returns its entry."""
    fig = Figure(os.path.relpath(path, self.root), caption)
    self.sections.setdefault(section, []).append(fig)
    return fig

  def figures(self, section: str) -> list[Figure]:
    return list(self.sections.get(section, []))

  def all(self) -> list[str]:
    """Every registered file, in registration order, without repeats."""
    return list(dict.fromkeys(
        f.src for figs in self.sections.values() for f in figs))


def clean_previous(out_dir: str) -> None:
  """Removes the files a previous analysis listed, so none goes stale."""
  path = os.path.join(out_dir, 'summary.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f).get('files', [])
  except (OSError, ValueError, AttributeError):
    return
  for name in old:
    target = os.path.join(out_dir, os.path.basename(str(name)))
    if os.path.isfile(target):
      os.remove(target)
