r"""Command-line entry point: ``python -m cnn_jax.main --flagfile=...``.

Modes:
  train    (default) train, checkpoint and test; resumes an existing workdir.
  eval     test the best checkpoint of --workdir.
  analyze  a report that explains the best checkpoint, in workdir/analysis
           (--compare=OTHER_WORKDIR puts another run beside it).
  predict  classify image files given as arguments.
  export   write a serving artifact of the best params.
  ensemble combine trained runs (--members=RUN1,RUN2,...) into --workdir.
  robustness  accuracy of --workdir on corrupted test images and on digits
           rendered from fonts, in workdir/robustness.json.
  explore  a local web page: draw or upload a digit and see every layer
           answer (--compare=OTHER_WORKDIR answers beside it; --host,
           --port; needs the 'explore' extra).

Flags are parsed here only and turned into a `Config`; for eval/analyze/
predict/export the workdir's saved config is used, with data-location and
evaluation flags given on the command line taking precedence. Each of these
modes takes any workdir: a run, a --num_models run or an ensemble.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from typing import Any, Sequence

from absl import app, flags, logging

from cnn_jax import config_flags, phases, runtime
from cnn_jax.config import Config, CnnJaxError, EVAL_OVERRIDE_FIELDS

MODES = ('train', 'eval', 'analyze', 'predict', 'export', 'ensemble',
         'robustness', 'explore')

_MODE = flags.DEFINE_string('mode', 'train', f'One of: {", ".join(MODES)}.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, '
                               'checkpoints, metrics, results, analysis.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() first (multi-host;'
    ' address/count/id from the flags below or the environment).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (distributed).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s index (distributed).')
_COMPILATION_CACHE = flags.DEFINE_bool(
    'compilation_cache', True, 'Keep compiled XLA programs in '
    '<cache_dir>/xla (JAX\'s persistent compilation cache), so a second run '
    'of the same config skips compiling.')
_ANALYSIS_EXAMPLES = flags.DEFINE_list(
    'analysis_examples', ['0', '1', '2'],
    'analyze: test-set indices whose path through the model is drawn.')
_COMPARE = flags.DEFINE_string(
    'compare', None, 'analyze, explore: the workdir of another run on the '
    'same dataset, shown side by side with --workdir\'s run.')
_HOST = flags.DEFINE_string(
    'host', '127.0.0.1', 'explore: the address to serve the page on; only '
    'this machine can open it unless you give another (e.g. 0.0.0.0).')
_PORT = flags.DEFINE_integer('port', 7860, 'explore: the port to serve on.')
_TOP_K = flags.DEFINE_integer('top_k', 3, 'predict: classes shown per file.')
_JSON = flags.DEFINE_bool('json', False, 'predict: one JSON object per line.')
_SAVE_PREPROCESSED = flags.DEFINE_string(
    'save_preprocessed', None,
    'predict: folder for PNGs of each preprocessed input beside its '
    'prediction.')
_ROBUSTNESS_SEED = flags.DEFINE_integer(
    'robustness_seed', 0, 'robustness: seed of the corruptions and of the '
    'font-rendered digits.')
_FONT_EXAMPLES = flags.DEFINE_integer(
    'font_examples', 2000, 'robustness: how many font-rendered digits to '
    'test (labels 0-9 in turn).')
_FONT_DIRS = flags.DEFINE_list(
    'font_dirs', [], 'robustness: folders searched for .ttf/.otf fonts '
    '(default /usr/share/fonts).')
_CORRUPTIONS = flags.DEFINE_list(
    'corruptions', [], 'robustness: the corruption kinds to test (default '
    'all; see cnn_jax/corruptions.py).')
config_flags.define_config_flags()
FLAGS = flags.FLAGS


def saved_config(workdir: str) -> Config:
  """The workdir's config, with data-location flags from the command line."""
  from cnn_jax import workdir as workdir_lib
  return workdir_lib.load_config(workdir, {
      name: FLAGS[name].value for name in EVAL_OVERRIDE_FIELDS
      if FLAGS[name].present})


def _print_json(obj: Any) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True))


def run(argv: Sequence[str], hooks: Sequence[Any] = ()) -> int:
  """Dispatches on --mode; returns the process exit code. ``hooks`` are
  training hooks (`cnn_jax.train.Hook`), for programs that wrap main."""
  mode, workdir = _MODE.value, _WORKDIR.value
  if mode not in MODES:
    raise CnnJaxError(f'unknown --mode={mode!r}; choose one of: '
                      f'{", ".join(MODES)}')
  if not workdir:
    raise CnnJaxError('--workdir is required')
  if mode != 'predict' and len(argv) > 1:
    raise CnnJaxError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.host_devices < 0:
    raise CnnJaxError(f'--host_devices must be >= 0, got {FLAGS.host_devices}')
  # Multi-host runs get their parallelism from the processes: one device
  # each unless --host_devices says otherwise.
  runtime.configure_xla(
      1 if _DISTRIBUTED.value and not FLAGS['host_devices'].present
      else FLAGS.host_devices, max(FLAGS.batch_size, 1))
  if _COMPILATION_CACHE.value:
    directory = runtime.compilation_cache_dir(FLAGS.cache_dir)
    if not runtime.enable_compilation_cache(directory):
      logging.warning('compilation cache %s cannot be created; compiling '
                      'every run', directory)
  if _DISTRIBUTED.value:
    from cnn_jax import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)

  if mode == 'train':
    config = config_flags.config_from_flags()
    from cnn_jax import train
    started = phases.process_seconds()
    if started is not None:
      logging.info('started in %.2fs (Python and imports)', started)
    _print_json(train.train_and_evaluate(config, workdir, hooks))
    return 0
  if mode == 'ensemble':
    if not FLAGS.members:
      raise CnnJaxError('--mode=ensemble needs --members=RUN1,RUN2,... '
                        '(trained workdirs)')
    config = config_flags.config_from_flags(members='')
    from cnn_jax import ensemble
    _print_json(ensemble.build(config, FLAGS.members.split(','),
                               workdir).to_json())
    return 0
  config = saved_config(workdir)
  if mode == 'eval':
    from cnn_jax import evaluate
    _print_json(evaluate.evaluate_workdir(workdir, config).to_json())
    return 0
  if mode == 'analyze':
    from cnn_jax.analysis import report
    try:
      examples = [int(i) for i in _ANALYSIS_EXAMPLES.value]
    except ValueError:
      raise CnnJaxError('--analysis_examples takes test-set indices, e.g. '
                        f'0,1,2; got {",".join(_ANALYSIS_EXAMPLES.value)}'
                        ) from None
    path = report.analyze(config, workdir, examples=examples,
                          compare=_COMPARE.value)
    print(f'analysis written: {path}')
    return 0
  if mode == 'robustness':
    from cnn_jax import robustness
    result = robustness.run(workdir, config, robustness.Options(
        seed=_ROBUSTNESS_SEED.value, font_examples=_FONT_EXAMPLES.value,
        font_dirs=tuple(_FONT_DIRS.value),
        corruptions=tuple(_CORRUPTIONS.value)))
    print(robustness.format_table(result))
    print(f'robustness written: {os.path.join(workdir, robustness.FILE)}')
    return 0
  if mode == 'predict':
    from cnn_jax import predict
    return predict.main(config, workdir, argv[1:], top_k=_TOP_K.value,
                        as_json=_JSON.value,
                        save_dir=_SAVE_PREPROCESSED.value)
  if mode == 'explore':
    from cnn_jax.explore import server
    return server.serve(config, workdir, compare=_COMPARE.value,
                        host=_HOST.value, port=_PORT.value)
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


def main(argv: Sequence[str], hooks: Sequence[Any] = ()) -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF's C++ start-up noise.
  logging.set_verbosity(logging.INFO)
  _quiet_libraries()
  try:
    code = run(argv, hooks)
    total = phases.process_seconds()
    if total is not None:
      logging.info('done in %.2fs since the process started', total)
  except CnnJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print('error: interrupted', file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # Stop from signals, and only that, is expected.
    from cnn_jax.stopping import Stop
    if isinstance(e, Stop):
      print(f'stopped: {e}', file=sys.stderr)
      sys.exit(143)
    raise
  sys.exit(code)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported as one ``error:`` line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def run_cli() -> None:
  """Console-script entry point (``cnn-jax``)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_cli()
