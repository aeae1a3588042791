"""A folder of fonts for tests: DejaVu faces shipped with matplotlib, so the
font-digit set needs no system fonts."""

from __future__ import annotations

import pathlib
import shutil

import matplotlib

MPL_TTF = (pathlib.Path(matplotlib.__file__).parent / 'mpl-data' / 'fonts'
           / 'ttf')
DEJAVU = ('DejaVuSans.ttf', 'DejaVuSerif-Bold.ttf', 'DejaVuSansMono.ttf',
          'DejaVuSans-Oblique.ttf')


def dejavu_dir(folder: pathlib.Path, names=DEJAVU) -> str:
  """``folder`` holding copies of the DejaVu faces ``names``."""
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copy(MPL_TTF / name, folder / name)
  return str(folder)
