r"""Runs a named ablation study over several seeds and tabulates it.

  python experiments/ablate.py --study=filters --quick --jobs=2 --out=/tmp/abl

Each (variant, seed) is one `python -m cnn_jax.main` subprocess training in
its own workdir ``OUT/STUDY/runs/<variant>_seed<k>`` and logging to its
``log.txt``. Runs whose ``results.json`` exists are skipped, so re-running
the same command resumes a sweep (an interrupted run resumes from its own
latest checkpoint). Finally ``OUT/STUDY/`` gets ``results.csv`` (one row per
run), ``results.md`` (mean ± std over seeds per variant), ``accuracy.png``
(accuracy vs the study's knob) and ``cost.png`` (accuracy vs training time).

Options other than the ones below that name a `cnn_jax.main` flag
(``--epochs=3``, ``--kernels=flax``, ``--flagfile=my.flags``) are base
options given to every run. A run's flags, later ones winning: the recipe,
the study's base, flagfile options, the --quick recipe, command-line
options, the variant's overrides, the seed. Exit status: 0 when every run
has a result, 1 when some failed, 2 for bad arguments, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
REPO = EXPERIMENTS.parent
for _p in (str(EXPERIMENTS), str(REPO)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import ablation_report  # noqa: E402
from ablation_studies import (DEFAULT_SEEDS, FULL_RECIPE, QUICK_RECIPE,  # noqa: E402
                              Study, Variant, studies)
from cnn_jax.config import Config, CnnJaxError, validate  # noqa: E402

# Flags ablate.py sets itself for every run.
RESERVED_FLAGS = ('workdir', 'mode', 'seed')
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
_TRUE, _FALSE = ('true', 't', '1', 'yes'), ('false', 'f', '0', 'no')


class UsageError(Exception):
  """Bad command line: printed as one ``error:`` line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training subprocess of a study."""

  variant: Variant
  seed: int
  workdir: str
  flags: Mapping[str, Any]

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)

  def command(self) -> list[str]:
    return [sys.executable, '-m', 'cnn_jax.main',
            f'--workdir={self.workdir}', *to_argv(self.flags)]


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a run ended: error is None on success."""

  run: Run
  error: str | None


# Flags ------------------------------------------------------------------------
def _parse_value(name: str, text: str | None, negated: bool) -> Any:
  kind = _FIELD_TYPES[name]
  if kind == 'bool':
    if text is None:
      return not negated
    if text.lower() in _TRUE + _FALSE:
      return (text.lower() in _TRUE) != negated
    raise UsageError(f'--{name} takes true or false, got {text!r}')
  if text is None or negated:
    raise UsageError(f'--{name} needs a value (--{name}=...)')
  try:
    return {'int': int, 'float': float, 'str': str}[kind](text)
  except ValueError:
    raise UsageError(f'--{name} takes a{"n" if kind == "int" else ""} '
                     f'{kind}, got {text!r}') from None


def parse_base_options(args: Sequence[str], study: Study
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Typed `cnn_jax.main` flags: (from flagfiles, from the command line).

  A flag the study varies is an error on the command line; in a flagfile
  (a recipe) the variants simply override it.
  """
  from_files: dict[str, Any] = {}
  explicit: dict[str, Any] = {}

  def take(items: Sequence[str], source: str) -> None:
    for item in items:
      m = re.fullmatch(r'--?([A-Za-z_]\w*)(?:=(.*))?', item, re.DOTALL)
      if not m:
        raise UsageError(f'unexpected argument {item!r}{source}; base '
                         'options are written --name=value')
      name, text = m.group(1), m.group(2)
      if name == 'flagfile':
        if not text:
          raise UsageError(f'--flagfile needs a path{source}')
        take(_read_flagfile(text), f' (in {text})')
        continue
      negated = name not in _FIELD_TYPES and name.startswith('no') and (
          _FIELD_TYPES.get(name[2:]) == 'bool')
      name = name[2:] if negated else name
      if name in RESERVED_FLAGS:
        raise UsageError(f'--{name} is set by ablate.py for each run'
                         + (' (use --seeds)' if name == 'seed' else '')
                         + source)
      if name not in _FIELD_TYPES:
        raise UsageError(f'unknown option --{name}{source}; see --help')
      if name in study.varied_flags and not source:
        raise UsageError(f'--{name} is what study {study.name} varies; it '
                         'cannot be a base option')
      (from_files if source else explicit)[name] = _parse_value(
          name, text, negated)

  take(args, '')
  return from_files, explicit


def _read_flagfile(path: str) -> list[str]:
  try:
    with open(path) as f:
      lines = [line.strip() for line in f]
  except OSError as e:
    raise UsageError(f'cannot read --flagfile={path}: {e.strerror or e}'
                     ) from None
  return [line for line in lines if line and not line.startswith(('#', '//'))]


def to_argv(flags: Mapping[str, Any]) -> list[str]:
  """``--name=value`` args (bools as true/false) in the mapping's order."""
  def text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
  return [f'--{k}={text(v)}' for k, v in flags.items()]


def run_flags(study: Study, variant: Variant, seed: int, quick: bool,
              base_options: tuple[Mapping[str, Any], Mapping[str, Any]],
              data_dir: str) -> dict[str, Any]:
  """A run's flags; later sources win (see the module docstring)."""
  from_files, explicit = base_options
  flags = dict(FULL_RECIPE)
  flags.update(study.base)
  flags.update(from_files)
  if quick:
    flags.update(QUICK_RECIPE)
  flags.update(explicit)
  flags.update(variant.overrides)
  flags['seed'] = seed
  if data_dir:
    flags['tfds_data_dir'] = data_dir
  return flags


def plan(study: Study, variants: Sequence[Variant], seeds: int, out: str,
         quick: bool,
         base_options: tuple[Mapping[str, Any], Mapping[str, Any]],
         data_dir: str) -> list[Run]:
  """Every (variant, seed) run, its flags checked by `cnn_jax.config`."""
  runs = []
  for variant in variants:
    for seed in range(seeds):
      flags = run_flags(study, variant, seed, quick, base_options, data_dir)
      try:
        validate(Config(**flags))
      except CnnJaxError as e:
        raise UsageError(f'variant {variant.name}: {e}') from None
      workdir = os.path.join(out, study.name, 'runs',
                             f'{variant.name}_seed{seed}')
      runs.append(Run(variant, seed, os.path.abspath(workdir), flags))
  return runs


def stale_error(run: Run) -> str | None:
  """Why a finished workdir cannot stand for `run` (another config), if so."""
  import json

  from cnn_jax.config import RESUMABLE_FIELDS
  try:
    with open(os.path.join(run.workdir, 'config.json')) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return f'{run.workdir} has results.json but no readable config.json'
  new = json.loads(Config(**run.flags).to_json())
  diff = sorted(k for k in set(old) | set(new)
                if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k))
  if not diff:
    return None
  shown = ', '.join(f'--{k}={old.get(k)!r}->{new.get(k)!r}' for k in diff[:3])
  return (f'finished with a different config ({shown}); use another --out '
          'or delete the run')


# Devices ------------------------------------------------------------------------
def visible_gpus(env: Mapping[str, str]) -> list[str]:
  """CUDA device ids runs may use: $CUDA_VISIBLE_DEVICES or `nvidia-smi -L`."""
  if env.get('CUDA_VISIBLE_DEVICES') is not None:
    return [d.strip() for d in env['CUDA_VISIBLE_DEVICES'].split(',')
            if d.strip() and d.strip() != '-1']
  smi = shutil.which('nvidia-smi')
  if not smi:
    return []
  try:
    listing = subprocess.run([smi, '-L'], capture_output=True, text=True,
                             timeout=30, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, _ in enumerate(
      line for line in listing.splitlines() if line.startswith('GPU '))]


def tpu_present(env: Mapping[str, str]) -> bool:
  """Whether this host has TPU chips (each is owned by a single process)."""
  return bool(glob.glob('/dev/accel*') or env.get('TPU_ACCELERATOR_TYPE'))


def job_env(env: Mapping[str, str], slot: int, gpus: Sequence[str],
            jobs: int) -> dict[str, str]:
  """The environment of the run in job slot `slot` of `jobs`.

  With several jobs and GPUs, slot k sees only GPU k mod #GPUs; when jobs
  outnumber GPUs, runs sharing a GPU allocate memory on demand.
  """
  out = dict(env)
  out['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(REPO), env.get('PYTHONPATH', '')) if p)
  if gpus and jobs > 1:
    out['CUDA_VISIBLE_DEVICES'] = gpus[slot % len(gpus)]
    if jobs > len(gpus):
      out['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  return out


# Running -------------------------------------------------------------------------
def log_error(log_path: str, returncode: int) -> str:
  """A one-line reason for a failed run, from the end of its log."""
  try:
    with open(log_path, errors='replace') as f:
      lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
  except OSError:
    lines = []
  picked = [line for line in lines if line.startswith(('error:', 'stopped:'))]
  tail = picked[-1:] or lines[-2:]
  text = ' | '.join(tail)
  text = text if len(text) <= 300 else '...' + text[-297:]
  return f'exit {returncode}: {text}' if text else f'exit {returncode}'


class Sweep:
  """Runs subprocesses on a pool of `jobs` slots; interruptible as a whole."""

  def __init__(self, jobs: int, env: Mapping[str, str],
               gpus: Sequence[str], say: Callable[[str], None]):
    self.jobs, self.env, self.gpus, self.say = jobs, env, gpus, say
    self.slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
      self.slots.put(slot)
    self.lock = threading.Lock()
    self.procs: set[subprocess.Popen] = set()
    self.stopping = False

  def run_one(self, run: Run) -> Outcome:
    slot = self.slots.get()
    try:
      if self.stopping:
        return Outcome(run, 'not started (interrupted)')
      env = job_env(self.env, slot, self.gpus, self.jobs)
      log_path = os.path.join(run.workdir, 'log.txt')
      where = (f' on GPU {env["CUDA_VISIBLE_DEVICES"]}'
               if self.gpus and self.jobs > 1 else '')
      self.say(f'start {run.name}{where}')
      t0 = time.monotonic()
      try:
        os.makedirs(run.workdir, exist_ok=True)
        with open(log_path, 'a') as log:
          log.write('$ ' + shlex.join(run.command()) + '\n')
          log.flush()
          proc = subprocess.Popen(run.command(), stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
          with self.lock:
            self.procs.add(proc)
          code = proc.wait()
          with self.lock:
            self.procs.discard(proc)
      except OSError as e:
        self.say(f'FAILED {run.name}: cannot start: {e}')
        return Outcome(run, f'cannot start: {e}')
      seconds = time.monotonic() - t0
    finally:
      self.slots.put(slot)
    results = ablation_report.read_results(run.workdir)
    if code == 0 and results is not None:
      self.say(f'done  {run.name}: test accuracy '
               f'{100 * results["test_accuracy"]:.2f}% ({seconds:.0f}s)')
      return Outcome(run, None)
    error = log_error(log_path, code)
    self.say(f'{"STOPPED" if self.stopping else "FAILED"} {run.name}: '
             f'{error} (log: {log_path})')
    return Outcome(run, error)

  def interrupt(self) -> None:
    """Asks running children to checkpoint and stop; starts no more."""
    self.stopping = True
    with self.lock:
      for proc in self.procs:
        if proc.poll() is None:
          proc.send_signal(signal.SIGINT)

  def run_all(self, runs: Sequence[Run]) -> list[Outcome]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs)
    futures = [pool.submit(self.run_one, r) for r in runs]
    try:
      return [f.result() for f in futures]
    except KeyboardInterrupt:
      self.interrupt()
      raise
    finally:
      pool.shutdown(wait=True, cancel_futures=True)


# Command line ----------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # type: ignore[override]
    raise UsageError(message)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}')
  return value


def study_list() -> str:
  return '\n'.join(f'  {name:<18} {s.description} ({len(s.variants)} '
                   'variants)' for name, s in studies().items())


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='ablate.py', allow_abbrev=False, description=__doc__.split('\n\n')[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='studies:\n' + study_list() + '\n\nAny other --name=value that '
      'is a cnn_jax.main flag (or --flagfile=PATH) is a base option for '
      'every run.')
  parser.add_argument('--study', required=True,
                      help='study to run, or "list" to list them')
  parser.add_argument('--out', help='output dir; the study writes OUT/STUDY/')
  parser.add_argument('--quick', action='store_true',
                      help='a few steps on a small subset (minutes on a CPU)')
  parser.add_argument('--seeds', type=_positive_int,
                      help='seeds 0..N-1 per variant (default: 2 with '
                      '--quick, else 3)')
  parser.add_argument('--jobs', type=_positive_int, default=1,
                      help='runs at a time (one GPU each when GPUs exist)')
  parser.add_argument('--variants',
                      help='comma-separated subset of the study\'s variants')
  parser.add_argument('--tfds_data_dir',
                      default=os.environ.get('TFDS_DATA_DIR', ''),
                      help='TFDS data dir for every run (default: '
                      '$TFDS_DATA_DIR)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands of the pending runs and stop')
  return parser


def _select(study: Study, names: str | None) -> list[Variant]:
  if not names:
    return list(study.variants)
  wanted = [n.strip() for n in names.split(',') if n.strip()]
  known = [v.name for v in study.variants]
  unknown = [n for n in wanted if n not in known]
  if unknown or not wanted:
    raise UsageError(f'--variants: unknown {", ".join(unknown) or "(empty)"}'
                     f'; study {study.name} has: {", ".join(known)}')
  return [study.variant(n) for n in dict.fromkeys(wanted)]


def _main(argv: Sequence[str], say: Callable[[str], None]) -> int:
  args, extra = build_parser().parse_known_args(argv)
  if args.study == 'list':
    say('studies:\n' + study_list())
    return 0
  all_studies = studies()
  if args.study not in all_studies:
    raise UsageError(f'unknown --study={args.study!r}; choose one of: '
                     f'{", ".join(all_studies)} (or list)')
  study = all_studies[args.study]
  if not args.out:
    raise UsageError('--out is required')
  mode = 'quick' if args.quick else 'full'
  seeds = args.seeds or DEFAULT_SEEDS[mode]
  variants = _select(study, args.variants)
  base = parse_base_options(extra, study)
  runs = plan(study, variants, seeds, args.out, args.quick, base,
              args.tfds_data_dir)
  finished = [r for r in runs
              if ablation_report.read_results(r.workdir) is not None]
  pending = [r for r in runs if r not in finished]
  study_dir = os.path.join(args.out, study.name)
  say(f'study {study.name} ({mode}): {len(runs)} runs = {len(variants)} '
      f'variants x {seeds} seeds; {len(finished)} already finished, '
      f'{len(pending)} to run, in {os.path.abspath(study_dir)}')
  if args.dry_run:
    for r in pending:
      say(shlex.join(r.command()))
    return 0

  errors = {r.workdir: stale_error(r) for r in finished}
  jobs = args.jobs
  env = dict(os.environ)
  if jobs > 1 and tpu_present(env):
    say('TPU found: runs go one at a time (a TPU belongs to one process)')
    jobs = 1
  sweep = Sweep(jobs, env, visible_gpus(env) if jobs > 1 else [], say)
  try:
    for outcome in sweep.run_all(pending):
      errors[outcome.run.workdir] = outcome.error
  except KeyboardInterrupt:
    say('interrupted: re-run the same command to resume the sweep')
    return 130

  rows = [ablation_report.run_row(r.variant, r.seed, r.workdir,
                                  errors.get(r.workdir)) for r in runs]
  paths = ablation_report.write_report(study_dir, study, rows, mode)
  summaries = ablation_report.summarize(study, rows)
  say('\n' + ablation_report.markdown_table(study, summaries))
  say('wrote ' + ', '.join(paths))
  failed = [r for r in rows if r['status'] != 'ok']
  for r in failed:
    say(f'no result: {r["variant"]} seed {r["seed"]}: {r["error"]}')
  return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status."""
  def say(text: str) -> None:
    print(text, flush=True)

  def on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, on_term) if in_main_thread else None
  try:
    return _main(sys.argv[1:] if argv is None else list(argv), say)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
  sys.exit(main())
