"""``--mode=eval``: the test-set score of a workdir's best checkpoint(s).

Works alike for a run, a ``--num_models`` run and a ``--mode=ensemble``
workdir: every member's probabilities, their average and majority vote, and
with ``--tta`` the same again with test-time augmentation, reported beside
the plain figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnn_jax import inference, input_pipeline, losses
from cnn_jax.config import Config, CnnJaxError


def check_compatible(info: input_pipeline.DatasetInfo,
                     data_info: input_pipeline.DatasetInfo) -> None:
  """Fails when data of ``data_info`` cannot go through a model of ``info``."""
  if not info.same_task(data_info):
    raise CnnJaxError(f'the run was trained on {info.describe()} but '
                      f'--dataset gives {data_info.describe()}')


def score(ensemble: inference.Ensemble, images: np.ndarray,
          labels: np.ndarray, prefix: str = 'test') -> dict[str, Any]:
  """Accuracy and loss of the averaged members (and their vote, and each
  member, when there are several), plus the same with TTA when set."""
  out: dict[str, Any] = {}
  single = ensemble.num_members == 1
  for tta, tag in ((0, ''), (ensemble.tta, 'tta_')):
    if tag and not tta:
      break
    if single and not tta:  # From the logits, as training reports it.
      run = ensemble.runs[0]
      m = ensemble.predictors[0].evaluate(run.variables, images, labels)[0]
      out.update({f'{prefix}_accuracy': m['accuracy'],
                  f'{prefix}_loss': m['loss']})
      continue
    probs = ensemble.member_probabilities(images, tta)
    m = losses.probability_metrics(probs, labels)
    out.update({f'{tag}{prefix}_accuracy': m['accuracy'],
                f'{tag}{prefix}_loss': m['loss']})
    if not single:
      vote = 'vote' if prefix == 'test' else f'{prefix}_vote'
      out[f'{tag}{vote}_accuracy'] = m['vote_accuracy']
      out[f'{tag}member_{prefix}_accuracy'] = [
          float((p.argmax(-1) == labels).mean()) for p in probs]
  if ensemble.tta:
    out['tta'] = ensemble.tta
  return out


def evaluate_workdir(workdir: str, config: Config) -> dict[str, Any]:
  """Restores the best checkpoint(s) of ``workdir`` and tests them."""
  ensemble = inference.load(workdir, config)
  data = input_pipeline.load(config, splits=('test',))
  check_compatible(ensemble.info, data.info)
  out = score(ensemble, data.test.images, data.test.labels)
  out['test_examples'] = len(data.test)
  members = ensemble.members
  if len(members) == 1:
    out.update(best_epoch=members[0].best_epoch,
               val_accuracy=members[0].val_accuracy)
  else:
    out['members'] = [{'name': m.name, 'model': m.model, 'seed': m.seed,
                       'best_epoch': m.best_epoch,
                       'val_accuracy': m.val_accuracy} for m in members]
  return out
