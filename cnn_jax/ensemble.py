"""``--mode=ensemble``: combine trained runs into one ensemble workdir.

``python -m cnn_jax.main --mode=ensemble --workdir=OUT --members=RUN1,RUN2``
copies each member's best checkpoint (with its config and dataset info)
into ``OUT/members/<i>/``, so the ensemble workdir is self-contained and
portable like any run, writes ``OUT/config.json`` and ``OUT/dataset_info.json``
and tests the ensemble: the members' softmax probabilities averaged, their
majority vote, and each member alone. Members may be any models (and
``--num_models`` runs, which count as all their members) trained on the same
dataset. The validation split is scored too when every member held out the
same one, so choices about the ensemble can be made without the test set.
Eval, analyze, predict and export then take ``--workdir=OUT`` like a run.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

from absl import logging

from cnn_jax import evaluate, inference, input_pipeline
from cnn_jax import results as results_lib
from cnn_jax import workdir as workdir_lib
from cnn_jax import checkpointing
from cnn_jax.config import Config, CnnJaxError, ENSEMBLE, validate

MEMBERS_DIR = 'members'


def _check_member(path: str, out: str) -> Config:
  """A member's config, after checking it is a finished run to copy."""
  if os.path.realpath(path) == os.path.realpath(out):
    raise CnnJaxError(f'--workdir={out} is also a member; write the '
                      'ensemble to a new folder')
  if not os.path.isdir(path):
    raise CnnJaxError(f'member {path} does not exist')
  config = workdir_lib.load_config(path)
  if config.members:
    raise CnnJaxError(f'member {path} is itself an ensemble; list its '
                      'members instead')
  if not checkpointing.has_best(path):
    raise CnnJaxError(f'member {path} has no checkpoint (no '
                      f'{os.path.join(path, "checkpoints", "best")}); train '
                      'it first')
  return config


def _copy_member(path: str, dest: str) -> None:
  """The files a member needs for inference and analysis: config, dataset
  info, results, training history and its best checkpoint."""
  os.makedirs(dest)
  for name in (workdir_lib.CONFIG, workdir_lib.DATASET_INFO,
               workdir_lib.RESULTS, workdir_lib.METRICS):
    if os.path.exists(os.path.join(path, name)):
      shutil.copy2(os.path.join(path, name), dest)
  shutil.copytree(os.path.join(path, 'checkpoints', 'best'),
                  os.path.join(dest, 'checkpoints', 'best'))


def build(config: Config, members: Sequence[str], out: str
          ) -> results_lib.Results:
  """Writes the ensemble workdir ``out``; returns its ``results.json``.

  ``config`` gives the data location and evaluation settings (``tta``,
  ``eval_batch_size``, ``test_examples``).
  """
  members = [m.strip() for m in members if m.strip()]
  if len(members) < 2:
    raise CnnJaxError('--members needs at least two trained workdirs, '
                      'separated by commas')
  if os.path.exists(os.path.join(out, workdir_lib.CONFIG)):
    raise CnnJaxError(f'--workdir={out} already holds a run or ensemble; '
                      'use a new folder')
  configs = [_check_member(m, out) for m in members]
  infos = [workdir_lib.dataset_info(m, c) for m, c in zip(members, configs)]
  for path, info in zip(members[1:], infos[1:]):
    if info.name != infos[0].name:
      raise CnnJaxError(f'member {path} was trained on {info.name}, '
                        f'{members[0]} on {infos[0].name}: an ensemble needs '
                        'one dataset')
    inference.check_same_data(infos[0], info, f'member {path}')

  staging = os.path.join(out, MEMBERS_DIR)
  try:
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    for i, path in enumerate(members):
      _copy_member(path, os.path.join(staging, str(i)))
  except OSError as e:
    raise CnnJaxError(f'cannot write the ensemble to {out}: '
                      f'{e.strerror or e}') from e
  first = configs[0]
  if len({c.permute_pixels for c in configs}) > 1:
    raise CnnJaxError('--members mix runs trained on permuted and on plain '
                      'pixels (--permute_pixels); an ensemble needs one')
  ensemble_config = validate(config.replace(
      model=ENSEMBLE, dataset=first.dataset, augment=False,
      permute_pixels=first.permute_pixels,
      val_examples=first.val_examples, num_models=1,
      members=','.join(f'{MEMBERS_DIR}/{i}' for i in range(len(members)))))
  workdir_lib.write_json(os.path.join(out, workdir_lib.CONFIG),
                         json.loads(ensemble_config.to_json()))
  workdir_lib.write_dataset_info(out, infos[0])

  ens = inference.load(out, ensemble_config)
  same_val = len({c.val_examples for c in configs}) == 1
  data = input_pipeline.load(ensemble_config, splits=(
      ('val', 'test') if same_val else ('test',)))
  evaluate.check_compatible(ens.info, data.info)
  test = evaluate.score(ens, data.test.images, data.test.labels, ens.tta)
  val = (evaluate.score(ens, data.val.images, data.val.labels)
         if same_val else None)
  results = results_lib.Results(
      model=ENSEMBLE, dataset=ens.info.name, test_examples=len(data.test),
      members=evaluate.member_results(
          ens, test, evaluate.member_names(ens, ensemble_config)),
      ensemble=evaluate.ensemble_scores(test, val), tta=ens.tta,
      sources=tuple({'workdir': path, 'copy': f'{MEMBERS_DIR}/{i}',
                     'model': c.model, 'num_models': c.num_models,
                     'seeds': c.member_seeds()}
                    for i, (path, c) in enumerate(zip(members, configs))))
  workdir_lib.write_results(out, results)
  logging.info('ensemble of %d members: test accuracy %.2f%% (vote %.2f%%)',
               ens.num_members, 100 * results.ensemble.test_accuracy,
               100 * results.ensemble.vote_accuracy)
  return results
