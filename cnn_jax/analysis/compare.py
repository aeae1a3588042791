"""Two runs side by side on the same test images (``--compare``).

It works on two `evaluation.Evaluation`s, i.e. on test-set probabilities,
so any two predictors on one dataset compare alike: accuracy, parameters,
per-class differences and the images one gets right and the other wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from cnn_jax import input_pipeline
from cnn_jax.analysis import captions, lesson_plots
from cnn_jax.analysis.evaluation import Evaluation
from cnn_jax.analysis.files import ReportFiles
from cnn_jax.config import Config, CnnJaxError

MAX_SHOWN = 32  # Disagreeing images drawn per direction.


@dataclasses.dataclass(frozen=True)
class Run:
  """One side of the comparison."""

  label: str
  workdir: str
  num_params: int
  best_epoch: int
  epochs: int
  ev: Evaluation


def check_same_dataset(info: input_pipeline.DatasetInfo,
                       other: input_pipeline.DatasetInfo,
                       other_workdir: str) -> None:
  """Fails unless both runs classify the same classes of same-shape images."""
  if not info.same_task(other):
    raise CnnJaxError(
        f'--compare={other_workdir} was trained on {other.describe()} but '
        f'this run on {info.describe()}; compare two runs on the same '
        'dataset')


def other_config(other: str, info: input_pipeline.DatasetInfo) -> Config:
  """The config of the ``--compare`` workdir (a run of any kind), checked
  to hold a run on the dataset of ``info``; every failure is one line
  naming the flag."""
  from cnn_jax import workdir as workdir_lib
  if not os.path.isdir(other):
    raise CnnJaxError(f'--compare={other} does not exist; give the workdir '
                      'of another trained run')
  if not os.path.isfile(os.path.join(other, workdir_lib.CONFIG)):
    raise CnnJaxError(f'--compare={other} holds no run (it has no '
                      f'{workdir_lib.CONFIG})')
  try:
    config = workdir_lib.load_config(other)
    check_same_dataset(info, workdir_lib.dataset_info(other, config), other)
  except CnnJaxError as e:
    if str(e).startswith('--compare='):
      raise
    raise CnnJaxError(f'--compare={other}: {e}') from e
  return config


def labels(model_a: str, workdir_a: str, model_b: str, workdir_b: str
           ) -> tuple[str, str]:
  """Short names for the two runs: their models, or their folders if the
  models are the same."""
  if model_a != model_b:
    return model_a, model_b
  a = os.path.basename(os.path.normpath(workdir_a))
  b = os.path.basename(os.path.normpath(workdir_b))
  if a == b:
    a, b = os.path.normpath(workdir_a), os.path.normpath(workdir_b)
  return f'{model_a} ({a})', f'{model_b} ({b})'


def disagreements(a: Evaluation, b: Evaluation
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Test indices (a right and b wrong, b right and a wrong, both wrong)."""
  if not np.array_equal(a.labels, b.labels):
    raise ValueError('the two evaluations are of different test sets')
  ra, rb = a.correct, b.correct
  return (np.flatnonzero(ra & ~rb), np.flatnonzero(rb & ~ra),
          np.flatnonzero(~ra & ~rb))


def write(files: ReportFiles, images: np.ndarray, a: Run, b: Run,
          class_names: Sequence[str]) -> dict[str, Any]:
  """Writes the comparison figures and ``compare.json``; returns the
  page's parts."""
  a_only, b_only, both = disagreements(a.ev, b.ev)
  files.add('compare', lesson_plots.compare_per_class(
      class_names, a.ev.scores.recall, b.ev.scores.recall, a.label, b.label,
      files.path('compare_per_class.png')), 'per-class accuracy, both runs')
  files.add('compare', lesson_plots.compare_disagreements(
      images, a.ev.labels, a.ev.predictions, b.ev.predictions,
      [(f'{a.label} right, {b.label} wrong ({len(a_only)})',
        a_only[:MAX_SHOWN]),
       (f'{b.label} right, {a.label} wrong ({len(b_only)})',
        b_only[:MAX_SHOWN])],
      a.label, b.label, class_names, files.path('compare_disagreements.png')),
            'test images one run gets right and the other wrong')
  record = {
      'runs': [{'label': r.label, 'workdir': r.workdir,
                'test_accuracy': r.ev.accuracy, 'num_params': r.num_params,
                'best_epoch': r.best_epoch, 'epochs': r.epochs}
               for r in (a, b)],
      'a_right_b_wrong': a_only.tolist(), 'b_right_a_wrong': b_only.tolist(),
      'both_wrong': both.tolist()}
  with open(files.path('compare.json'), 'w') as f:
    json.dump(record, f, indent=2)
  files.add('tables', files.path('compare.json'))
  diff = b.ev.scores.recall - a.ev.scores.recall
  return {
      'runs': record['runs'],
      'label_a': a.label, 'label_b': b.label,
      'captions': captions.compare(
          a.label, b.label, a.ev.accuracy, b.ev.accuracy, a.num_params,
          b.num_params, len(a.ev.labels), len(a_only), len(b_only), len(both),
          class_names, a.ev.scores.recall, b.ev.scores.recall),
      'per_class': [{'class_name': n, 'a': float(ra), 'b': float(rb),
                     'diff': float(d)} for n, ra, rb, d in zip(
                         class_names, a.ev.scores.recall, b.ev.scores.recall,
                         diff)],
      'a_right_b_wrong': a_only.tolist(), 'b_right_a_wrong': b_only.tolist(),
      'both_wrong': len(both),
      'figures': files.figures('compare'),
  }
