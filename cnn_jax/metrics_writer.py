"""A run's per-epoch metrics: ``metrics.jsonl`` rows and TensorBoard scalars.

`epoch_row` builds one row from an epoch's summed training metrics and its
validation figures; `MetricsWriter` appends it to ``workdir/metrics.jsonl``
and writes its numbers as TensorBoard scalars under ``workdir/tb`` (process
0 only).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np

from cnn_jax import workdir as workdir_lib


class TensorBoard:
  """Scalar summaries for TensorBoard, written without TensorFlow.

  TensorBoard's own ``EventFileWriter`` opens files through
  ``tensorboard.compat.tf``, which imports TensorFlow (seconds) whenever it
  is installed; the event file is just records of ``Event`` protos.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event, self._summary = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time()):010d}.'
            f'{socket.gethostname()}.{os.getpid()}.cnn_jax')
    self._writer = RecordWriter(open(os.path.join(logdir, name), 'wb'))
    self._write(event_pb2.Event(wall_time=time.time(),
                                file_version='brain.Event:2'))

  def _write(self, event: Any) -> None:
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def scalars(self, values: dict[str, float], step: int) -> None:
    summary = self._summary.Summary(value=[
        self._summary.Summary.Value(tag=k, simple_value=float(v))
        for k, v in values.items()])
    self._write(self._event.Event(step=step, summary=summary,
                                  wall_time=time.time()))

  def close(self) -> None:
    self._writer.close()


class MetricsWriter:
  """Per-epoch rows to ``metrics.jsonl`` and TensorBoard (process 0)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, workdir_lib.METRICS)
    self.tb = None
    if self.enabled:
      try:
        self.tb = TensorBoard(os.path.join(workdir, 'tb'))
      except ImportError:  # TensorBoard summaries are optional.
        self.tb = None

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self.tb:
      self.tb.scalars({k: v for k, v in row.items()
                       if k not in ('epoch', 'step')
                       and isinstance(v, (int, float))}, row['step'])

  def close(self) -> None:
    if self.tb:
      self.tb.close()


def epoch_row(epoch: int, step: int, learning_rate: float, sums: Any,
              vals: list[dict[str, float]],
              val_ensemble_accuracy: float | None = None) -> dict[str, Any]:
  """One ``metrics.jsonl`` row: the members' means, and each member's
  figures when there are several. ``sums`` are the epoch's summed training
  metrics (``loss_sum``, ``correct``, ``count``; per member when many)."""
  s = jax.device_get(sums)
  train_loss = np.atleast_1d(s['loss_sum'] / s['count'])
  train_acc = np.atleast_1d(s['correct'] / s['count'])
  row = {'epoch': epoch + 1, 'step': step,
         'train_loss': float(np.mean(train_loss)),
         'train_accuracy': float(np.mean(train_acc)),
         'val_loss': float(np.mean([v['loss'] for v in vals])),
         'val_accuracy': float(np.mean([v['accuracy'] for v in vals])),
         'learning_rate': learning_rate}
  if len(vals) > 1:
    row['val_ensemble_accuracy'] = val_ensemble_accuracy
    row['members'] = {
        'train_loss': train_loss.tolist(), 'train_accuracy': train_acc.tolist(),
        'val_loss': [v['loss'] for v in vals],
        'val_accuracy': [v['accuracy'] for v in vals]}
  return row
