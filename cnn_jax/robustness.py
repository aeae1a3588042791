"""``--mode=robustness``: how a workdir's networks fare off MNIST's test set.

For any workdir eval takes (a run, a ``--num_models`` run, an ensemble) it
scores the test split clean, under every corruption of `cnn_jax.corruptions`
at each of its severities (made on the device, deterministic by seed), and
the font-rendered digits of `cnn_jax.font_digits`: every network on its own
and, with several, their averaged probabilities; with ``--tta=N`` all of it
again with test-time augmentation. It writes ``WORKDIR/robustness.json``
(`build_json` is the one place that lays it out) and
``WORKDIR/robustness_examples.npz`` (the images the report shows), and
returns the JSON for `format_table` to print.

``robustness.json`` (``format`` 1)::

  format, dataset, class_names, test_examples, seed, tta, seconds
  corruptions:  [{name, description, severities: [{param: value}, ...]}],
                in the order tested (JSON objects below are keyed by name)
  font_set:     {examples, seed, key, families, fonts: [{font, examples}]}
  networks:     [{name, model, seed}]
  results:      one row per predictor (a network, a member, the ensemble;
                each with tta 0 and, with --tta=N, N):
                {name, role: network|member|ensemble, tta,
                 clean_accuracy, font_accuracy, font_error,
                 corruption_accuracy: {kind: [accuracy at severity 1, 2, 3]},
                 mean_corruption_accuracy, mean_corruption_error,
                 per_class: {clean, corruptions, fonts: [accuracy per class]},
                 worst_classes: {corruptions, fonts: [{class, accuracy}] x3}}
  summary:      the workdir's own predictor (the network, or the ensemble)
                flat, like results.json: clean_accuracy,
                mean_corruption_accuracy, mean_corruption_error,
                font_accuracy, tta_* of the same, member_* lists
  mistakes:     {corruptions: [{corruption, severity, index, label,
                 prediction}], fonts: [{index, label, prediction, font}]}
                of the workdir's own predictor without TTA, at each kind's
                highest severity; their images are in the .npz
  examples_file: robustness_examples.npz

The mean corruption accuracy averages each kind's mean over its severities,
so every kind weighs the same; its error is one minus it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from cnn_jax import corruptions as corruptions_lib
from cnn_jax import evaluate, font_digits, inference, input_pipeline
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, CnnJaxError

FORMAT = 1
FILE = 'robustness.json'
EXAMPLES_FILE = 'robustness_examples.npz'
EXAMPLE_IMAGES = 2  # Test images shown under every kind and severity.
FONT_IMAGES = 30  # Font digits shown as they go into the model.
WORST = 3


@dataclasses.dataclass(frozen=True)
class Options:
  """What to test besides the workdir's own config."""

  seed: int = 0
  font_examples: int = 2000
  font_dirs: tuple[str, ...] = ()
  corruptions: tuple[str, ...] = ()  # Empty: every kind.
  mistakes: int = 8  # Kept per kind, and for the font set.


@dataclasses.dataclass(frozen=True)
class Predictor:
  """One column of the results: a member (index), or all averaged."""

  name: str
  role: str  # 'network', 'member' or 'ensemble'.
  tta: int
  member: int | None  # None: the members' averaged probabilities.


def predictors(ensemble: inference.Ensemble, tta: int) -> list[Predictor]:
  """The networks (each, when several) and their average, without and
  with TTA."""
  members = ensemble.networks
  out = []
  for t in (0, tta) if tta else (0,):
    if len(members) == 1:
      out.append(Predictor('network', 'network', t, None))
      continue
    out.extend(Predictor(m.name, 'member', t, k)
               for k, m in enumerate(members))
    out.append(Predictor('ensemble', 'ensemble', t, None))
  return out


def _predict(ensemble: inference.Ensemble, images: Any,
             columns: Sequence[Predictor]) -> dict[Predictor, np.ndarray]:
  """Each column's predicted classes of ``images``."""
  out = {}
  for tta in sorted({p.tta for p in columns}):
    probs = ensemble.member_probabilities(images, tta)
    for p in columns:
      if p.tta == tta:
        chosen = probs.mean(0) if p.member is None else probs[p.member]
        out[p] = chosen.argmax(-1).astype(np.int32)
  return out


def _per_class(correct: np.ndarray, labels: np.ndarray, classes: int
               ) -> np.ndarray:
  return np.array([correct[labels == c].mean() if (labels == c).any()
                   else np.nan for c in range(classes)])


def _worst(per_class: np.ndarray, names: Sequence[str]) -> list[dict]:
  order = [int(c) for c in np.argsort(per_class, kind='stable')
           if not np.isnan(per_class[c])][:WORST]
  return [{'class': str(names[c]), 'accuracy': float(per_class[c])}
          for c in order]


def _row(p: Predictor, preds: dict[str, dict[Predictor, np.ndarray]],
         labels: np.ndarray, font_labels: np.ndarray,
         kinds: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
  classes = len(names)
  clean = preds['clean'][p] == labels
  fonts = preds['fonts'][p] == font_labels
  by_kind, class_by_kind = {}, []
  for kind in kinds:
    levels = len(corruptions_lib.get(kind).severities)
    right = [preds[f'{kind}/{s}'][p] == labels for s in range(1, levels + 1)]
    by_kind[kind] = [float(r.mean()) for r in right]
    class_by_kind.append(np.mean([_per_class(r, labels, classes)
                                  for r in right], 0))
  mean = float(np.mean([np.mean(v) for v in by_kind.values()]))
  class_corrupt = np.mean(class_by_kind, 0)
  class_fonts = _per_class(fonts, font_labels, classes)
  return {
      'name': p.name, 'role': p.role, 'tta': p.tta,
      'clean_accuracy': float(clean.mean()),
      'corruption_accuracy': by_kind,
      'mean_corruption_accuracy': mean, 'mean_corruption_error': 1 - mean,
      'font_accuracy': float(fonts.mean()),
      'font_error': float(1 - fonts.mean()),
      'per_class': {'clean': _per_class(clean, labels, classes).tolist(),
                    'corruptions': class_corrupt.tolist(),
                    'fonts': class_fonts.tolist()},
      'worst_classes': {'corruptions': _worst(class_corrupt, names),
                        'fonts': _worst(class_fonts, names)}}


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  keys = ('clean_accuracy', 'mean_corruption_accuracy',
          'mean_corruption_error', 'font_accuracy')
  out: dict[str, Any] = {}
  for row in rows:
    tag = 'tta_' if row['tta'] else ''
    if row['role'] == 'member':
      for k in keys:
        out.setdefault(f'{tag}member_{k}', []).append(row[k])
    else:
      out.update({f'{tag}{k}': row[k] for k in keys})
  return out


def build_json(info: input_pipeline.DatasetInfo, networks: Sequence[Any],
               kinds: Sequence[str], params: dict[str, list[dict]],
               labels: np.ndarray, fonts: font_digits.FontDigits,
               preds: dict[str, dict[Predictor, np.ndarray]],
               columns: Sequence[Predictor], mistakes: dict[str, list],
               seed: int, tta: int, seconds: dict[str, float]
               ) -> dict[str, Any]:
  """``robustness.json``: every figure computed here from the predictions."""
  names = [str(n) for n in info.class_names]
  rows = [_row(p, preds, labels, fonts.labels, kinds, names)
          for p in columns]
  counts = np.bincount(fonts.font_index, minlength=len(fonts.fonts))
  return {
      'format': FORMAT, 'dataset': info.name, 'class_names': names,
      'test_examples': int(len(labels)), 'seed': seed, 'tta': tta,
      'corruptions': [
          {'name': k, 'description': corruptions_lib.get(k).description,
           'severities': params[k]} for k in kinds],
      'font_set': {
          'examples': int(len(fonts)), 'seed': fonts.seed, 'key': fonts.key,
          'families': fonts.families,
          'fonts': [{'font': f, 'examples': int(c)}
                    for f, c in zip(fonts.fonts, counts) if c]},
      'networks': [{'name': m.name, 'model': m.model, 'seed': m.seed}
                   for m in networks],
      'results': rows, 'summary': _summary(rows), 'mistakes': mistakes,
      'examples_file': EXAMPLES_FILE,
      'seconds': {k: round(v, 2) for k, v in seconds.items()}}


@dataclasses.dataclass
class _Scored:
  """Every set's predictions, plus what the report shows of the sets."""

  preds: dict[str, dict[Predictor, np.ndarray]]
  examples: np.ndarray  # [kinds, 1 + severities, images, H, W, C]
  mistakes: dict[str, list]
  mistake_images: list[np.ndarray]
  seconds: dict[str, float]


def _score_sets(ensemble: inference.Ensemble, columns: Sequence[Predictor],
                test: input_pipeline.Split, fonts: font_digits.FontDigits,
                kinds: Sequence[str], options: Options, chunk: int
                ) -> _Scored:
  """Predicts the clean, font and corrupted sets, one corrupted set at a
  time (made on the device, then scored in batches)."""
  main = next(p for p in columns if p.role != 'member')
  labels = test.labels
  seconds = {'corrupt': 0.0, 'predict': 0.0}
  preds: dict[str, dict[Predictor, np.ndarray]] = {}

  def score(name: str, images: np.ndarray) -> None:
    t = time.perf_counter()
    preds[name] = _predict(ensemble, images, columns)
    seconds['predict'] += time.perf_counter() - t

  def wrong(name: str, truth: np.ndarray) -> np.ndarray:
    return np.flatnonzero(preds[name][main] != truth)[:options.mistakes]

  score('clean', test.images)
  score('fonts', fonts.images)
  n_ex = min(EXAMPLE_IMAGES, len(test))
  levels = max(len(corruptions_lib.get(k).severities) for k in kinds)
  examples = np.zeros((len(kinds), levels + 1, n_ex, *test.images.shape[1:]),
                      np.uint8)
  mistakes: dict[str, list] = {'corruptions': [], 'fonts': []}
  mistake_images: list[np.ndarray] = []
  for k, kind in enumerate(kinds):
    examples[k, 0] = test.images[:n_ex]
    for s, params in enumerate(corruptions_lib.get(kind).severities, 1):
      t = time.perf_counter()
      images = np.asarray(corruptions_lib.corrupt_images(
          kind, params, test.images, options.seed, chunk=chunk))
      seconds['corrupt'] += time.perf_counter() - t
      examples[k, s] = images[:n_ex]
      name = f'{kind}/{s}'
      score(name, images)
      logging.info('robustness: %s severity %d: %.2f%%', kind, s,
                   100 * float((preds[name][main] == labels).mean()))
    for i in wrong(name, labels):  # At the kind's highest severity.
      mistakes['corruptions'].append(
          {'corruption': kind, 'severity': s, 'index': int(i),
           'label': int(labels[i]), 'prediction': int(preds[name][main][i])})
      mistake_images.append(images[i])
  mistakes['fonts'] = [
      {'index': int(i), 'label': int(fonts.labels[i]),
       'prediction': int(preds['fonts'][main][i]),
       'font': fonts.fonts[fonts.font_index[i]]}
      for i in wrong('fonts', fonts.labels)]
  return _Scored(preds, examples, mistakes, mistake_images, seconds)


def _write(workdir: str, out: dict[str, Any], scored: _Scored,
           fonts: font_digits.FontDigits) -> None:
  font_wrong = [m['index'] for m in scored.mistakes['fonts']]
  shape = (0, *scored.examples.shape[3:])
  mistakes = (np.stack(scored.mistake_images) if scored.mistake_images
              else np.zeros(shape, np.uint8))
  try:
    tmp = os.path.join(workdir, f'.{EXAMPLES_FILE}.tmp.npz')
    np.savez_compressed(
        tmp, examples=scored.examples, mistake_images=mistakes,
        font_mistake_images=fonts.images[font_wrong].reshape(-1, *shape[1:]),
        font_images=fonts.images[:FONT_IMAGES],
        font_labels=fonts.labels[:FONT_IMAGES])
    os.replace(tmp, os.path.join(workdir, EXAMPLES_FILE))
    workdir_lib.write_json(os.path.join(workdir, FILE), out)
  except OSError as e:
    raise CnnJaxError(f'cannot write the robustness results into {workdir}: '
                      f'{e.strerror or e}') from e


def corrupted_accuracy(predict: Callable[[np.ndarray], np.ndarray],
                       images: np.ndarray, labels: np.ndarray, seed: int,
                       kinds: Sequence[str] = (), chunk: int = 1000
                       ) -> dict[str, Any]:
  """Accuracy of ``predict`` (uint8 images -> class indices) on ``images``
  clean and under every corruption kind at each severity; the mean of the
  kinds' means is ``mean_corruption_accuracy``, as `run` reports it.

  For choosing a recipe on the validation split: corrupting validation
  images (with a seed of its own) never looks at the test split or the
  font set.
  """
  labels = np.asarray(labels)
  acc = lambda x: float((np.asarray(predict(x)) == labels).mean())
  per_kind = {}
  for kind in kinds or list(corruptions_lib.CORRUPTIONS):
    per_kind[kind] = [
        acc(np.asarray(corruptions_lib.corrupt_images(kind, params, images,
                                                      seed, chunk=chunk)))
        for params in corruptions_lib.get(kind).severities]
  return {'clean_accuracy': acc(images), 'corruption_accuracy': per_kind,
          'mean_corruption_accuracy': float(np.mean(
              [np.mean(v) for v in per_kind.values()]))}


def run(workdir: str, config: Config, options: Options = Options()
        ) -> dict[str, Any]:
  """Tests ``workdir``'s best checkpoint(s); writes and returns the JSON."""
  started = time.perf_counter()
  kinds = list(options.corruptions) or list(corruptions_lib.CORRUPTIONS)
  for kind in kinds:
    corruptions_lib.get(kind)
  ensemble = inference.load(workdir, config)
  info = ensemble.info
  if len(info.image_shape) != 3 or info.image_shape[-1] != 1:
    raise CnnJaxError('robustness supports grayscale (HxWx1) datasets; '
                      f'{info.name!r} has images of shape {info.image_shape}')
  t = time.perf_counter()
  fonts = font_digits.load(options.font_examples, options.seed,
                           options.font_dirs, tuple(info.image_shape[:2]),
                           config.cache_dir, config.cache)
  font_seconds = time.perf_counter() - t
  data = input_pipeline.load(config, splits=('test',))
  evaluate.check_compatible(info, data.info)
  if not len(data.test):
    raise CnnJaxError(f'the test split of {info.name!r} is empty')
  columns = predictors(ensemble, config.tta)
  scored = _score_sets(ensemble, columns, data.test, fonts, kinds, options,
                       config.eval_batch_size)
  seconds = dict(scored.seconds, fonts=font_seconds,
                 total=time.perf_counter() - started)
  params = {k: [dict(p) for p in corruptions_lib.get(k).severities]
            for k in kinds}
  out = build_json(info, ensemble.networks, kinds, params, data.test.labels,
                   fonts, scored.preds, columns, scored.mistakes,
                   options.seed, config.tta, seconds)
  _write(workdir, out, scored, fonts)
  return out


def _pct(x: float) -> str:
  return f'{100 * x:6.2f}%'


def format_table(result: dict[str, Any]) -> str:
  """The JSON as a table: accuracy per corruption and severity (rows) for
  every predictor (columns), then the means, fonts and worst classes."""
  rows = result['results']
  members = [r['name'] for r in rows if r['role'] == 'member' and not r['tta']]
  heads = []
  for row in rows:
    if row['role'] == 'member':
      base = f'm{members.index(row["name"]) + 1}'
    else:
      base = 'net' if row['role'] == 'network' else 'ens'
    heads.append(f'{base}+tta{row["tta"]}' if row['tta'] else base)
  width = max(9, *(len(h) + 1 for h in heads))
  lines = [f'robustness: {result["dataset"]}, {result["test_examples"]:,} '
           f'test images, corruption seed {result["seed"]}']
  lines += [f'  m{i + 1} = {name}' for i, name in enumerate(members)]
  lines.append(f'{"corruption":16s}{"sev":>4s}'
               + ''.join(f'{h:>{width}s}' for h in heads))

  def line(label: str, sev: str, values: Sequence[float]) -> str:
    return (f'{label:16s}{sev:>4s}'
            + ''.join(f'{_pct(v):>{width}s}' for v in values))

  lines.append(line('clean', '', [r['clean_accuracy'] for r in rows]))
  for spec in result['corruptions']:
    for s in range(len(spec['severities'])):
      lines.append(line(spec['name'], str(s + 1),
                        [r['corruption_accuracy'][spec['name']][s]
                         for r in rows]))
  lines.append(line('mean corruption', '',
                    [r['mean_corruption_accuracy'] for r in rows]))
  lines.append(line('fonts', '', [r['font_accuracy'] for r in rows]))
  fs = result['font_set']
  lines.append(f'font set: {fs["examples"]:,} digits from {len(fs["fonts"])} '
               f'fonts in {fs["families"]} families')
  own = next(r for r in rows if r['role'] != 'member' and not r['tta'])
  for what in ('corruptions', 'fonts'):
    worst = ', '.join(f'{w["class"]} ({100 * w["accuracy"]:.1f}%)'
                      for w in own['worst_classes'][what])
    lines.append(f'worst classes ({what}, {own["name"]}): {worst}')
  return '\n'.join(lines)
