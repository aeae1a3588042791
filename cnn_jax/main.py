r"""Command-line entry point: ``python -m cnn_jax.main --flagfile=...``.

Modes:
  train    (default) train, checkpoint and test; resumes an existing workdir.
  eval     test the best checkpoint of --workdir.
  analyze  plots and a report of the best checkpoint under workdir/analysis.
  predict  classify image files given as arguments.
  export   write a serving artifact of the best params.

Flags are parsed here only and turned into a `Config`; for eval/analyze/
predict/export the workdir's saved config is used, with data-location flags
given on the command line taking precedence.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from typing import Any, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from cnn_jax import config_flags  # noqa: E402
from cnn_jax.config import Config, CnnJaxError, validate  # noqa: E402

MODES = ('train', 'eval', 'analyze', 'predict', 'export')
# Flags that may override a saved config in the non-training modes.
LOCATION_FIELDS = ('tfds_data_dir', 'download', 'eval_batch_size',
                   'test_examples', 'conv_impl', 'pool_impl')

_MODE = flags.DEFINE_string('mode', 'train', f'One of: {", ".join(MODES)}.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, '
                               'checkpoints, metrics, results, analysis.')
_HOST_DEVICES = flags.DEFINE_integer(
    'host_devices', 0, 'CPU only: split the host into this many XLA devices '
    '(one thread each) for data-parallel training; 0 = as many as CPU cores '
    '(the largest count <= cores that divides --batch_size). Ignored when '
    'XLA_FLAGS already sets a device count, and on GPU/TPU.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() first (multi-host;'
    ' address/count/id from the flags below or the environment).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (distributed).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s index (distributed).')
_ANALYSIS_EXAMPLES = flags.DEFINE_list(
    'analysis_examples', ['0', '1', '2'],
    'analyze: test-set indices whose feature maps are drawn.')
_TOP_K = flags.DEFINE_integer('top_k', 3, 'predict: classes shown per file.')
_JSON = flags.DEFINE_bool('json', False, 'predict: one JSON object per line.')
_SAVE_PREPROCESSED = flags.DEFINE_string(
    'save_preprocessed', None,
    'predict: folder for PNGs of each preprocessed input beside its '
    'prediction.')
config_flags.define_config_flags()
FLAGS = flags.FLAGS


def saved_config(workdir: str) -> Config:
  """The workdir's config.json, with location flags from the command line."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise CnnJaxError(f'no run found in --workdir={workdir} (it has no '
                      'config.json); train first with --mode=train')
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CnnJaxError(f'cannot read {path}: {e}') from e
  for name in LOCATION_FIELDS:
    if FLAGS[name].present:
      saved[name] = FLAGS[name].value
  return validate(Config.from_dict(saved))


def _print_json(obj: Any) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True))


def _set_host_devices(count: int, batch_size: int) -> None:
  """Asks XLA:CPU for `count` host devices; must run before JAX starts.

  XLA:CPU runs each device's kernels on one thread here (see
  `cnn_jax/__init__.py`), so data parallelism over host devices is how a run
  uses every core.
  """
  if count < 0:
    raise CnnJaxError(f'--host_devices must be >= 0, got {count}')
  if not count:
    cores = os.cpu_count() or 1
    count = max(d for d in range(1, cores + 1) if batch_size % d == 0)
  xla_flags = os.environ.get('XLA_FLAGS', '')
  if count > 1 and 'xla_force_host_platform_device_count' not in xla_flags:
    os.environ['XLA_FLAGS'] = (
        f'{xla_flags} --xla_force_host_platform_device_count={count}').strip()


def run(argv: Sequence[str]) -> int:
  """Dispatches on --mode; returns the process exit code."""
  mode, workdir = _MODE.value, _WORKDIR.value
  if mode not in MODES:
    raise CnnJaxError(f'unknown --mode={mode!r}; choose one of: '
                      f'{", ".join(MODES)}')
  if not workdir:
    raise CnnJaxError('--workdir is required')
  if mode != 'predict' and len(argv) > 1:
    raise CnnJaxError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Multi-host runs get their parallelism from the processes: one device
  # each unless --host_devices says otherwise.
  _set_host_devices(
      1 if _DISTRIBUTED.value and not FLAGS['host_devices'].present
      else _HOST_DEVICES.value, max(FLAGS.batch_size, 1))
  if _DISTRIBUTED.value:
    from cnn_jax import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)

  from cnn_jax import train  # Imports JAX; deferred past flag errors.
  if mode == 'train':
    results = train.train_and_evaluate(config_flags.config_from_flags(),
                                       workdir)
    _print_json(results)
    return 0
  config = saved_config(workdir)
  if mode == 'eval':
    _print_json(train.evaluate_workdir(workdir, config))
    return 0
  if mode == 'analyze':
    from cnn_jax.analysis import report
    examples = [int(i) for i in _ANALYSIS_EXAMPLES.value]
    path = report.analyze(config, workdir, examples=examples)
    print(f'analysis written: {path}')
    return 0
  if mode == 'predict':
    from cnn_jax import predict
    return predict.main(config, workdir, argv[1:], top_k=_TOP_K.value,
                        as_json=_JSON.value,
                        save_dir=_SAVE_PREPROCESSED.value)
  from cnn_jax import export
  path = export.export(config, workdir)
  print(f'exported: {path}')
  return 0


def _quiet_libraries() -> None:
  """Keeps INFO for our own progress lines; libraries speak at WARNING+."""
  def keep(record) -> bool:
    return (record.levelno >= std_logging.WARNING
            or os.sep + 'cnn_jax' + os.sep in record.pathname)
  logging.get_absl_handler().addFilter(keep)


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.INFO)
  _quiet_libraries()
  try:
    code = run(argv)
  except CnnJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print('error: interrupted', file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # Stop from signals, and only that, is expected.
    from cnn_jax.train import Stop
    if isinstance(e, Stop):
      print(f'stopped: {e}', file=sys.stderr)
      sys.exit(143)
    raise
  sys.exit(code)


def run_cli() -> None:
  """Console-script entry point (``cnn-jax``)."""
  app.run(main)


if __name__ == '__main__':
  run_cli()
