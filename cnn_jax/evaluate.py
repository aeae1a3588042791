"""Scoring trained networks, and ``--mode=eval``.

`score` is the one place test (or validation) figures come from, for any
workdir: each network's accuracy and loss from its own logits (as training
reports them), and for several networks those of their averaged softmax
probabilities and their majority vote; with test-time augmentation the same
again from probabilities averaged over shifted copies of each image.
Training's final test, ``--mode=eval`` and ``--mode=ensemble`` all use it,
and `results` gives the figures their one layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cnn_jax import inference, input_pipeline, losses, models
from cnn_jax import results as results_lib
from cnn_jax.config import Config, CnnJaxError


@dataclasses.dataclass(frozen=True)
class Scores:
  """Figures of an ensemble's networks on one split."""

  member_accuracy: list[float]
  member_loss: list[float]
  ensemble: dict[str, float] | None  # accuracy, loss, vote_accuracy.
  tta_member_accuracy: list[float] | None = None
  tta_member_loss: list[float] | None = None
  tta_ensemble: dict[str, float] | None = None


def check_compatible(info: input_pipeline.DatasetInfo,
                     data_info: input_pipeline.DatasetInfo) -> None:
  """Fails when data of ``data_info`` cannot go through a model of ``info``."""
  if not info.same_task(data_info):
    raise CnnJaxError(f'the run was trained on {info.describe()} but '
                      f'--dataset gives {data_info.describe()}')


def _softmax64(logits: np.ndarray) -> np.ndarray:
  # In float64: float32 softmax can round nearly equal logits to equal
  # probabilities, and argmax must agree with the logits.
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _per_member(probs: np.ndarray, labels: np.ndarray
                ) -> tuple[list[float], list[float]]:
  picked = np.clip(probs[:, np.arange(len(labels)), labels], 1e-12, 1.0)
  return ([float(a) for a in (probs.argmax(-1) == labels).mean(-1)],
          [float(x) for x in -np.log(picked).mean(-1)])


def score(ensemble: inference.Ensemble, images: np.ndarray,
          labels: np.ndarray, tta: int = 0) -> Scores:
  """Every network's figures and, for several, their ensemble's; with
  ``tta`` > 0 also the same from ``tta`` shifted copies of each image."""
  labels = np.asarray(labels)
  member_acc, member_loss, probs = [], [], []
  for run, predictor in zip(ensemble.runs, ensemble.predictors):
    logits = predictor.logits(run.variables, images)
    for m in predictor.evaluate_logits(logits, labels):
      member_acc.append(m['accuracy'])
      member_loss.append(m['loss'])
    probs.append(_softmax64(np.asarray(logits)))
  several = ensemble.num_members > 1
  probs = np.concatenate(probs)
  out: dict[str, Any] = dict(
      member_accuracy=member_acc, member_loss=member_loss,
      ensemble=losses.probability_metrics(probs, labels) if several else None)
  if tta:
    tta_probs = ensemble.member_probabilities(images, tta)
    out['tta_member_accuracy'], out['tta_member_loss'] = _per_member(
        tta_probs, labels)
    if several:
      out['tta_ensemble'] = losses.probability_metrics(tta_probs, labels)
  return Scores(**out)


def member_results(ensemble: inference.Ensemble, scores: Scores,
                   names: list[str] | None = None
                   ) -> tuple[results_lib.Member, ...]:
  """The `results.Member` of each network of ``ensemble``."""
  out = []
  params = [p for run in ensemble.runs for p in _member_params(run)]
  for k, net in enumerate(ensemble.networks):
    out.append(results_lib.Member(
        name=names[k] if names else f'seed{net.seed}', model=net.model,
        seed=net.seed, num_params=params[k], best_epoch=net.best_epoch,
        best_val_accuracy=net.best_val_accuracy,
        best_val_loss=net.best_val_loss,
        test_accuracy=scores.member_accuracy[k],
        test_loss=scores.member_loss[k],
        tta_test_accuracy=(scores.tta_member_accuracy[k]
                           if scores.tta_member_accuracy else None),
        tta_test_loss=(scores.tta_member_loss[k]
                       if scores.tta_member_loss else None)))
  return tuple(out)


def _member_params(run: inference.Restored) -> list[int]:
  # From the shapes: indexing each network out would be a program per leaf.
  k = run.num_members
  return [models.count_params(run.variables['params']) // k] * k


def ensemble_scores(test: Scores, val: Scores | None = None
                    ) -> results_lib.EnsembleScores | None:
  """The ensemble's figures (None for one network)."""
  if test.ensemble is None:
    return None
  tta = test.tta_ensemble or {}
  v = (val.ensemble if val is not None else None) or {}
  return results_lib.EnsembleScores(
      test_accuracy=test.ensemble['accuracy'], test_loss=test.ensemble['loss'],
      vote_accuracy=test.ensemble['vote_accuracy'],
      tta_test_accuracy=tta.get('accuracy'), tta_test_loss=tta.get('loss'),
      tta_vote_accuracy=tta.get('vote_accuracy'),
      val_accuracy=v.get('accuracy'), val_loss=v.get('loss'),
      val_vote_accuracy=v.get('vote_accuracy'))


def evaluate_workdir(workdir: str, config: Config) -> results_lib.Results:
  """Restores the best checkpoint(s) of ``workdir`` and tests them."""
  ensemble = inference.load(workdir, config)
  data = input_pipeline.load(config, splits=('test',))
  check_compatible(ensemble.info, data.info)
  scores = score(ensemble, data.test.images, data.test.labels, ensemble.tta)
  return results_lib.Results(
      model=config.model, dataset=ensemble.info.name,
      test_examples=len(data.test),
      members=member_results(ensemble, scores,
                             member_names(ensemble, config)),
      ensemble=ensemble_scores(scores), tta=ensemble.tta)


def member_names(ensemble: inference.Ensemble, config: Config) -> list[str]:
  """How results name each network: ``seedN`` in a run; in an ensemble
  workdir the member's folder (``members/0``), with ``#seedN`` when that
  member is a K-network run."""
  if not config.members:
    return [f'seed{n.seed}' for n in ensemble.networks]
  out = []
  for folder, run in zip(config.members.split(','), ensemble.runs):
    for net in run.networks:
      out.append(folder + (f'#seed{net.seed}' if run.num_members > 1 else ''))
  return out


def test_run(config: Config, model: Any, info: input_pipeline.DatasetInfo,
             test: input_pipeline.Split, best: Any, best_meta: dict[str, Any],
             workdir: str, mesh: Any, training: results_lib.Training
             ) -> results_lib.Results:
  """A finished run's ``results.json``: its best variables (as the best
  checkpoint holds them; no member axis for one network) on the test split,
  also with ``config.tta`` shifted copies when set. ``model`` is the stock
  (forward) model."""
  variables = best if config.num_models > 1 else inference.stack(best)
  run = inference.Restored(config, info, model, variables,
                           inference.networks_of(config, best_meta, workdir),
                           workdir)
  ensemble = inference.Ensemble([run], mesh)
  scores = score(ensemble, test.images, test.labels, config.tta)
  return results_lib.Results(
      model=config.model, dataset=info.name, test_examples=len(test),
      members=member_results(ensemble, scores),
      ensemble=ensemble_scores(scores), training=training, tta=config.tta)
