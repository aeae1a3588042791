"""The evaluation part of the report, from test-set probabilities alone.

Everything here takes ``[N, C]`` class probabilities and the labels (plus
the images, for galleries), never a model: one run's softmax or several
runs' averaged softmax serve alike. It computes the metrics and writes the
results, mistakes and reference figures and tables, with their captions.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from cnn_jax.analysis import captions, lesson_plots, metrics, plots
from cnn_jax.analysis.files import ReportFiles

NUM_CORRECT, NUM_MISTAKES = 16, 16
NUM_PAIRS, PAIR_EXAMPLES = 5, 6


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Test-set predictions and the metrics derived from them."""

  labels: np.ndarray
  probabilities: np.ndarray
  predictions: np.ndarray
  confidences: np.ndarray
  loss: float
  cm: np.ndarray
  scores: metrics.PerClass
  calibration: metrics.Calibration

  @property
  def accuracy(self) -> float:
    return metrics.accuracy(self.cm)

  @property
  def correct(self) -> np.ndarray:
    return self.predictions == self.labels

  @property
  def mistakes(self) -> int:
    return int((~self.correct).sum())


def evaluate(probabilities: np.ndarray, labels: np.ndarray,
             num_classes: int) -> Evaluation:
  """All test metrics from the ``[N, C]`` probabilities of a whole split."""
  probs = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels)
  predictions = probs.argmax(-1)
  confidences = probs.max(-1)
  cm = metrics.confusion_matrix(labels, predictions, num_classes)
  return Evaluation(
      labels=labels, probabilities=probs, predictions=predictions,
      confidences=confidences, loss=metrics.nll(probs, labels), cm=cm,
      scores=metrics.per_class_metrics(cm),
      calibration=metrics.calibration(confidences, predictions == labels))


def pair_examples(ev: Evaluation, pairs: Sequence[tuple[int, int, int]],
                  k: int) -> list[tuple[int, int, int, np.ndarray]]:
  """Each (true, predicted, count) pair with up to ``k`` test indices of
  it, most confident first."""
  out = []
  for t, p, count in pairs:
    idx = np.flatnonzero((ev.labels == t) & (ev.predictions == p))
    idx = idx[np.argsort(-ev.confidences[idx], kind='stable')][:k]
    out.append((t, p, count, idx))
  return out


def _write_tables(ev: Evaluation, class_names: Sequence[str],
                  files: ReportFiles) -> list[dict[str, Any]]:
  """per_class.{json,csv} and confusion_matrix.json (rows = true class)."""
  rows = ev.scores.rows(class_names)
  with open(files.path('confusion_matrix.json'), 'w') as f:
    json.dump({'class_names': list(class_names), 'rows': 'true class',
               'columns': 'predicted class', 'counts': ev.cm.tolist(),
               'errors_only': metrics.errors_only(ev.cm).tolist()}, f)
  with open(files.path('per_class.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  with open(files.path('per_class.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  for name in ('per_class.csv', 'per_class.json', 'confusion_matrix.json'):
    files.add('tables', files.path(name))
  return rows


def write(files: ReportFiles, images: np.ndarray, ev: Evaluation,
          class_names: Sequence[str]) -> dict[str, Any]:
  """Writes the evaluation figures and tables; returns the page's parts:
  captions of the results, mistakes and calibration, the per-class rows
  and the confused pairs."""
  files.add('results', plots.per_class(
      ev.scores, class_names, ev.accuracy, files.path('per_class.png')))
  errors = metrics.errors_only(ev.cm)
  files.add('mistakes', plots.confusion_errors(
      errors, class_names, files.path('confusion_errors.png')),
            'mistakes only: the confusion matrix without its diagonal')
  pairs = pair_examples(ev, metrics.confused_pairs(ev.cm, NUM_PAIRS),
                        PAIR_EXAMPLES)
  if pairs:
    files.add('mistakes', lesson_plots.confused_pairs(
        images, pairs, ev.confidences, class_names,
        files.path('confused_pairs.png')), 'the most frequent mistakes')
  right, wrong = metrics.gallery_indices(ev.labels, ev.predictions,
                                         ev.confidences, NUM_CORRECT,
                                         NUM_MISTAKES)
  files.add('mistakes', plots.gallery(
      images, ev.labels, ev.predictions, ev.confidences, class_names,
      right, wrong, files.path('predictions_gallery.png')),
            'correct predictions and the most confident mistakes')
  files.add('reference_evaluation', plots.confusion(
      ev.cm, class_names, files.path('confusion_matrix.png')),
            'confusion matrix, counts')
  files.add('reference_evaluation', plots.calibration(
      ev.calibration, files.path('calibration.png')),
            'reliability diagram and confidence histogram')
  rows = [{**r, 'below_overall': r['recall'] < ev.accuracy}
          for r in _write_tables(ev, class_names, files)]
  return {
      'results': captions.per_class(class_names, ev.scores.recall,
                                    ev.accuracy),
      'mistakes': captions.mistakes(ev.cm, class_names,
                                    [p[:3] for p in pairs], ev.confidences,
                                    ev.correct),
      'calibration': captions.calibration(ev.calibration, ev.confidences,
                                          ev.correct),
      'per_class_rows': rows,
      'pairs': [{'true': class_names[t], 'predicted': class_names[p],
                 'count': c, 'examples': [int(i) for i in idx]}
                for t, p, c, idx in pairs],
  }
