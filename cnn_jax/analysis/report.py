"""`analyze`: a report that teaches how a run's CNN works, from its workdir.

It restores the best params (`inference.restore`), computes the test-set
probabilities, and writes under ``workdir/analysis/`` one self-contained
folder: ``index.html`` (rendered from a Jinja2 template by `page`), the PNG
figures it shows, ``per_class.csv``/``per_class.json``,
``confusion_matrix.json``, ``summary.json`` (and ``compare.json`` with
``compare=``). The page reads top to bottom like a lesson (data,
architecture, one filter's path to the decision, early vs deep layers,
training, results, mistakes, another run side by side), then the reference.

Two parts feed it: `evaluation` (test probabilities and labels only, so an
ensemble's averaged probabilities plug in alike) and `internals` (the model
and its variables); `captions` turns both into sentences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

from absl import logging
import numpy as np

from cnn_jax import evaluate as evaluate_lib
from cnn_jax import inference, input_pipeline, registry
from cnn_jax import workdir as workdir_lib
from cnn_jax.analysis import (captions, compare as compare_lib, evaluation,
                              internals, members, metrics, page, plots,
                              robustness_section)
from cnn_jax.analysis.files import ReportFiles, clean_previous
from cnn_jax.config import Config, CnnJaxError

NUM_SAMPLES = 32
NUM_SALIENCY = 8  # Of each kind (correct / mistakes).
# The ablation studies' page, in the repository this package runs from.
FINDINGS = 'experiments/FINDINGS.md'


def findings_link() -> dict[str, str]:
  """Where the report points for the ablation findings: the file itself
  when the package runs from a checkout that has it, else its repo path."""
  path = pathlib.Path(__file__).resolve().parents[2] / FINDINGS
  return {'text': FINDINGS, 'href': path.as_uri() if path.is_file() else ''}


def _check_examples(examples: Sequence[int], n: int) -> list[int]:
  bad = [i for i in examples if not 0 <= int(i) < n]
  if bad:
    raise CnnJaxError(f'--analysis_examples {bad} out of range: the test '
                      f'split has {n} examples (indices 0..{n - 1})')
  return list(dict.fromkeys(int(i) for i in examples))


@dataclasses.dataclass(frozen=True)
class _First:
  """The first network of a workdir (of a many-member run, or an
  ensemble's first member), whose insides the report draws."""

  run: inference.Restored
  network: inference.Network
  variables: Any


def _first_network(ens: inference.Ensemble) -> _First:
  run = ens.runs[0]
  return _First(run, run.networks[0], run.network_variables(0))


def _other_run(other: str, info: input_pipeline.DatasetInfo
               ) -> inference.Ensemble:
  """The ``--compare`` workdir (any kind), checked to be on the dataset."""
  config = compare_lib.other_config(other, info)
  try:
    return inference.load(other, config)
  except CnnJaxError as e:
    raise CnnJaxError(f'--compare={other}: {e}') from e


def _run(label: str, workdir: str, ens: inference.Ensemble,
         ev: evaluation.Evaluation) -> compare_lib.Run:
  first = _first_network(ens)
  history = workdir_lib.read_history(first.run.workdir)
  return compare_lib.Run(
      label=label, workdir=workdir, num_params=ens.num_params(),
      best_epoch=int(first.network.best_epoch or -1),
      epochs=len(history) or first.run.config.epochs, ev=ev)


def _headline_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
  return [('model', summary['model']), ('dataset', summary['dataset']),
          ('test accuracy', captions.pct(summary['test_accuracy'])),
          ('test mistakes', f"{summary['mistakes']:,} of "
                            f"{summary['test_examples']:,}"),
          ('test loss', f"{summary['test_loss']:.4f}"),
          ('parameters', f"{summary['num_params']:,}"),
          ('tested checkpoint', f"epoch {summary['best_epoch']} of "
                                f"{summary['epochs_trained']}"),
          ('its validation accuracy', captions.pct(summary['val_accuracy'])),
          ('expected calibration error', captions.pct(summary['ece']))]


def _stage_rows(arch: Any) -> list[dict[str, Any]]:
  return [{'name': s.name, 'kind': s.kind, 'in_shape': s.in_shape,
           'out_shape': s.out_shape, 'params': s.params,
           'arithmetic': s.arithmetic, 'field_text': s.field_text,
           'note': s.note} for s in arch.stages]


def analyze(config: Config, workdir: str,
            examples: Sequence[int] = (0, 1, 2),
            compare: str | None = None) -> str:
  """Writes ``workdir/analysis/index.html`` (and its files); returns its path.

  ``examples`` are the test-set indices whose path through the model is
  drawn; ``compare`` is another run's workdir (same dataset) to show side by
  side. Raises CnnJaxError when a workdir holds no run or best checkpoint,
  the runs are on different datasets, or an index is out of range.
  """
  ens = inference.load(workdir, config)
  other = _other_run(compare, ens.info) if compare else None
  first = _first_network(ens)
  model, variables = first.run.model, first.variables
  data = input_pipeline.load(config, splits=('test',))
  info, test = ens.info, data.test
  evaluate_lib.check_compatible(info, data.info)
  if not len(test):
    raise CnnJaxError(f'the test split of {info.name!r} is empty')
  examples = _check_examples(examples, len(test))
  names = [str(n) for n in info.class_names]
  member_probs = ens.member_probabilities(test.images)
  ev = evaluation.evaluate(member_probs.mean(0), test.labels,
                           info.num_classes)

  out_dir = os.path.join(workdir, 'analysis')
  os.makedirs(out_dir, exist_ok=True)
  clean_previous(out_dir)
  files = ReportFiles(out_dir)
  n = min(NUM_SAMPLES, len(test))
  files.add('data', plots.samples(
      test.images[:n], test.labels[:n], names, files.path('samples.png'),
      f'the first {n} test images with their labels'))
  evaluated = evaluation.write(files, test.images, ev, names)
  right, wrong = metrics.gallery_indices(ev.labels, ev.predictions,
                                         ev.confidences, NUM_SALIENCY,
                                         NUM_SALIENCY)
  chosen = np.concatenate([right, wrong]).astype(int)
  inside = internals.write(
      files, model, variables, test.images, test.labels, names, examples,
      (chosen, ev.predictions[chosen], ev.confidences[chosen]),
      min(config.eval_batch_size, 500))
  arch = inside['architecture']
  networks = ens.networks
  ensemble = (members.write(files, test.images, test.labels, member_probs,
                            networks, names) if len(networks) > 1 else None)
  robust = robustness_section.write(files, workdir, names)
  history = workdir_lib.read_history(first.run.workdir)
  best_epoch = int(first.network.best_epoch or -1)
  files.add('training', plots.history(history, files.path('history.png'),
                                      best_epoch))
  compared = None
  if other is not None:
    label_a, label_b = compare_lib.labels(config.model, workdir,
                                          other.runs[0].config.model
                                          if len(other.runs) == 1 else
                                          'ensemble', compare)
    other_ev = evaluation.evaluate(other.probabilities(test.images),
                                   test.labels, info.num_classes)
    compared = compare_lib.write(
        files, test.images, _run(label_a, workdir, ens, ev),
        _run(label_b, compare, other, other_ev), names)

  summary = {
      'model': config.model, 'dataset': info.name, 'workdir': workdir,
      'test_accuracy': ev.accuracy, 'test_loss': ev.loss,
      'test_examples': int(len(test)), 'mistakes': ev.mistakes,
      'num_params': ens.num_params(),
      'num_networks': len(networks), 'best_epoch': best_epoch,
      'val_accuracy': float(first.network.best_val_accuracy
                            if first.network.best_val_accuracy is not None
                            else float('nan')),
      'ece': ev.calibration.ece, 'epochs_trained': len(history),
      'feature_map_layers': inside['feature_map_layers'],
      'examples': examples,
      'sections': list(page.section_ids(compared is not None,
                                        ensemble is not None,
                                        robust is not None)),
      'compare': compare,
  }
  dropout = sorted({s.rate for s in arch.stages
                    if s.kind == 'dropout' and s.rate})
  context = {
      'title': f'{config.model} on {info.name}', 'workdir': workdir,
      'accuracy': ev.accuracy,
      'headline': captions.headline(config.model, info.name, ev.labels,
                                    ev.predictions),
      'headline_rows': _headline_rows(summary),
      'data': {'captions': captions.data(names, info.image_shape, len(test)),
               'figures': files.figures('data')},
      'arch': {'stages': _stage_rows(arch), 'lessons': inside['lessons'],
               'total': arch.num_params,
               'tabulate': registry.summary(first.run.config,
                                            info.num_classes,
                                            info.image_shape),
               'note': (f'This workdir holds {len(networks)} networks. The '
                        'architecture, feature maps, filters and training '
                        f'history below are those of the first '
                        f'({networks[0].name}); the results and mistakes are '
                        'those of their averaged probabilities.'
                        if len(networks) > 1 else '')},
      'examples': [
          {**ex, 'stage_figures': files.figures(f'fmaps_{ex["index"]}')}
          for ex in inside['examples']],
      'early_deep': {'captions': inside['early_deep'],
                     'figures': files.figures('early_deep')},
      'training': {'captions': captions.training(
          history, best_epoch, config.best_metric, config.augment, dropout,
          config.label_smoothing, config.lr_schedule),
                   'figures': files.figures('training')},
      'results': {'captions': evaluated['results'],
                  'figures': files.figures('results')},
      'mistakes': {'captions': evaluated['mistakes'],
                   'pairs': evaluated['pairs'],
                   'figures': files.figures('mistakes')},
      'compare': compared,
      'ensemble': ensemble,
      'robustness': robust,
      'findings': findings_link(),
      'reference': {
          'per_class_rows': evaluated['per_class_rows'],
          'any_low': any(r['below_overall']
                         for r in evaluated['per_class_rows']),
          'calibration': evaluated['calibration'],
          'saliency': captions.saliency(len(right), len(wrong)),
          'evaluation_figures': files.figures('reference_evaluation'),
          'internals_figures': files.figures('reference_internals')},
  }
  index = files.path('index.html')
  page.write(index, context)
  summary['files'] = files.all() + ['index.html', 'summary.json']
  with open(files.path('summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  logging.info('analysis of %s: test accuracy %.2f%%, %d files in %s',
               workdir, 100 * ev.accuracy, len(summary['files']), out_dir)
  return index
