"""The robustness part of the report, from ``WORKDIR/robustness.json``.

Written by ``--mode=robustness`` (`cnn_jax.robustness`); when the file is
there the report shows accuracy per corruption as bars (one network, the
ensemble and TTA where the workdir has them), a table per severity, every
corruption at each severity on a test image, and the corrupted and
font-rendered digits the workdir's predictor gets wrong. Everything comes
from the JSON and its ``.npz`` of images: no network runs here.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from absl import logging
from matplotlib.figure import Figure
import numpy as np

from cnn_jax import robustness
from cnn_jax import workdir as workdir_lib
from cnn_jax.analysis import captions
from cnn_jax.analysis.files import ReportFiles
from cnn_jax.analysis.plots import MISTAKE, save, show_image
from cnn_jax.config import CnnJaxError

SECTION = 'robustness'
MISTAKES_PER_KIND = 2  # Shown; the JSON keeps more.
FONT_MISTAKES = 16


def read(workdir: str
         ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None] | None:
  """The workdir's robustness JSON and images, or None if it has none (or
  one of another format, with a warning)."""
  path = os.path.join(workdir, robustness.FILE)
  if not os.path.exists(path):
    return None
  try:
    result = workdir_lib.read_json(path)
  except CnnJaxError as e:
    logging.warning('report: skipping robustness: %s', e)
    return None
  if not isinstance(result, dict) or result.get('format') != robustness.FORMAT:
    logging.warning('report: %s has another format; run --mode=robustness '
                    'again to show it', path)
    return None
  npz = os.path.join(workdir, result.get('examples_file', ''))
  images = None
  if os.path.isfile(npz):
    with np.load(npz) as z:
      images = {k: z[k] for k in z.files}
  return result, images


def shown_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """The rows the bars compare: one network (the first member of several),
  the ensemble, and TTA of the workdir's own predictor; with labels."""
  rows = result['results']
  plain = [r for r in rows if not r['tta']]
  out = [('one network' if len(plain) > 1 else 'the network', plain[0])]
  ens = [r for r in plain if r['role'] == 'ensemble']
  if ens:
    out.append((f'{len(plain) - 1} networks averaged', ens[0]))
  tta = [r for r in rows if r['tta'] and r['role'] != 'member']
  if tta:
    out.append((f'{out[-1][0]} + TTA {tta[0]["tta"]}', tta[0]))
  return out


def bars(result: dict[str, Any], path: str) -> str:
  """Accuracy per corruption (mean over severities), clean and fonts."""
  shown = shown_rows(result)
  kinds = [c['name'] for c in result['corruptions']]
  labels = ['clean'] + kinds + ['mean corruption', 'fonts']
  height = 0.8 / len(shown)
  fig = Figure(figsize=(9, 0.32 * len(labels) * max(1, len(shown) / 1.6) + 1),
               constrained_layout=True)
  ax = fig.subplots()
  y = np.arange(len(labels))
  for j, (name, row) in enumerate(shown):
    values = ([row['clean_accuracy']]
              + [float(np.mean(row['corruption_accuracy'][k])) for k in kinds]
              + [row['mean_corruption_accuracy'], row['font_accuracy']])
    ax.barh(y + (j - (len(shown) - 1) / 2) * height, 100 * np.array(values),
            height, label=name)
  ax.set_yticks(y)
  ax.set_yticklabels(labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, 100)
  ax.set_xlabel('accuracy (%), corruptions: mean over severities')
  ax.grid(axis='x', alpha=0.3)
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8)
  ax.set_title('accuracy on clean, corrupted and font-rendered digits')
  return save(fig, path)


def severity_examples(result: dict[str, Any], examples: np.ndarray,
                      path: str) -> str:
  """Each corruption (rows) on the first test images at severity 0-3."""
  n_kinds, levels, n_images = examples.shape[:3]
  cols = levels * n_images
  fig = Figure(figsize=(0.9 * cols + 1.5, 0.95 * n_kinds + 0.6),
               constrained_layout=True)
  axes = np.atleast_2d(fig.subplots(n_kinds, cols))
  for r, spec in enumerate(result['corruptions']):
    have = len(spec['severities'])
    for i in range(n_images):
      for s in range(levels):
        ax = axes[r, i * levels + s]
        if s > have:
          ax.axis('off')
          continue
        show_image(ax, examples[r, s, i])
        if r == 0:
          ax.set_title('clean' if s == 0 else f'severity {s}', fontsize=7)
    axes[r, 0].set_ylabel(spec['name'], rotation=0, ha='right', va='center',
                          fontsize=8)
  fig.suptitle('every corruption at each severity, on the first test images')
  return save(fig, path)


def image_grid(images: np.ndarray, titles: Sequence[str], heading: str,
               path: str, cols: int = 10, color: str = MISTAKE) -> str:
  """Images with a title each (mistakes: what the predictor said)."""
  rows = max(1, math.ceil(len(images) / cols))
  fig = Figure(figsize=(1.25 * cols, 1.45 * rows + 0.5),
               constrained_layout=True)
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for ax in axes[len(images):]:
    ax.axis('off')
  for ax, image, title in zip(axes, images, titles):
    show_image(ax, image)
    ax.set_title(title, fontsize=6, color=color)
  fig.suptitle(heading if len(images) else f'{heading}: none')
  return save(fig, path)


def sentences(result: dict[str, Any]) -> list[str]:
  """Computed captions: every number read from the JSON."""
  rows = result['results']
  own = next(r for r in rows if r['role'] != 'member' and not r['tta'])
  who, verb, its = (('the averaged networks', 'score', 'their')
                    if own['role'] == 'ensemble' else
                    ('the network', 'scores', 'its'))
  levels = {c['name']: len(c['severities']) for c in result['corruptions']}
  kinds = list(levels)
  clean_error = 1 - own['clean_accuracy']
  ratio = (own['mean_corruption_error'] / clean_error if clean_error > 0
           else float('inf'))
  out = [
      f'On the {captions.num(result["test_examples"])} clean test images '
      f'{who} {verb} {captions.pct(own["clean_accuracy"])}. Under '
      f'{len(kinds)} kinds of corruption, at up to {max(levels.values())} '
      f'severities each, {its} mean accuracy is '
      f'{captions.pct(own["mean_corruption_accuracy"])}: an error of '
      f'{captions.pct(own["mean_corruption_error"])}'
      + (f', {ratio:.1f} times the clean error.' if math.isfinite(ratio)
         else '.')]
  by_level = sorted(
      ((own['corruption_accuracy'][k][s], k, s + 1) for k in kinds
       for s in range(levels[k])))
  hardest = ', '.join(f'{k} at severity {s} ({captions.pct(a)})'
                      for a, k, s in by_level[:3])
  means = sorted((float(np.mean(own['corruption_accuracy'][k])), k)
                 for k in kinds)
  out.append(f'Hardest: {hardest}. Least harmful on average: '
             f'{means[-1][1]} ({captions.pct(means[-1][0])} over its '
             'severities).')
  fs = result['font_set']
  out.append(
      f'On {captions.num(fs["examples"])} digits rendered from '
      f'{captions.plural(len(fs["fonts"]), "font")} in '
      f'{captions.plural(fs["families"], "family", "families")} and '
      f'preprocessed as --mode=predict preprocesses a file, {who} {verb} '
      f'{captions.pct(own["font_accuracy"])}.')
  for what, label in (('corruptions', 'under corruption'),
                      ('fonts', 'on the font digits')):
    worst = ', '.join(f'{captions.cls(w["class"])} '
                      f'({captions.pct(w["accuracy"])})'
                      for w in own['worst_classes'][what])
    out.append(f'Weakest classes {label}: {worst}.')
  members = [r for r in rows if r['role'] == 'member' and not r['tta']]
  if members:
    accs = [r['mean_corruption_accuracy'] for r in members]
    fonts = [r['font_accuracy'] for r in members]
    out.append(
        f'The {len(members)} networks alone: mean corruption accuracy '
        f'{captions.pct(min(accs))} to {captions.pct(max(accs))}, font '
        f'digits {captions.pct(min(fonts))} to {captions.pct(max(fonts))}; '
        'averaged, they reach the figures above.')
  tta = [r for r in rows if r['tta'] and r['role'] == own['role']]
  if tta:
    t = tta[0]
    out.append(
        f'With test-time augmentation over {t["tta"]} shifted copies: clean '
        f'{captions.pct(t["clean_accuracy"])}, mean corruption '
        f'{captions.pct(t["mean_corruption_accuracy"])}, font digits '
        f'{captions.pct(t["font_accuracy"])}.')
  return out


def table(result: dict[str, Any]) -> dict[str, Any]:
  """Rows of the page's table: each kind's accuracy per severity for every
  row of `shown_rows`."""
  shown = shown_rows(result)
  levels = max(len(c['severities']) for c in result['corruptions'])
  rows = []
  for spec in result['corruptions']:
    kind = spec['name']
    params = '; '.join(', '.join(f'{k} {v:g}' for k, v in p.items())
                       for p in spec['severities'])
    rows.append({'kind': kind, 'description': spec['description'],
                 'params': params,
                 'values': [[row['corruption_accuracy'][kind][s]
                             if s < len(spec['severities']) else None
                             for s in range(levels)] for _, row in shown]})
  return {'columns': [name for name, _ in shown], 'levels': levels,
          'rows': rows}


def write(files: ReportFiles, workdir: str, class_names: Sequence[str]
          ) -> dict[str, Any] | None:
  """The section's figures and captions, or None without robustness.json."""
  found = read(workdir)
  if found is None:
    return None
  result, images = found
  names = list(class_names)
  files.add(SECTION, bars(result, files.path('robustness_bars.png')),
            'accuracy per corruption: the bars compare one network, the '
            'ensemble and TTA where the workdir has them')
  if images is not None:
    files.add(SECTION, severity_examples(
        result, images['examples'], files.path('robustness_examples.png')))
    kept = result['mistakes']['corruptions']
    shown, count = [], {}
    for i, m in enumerate(kept):
      count[m['corruption']] = count.get(m['corruption'], 0) + 1
      if count[m['corruption']] <= MISTAKES_PER_KIND:
        shown.append(i)
    files.add(SECTION, image_grid(
        images['mistake_images'][shown],
        [f'{kept[i]["corruption"]} {kept[i]["severity"]}\n'
         f'true {names[kept[i]["label"]]} said {names[kept[i]["prediction"]]}'
         for i in shown],
        'corrupted test images it gets wrong (highest severity)',
        files.path('robustness_mistakes.png')))
    files.add(SECTION, image_grid(
        images['font_images'], [f'label {names[y]}'
                                for y in images['font_labels']],
        'font-rendered digits as the model sees them (preprocessed like '
        '--mode=predict)', files.path('robustness_fonts.png'), color='black'))
    fonts = result['mistakes']['fonts'][:FONT_MISTAKES]
    files.add(SECTION, image_grid(
        images['font_mistake_images'][:len(fonts)],
        [f'{m["font"].split(" (")[0][:18]}\ntrue {names[m["label"]]} said '
         f'{names[m["prediction"]]}' for m in fonts],
        'font-rendered digits it gets wrong, as the model sees them',
        files.path('robustness_font_mistakes.png'), cols=8))
  return {'captions': sentences(result), 'table': table(result),
          'figures': files.figures(SECTION)}
