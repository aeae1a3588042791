r"""Time to accuracy: the recipes for each MNIST test-accuracy target, run as
a user runs them, timed whole, over several seeds.

  python -m experiments.speedrun                     # every target, a table
  python -m experiments.speedrun --targets=99.0 --seeds=5 --json

Every run reads MNIST from ``$TFDS_DATA_DIR`` (or TFDS's default folder).

Each target has a recipe flagfile in ``experiments/configs/`` (`TARGETS`),
chosen on the validation split only. For each recipe this runs one untimed
command first (it fills the decoded-data and compilation caches, as any
earlier run would have), then ``--seeds`` timed commands ``python -m
cnn_jax.main --flagfile=RECIPE --seed=S --workdir=...`` (seeds ``k * K`` for
a recipe of K members, so no two runs share a network), each timed from the
start of the process to its exit. The test split is scored by those commands
only, once each. The table gives the wall time (min and median), the
recipe's test accuracy (mean and worst seed: the ensemble's averaged
probabilities for a many-member recipe, with test-time augmentation when the
recipe sets ``--tta``), and the training images seen.

CPUs differ between machines: the table also prints Keras's and PyTorch's
SimpleCNN training speed measured here and now
(`experiments.benchmark.throughput`, in a subprocess), and scales each
target's time goal (`GOAL_SECONDS`, set where Keras trains at
`KERAS_REFERENCE` img/s) by it. A target is met when the mean accuracy
reaches it and the median wall time is within the scaled goal; otherwise
the table says by how much each misses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app, flags

from cnn_jax import config_flags
from cnn_jax import results as results_lib

FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'experiments', 'configs')
# Target test accuracy (%) -> its recipe, the fastest found to reach it.
TARGETS = {'99.0': 'target_99.flags', '99.5': 'target_99_5.flags',
           '99.75': 'target_99_75.flags'}
# The goal of each target (wall seconds, whole command, warm caches) on the
# machine they were set for, where Keras trains SimpleCNN at KERAS_REFERENCE
# img/s in `experiments.benchmark`; scaled here by Keras's speed now.
GOAL_SECONDS = {'99.0': 8.0, '99.5': 60.0, '99.75': 25 * 60.0}
KERAS_REFERENCE = 5400.0


def define_flags() -> None:
  """The script's flags, defined when it runs (importing it for its
  functions leaves absl's flags to cnn_jax.main)."""
  flags.DEFINE_list('targets', list(TARGETS),
                    'Targets to run (test accuracy, %).')
  flags.DEFINE_integer('seeds', 3, 'Timed runs (seeds) per target.')
  flags.DEFINE_string('out', '', 'Keep the runs\' workdirs here '
                      '(default: a temporary folder, removed).')
  flags.DEFINE_bool('peers', True, 'Also time Keras and PyTorch '
                    'training SimpleCNN here (the scale of this CPU).')
  flags.DEFINE_bool('json', False, 'Print one JSON object.')


@dataclasses.dataclass(frozen=True)
class Timed:
  """One timed command of a recipe."""

  seed: int
  wall_seconds: float
  accuracy: float
  images_seen: int


def recipe_accuracy(results: results_lib.Results, tta: int) -> float:
  """The figure a recipe is judged by: its ensemble's (with TTA when the
  recipe asks for it), else its one network's."""
  if results.ensemble is not None:
    return (results.ensemble.tta_test_accuracy if tta
            else results.ensemble.test_accuracy)
  member = results.members[0]
  return member.tta_test_accuracy if tta else member.test_accuracy


def run_recipe(recipe: str, seed: int, workdir: str, data_dir: str
               ) -> tuple[float, results_lib.Results]:
  """Runs one whole command; (wall seconds, its results)."""
  cmd = [sys.executable, '-m', 'cnn_jax.main', f'--flagfile={recipe}',
         f'--seed={seed}', f'--workdir={workdir}']
  if data_dir:
    cmd.append(f'--tfds_data_dir={data_dir}')
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or ['(no output)'])[-1]
    raise SystemExit(f'error: {os.path.basename(recipe)} --seed={seed} '
                     f'failed: {last}')
  with open(os.path.join(workdir, results_lib.FILE)) as f:
    return wall, results_lib.from_json(json.load(f))


def time_target(target: str, seeds: int, root: str, data_dir: str
                ) -> dict[str, Any]:
  """The target's recipe: one untimed warm-up, then ``seeds`` timed runs."""
  recipe = os.path.join(CONFIGS, TARGETS[target])
  if not os.path.exists(recipe):
    raise SystemExit(f'error: no recipe for {target}%: {recipe} is missing')
  config = config_flags.config_from_flagfile(recipe)
  stride = config.num_models
  run_recipe(recipe, 10_000, os.path.join(root, f'{target}_warmup'),
             data_dir)
  timed = []
  for k in range(seeds):
    seed = k * stride
    wall, results = run_recipe(recipe, seed,
                               os.path.join(root, f'{target}_seed{seed}'),
                               data_dir)
    steps = results.training.steps
    timed.append(Timed(seed, wall, recipe_accuracy(results, config.tta),
                       steps * config.batch_size * config.num_models))
  accs = [t.accuracy for t in timed]
  walls = [t.wall_seconds for t in timed]
  return {'target': float(target), 'recipe': TARGETS[target],
          'model': config.model, 'members': config.num_models,
          'tta': config.tta, 'epochs': config.epochs,
          'wall_seconds_min': min(walls),
          'wall_seconds_median': statistics.median(walls),
          'test_accuracy_mean': statistics.fmean(accs),
          'test_accuracy_worst': min(accs),
          'images_seen': timed[0].images_seen,
          'runs': [dataclasses.asdict(t) for t in timed]}


def peer_speed() -> dict[str, float]:
  """Keras's and PyTorch's SimpleCNN training img/s on this machine now."""
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark', '--json',
       '--models=simple_cnn', '--repeats=3', '--host_devices=2'],
      capture_output=True, text=True, cwd=REPO,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  if proc.returncode != 0:
    return {}
  simple = json.loads(proc.stdout)['simple_cnn']
  out = {'cnn_jax': simple['train_img_per_s']}
  for peer in ('keras', 'torch'):
    if peer in simple:
      out[peer] = simple[peer]['train_img_per_s']
  return out


def machine() -> dict[str, Any]:
  """The CPU model and core count, so a saved table says where it ran."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f
                    if line.startswith('model name')), model)
  except OSError:
    pass
  return {'cpu': model, 'cpu_count': os.cpu_count()}


def judge(row: dict[str, Any], keras_img_per_s: float | None
          ) -> dict[str, Any]:
  """``row`` with its goal: the goal's seconds scaled to this machine
  (unscaled without a Keras figure), whether the mean accuracy and the
  median wall time meet it, and by how much each misses."""
  scale = KERAS_REFERENCE / keras_img_per_s if keras_img_per_s else 1.0
  goal = scale * next(s for t, s in GOAL_SECONDS.items()
                      if float(t) == row['target'])
  short = row['target'] / 100 - row['test_accuracy_mean']
  over = row['wall_seconds_median'] - goal
  return {**row, 'goal_seconds': goal, 'goal_scale': scale,
          'accuracy_short_points': max(0.0, 100 * short),
          'seconds_over_goal': max(0.0, over),
          'met': short <= 0 and over <= 0}


def _miss(r: dict[str, Any]) -> str:
  if r['met']:
    return 'yes'
  parts = []
  if r['accuracy_short_points'] > 0:
    parts.append(f'{r["accuracy_short_points"]:.2f} points short')
  if r['seconds_over_goal'] > 0:
    parts.append(f'{r["seconds_over_goal"]:.1f} s over')
  return 'no: ' + ', '.join(parts)


def table(rows: Sequence[dict[str, Any]], peers: dict[str, float],
          where: dict[str, Any] | None = None) -> str:
  """The judged targets as a Markdown table, then the machine's scale."""
  lines = ['| target | recipe | wall time (min / median) | goal here | '
           'test accuracy (mean / worst) | images seen | met |',
           '|---|---|---:|---:|---:|---:|---|']
  for r in rows:
    lines.append(
        f'| {r["target"]:g}% | `{r["recipe"]}` | '
        f'{r["wall_seconds_min"]:.1f} s / {r["wall_seconds_median"]:.1f} s | '
        f'{r["goal_seconds"]:.1f} s | '
        f'{100 * r["test_accuracy_mean"]:.2f}% / '
        f'{100 * r["test_accuracy_worst"]:.2f}% | '
        f'{r["images_seen"]:,} | {_miss(r)} |')
  scale = rows[0]['goal_scale'] if rows else 1.0
  goals = ', '.join(f'{t}% in {s:g} s' for t, s in GOAL_SECONDS.items())
  lines.append(f'\nGoals: {goals} where Keras trains SimpleCNN at '
               f'{KERAS_REFERENCE:,.0f} img/s; scaled here by {scale:.2f}.')
  if where:
    lines.append(f'\nMachine: {where["cpu"]}, {where["cpu_count"]} cores.')
  if peers:
    lines.append('\nSimpleCNN training speed on this machine now: ' + ', '.join(
        f'{k} {v:,.0f} img/s' for k, v in peers.items()))
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  unknown = [t for t in FLAGS.targets if t not in TARGETS]
  if unknown or FLAGS.seeds < 1:
    raise SystemExit(f'error: --targets takes {", ".join(TARGETS)} and '
                     '--seeds a positive count')
  root = FLAGS.out or tempfile.mkdtemp(prefix='speedrun_')
  try:
    data_dir = os.environ.get('TFDS_DATA_DIR', '')
    rows = [time_target(t, FLAGS.seeds, root, data_dir)
            for t in FLAGS.targets]
  finally:
    if not FLAGS.out:
      shutil.rmtree(root, ignore_errors=True)
  peers = peer_speed() if FLAGS.peers else {}
  rows = [judge(r, peers.get('keras')) for r in rows]
  where = machine()
  if FLAGS.json:
    print(json.dumps({'targets': rows, 'peers_img_per_s': peers,
                      'machine': where}, indent=1))
  else:
    print(table(rows, peers, where))


if __name__ == '__main__':
  define_flags()
  app.run(main)
