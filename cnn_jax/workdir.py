"""The files of a run directory, read and written in one place.

A workdir holds everything about a run, with no absolute path needed to use
it, so it can be moved or copied to another machine:

* ``config.json``: the full `Config` of the run;
* ``dataset_info.json``: the dataset's name, version, class names, image
  shape and the input contract (`input_pipeline.INPUT_CONTRACT`), so
  prediction and export need no TFDS;
* ``metrics.jsonl``: one row per epoch; ``results.json``: the final test;
* ``checkpoints/``: Orbax checkpoints (`cnn_jax.checkpointing`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import logging
import jax

from cnn_jax import input_pipeline
from cnn_jax import results as results_lib
from cnn_jax.config import (Config, CnnJaxError, EVAL_OVERRIDE_FIELDS,
                            config_changes, validate)

CONFIG = 'config.json'
DATASET_INFO = 'dataset_info.json'
METRICS = 'metrics.jsonl'
RESULTS = results_lib.FILE


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON atomically (a reader never sees half a file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """The JSON in ``path``; a clear error when it is unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CnnJaxError(f'cannot read {path}: {e}') from e


def require_run(workdir: str) -> None:
  """Fails with a hint unless ``workdir`` holds a run's config."""
  if not os.path.isfile(os.path.join(workdir, CONFIG)):
    raise CnnJaxError(f'no run found in --workdir={workdir} (it has no '
                      f'{CONFIG}); train first with --mode=train')


def prepare(config: Config, workdir: str) -> None:
  """Makes ``workdir`` ready for ``config``'s run, or refuses to mix runs:
  it must be writable, and a config saved there must match on resume.
  Saves ``config.json`` (process 0)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CnnJaxError(f'--workdir={workdir} is not writable: '
                      f'{e.strerror or e}') from e
  path = os.path.join(workdir, CONFIG)
  if os.path.exists(path):
    changes = config_changes(read_json(path), config)
    if changes:
      raise CnnJaxError(f'--workdir={workdir} holds a run with a different '
                        f'config ({", ".join(changes[:4])}); use a new '
                        '--workdir to start another run')
  if jax.process_index() == 0:
    write_json(path, json.loads(config.to_json()))


def load_config(workdir: str, overrides: Mapping[str, Any] | None = None
                ) -> Config:
  """The run's saved config, with eval-like overrides applied.

  ``overrides`` may set `EVAL_OVERRIDE_FIELDS` only. A saved data dir that
  does not exist here (a workdir trained on another machine) is dropped, so
  ``$TFDS_DATA_DIR`` or the TFDS default applies.
  """
  require_run(workdir)
  saved = read_json(os.path.join(workdir, CONFIG))
  if not isinstance(saved, dict):
    raise CnnJaxError(f'{os.path.join(workdir, CONFIG)} is not a JSON object')
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(EVAL_OVERRIDE_FIELDS)
  if unknown:
    raise ValueError(f'cannot override {sorted(unknown)} of a saved run')
  if not os.path.isdir(saved.get('tfds_data_dir') or '.'):
    saved['tfds_data_dir'] = ''
  saved.update(overrides)
  return validate(Config.from_dict(saved))


def write_dataset_info(workdir: str, info: input_pipeline.DatasetInfo) -> None:
  write_json(os.path.join(workdir, DATASET_INFO), info.to_dict())


def dataset_info(workdir: str, config: Config
                 ) -> input_pipeline.DatasetInfo:
  """The dataset info saved with the run.

  Runs saved before it was kept there read it from TFDS once (which needs
  the dataset's metadata in the data dir) and write it back when they can.
  """
  path = os.path.join(workdir, DATASET_INFO)
  if os.path.exists(path):
    try:
      return input_pipeline.DatasetInfo.from_dict(read_json(path))
    except (KeyError, TypeError, ValueError) as e:
      raise CnnJaxError(f'{path} is not a valid dataset info ({e}); '
                        'delete it to read it from TFDS again') from e
  info = input_pipeline.dataset_info(input_pipeline.get_builder(config))
  try:
    write_dataset_info(workdir, info)
    logging.info('%s had no %s (an older run); read it from TFDS and saved '
                 'it, so the workdir no longer needs TFDS to predict',
                 workdir, DATASET_INFO)
  except OSError:
    logging.warning('%s has no %s (an older run) and is read-only; '
                    'predict and export will read TFDS each time', workdir,
                    DATASET_INFO)
  return info


def write_results(workdir: str, results: results_lib.Results) -> None:
  write_json(os.path.join(workdir, RESULTS), results.to_json())


def read_results(workdir: str) -> results_lib.Results | None:
  """``results.json`` of a finished run (any layout), or None when it has
  none or it is unreadable (with a warning)."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return None
  try:
    saved = read_json(path)
    seeds = ()
    if 'layout' not in saved and os.path.exists(os.path.join(workdir,
                                                             CONFIG)):
      seeds = Config.from_dict(read_json(os.path.join(workdir, CONFIG))
                               ).member_seeds()
    return results_lib.from_json(saved, seeds)
  except (CnnJaxError, KeyError, TypeError, ValueError) as e:
    logging.warning('ignoring unreadable %s (%s)', path, e)
    return None


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The per-epoch metric rows a run wrote (the last row of an epoch wins)."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return []
  rows: dict[int, dict[str, Any]] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row['epoch']] = row
  return [rows[k] for k in sorted(rows)]
