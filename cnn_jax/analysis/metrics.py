"""Classification metrics as pure numpy functions of labels and predictions.

Everything here is independent of JAX and of the model, so it can be unit
tested on hand-made examples: confusion matrix, per-class precision / recall /
F1 / support, softmax statistics, calibration (reliability) bins with the
expected calibration error, and the selection of gallery examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax of ``[N, K]`` logits, numerically stable."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean categorical cross-entropy of ``[N, K]`` logits against int labels."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  labels = np.asarray(labels)
  return float(-log_probs[np.arange(len(labels)), labels].mean())


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
  """Mean negative log-probability of the true class (cross-entropy of
  probabilities, e.g. of an ensemble's averaged softmax)."""
  p = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels)
  chosen = p[np.arange(len(labels)), labels]
  return float(-np.log(np.maximum(chosen, np.finfo(np.float64).tiny)).mean())


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """``[K, K]`` int64 counts; row = true class, column = predicted class."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} and predictions '
                     f'{predictions.shape} differ in shape')
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, predictions), 1)
  return cm


def row_normalize(cm: np.ndarray) -> np.ndarray:
  """Each row divided by its sum (rows of absent classes stay 0)."""
  rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
  return np.divide(cm, rows, out=np.zeros(cm.shape, np.float64),
                   where=rows > 0)


def errors_only(cm: np.ndarray) -> np.ndarray:
  """The confusion matrix with its diagonal (the correct ones) set to 0.

  At 99% accuracy the diagonal dwarfs everything else; what is left is
  the mistakes, counted by (true class, predicted class).
  """
  out = np.array(cm, np.int64, copy=True)
  np.fill_diagonal(out, 0)
  return out


def confused_pairs(cm: np.ndarray, k: int) -> list[tuple[int, int, int]]:
  """The ``k`` most frequent mistakes as (true, predicted, count), most
  frequent first (ties by class index); pairs never confused are left out."""
  errors = errors_only(cm)
  true, pred = np.nonzero(errors)
  counts = errors[true, pred]
  order = np.lexsort((pred, true, -counts))[:k]
  return [(int(true[i]), int(pred[i]), int(counts[i])) for i in order]


@dataclasses.dataclass(frozen=True)
class PerClass:
  """Per-class scores derived from a confusion matrix (arrays of length K)."""

  precision: np.ndarray
  recall: np.ndarray
  f1: np.ndarray
  support: np.ndarray   # Number of true examples of each class.
  predicted: np.ndarray  # Number of examples predicted as each class.
  correct: np.ndarray

  def rows(self, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One JSON-ready dict per class."""
    return [{'class_index': i, 'class_name': str(name),
             'precision': float(self.precision[i]),
             'recall': float(self.recall[i]), 'f1': float(self.f1[i]),
             'support': int(self.support[i]),
             'predicted': int(self.predicted[i]),
             'correct': int(self.correct[i])}
            for i, name in enumerate(class_names)]


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def per_class_metrics(cm: np.ndarray) -> PerClass:
  """Precision, recall (= per-class accuracy), F1 and support per class.

  A ratio with a zero denominator (class never predicted / never present)
  is reported as 0.
  """
  correct = np.diag(cm).astype(np.int64)
  support = cm.sum(axis=1).astype(np.int64)
  predicted = cm.sum(axis=0).astype(np.int64)
  precision = _safe_div(correct, predicted)
  recall = _safe_div(correct, support)
  f1 = _safe_div(2 * precision * recall, precision + recall)
  return PerClass(precision, recall, f1, support, predicted, correct)


def accuracy(cm: np.ndarray) -> float:
  """Overall accuracy: trace over total."""
  total = cm.sum()
  return float(np.trace(cm) / total) if total else 0.0


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Equal-width confidence bins of a reliability diagram."""

  edges: np.ndarray       # [B + 1] bin edges on [0, 1].
  counts: np.ndarray      # [B] examples whose confidence falls in the bin.
  accuracy: np.ndarray    # [B] fraction correct in the bin (0 if empty).
  confidence: np.ndarray  # [B] mean confidence in the bin (0 if empty).
  ece: float              # Expected calibration error.


def calibration(confidences: np.ndarray, correct: np.ndarray,
                num_bins: int = 15) -> Calibration:
  """Bins top-1 confidences and computes ECE = sum_b |acc_b - conf_b| n_b/N.

  Bins are ``(lo, hi]`` except the first, which also holds confidence 0.
  """
  conf = np.asarray(confidences, np.float64)
  correct = np.asarray(correct, np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(np.searchsorted(edges, conf, side='left') - 1, 0,
                 num_bins - 1)
  counts = np.bincount(bins, minlength=num_bins)
  acc = _safe_div(np.bincount(bins, correct, num_bins), counts)
  mean_conf = _safe_div(np.bincount(bins, conf, num_bins), counts)
  ece = float(np.sum(np.abs(acc - mean_conf) * counts) / max(len(conf), 1))
  return Calibration(edges, counts, acc, mean_conf, ece)


def gallery_indices(labels: np.ndarray, predictions: np.ndarray,
                    confidences: np.ndarray, num_correct: int,
                    num_mistakes: int) -> tuple[np.ndarray, np.ndarray]:
  """(correct, mistakes): the first correct examples in test order and the
  most confident mistakes, most confident first."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  right = np.flatnonzero(labels == predictions)[:num_correct]
  wrong = np.flatnonzero(labels != predictions)
  order = np.argsort(-np.asarray(confidences)[wrong], kind='stable')
  return right, wrong[order][:num_mistakes]
