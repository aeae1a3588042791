"""The training objective and the summable metrics of a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
