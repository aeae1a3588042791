"""``--mode=eval``: the test-set score of a run's best checkpoint."""

from __future__ import annotations

from typing import Any

from cnn_jax import inference, input_pipeline
from cnn_jax.config import Config, CnnJaxError


def check_compatible(info: input_pipeline.DatasetInfo,
                     data_info: input_pipeline.DatasetInfo) -> None:
  """Fails when data of ``data_info`` cannot go through a model of ``info``."""
  if (info.num_classes, tuple(info.image_shape)) != (
      data_info.num_classes, tuple(data_info.image_shape)):
    raise CnnJaxError(
        f'the run was trained on {info.name} ({info.num_classes} classes, '
        f'images {tuple(info.image_shape)}) but --dataset gives '
        f'{data_info.name} ({data_info.num_classes} classes, images '
        f'{tuple(data_info.image_shape)})')


def evaluate_workdir(workdir: str, config: Config) -> dict[str, Any]:
  """Restores the best variables of a run and tests them."""
  restored = inference.restore(workdir, config)
  data = input_pipeline.load(config, splits=('test',))
  check_compatible(restored.info, data.info)
  test = restored.predictor().evaluate(restored.variables, data.test.images,
                                       data.test.labels)
  return {'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
          'best_epoch': restored.meta['epoch'],
          'val_accuracy': restored.meta['accuracy'],
          'test_examples': len(data.test)}
