"""The steps of `colab_tpu.ipynb`, one function per notebook cell.

Every step runs `cnn_jax` in a subprocess (``python -m cnn_jax.main ...`` or
``python -m experiments.ablate ...``), prints the command and the progress lines, and
keeps the full output in a ``log.txt``. The notebook's own process never
imports JAX: a TPU belongs to one process at a time, so a kernel holding it
would make every training subprocess fail.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import mimetypes
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from cnn_jax import results  # Plain data: imports no JAX.
from experiments.ablation_studies import QUICK_RECIPE

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
REPO = EXPERIMENTS.parent
CONFIGS = EXPERIMENTS / 'configs'
_ABSL_PREAMBLE = 'WARNING: All log messages before absl::InitializeLog()'
_ABSL_LINE = re.compile(r'^([IWEF])\d{4} [\d:.]+\s+\d+ ([^:\s]+):\d+\] ')


class StepError(RuntimeError):
  """A step's subprocess failed; the message names its log."""


def _own_modules() -> frozenset[str]:
  return frozenset(p.name for p in (REPO / 'cnn_jax').rglob('*.py'))


def progress_filter() -> Callable[[str], bool]:
  """Keeps cnn_jax's log lines, errors and plain output; drops library INFO."""
  own = _own_modules()

  def keep(line: str) -> bool:
    if line.startswith(_ABSL_PREAMBLE):
      return False
    m = _ABSL_LINE.match(line)
    return m is None or m.group(2) in own or m.group(1) in 'EF'
  return keep


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(REPO), env.get('PYTHONPATH', '')) if p)
  return env


def run_logged(cmd: Sequence[str], log_path: str | os.PathLike | None,
               keep: Callable[[str], bool] = lambda line: True) -> str:
  """Runs `cmd` in the repository; returns its output.

  Echoes the lines `keep` accepts, appends all of them to `log_path` (if
  given) and raises StepError with the last lines on a non-zero exit.
  """
  print('$ ' + shlex.join(cmd), flush=True)
  lines = []
  with contextlib.ExitStack() as stack:
    log = None
    if log_path is not None:
      os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
      log = stack.enter_context(open(log_path, 'a'))
    proc = stack.enter_context(subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(), cwd=REPO))
    assert proc.stdout is not None
    for line in proc.stdout:
      lines.append(line)
      if log is not None:
        log.write(line)
      if keep(line):
        print(line, end='', flush=True)
  if proc.returncode:
    tail = ''.join(lines[-5:]).strip()
    where = f' (full log: {log_path})' if log_path is not None else ''
    raise StepError(f'exit {proc.returncode}: {shlex.join(cmd[:3])} ...'
                    f'{where}\n{tail}')
  return ''.join(lines)


def check_devices() -> str:
  """Prints `jax.devices()` from a fresh process; returns the backend name."""
  out = run_logged(
      [sys.executable, '-c', 'import jax; print(jax.devices()); '
       'print("backend:", jax.default_backend())'],
      None,
      keep=lambda line: not _ABSL_LINE.match(line))
  found = re.findall(r'^backend: (\w+)$', out, re.MULTILINE)
  if not found:
    raise StepError(f'could not read the JAX backend from:\n{out[-500:]}')
  return found[-1]


def quick_flags() -> list[str]:
  """The flags of ablate.py's --quick recipe (few steps, small subset)."""
  with open(QUICK_RECIPE) as f:
    lines = (line.strip() for line in f)
    return [line for line in lines if line and not line.startswith('#')]


def recipe(model: str) -> list[str]:
  """Flags of a model's training recipe.

  ``experiments/configs/<model>.flags`` if it exists, else the simple_cnn
  recipe with ``--model=<model>``.
  """
  own = CONFIGS / f'{model}.flags'
  if own.exists():
    return [f'--flagfile={own.relative_to(REPO)}']
  return [f'--flagfile={(CONFIGS / "simple_cnn.flags").relative_to(REPO)}',
          f'--model={model}']


def _data_flags(data_dir: str) -> list[str]:
  return [f'--tfds_data_dir={data_dir}'] if data_dir else []


def train(model: str, workdir: str, quick: bool, data_dir: str = '',
          extra: Sequence[str] = ()) -> results.Results:
  """Trains (or resumes) `model` in `workdir`; returns its results.json."""
  cmd = [sys.executable, '-m', 'cnn_jax.main', *recipe(model),
         f'--workdir={os.path.abspath(workdir)}',
         *(quick_flags() if quick else []), *_data_flags(data_dir), *extra]
  run_logged(cmd, os.path.join(workdir, 'log.txt'), progress_filter())
  with open(os.path.join(workdir, 'results.json')) as f:
    return results.from_json(json.load(f))  # No JAX in this process.


def ablate(study: str, out: str, quick: bool, seeds: int, jobs: int,
           data_dir: str = '', variants: str | None = None,
           extra: Sequence[str] = ()) -> str:
  """Runs an ablation study with experiments.ablate; returns its dir."""
  cmd = [sys.executable, '-m', 'experiments.ablate', f'--study={study}',
         f'--out={os.path.abspath(out)}', f'--seeds={seeds}',
         f'--jobs={jobs}', *(['--quick'] if quick else []),
         *_data_flags(data_dir),
         *([f'--variants={variants}'] if variants else []), *extra]
  run_logged(cmd, os.path.join(out, f'{study}.log'))
  return os.path.join(os.path.abspath(out), study)


def analyze(workdir: str, data_dir: str = '') -> str:
  """Writes the analysis report of a trained run; returns index.html."""
  cmd = [sys.executable, '-m', 'cnn_jax.main', '--mode=analyze',
         f'--workdir={os.path.abspath(workdir)}', *_data_flags(data_dir)]
  run_logged(cmd, os.path.join(workdir, 'log.txt'), progress_filter())
  return os.path.join(os.path.abspath(workdir), 'analysis', 'index.html')


def inline_images(page: str, base_dir: str | os.PathLike) -> str:
  """`page` with each relative ``src="file"`` replaced by a data: URI.

  A notebook shows HTML in the browser, which cannot read the runtime's
  files; embedding the images makes the report display inline.
  """
  def embed(m: re.Match[str]) -> str:
    src = html.unescape(m.group(2))
    path = pathlib.Path(base_dir) / src
    if re.match(r'^[a-z]+:', src) or src.startswith('/') or not path.is_file():
      return m.group(0)
    kind = mimetypes.guess_type(path.name)[0] or 'application/octet-stream'
    data = base64.b64encode(path.read_bytes()).decode('ascii')
    return f'{m.group(1)}"data:{kind};base64,{data}"'
  return re.sub(r'(\bsrc=)"([^"]+)"', embed, page)


def show_report(index_html: str) -> None:
  """Displays an analysis index.html inline, its images embedded."""
  from IPython.display import HTML, display
  with open(index_html) as f:
    page = f.read()
  display(HTML(inline_images(page, os.path.dirname(index_html))))


def show_markdown(path: str) -> None:
  """Displays a Markdown file (e.g. an ablation's results.md)."""
  from IPython.display import Markdown, display
  with open(path) as f:
    display(Markdown(f.read()))


def show_image(path: str) -> None:
  """Displays a PNG file."""
  from IPython.display import Image, display
  display(Image(filename=path))
