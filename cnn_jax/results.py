"""``results.json``: one layout for every kind of workdir.

A run of one network, a ``--num_models=K`` run and a ``--mode=ensemble``
workdir write the same shape, defined here once:

* ``members``: one `Member` per network (one for a single run), each with
  the same fields: its model, seed, parameters, best epoch and validation
  metrics, and its own test accuracy and loss;
* ``ensemble``: for more than one network, the figures of their averaged
  probabilities (`EnsembleScores`: accuracy, loss, majority vote), under
  their own names; ``None`` for one network;
* ``training``: how the run trained (`Training`); ``None`` for an ensemble
  workdir, which trains nothing (``sources`` says where its members came
  from);
* ``tta``: the number of shifted copies behind the ``tta_*`` figures (0:
  none), and ``test_examples``, ``timings``.

`Results.accuracy` is the workdir's one headline figure: the ensemble's when
there are several networks, else the network's. `read` also reads the
earlier layouts (no ``layout`` key) of all three kinds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

LAYOUT = 2
FILE = 'results.json'


@dataclasses.dataclass(frozen=True)
class Member:
  """One network of a workdir and its figures."""

  name: str  # 'seed0'; in an ensemble workdir 'members/0' or 'members/0#seed1'.
  model: str
  seed: int | None
  num_params: int | None
  best_epoch: int | None
  best_val_accuracy: float | None
  best_val_loss: float | None
  test_accuracy: float
  test_loss: float
  tta_test_accuracy: float | None = None
  tta_test_loss: float | None = None


@dataclasses.dataclass(frozen=True)
class EnsembleScores:
  """The members' averaged probabilities (and majority vote) on a split."""

  test_accuracy: float
  test_loss: float
  vote_accuracy: float
  tta_test_accuracy: float | None = None
  tta_test_loss: float | None = None
  tta_vote_accuracy: float | None = None
  val_accuracy: float | None = None
  val_loss: float | None = None
  val_vote_accuracy: float | None = None


@dataclasses.dataclass(frozen=True)
class Training:
  """How a run trained: the same for all its members."""

  epochs: int
  steps: int
  best_metric: str
  train_seconds: float
  train_img_per_s: float
  num_devices: int
  backend: str
  kernels: str


@dataclasses.dataclass(frozen=True)
class Results:
  """The contents of ``results.json`` (and of ``--mode=eval``'s output)."""

  model: str  # A registry name, or 'ensemble'.
  dataset: str
  test_examples: int
  members: tuple[Member, ...]
  ensemble: EnsembleScores | None = None
  training: Training | None = None
  tta: int = 0
  sources: tuple[dict[str, Any], ...] | None = None
  timings: dict[str, Any] | None = None
  layout: int = LAYOUT

  @property
  def accuracy(self) -> float:
    """The headline test accuracy: the ensemble's, else the network's."""
    return (self.ensemble.test_accuracy if self.ensemble
            else self.members[0].test_accuracy)

  @property
  def loss(self) -> float:
    return (self.ensemble.test_loss if self.ensemble
            else self.members[0].test_loss)

  @property
  def member_accuracies(self) -> list[float]:
    return [m.test_accuracy for m in self.members]

  def member_accuracy_std(self) -> float:
    """Sample standard deviation over members (NaN for one)."""
    accs = self.member_accuracies
    return float(np.std(accs, ddof=1)) if len(accs) > 1 else math.nan

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict; fields that do not apply (None) are left out."""
    return _drop_none(dataclasses.asdict(self))


def _drop_none(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _drop_none(v) for k, v in value.items() if v is not None}
  if isinstance(value, (list, tuple)):
    return [_drop_none(v) for v in value]
  return value


def _build(cls: type, d: dict[str, Any]) -> Any:
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in d.items() if k in names})


def from_json(d: dict[str, Any], seeds: Sequence[int] = ()) -> Results:
  """`Results` from ``results.json``'s dict, of this layout or an earlier
  one (``seeds``, the run's member seeds from its config, name the members
  of an earlier single run, which did not record its seed)."""
  if d.get('layout', 1) >= LAYOUT:
    return Results(
        model=d['model'], dataset=d['dataset'],
        test_examples=d['test_examples'],
        members=tuple(_build(Member, m) for m in d['members']),
        ensemble=_build(EnsembleScores, d['ensemble']) if d.get('ensemble')
        else None,
        training=_build(Training, d['training']) if d.get('training')
        else None,
        tta=d.get('tta', 0),
        sources=tuple(d['sources']) if d.get('sources') else None,
        timings=d.get('timings'), layout=d['layout'])
  return _from_layout_1(d, list(seeds))


def _from_layout_1(d: dict[str, Any], seeds: list[int]) -> Results:
  """The three shapes written before `LAYOUT` 2."""
  training = None if d.get('model') == 'ensemble' else _build(Training, {
      'epochs': d.get('epochs'), 'steps': d.get('steps'),
      'best_metric': d.get('best_metric'),
      'train_seconds': d.get('train_seconds'),
      'train_img_per_s': d.get('train_img_per_s'),
      'num_devices': d.get('num_devices'), 'backend': d.get('backend'),
      'kernels': d.get('kernels')})
  common = dict(model=d['model'], dataset=d['dataset'],
                test_examples=d.get('test_examples', 0), training=training,
                timings=d.get('timings'), tta=d.get('tta', 0), layout=1)
  old_members = d.get('members')
  if d['model'] == 'ensemble':  # members: [{workdir, copy, model, seeds, ...}]
    members, sources = [], []
    for entry in old_members or []:
      accs = entry.get('test_accuracy')
      accs = accs if isinstance(accs, list) else [accs]
      for seed, acc in zip(entry.get('seeds') or [None], accs):
        suffix = f'#seed{seed}' if len(entry.get('seeds') or []) > 1 else ''
        members.append(Member(f'{entry["copy"]}{suffix}', entry['model'], seed,
                              None, None, None, None, acc, math.nan))
      sources.append({k: entry[k] for k in ('workdir', 'copy', 'model',
                                            'num_models', 'seeds')
                      if k in entry})
    return Results(**common, members=tuple(members), sources=tuple(sources),
                   ensemble=_ensemble_1(d))
  num_params = d.get('num_params')
  if old_members:  # A --num_models=K run.
    members = tuple(Member(
        f'seed{m["seed"]}', d['model'], m['seed'], num_params,
        m.get('best_epoch'), m.get('best_val_accuracy'),
        m.get('best_val_loss'), m['test_accuracy'], m['test_loss'])
                    for m in old_members)
    return Results(**common, members=members, ensemble=_ensemble_1(d))
  seed = seeds[0] if seeds else None
  member = Member(f'seed{seed}' if seed is not None else d['model'],
                  d['model'], seed, num_params, d.get('best_epoch'),
                  d.get('best_val_accuracy'), d.get('best_val_loss'),
                  d['test_accuracy'], d['test_loss'])
  return Results(**common, members=(member,))


def _ensemble_1(d: dict[str, Any]) -> EnsembleScores:
  return EnsembleScores(
      test_accuracy=d['test_accuracy'], test_loss=d['test_loss'],
      vote_accuracy=d.get('vote_accuracy'),
      tta_test_accuracy=d.get('tta_test_accuracy'),
      tta_test_loss=d.get('tta_test_loss'),
      tta_vote_accuracy=d.get('tta_vote_accuracy'),
      val_accuracy=d.get('val_accuracy'), val_loss=d.get('val_loss'),
      val_vote_accuracy=d.get('val_vote_accuracy'))


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)
