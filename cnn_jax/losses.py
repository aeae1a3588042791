"""The training objective, the summable metrics of a batch, and the
metrics of averaged (ensemble) probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax import input_pipeline


def loss_and_metrics(logits: jax.Array, labels: jax.Array, num_classes: int,
                     label_smoothing: float = 0.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean categorical cross-entropy and the summable metrics of a batch.

  The metrics (``loss_sum``, ``correct``, ``count``) add up over batches,
  devices and steps; their ratios are the mean loss and the accuracy.
  """
  targets = input_pipeline.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  correct = jnp.argmax(logits, -1) == labels
  metrics = {'loss_sum': losses.sum(), 'correct': correct.sum(),
             'count': jnp.asarray(labels.shape[0])}
  return losses.mean(), metrics


def summarize(metrics: dict[str, jax.Array]) -> dict[str, float]:
  """``{'loss', 'accuracy'}`` from summed metrics."""
  m = jax.device_get(metrics)
  return {'loss': float(m['loss_sum'] / m['count']),
          'accuracy': float(m['correct'] / m['count'])}


def probability_metrics(member_probs: np.ndarray, labels: np.ndarray
                        ) -> dict[str, float]:
  """Accuracy and cross-entropy of members' averaged probabilities, and
  the accuracy of their majority vote (ties to the lowest class index).

  ``member_probs`` is ``[members, N, classes]`` (or ``[N, classes]``).
  """
  probs = np.asarray(member_probs, np.float64)
  probs = probs[None] if probs.ndim == 2 else probs
  labels = np.asarray(labels)
  mean = probs.mean(0)
  votes = np.zeros_like(mean)
  for member in probs:
    votes[np.arange(len(labels)), member.argmax(-1)] += 1
  picked = np.clip(mean[np.arange(len(labels)), labels], 1e-12, 1.0)
  return {'accuracy': float((mean.argmax(-1) == labels).mean()),
          'loss': float(-np.log(picked).mean()),
          'vote_accuracy': float((votes.argmax(-1) == labels).mean())}
