"""Aggregation of an ablation study: `results.csv`, `results.md` and plots.

Everything here reads finished run directories (their `results.json`) and
writes files; nothing trains. The statistics are over seeds: the mean and the
sample standard deviation (ddof=1; undefined, shown as "n/a", for one seed).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from cnn_jax import results as results_lib  # Plain data: imports no JAX.
from experiments.ablation_studies import Study, Variant

METRICS = ('test_accuracy', 'test_loss', 'best_val_accuracy', 'num_params',
           'train_seconds', 'train_img_per_s', 'epochs')
ROW_FIELDS = ('variant', 'group', 'knob', 'seed', 'status') + METRICS + (
    'ensemble_accuracy', 'error', 'workdir')


@dataclasses.dataclass(frozen=True)
class Summary:
  """One variant's statistics over its successful seeds."""

  variant: Variant
  n: int
  n_failed: int
  acc_mean: float
  acc_std: float
  accs: tuple[float, ...]
  num_params: float
  train_seconds: float
  img_per_s: float
  ensemble_acc: float  # Of the seeds' averaged probabilities (NaN if n/a).


def read_results(workdir: str, seeds: Sequence[int] = ()
                 ) -> results_lib.Results | None:
  """A run's `results.json` (any layout), or None when it has not
  finished; ``seeds`` name the members of an older single run."""
  path = os.path.join(workdir, results_lib.FILE)
  try:
    with open(path) as f:
      return results_lib.from_json(json.load(f), seeds)
  except FileNotFoundError:
    return None


def run_rows(variant: Variant, seeds: Sequence[int], workdir: str,
             error: str | None = None) -> list[dict[str, Any]]:
  """The CSV rows of one run, one per seed: each member's results or the
  run's error, plus the variant's overrides.

  A member's ``train_seconds`` is its share of the run's (the run's time
  over its members); ``ensemble_accuracy`` is the test accuracy of all the
  run's members' averaged probabilities.
  """
  results = read_results(workdir, seeds)
  rows = []
  members = results.members if results else [None] * len(seeds)
  for seed, member in zip(seeds, members):
    row: dict[str, Any] = {'variant': variant.name, 'group': variant.group,
                           'knob': variant.knob, 'seed': seed,
                           'workdir': workdir, 'error': ''}
    if error is not None:
      row.update(status='failed', error=error)
    elif results is None:
      row.update(status='missing')
    else:
      training = results.training
      row.update(status='ok', test_accuracy=member.test_accuracy,
                 test_loss=member.test_loss,
                 best_val_accuracy=member.best_val_accuracy,
                 num_params=member.num_params, epochs=training.epochs,
                 train_seconds=training.train_seconds / len(members),
                 train_img_per_s=training.train_img_per_s,
                 ensemble_accuracy=(results.ensemble.test_accuracy
                                    if results.ensemble else None))
    row.update(variant.columns())
    rows.append(row)
  return rows


def _fmt(value: Any) -> Any:
  if value is None:
    return ''
  return str(value).lower() if isinstance(value, bool) else value


def write_csv(path: str, rows: Sequence[dict[str, Any]],
              override_fields: Iterable[str]) -> None:
  """One row per run: ROW_FIELDS, then one column per overridden flag."""
  fields = list(ROW_FIELDS) + [f for f in override_fields
                               if f not in ROW_FIELDS]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _fmt(row.get(k)) for k in fields})


def _mean(values: Sequence[float]) -> float:
  return float(np.mean(values)) if values else math.nan


def summarize(study: Study, rows: Sequence[dict[str, Any]]) -> list[Summary]:
  """Per-variant statistics over seeds, in study order (variants with rows)."""
  out = []
  for variant in study.variants:
    mine = [r for r in rows if r['variant'] == variant.name]
    if not mine:
      continue
    ok = [r for r in mine if r['status'] == 'ok']
    accs = tuple(float(r['test_accuracy']) for r in ok)
    out.append(Summary(
        variant=variant, n=len(ok),
        n_failed=sum(r['status'] == 'failed' for r in mine),
        acc_mean=_mean(accs),
        acc_std=float(np.std(accs, ddof=1)) if len(accs) > 1 else math.nan,
        accs=accs,
        num_params=_mean([float(r['num_params']) for r in ok]),
        train_seconds=_mean([float(r['train_seconds']) for r in ok]),
        img_per_s=_mean([float(r['train_img_per_s']) for r in ok]),
        ensemble_acc=_mean(sorted({float(r['ensemble_accuracy']) for r in ok
                                   if r.get('ensemble_accuracy')
                                   is not None}))))
  return out


def _pct(x: float) -> str:
  return 'n/a' if math.isnan(x) else f'{100 * x:.2f}'


def _num(x: float, spec: str) -> str:
  return 'n/a' if math.isnan(x) else format(x, spec)


def markdown_table(study: Study, summaries: Sequence[Summary]) -> str:
  """The aggregated table; the best mean test accuracy is bold."""
  grouped = any(s.variant.group for s in summaries)
  ensembled = any(not math.isnan(s.ensemble_acc) for s in summaries)
  head = ['variant'] + (['group'] if grouped else []) + [
      study.knob_label, 'test accuracy % (mean ± std)', 'seeds'] + (
          ['seeds averaged %'] if ensembled else []) + [
              'params', 'train time (s)', 'train img/s']
  numeric = 5 + ensembled
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '|'.join(['---'] * (len(head) - numeric)
                          + ['---:'] * numeric) + '|']
  finite = [s.acc_mean for s in summaries if not math.isnan(s.acc_mean)]
  best = max(finite) if finite else None
  for s in summaries:
    acc = 'no result' if s.n == 0 else (
        f'{_pct(s.acc_mean)} ± {_pct(s.acc_std)}')
    if best is not None and s.acc_mean == best:
      acc = f'**{acc}**'
    seeds = str(s.n) + (f' ({s.n_failed} failed)' if s.n_failed else '')
    cells = [s.variant.name] + ([s.variant.group] if grouped else []) + [
        f'{s.variant.knob:g}' if isinstance(s.variant.knob, float)
        else str(s.variant.knob),
        acc, seeds] + ([_pct(s.ensemble_acc)] if ensembled else []) + [
            _num(s.num_params, ',.0f'), _num(s.train_seconds, '.1f'),
            _num(s.img_per_s, ',.0f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_markdown(path: str, study: Study, summaries: Sequence[Summary],
                   rows: Sequence[dict[str, Any]], header: str) -> None:
  """`results.md`: a header paragraph, the table, then any failed runs."""
  parts = [f'# Ablation: {study.name}\n', study.description + '\n', header,
           markdown_table(study, summaries)]
  failed = [r for r in rows if r['status'] != 'ok']
  if failed:
    parts.append('Runs without a result:\n')
    parts.extend(f'- `{r["variant"]}` seed {r["seed"]}: {r["status"]}'
                 + (f' — {r["error"]}' if r['error'] else '') for r in failed)
    parts.append('')
  with open(path, 'w') as f:
    f.write('\n'.join(parts) + '\n')


def _x_positions(study: Study, summaries: Sequence[Summary]
                 ) -> tuple[dict[str, float], list[float], list[str]]:
  """x per variant, plus the ticks and their labels."""
  if study.numeric_knob:
    knobs = sorted({float(s.variant.knob) for s in summaries})
    return ({s.variant.name: float(s.variant.knob) for s in summaries},
            knobs, [f'{k:g}' for k in knobs])
  labels = list(dict.fromkeys(str(s.variant.knob) for s in summaries))
  groups = list(dict.fromkeys(s.variant.group for s in summaries))
  width = 0.6 / max(len(groups), 1)
  x = {s.variant.name: labels.index(str(s.variant.knob))
       + (groups.index(s.variant.group) - (len(groups) - 1) / 2) * width
       for s in summaries}
  return x, list(range(len(labels))), labels


def plot_accuracy(path: str, study: Study, summaries: Sequence[Summary],
                  title: str) -> None:
  """Test accuracy vs the study's knob: mean ± std per group, seeds as dots."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  x, ticks, labels = _x_positions(study, summaries)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  groups = list(dict.fromkeys(s.variant.group for s in summaries))
  for group in groups:
    mine = sorted((s for s in summaries if s.variant.group == group and s.n),
                  key=lambda s: x[s.variant.name])
    if not mine:
      continue
    xs = [x[s.variant.name] for s in mine]
    means = [100 * s.acc_mean for s in mine]
    errs = [0.0 if math.isnan(s.acc_std) else 100 * s.acc_std for s in mine]
    line = ax.errorbar(xs, means, yerr=errs, marker='o', capsize=4,
                       label=group or None,
                       linestyle='-' if study.numeric_knob else 'none')
    for xi, s in zip(xs, mine):
      ax.scatter([xi] * len(s.accs), [100 * a for a in s.accs], s=12,
                 alpha=0.4, color=line[0].get_color())
  if study.log_x:
    ax.set_xscale('log', base=2)
  ax.set_xticks(ticks)
  ax.set_xticklabels(labels)
  ax.minorticks_off()
  ax.set_xlabel(study.knob_label)
  ax.set_ylabel('test accuracy (%)')
  _finish(fig, ax, path, title, legend=any(groups))


def _finish(fig: Any, ax: Any, path: str, title: str, legend: bool) -> None:
  """Title, grid, optional legend; saves the figure and frees it."""
  import matplotlib.pyplot as plt
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  if legend:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_cost(path: str, study: Study, summaries: Sequence[Summary],
              title: str) -> None:
  """Mean test accuracy vs mean training time, one labelled point a variant."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  done = [s for s in summaries if s.n]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  groups = list(dict.fromkeys(s.variant.group for s in done))
  for group in groups:
    mine = [s for s in done if s.variant.group == group]
    ax.scatter([s.train_seconds for s in mine],
               [100 * s.acc_mean for s in mine], label=group or None)
  for s in done:
    ax.annotate(s.variant.name, (s.train_seconds, 100 * s.acc_mean),
                fontsize=7, xytext=(3, 3), textcoords='offset points')
  ax.set_xlabel('mean training time per seed (s)')
  ax.set_ylabel('mean test accuracy (%)')
  _finish(fig, ax, path, title, legend=any(groups))


def write_report(study_dir: str, study: Study,
                 rows: Sequence[dict[str, Any]], mode: str,
                 recipes: Sequence[str] = ()) -> list[str]:
  """Writes results.csv, results.md and the plots; returns their paths.
  ``mode`` is the budget (or quick) and ``recipes`` the runs' flagfiles."""
  summaries = summarize(study, rows)
  seeds = sorted({r['seed'] for r in rows})
  epochs = sorted({int(r['epochs']) for r in rows if r.get('epochs')})
  header = (f'Budget: **{mode}**'
            + (f' (recipe {", ".join(f"`{r}`" for r in recipes)})'
               if recipes else '')
            + (f'; epochs {", ".join(map(str, epochs))}' if epochs else '')
            + f'; seeds {", ".join(map(str, seeds))}; test accuracy of each '
            'run\'s best-validation checkpoint, mean ± sample std over '
            'seeds.\n')
  paths = [os.path.join(study_dir, n) for n in ('results.csv', 'results.md')]
  write_csv(paths[0], rows, study.columns)
  write_markdown(paths[1], study, summaries, rows, header)
  if any(s.n for s in summaries):
    title = f'{study.name} ({mode}, {len(seeds)} seed(s))'
    paths.append(os.path.join(study_dir, 'accuracy.png'))
    plot_accuracy(paths[-1], study, summaries, title)
    paths.append(os.path.join(study_dir, 'cost.png'))
    plot_cost(paths[-1], study, summaries, title)
  return paths
