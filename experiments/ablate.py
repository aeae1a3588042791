r"""Runs a named ablation study over several seeds and tabulates it.

  python -m experiments.ablate --study=filters --out=experiments/results
  python -m experiments.ablate --study=filters --budget=full \
      --out=experiments/results/full
  python -m experiments.ablate --study=filters --quick --out=/tmp/abl

Every run starts from a recipe flagfile, read by absl exactly as ``python -m
cnn_jax.main --flagfile=...`` reads it: with ``--budget=short`` (default)
``experiments/configs/ablation.flags`` (2 epochs); with ``--budget=full``
the recipe each variant varies, at its own length (`ablation_studies`);
``--recipe=PATH`` for another. By
default the seeds of a variant train together in one process, as the members
of one ``--num_models=N`` run (jax.vmap: one compilation per variant), in
``OUT/STUDY/runs/<variant>``; ``--separate_seeds`` runs one process per seed
in ``OUT/STUDY/runs/<variant>_seed<k>`` instead (for one GPU per job). Each
run logs to its workdir's ``log.txt``. Runs whose ``results.json`` exists are
skipped, so re-running the same command resumes a sweep (an interrupted run
resumes from its own latest checkpoint), and a run whose configuration a
finished run of another study under the same ``--out`` already has (the
same model, recipe, seeds...) links to it instead of training again. Finally ``OUT/STUDY/`` gets
``results.csv`` (one row per seed), ``results.md`` (mean ± std over seeds per
variant), ``accuracy.png`` (accuracy vs the study's knob) and ``cost.png``.

Options other than the ones below that name a `cnn_jax.main` flag
(``--epochs=3``, ``--kernels=flax``, ``--flagfile=my.flags``) are base
options given to every run. A run's flags, later ones winning: the recipe,
the study's base, flagfile options, the --quick overlay
(``configs/quick.flags``), other command-line options, the variant's
overrides, the seeds. Exit status: 0 when every run has a result, 1 when
some failed, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
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

from cnn_jax import config_flags
from cnn_jax.config import Config, CnnJaxError, config_changes
from experiments import ablation_report
from experiments.ablation_studies import (BUDGETS, DEFAULT_SEEDS,
                                          QUICK_RECIPE, Study, Variant,
                                          studies)

REPO = pathlib.Path(__file__).resolve().parents[1]

# Flags ablate.py sets itself for every run.
RESERVED_FLAGS = ('workdir', 'mode', 'seed', 'num_models')


class UsageError(Exception):
  """Bad command line: printed as one ``error:`` line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training subprocess of a study: one or several seeds."""

  variant: Variant
  seeds: tuple[int, ...]
  workdir: str
  argv: tuple[str, ...]  # cnn_jax.main flags, --workdir aside.

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)

  def command(self) -> list[str]:
    return [sys.executable, '-m', 'cnn_jax.main',
            f'--workdir={self.workdir}', *self.argv]

  def config(self) -> Config:
    return config_flags.config_from_argv(self.argv)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a run ended: error is None on success."""

  run: Run
  error: str | None


# Flags ------------------------------------------------------------------------
def to_argv(flags: Mapping[str, Any]) -> list[str]:
  """``--name=value`` args (bools as true/false, lists joined by commas,
  a mapping as ``key=value,...``: model options) in the mapping's order."""
  def text(v: Any) -> str:
    if isinstance(v, bool):
      return str(v).lower()
    if isinstance(v, (list, tuple)):
      return ','.join(text(x) for x in v)
    if isinstance(v, Mapping):
      return ','.join(f'{k}={text(x)}' for k, x in v.items())
    return str(v)
  return [f'--{k}={text(v)}' for k, v in flags.items()]


def _flag_name(arg: str) -> str:
  m = re.fullmatch(r'--?([A-Za-z_]\w*)(?:=.*)?', arg, re.DOTALL)
  if not m:
    raise UsageError(f'unexpected argument {arg!r}; base options are '
                     'written --name=value')
  return m.group(1)


def parse_base_options(args: Sequence[str], study: Study
                       ) -> tuple[list[str], list[str]]:
  """The user's base options: (flagfile arguments, other arguments).

  They are checked by parsing them with absl as `cnn_jax.main` would: an
  unknown flag, a bad value or an unreadable flagfile is a usage error. A
  flag the study varies, or one ablate.py sets, is an error on the command
  line; in a flagfile (a recipe) the variants simply override it.
  """
  flagfiles, explicit = [], []
  for arg in args:
    name = _flag_name(arg)
    if name == 'flagfile':
      flagfiles.append(arg)
      continue
    plain = name[2:] if name.startswith('no') and name[2:] in (
        f.name for f in dataclasses.fields(Config)) else name
    if plain in RESERVED_FLAGS:
      raise UsageError(f'--{plain} is set by ablate.py for each run'
                       + (' (use --seeds)' if plain == 'seed' else ''))
    if plain in study.varied_flags:
      raise UsageError(f'--{plain} is what study {study.name} varies; it '
                       'cannot be a base option')
    explicit.append(arg)
  try:
    config_flags.parse_argv([*flagfiles, *explicit])
  except Exception as e:  # absl's flags.Error and flagfile OSErrors.
    raise UsageError(' '.join(str(e).split())) from None
  return flagfiles, explicit


def run_argv(study: Study, variant: Variant, seeds: Sequence[int],
             quick: bool, base: tuple[Sequence[str], Sequence[str]],
             recipe: str, data_dir: str) -> list[str]:
  """A run's cnn_jax.main arguments; later ones win (see the docstring).
  A `same_steps` study's smaller training sets get more epochs (not with
  ``quick``, a smoke test)."""
  flagfiles, explicit = base
  argv = [f'--flagfile={recipe}', *to_argv(study.base), *flagfiles]
  if quick:
    argv.append(f'--flagfile={QUICK_RECIPE}')
  argv += [*explicit, *to_argv(variant.overrides)]
  epochs = None if quick else study.epochs(
      variant, config_flags.config_from_argv(argv).epochs)
  if epochs:
    argv.append(f'--epochs={epochs}')
  argv += [f'--seed={seeds[0]}', f'--num_models={len(seeds)}']
  if data_dir:
    argv.append(f'--tfds_data_dir={data_dir}')
  return argv


def plan(study: Study, variants: Sequence[Variant], seeds: int, out: str,
         quick: bool, base: tuple[Sequence[str], Sequence[str]],
         data_dir: str, recipe: str | None = None,
         separate_seeds: bool = False, budget: str = 'short') -> list[Run]:
  """Every run of the study, its flags checked by `cnn_jax.config`."""
  runs = []
  for variant in variants:
    groups = ([(k,) for k in range(seeds)] if separate_seeds
              else [tuple(range(seeds))])
    for group in groups:
      try:
        argv = run_argv(study, variant, group, quick, base,
                        recipe or study.recipe(budget, variant), data_dir)
        config_flags.config_from_argv(argv)
      except CnnJaxError as e:
        raise UsageError(f'variant {variant.name}: {e}') from None
      name = (f'{variant.name}_seed{group[0]}' if separate_seeds
              else variant.name)
      runs.append(Run(variant, group, os.path.abspath(
          os.path.join(out, study.name, 'runs', name)), tuple(argv)))
  return runs


def stale_error(run: Run) -> str | None:
  """Why a finished workdir cannot stand for `run` (another config), if so."""
  try:
    with open(os.path.join(run.workdir, 'config.json')) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return f'{run.workdir} has results.json but no readable config.json'
  diff = config_changes(old, run.config())
  if not diff:
    return None
  return (f'finished with a different config ({", ".join(diff[:3])}); use '
          'another --out or delete the run')


def finished_twin(run: Run, out: str) -> str | None:
  """A finished run under ``out`` (another study's) with ``run``'s exact
  configuration, which can stand for it: same recipe, seeds, everything."""
  config = run.config()
  for path in sorted(glob.glob(os.path.join(out, '*', 'runs', '*',
                                            'results.json'))):
    workdir = os.path.dirname(path)
    if os.path.realpath(workdir) == os.path.realpath(run.workdir):
      continue
    try:
      with open(os.path.join(workdir, 'config.json')) as f:
        if not config_changes(json.load(f), config):
          return os.path.realpath(workdir)
    except (OSError, ValueError, CnnJaxError):
      continue
  return None


def link_twins(runs: Sequence[Run], out: str,
               say: Callable[[str], None]) -> list[Run]:
  """Links each run not yet started to its finished twin, if it has one
  (a relative symlink, so ``out`` can move); returns the runs still to do."""
  pending = []
  for run in runs:
    twin = None if os.path.lexists(run.workdir) else finished_twin(run, out)
    if twin is None:
      pending.append(run)
      continue
    os.makedirs(os.path.dirname(run.workdir), exist_ok=True)
    os.symlink(os.path.relpath(twin, os.path.dirname(run.workdir)),
               run.workdir)
    say(f'same  {run.name}: the finished run {twin} has its exact '
        'configuration; linked, not trained again')
  return pending


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
    results = ablation_report.read_results(run.workdir, run.seeds)
    if code == 0 and results is not None:
      accs = ', '.join(f'{100 * a:.2f}%' for a in results.member_accuracies)
      self.say(f'done  {run.name}: test accuracy {accs} ({seconds:.0f}s)')
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
  parser.add_argument('--budget', choices=BUDGETS, default='short',
                      help='short: every run the 2-epoch ablation.flags; '
                      'full: the recipe each variant varies, at its own '
                      'length')
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
  parser.add_argument('--recipe',
                      help='recipe flagfile for every run (default: by '
                      '--budget)')
  parser.add_argument('--separate_seeds', action='store_true',
                      help='one process per seed instead of all seeds of a '
                      'variant as the members of one --num_models run')
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
  mode = 'quick' if args.quick else args.budget
  seeds = args.seeds or DEFAULT_SEEDS[mode]
  variants = _select(study, args.variants)
  if args.recipe and not os.path.isfile(args.recipe):
    raise UsageError(f'--recipe={args.recipe} is not a readable file')
  base = parse_base_options(extra, study)
  runs = plan(study, variants, seeds, args.out, args.quick, base,
              args.tfds_data_dir, args.recipe, args.separate_seeds,
              args.budget)
  finished = [r for r in runs
              if ablation_report.read_results(r.workdir) is not None]
  pending = [r for r in runs if r not in finished]
  study_dir = os.path.join(args.out, study.name)
  say(f'study {study.name} ({mode}): {len(variants)} variants x {seeds} '
      f'seeds in {len(runs)} runs; {len(finished)} already finished, '
      f'{len(pending)} to run, in {os.path.abspath(study_dir)}')
  if args.dry_run:
    for r in pending:
      say(shlex.join(r.command()))
    return 0

  pending = link_twins(pending, args.out, say)
  errors = {r.workdir: stale_error(r) for r in runs if r not in pending
            and ablation_report.read_results(r.workdir) is not None}
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

  rows = [row for r in runs for row in ablation_report.run_rows(
      r.variant, r.seeds, r.workdir, errors.get(r.workdir))]
  recipes = sorted({os.path.basename(r.argv[0].split('=', 1)[1])
                    for r in runs})
  paths = ablation_report.write_report(study_dir, study, rows, mode, recipes)
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
