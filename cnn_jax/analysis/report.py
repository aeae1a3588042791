"""`analyze`: an HTML report on a run's best checkpoint, from its workdir.

It restores the best params (`inference.restore`), evaluates them on the test
split, and writes under ``workdir/analysis/``: PNG figures (training history,
samples, feature maps of every conv/BN/pool stage, filters, confusion matrix,
per-class scores, predictions gallery, saliency, calibration),
``per_class.csv``/``per_class.json``, ``summary.json`` and ``index.html``,
which embeds every figure by relative path.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import os
import re
from typing import Any, Sequence

from absl import logging
import jax.numpy as jnp
import numpy as np

from cnn_jax import evaluate as evaluate_lib
from cnn_jax import inference, input_pipeline, models
from cnn_jax import workdir as workdir_lib
from cnn_jax.analysis import intermediates, metrics, plots
from cnn_jax.config import Config, CnnJaxError

NUM_SAMPLES = 32
NUM_CORRECT, NUM_MISTAKES = 16, 16
NUM_SALIENCY = 8  # Of each kind (correct / mistakes).
TOP_ACTIVATION_IMAGES = 2000


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Test-set predictions of the best params and the metrics derived."""

  labels: np.ndarray
  predictions: np.ndarray
  confidences: np.ndarray
  loss: float
  cm: np.ndarray
  scores: metrics.PerClass
  calibration: metrics.Calibration

  @property
  def accuracy(self) -> float:
    return metrics.accuracy(self.cm)


def evaluate(logits: np.ndarray, labels: np.ndarray, num_classes: int
             ) -> Evaluation:
  """All test metrics from the logits of the whole split."""
  probs = metrics.softmax(logits)
  predictions = probs.argmax(-1)
  confidences = probs.max(-1)
  cm = metrics.confusion_matrix(labels, predictions, num_classes)
  return Evaluation(
      labels=labels, predictions=predictions, confidences=confidences,
      loss=metrics.cross_entropy(logits, labels), cm=cm,
      scores=metrics.per_class_metrics(cm),
      calibration=metrics.calibration(confidences, predictions == labels))


def _check_examples(examples: Sequence[int], n: int) -> list[int]:
  bad = [i for i in examples if not 0 <= int(i) < n]
  if bad:
    raise CnnJaxError(f'--analysis_examples {bad} out of range: the test '
                      f'split has {n} examples (indices 0..{n - 1})')
  return list(dict.fromkeys(int(i) for i in examples))


def _slug(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'layer'


class _Files:
  """Paths of written files, relative to the analysis dir, by section."""

  def __init__(self, root: str):
    self.root = root
    self.sections: dict[str, list[tuple[str, str]]] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.root, name)

  def add(self, section: str, path: str, caption: str = '') -> None:
    self.sections.setdefault(section, []).append(
        (os.path.relpath(path, self.root), caption))

  def all(self) -> list[str]:
    return [f for items in self.sections.values() for f, _ in items]


def _clean_previous(out_dir: str) -> None:
  """Removes the files a previous analysis listed, so none goes stale."""
  path = os.path.join(out_dir, 'summary.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f).get('files', [])
  except (OSError, ValueError):
    return
  for name in old:
    target = os.path.join(out_dir, os.path.basename(name))
    if os.path.isfile(target):
      os.remove(target)


def _feature_maps(model: Any, variables: Any, test: input_pipeline.Split,
                  class_names: Sequence[str], ev: Evaluation,
                  examples: list[int], files: _Files
                  ) -> list[intermediates.FeatureMap]:
  """Input + every 4-D stage of each chosen example; returns the capture."""
  if not examples:
    return intermediates.capture(model, variables, input_pipeline.normalize(
        jnp.asarray(test.images[:1])))
  x = input_pipeline.normalize(jnp.asarray(test.images[examples]))
  maps = intermediates.capture(model, variables, x)
  for row, idx in enumerate(examples):
    section = f'fmaps_{idx}'
    label = class_names[ev.labels[idx]]
    pred = class_names[ev.predictions[idx]]
    files.add(section, plots.input_image(
        test.images[idx], f'test #{idx}: label {label}\npredicted {pred} '
        f'({100 * ev.confidences[idx]:.0f}%)',
        files.path(f'fmap_ex{idx}_00_input.png')), 'input')
    for i, fm in enumerate(maps, start=1):
      h, w, c = fm.value.shape[1:]
      title = (f'{fm.name} | test #{idx} (label {label}) | '
               f'{h}x{w}x{c}, one tile per channel')
      files.add(section, plots.feature_map(
          fm.value[row], title,
          files.path(f'fmap_ex{idx}_{i:02d}_{_slug(fm.name)}.png')),
                f'{fm.name} ({h}x{w}x{c})')
  return maps


def _filters(model: Any, variables: Any, test: input_pipeline.Split,
             maps: list[intermediates.FeatureMap], config: Config,
             files: _Files) -> None:
  kernels = intermediates.conv_kernels(variables['params'],
                                       [m.name for m in maps])
  if kernels:
    name, k = kernels[0]
    files.add('filters', plots.first_layer_filters(
        name, k, files.path('filters_first_layer.png')),
              f'{name}: first-layer kernels')
  if len(kernels) > 1:
    files.add('filters', plots.kernel_norms(
        kernels[1:], files.path('filters_deeper_norms.png')),
              'deeper conv layers: kernel L2 norms')
  if maps:
    layer = maps[-1].name
    images = test.images[:TOP_ACTIVATION_IMAGES]
    maxima = intermediates.channel_maxima(
        model, variables, images, layer, min(config.eval_batch_size, 500))
    files.add('filters', plots.top_activations(
        images, maxima, layer, files.path('top_activations.png')),
              f'{layer}: maximally activating test images')


def _evaluation_figures(model: Any, variables: Any,
                        test: input_pipeline.Split,
                        class_names: Sequence[str], ev: Evaluation,
                        files: _Files) -> None:
  files.add('confusion', plots.confusion(
      ev.cm, class_names, files.path('confusion_matrix.png')))
  files.add('per_class', plots.per_class(
      ev.scores, class_names, ev.accuracy, files.path('per_class.png')))
  right, wrong = metrics.gallery_indices(ev.labels, ev.predictions,
                                         ev.confidences, NUM_CORRECT,
                                         NUM_MISTAKES)
  files.add('gallery', plots.gallery(
      test.images, ev.labels, ev.predictions, ev.confidences, class_names,
      right, wrong, files.path('predictions_gallery.png')))
  chosen = np.concatenate([right[:NUM_SALIENCY], wrong[:NUM_SALIENCY]])
  if len(chosen):
    x = input_pipeline.normalize(jnp.asarray(test.images[chosen]))
    sal = intermediates.saliency(model, variables, x, ev.predictions[chosen])
    files.add('saliency', plots.saliency(
        test.images[chosen], sal, ev.labels[chosen], ev.predictions[chosen],
        ev.confidences[chosen], class_names, files.path('saliency.png')))
  files.add('calibration', plots.calibration(
      ev.calibration, files.path('calibration.png')))


def _write_tables(rows: list[dict[str, Any]], cm: np.ndarray,
                  class_names: Sequence[str], files: _Files) -> None:
  """per_class.{json,csv} and confusion_matrix.json (rows = true class)."""
  with open(files.path('confusion_matrix.json'), 'w') as f:
    json.dump({'class_names': list(class_names), 'rows': 'true class',
               'columns': 'predicted class', 'counts': cm.tolist()}, f)
  files.add('tables', files.path('confusion_matrix.json'))
  with open(files.path('per_class.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  with open(files.path('per_class.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  files.add('tables', files.path('per_class.json'))
  files.add('tables', files.path('per_class.csv'))


# HTML -------------------------------------------------------------------------
_CSS = """
body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
img{max-width:100%;margin:4px 0} figure{display:inline-block;margin:6px;
vertical-align:top} figcaption{font-size:12px;color:#555}
.low{color:#c0392b;font-weight:bold}
"""


def _img(path: str, caption: str = '') -> str:
  cap = f'<figcaption>{html.escape(caption)}</figcaption>' if caption else ''
  return (f'<figure><img src="{html.escape(path)}" alt="'
          f'{html.escape(caption or path)}" loading="lazy">{cap}</figure>')


def _section(files: _Files, key: str) -> str:
  return ''.join(_img(p, c) for p, c in files.sections.get(key, []))


def _headline_table(summary: dict[str, Any]) -> str:
  shown = [('model', summary['model']), ('dataset', summary['dataset']),
           ('test accuracy', f"{100 * summary['test_accuracy']:.2f}%"),
           ('test loss', f"{summary['test_loss']:.4f}"),
           ('test examples', f"{summary['test_examples']:,}"),
           ('parameters', f"{summary['num_params']:,}"),
           ('best epoch', summary['best_epoch']),
           ('val accuracy (best epoch)',
            f"{100 * summary['val_accuracy']:.2f}%"),
           ('expected calibration error', f"{100 * summary['ece']:.2f}%"),
           ('epochs trained', summary['epochs_trained'])]
  body = ''.join(f'<tr><th class="l">{html.escape(k)}</th>'
                 f'<td>{html.escape(str(v))}</td></tr>' for k, v in shown)
  return f'<table>{body}</table>'


def _per_class_table(rows: list[dict[str, Any]], accuracy: float) -> str:
  head = ('<tr><th class="l">class</th><th>precision</th><th>recall '
          '(accuracy)</th><th>F1</th><th>support</th><th>predicted</th></tr>')
  body = []
  for r in rows:
    low = ' class="low"' if r['recall'] < accuracy else ''
    body.append(
        f'<tr><td class="l">{html.escape(r["class_name"])}</td>'
        f'<td>{100 * r["precision"]:.2f}%</td>'
        f'<td{low}>{100 * r["recall"]:.2f}%</td>'
        f'<td>{100 * r["f1"]:.2f}%</td><td>{r["support"]}</td>'
        f'<td>{r["predicted"]}</td></tr>')
  return f'<table>{head}{"".join(body)}</table>'


def _write_html(summary: dict[str, Any], rows: list[dict[str, Any]],
                files: _Files, examples: list[int], path: str) -> None:
  fmap_sections = ''.join(
      f'<h3>test example #{i}</h3>{_section(files, f"fmaps_{i}")}'
      for i in examples) or '<p>No examples chosen (--analysis_examples).</p>'
  title = f"{summary['model']} on {summary['dataset']}"
  parts = [
      f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>'
      f'{html.escape(title)}: analysis</title><style>{_CSS}</style></head>'
      f'<body><h1>{html.escape(title)}</h1>'
      f'<p>Best checkpoint of <code>{html.escape(summary["workdir"])}</code>'
      f', evaluated on the test split.</p>',
      _headline_table(summary),
      '<h2>Training history</h2>', _section(files, 'history'),
      '<h2>Sample test images</h2>', _section(files, 'samples'),
      '<h2>Confusion matrix</h2>', _section(files, 'confusion'),
      '<h2>Per-class accuracy</h2>', _section(files, 'per_class'),
      '<p>Recall is the per-class accuracy; red marks classes below the '
      'overall accuracy. Also as <a href="per_class.csv">per_class.csv</a> '
      'and <a href="per_class.json">per_class.json</a>; the confusion '
      'matrix as <a href="confusion_matrix.json">confusion_matrix.json</a>.'
      '</p>',
      _per_class_table(rows, summary['test_accuracy']),
      '<h2>Predictions gallery</h2>', _section(files, 'gallery'),
      '<h2>Saliency</h2>', _section(files, 'saliency'),
      '<h2>Calibration</h2>', _section(files, 'calibration'),
      '<h2>Filters</h2>', _section(files, 'filters'),
      '<h2>Feature maps</h2><p>Every 4-D stage the model computes (conv '
      'outputs, batch norm, ReLU, pooling), in call order, captured with '
      'Flax <code>capture_intermediates</code>; one colour scale per '
      'layer.</p>', fmap_sections, '</body></html>']
  with open(path, 'w') as f:
    f.write('\n'.join(parts))


def analyze(config: Config, workdir: str,
            examples: Sequence[int] = (0, 1, 2)) -> str:
  """Writes ``workdir/analysis/index.html`` (and its files); returns its path.

  ``examples`` are the test-set indices whose feature maps are drawn.
  Raises CnnJaxError when the workdir holds no best checkpoint or an index
  is out of range.
  """
  restored = inference.restore(workdir, config)
  model, variables, meta = restored.model, restored.variables, restored.meta
  data = input_pipeline.load(config, splits=('test',))
  info, test = restored.info, data.test
  evaluate_lib.check_compatible(info, data.info)
  if not len(test):
    raise CnnJaxError(f'the test split of {info.name!r} is empty')
  examples = _check_examples(examples, len(test))
  logits = np.asarray(restored.predictor().logits(variables, test.images))
  ev = evaluate(logits, test.labels, info.num_classes)
  names = [str(n) for n in info.class_names]

  out_dir = os.path.join(workdir, 'analysis')
  os.makedirs(out_dir, exist_ok=True)
  _clean_previous(out_dir)
  files = _Files(out_dir)
  history = workdir_lib.read_history(workdir)
  files.add('history', plots.history(history, files.path('history.png')))
  n = min(NUM_SAMPLES, len(test))
  files.add('samples', plots.samples(
      test.images[:n], test.labels[:n], names, files.path('samples.png'),
      f'the first {n} test images with their labels'))
  _evaluation_figures(model, variables, test, names, ev, files)
  maps = _feature_maps(model, variables, test, names, ev, examples, files)
  _filters(model, variables, test, maps, config, files)
  rows = ev.scores.rows(names)
  _write_tables(rows, ev.cm, names, files)

  summary = {
      'model': config.model, 'dataset': info.name, 'workdir': workdir,
      'test_accuracy': ev.accuracy, 'test_loss': ev.loss,
      'test_examples': int(len(test)),
      'num_params': models.count_params(variables['params']),
      'best_epoch': int(meta.get('epoch', -1)),
      'val_accuracy': float(meta.get('accuracy', float('nan'))),
      'ece': ev.calibration.ece, 'epochs_trained': len(history),
      'feature_map_layers': [m.name for m in maps],
      'examples': examples,
  }
  index = files.path('index.html')
  _write_html(summary, rows, files, examples, index)
  summary['files'] = files.all() + ['index.html', 'summary.json']
  with open(files.path('summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  logging.info('analysis of %s: test accuracy %.2f%%, %d files in %s',
               workdir, 100 * ev.accuracy, len(summary['files']), out_dir)
  return index
