"""The report's sentences, computed from the run's numbers.

Every function here takes plain data (arrays, history rows, the layer table)
and returns short sentences; each number in them is read from that data,
so the page cannot say something the run does not show. Classes are named
by their dataset names (``class “T-shirt/top”``), never as digits.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cnn_jax.analysis import metrics
from cnn_jax.analysis.architecture import Architecture, Stage, shape_text

CONFIDENT = 0.9  # A mistake above this confidence is a "confident" one.


def pct(x: float, digits: int = 2) -> str:
  """0.99215 -> ``99.22%``."""
  return f'{100 * float(x):.{digits}f}%'


def num(n: int) -> str:
  """9922 -> ``9,922``."""
  return f'{int(n):,}'


def cls(name: str) -> str:
  """A class name as the page quotes it."""
  return f'“{name}”'


def plural(n: int, word: str, words: str | None = None) -> str:
  """``1 epoch``, ``2 epochs``."""
  return f'{num(n)} {word if n == 1 else (words or word + "s")}'


def name_list(names: Sequence[str], limit: int = 12) -> str:
  """``“a”, “b” and “c”``; long lists end with how many more."""
  quoted = [cls(n) for n in names]
  if len(quoted) > limit:
    return ', '.join(quoted[:limit]) + f' and {len(quoted) - limit} more'
  if len(quoted) <= 1:
    return ''.join(quoted)
  return ', '.join(quoted[:-1]) + ' and ' + quoted[-1]


def prob(p: float) -> str:
  """A probability as the page writes it, never rounded to 100% or 0%."""
  if p > 0.9999:
    return 'over 99.99%'
  if p < 0.0001:
    return 'under 0.01%'
  return pct(p)


def lr(x: float) -> str:
  return f'{float(x):.2g}'


# Summary and data ------------------------------------------------------------
def headline(model: str, dataset: str, labels: np.ndarray,
             predictions: np.ndarray) -> list[str]:
  n = len(labels)
  right = int((labels == predictions).sum())
  return [f'{model} classifies {num(right)} of the {num(n)} {dataset} test '
          f'images correctly: {pct(right / max(n, 1))}, with '
          f'{plural(n - right, "mistake")}.',
          'This page explains how it gets there, one step at a time, with '
          'this run’s own numbers; reference tables come at the end.']


def data(class_names: Sequence[str], image_shape: Sequence[int],
         num_test: int) -> list[str]:
  h, w, c = image_shape
  kind = 'grayscale' if c == 1 else f'{c}-channel'
  return [f'The test set has {num(num_test)} {kind} images of {h}×{w} '
          f'pixels in {plural(len(class_names), "class", "classes")}: '
          f'{name_list(class_names)}.',
          f'The model sees each image as {h}×{w}×{c} = {num(h * w * c)} '
          'numbers between 0 and 1 (pixel value / 255).']


# Architecture ----------------------------------------------------------------
def _producer(arch: Architecture, stage: Stage) -> Stage:
  """The conv whose maps reach ``stage`` (or the input)."""
  i = arch.stages.index(stage)
  for s in reversed(arch.stages[:i]):
    if s.kind in ('convolution', 'input'):
      return s
  return arch.stages[0]


def _conv_lessons(arch: Architecture, conv: Stage, first: bool) -> list[str]:
  kh, kw, cin, cout = conv.kernel
  if first:
    return [f'{conv.name} has {cout} filters, so it produces {cout} feature '
            f'maps: its output is {shape_text(conv.out_shape)}.',
            f'Each {conv.name} filter is {kh}×{kw}×{cin}: its depth {cin} '
            f'matches the {plural(cin, "channel")} of the input image.']
  src = _producer(arch, conv)
  return [f'{conv.name} has {cout} filters, each {kh}×{kw}×{cin}: its depth '
          f'matches {src.name}’s {cin} feature maps. One filter reads all '
          f'{cin} maps at once and adds up what it finds into one new map.']


def _pool_lesson(p: Stage) -> str:
  before = p.in_shape[0] * p.in_shape[1]
  after = p.out_shape[0] * p.out_shape[1]
  return (f'{p.name} keeps the largest value of each {p.window}×{p.window} '
          f'block: {p.in_shape[0]}×{p.in_shape[1]} → {p.out_shape[0]}×'
          f'{p.out_shape[1]} per map ({before / after:.1f}× fewer values), '
          f'still {p.out_shape[2]} maps.')


def architecture(arch: Architecture) -> list[str]:
  """The seed session's lessons, stated with this model's figures, in the
  order of the stages they are about."""
  out = []
  convs = arch.convs()
  said_pool = False
  for s in arch.stages:
    if s.kind == 'convolution' and s in convs[:2]:
      out += _conv_lessons(arch, s, s is convs[0])
    elif s.window and not said_pool:
      out.append(_pool_lesson(s))
      said_pool = True
    elif s.kind == 'flatten':
      i = arch.stages.index(s)
      nxt = arch.stages[i + 1]
      if arch.stages[i - 1].kind == 'input':
        out.append(f'flatten lays the {shape_text(s.in_shape)} image out as '
                   f'{num(s.out_shape[0])} numbers, the input of '
                   f'{nxt.name}: each of its units weighs every pixel on '
                   'its own, with nothing that says which pixels are '
                   'neighbours.')
      else:
        out.append(f'flatten lays the last {shape_text(s.in_shape)} maps '
                   f'out as {num(s.out_shape[0])} numbers, the input of '
                   f'{nxt.name}: from here on, dense layers see the whole '
                   'image at once.')
  layers = [s for s in arch.stages if s.params]
  if layers:
    big = max(layers, key=lambda s: s.params)
    conv_params = sum(s.params for s in convs)
    held = (f'the convolutions hold {num(conv_params)} '
            f'({pct(conv_params / arch.num_params, 0)}), and ' if convs
            else 'there is no convolution; ')
    out.append(f'{num(arch.num_params)} parameters in all: {held}the '
               f'largest layer, {big.name}, holds {num(big.params)} '
               f'({pct(big.params / arch.num_params, 0)}).')
  with_field = [s for s in convs if s.field]
  if len(with_field) > 1:
    a, b = with_field[0], with_field[-1]
    out.append(f'A {a.name} unit sees {a.field_text} pixels of the input; a '
               f'{b.name} unit sees {b.field_text}: each layer looks at a '
               'larger part of the image than the one before.')
  norms = [s for s in arch.stages if s.kind == 'batch norm']
  if norms:
    out.append(f'The {plural(len(norms), "batch norm layer")} normalize each '
               'map and rescale it with a learned scale and offset: with '
               'the statistics of each batch in training, with running '
               'averages at test time.')
  drops = [s for s in arch.stages if s.kind == 'dropout' and s.rate]
  if drops:
    rates = sorted({s.rate for s in drops})
    out.append(f'The {plural(len(drops), "dropout layer")} (rate '
               f'{", ".join(f"{r:g}" for r in rates)}) set that share of '
               'values to 0 at random in training only; at test time they '
               'pass everything through.')
  last = arch.stages[-1]
  if last.kind == 'dense':
    out.append(f'{last.name} gives one score per class '
               f'({last.out_shape[0]} scores); softmax turns them into '
               'probabilities that sum to 1.')
  return out


# From filter to decision -----------------------------------------------------
def _decision(probs: np.ndarray, label: str,
              class_names: Sequence[str]) -> list[str]:
  order = np.argsort(-probs, kind='stable')
  pred = int(order[0])
  verdict = f'{cls(class_names[pred])} with {prob(probs[pred])} probability'
  right = class_names[pred] == label
  out = [f'The decision: {verdict}' + (', which is right.' if right else
                                       f', but the image is a {cls(label)}.')]
  if len(order) > 1:
    out.append(f'Runner-up: {cls(class_names[order[1]])} '
               f'({prob(probs[order[1]])}).')
  return out


def filter_to_decision(arch: Architecture, strip: Sequence[Stage],
                       channel: int, values: dict[str, np.ndarray],
                       index: int, label: str, probs: np.ndarray,
                       class_names: Sequence[str], full: bool = True
                       ) -> list[str]:
  """What happens to one test image, from one filter to the answer.

  ``strip`` is the first conv and the stages that keep its channels
  (activation, pooling); ``values`` their maps for this image. ``full``
  explains every step; otherwise (a further example) only the filter and
  the decision are named.
  """
  conv = strip[0]
  kh, kw, cin, cout = conv.kernel
  h_in, w_in = conv.in_shape[:2]
  h, w = conv.out_shape[:2]
  out = [f'Test image #{index} belongs to class {cls(label)}.']
  if not full:
    return out + [f'Filter {channel} of {conv.name} responds most to it; the '
                  'figures follow the same steps as above.'] + _decision(
                      probs, label, class_names)
  fits = (h, w) == (h_in - kh + 1, w_in - kw + 1)
  if not fits:
    why = '.'
  elif (h_in, kh) == (w_in, kw):
    why = f': {h_in} − {kh} + 1 = {h} positions per side'
  else:
    why = (f': {h_in} − {kh} + 1 = {h} rows and {w_in} − {kw} + 1 = {w} '
           'columns')
  if fits:
    why += ', as the filter must fit inside the image.'
  out.append(f'Filter {channel} of {conv.name} ({kh}×{kw}×{cin} weights) '
             'responds most to this image. Sliding it over the '
             f'{h_in}×{w_in} input gives one {h}×{w} feature map{why}')
  prev = values[conv.name]
  for s in strip[1:]:
    v = values[s.name]
    if s.kind == 'ReLU':
      negative = float((prev < 0).mean())
      share = (f'{pct(negative, 0)} of this map' if negative
               else 'none in this map')
      out.append(f'{s.name}: ReLU sets the negative values to 0 '
                 f'({share}).')
    elif s.kind == 'batch norm':
      out.append(f'{s.name} normalizes the map and applies channel '
                 f'{channel}’s learned scale and offset.')
    elif s.window:
      kept = s.out_shape[0] * s.out_shape[1]
      out.append(f'{s.name} keeps the largest value of each {s.window}×'
                 f'{s.window} block: {s.in_shape[0]}×{s.in_shape[1]} → '
                 f'{s.out_shape[0]}×{s.out_shape[1]}, {num(kept)} values '
                 f'instead of {num(prev.size)}, and the strongest response '
                 f'({float(v.max()):.2f}) survives.')
    prev = v
  out.append(f'{conv.name} has {cout} filters, so this happens {cout} times '
             f'at once: {cout} feature maps.')
  convs = arch.convs()
  if len(convs) > 1:
    nxt = convs[1]
    out.append(f'Deeper stages (second figure) work on all these maps '
               f'together: each {nxt.name} filter is '
               f'{"×".join(str(d) for d in nxt.kernel[:3])} and reads all '
               f'{nxt.kernel[2]} maps.')
  flat = [s for s in arch.stages if s.kind == 'flatten']
  if flat:
    nxt = arch.stages[arch.stages.index(flat[0]) + 1]
    out.append(f'The last maps, {shape_text(flat[0].in_shape)}, are '
               f'flattened into {num(flat[0].out_shape[0])} numbers for '
               f'{nxt.name}.')
  return out + _decision(probs, label, class_names)


def no_feature_maps(arch: Architecture) -> str:
  """What the early-vs-deep section says of a model without spatial
  stages (a dense network)."""
  first = next((st for st in arch.stages if st.params), None)
  where = f' ({first.name} is the first layer)' if first else ''
  return ('This model has no convolution and keeps no spatial map: it '
          f'flattens the image first{where}, so there are no feature maps, '
          'filters or receptive fields to draw.')


def receptive_fields(first: Stage, last: Stage, image_shape: Sequence[int],
                     num_images: int, per_channel: int) -> list[str]:
  """Early vs deep layers, with their receptive fields on this input."""
  area = image_shape[0] * image_shape[1]

  def share(s: Stage) -> str:
    h, w = (min(x, lim) for x, lim in zip(s.field.size, image_shape[:2]))
    return pct(h * w / area, 0)
  return [
      f'A unit of {first.name} sees a {first.field_text} patch of the '
      f'{image_shape[0]}×{image_shape[1]} input ({share(first)} of the '
      f'image); a unit of {last.name} sees {last.field_text} '
      f'({share(last)}).',
      f'Each row is one channel. Its {per_channel} patches are the places '
      f'in the first {num(num_images)} test images where that channel '
      'responds most, cut out at its receptive field.',
      f'In {first.field_text} pixels a {first.name} unit can tell little '
      f'more than an edge or a corner; {last.name}’s patches hold '
      'combinations of them, larger parts of the shapes. That is how deeper '
      'layers combine simple features into complex ones.']


# Training --------------------------------------------------------------------
def training(history: Sequence[dict[str, Any]], best_epoch: int,
             best_metric: str, augment: bool, dropout_rates: Sequence[float],
             label_smoothing: float, schedule: str) -> list[str]:
  """What the per-epoch history shows, and why."""
  if not history:
    return ['This workdir has no metrics.jsonl, so there is no training '
            'history to show.']
  rows = list(history)
  e = len(rows)
  last = rows[-1]
  out = []
  if e > 1:
    out.append(f'Training ran {plural(e, "epoch")}. Validation accuracy went '
               f'from {pct(rows[0]["val_accuracy"])} after epoch 1 to '
               f'{pct(last["val_accuracy"])} after epoch {last["epoch"]}; '
               f'training loss from {rows[0]["train_loss"]:.4f} to '
               f'{last["train_loss"]:.4f}.')
  else:
    out.append(f'Training ran 1 epoch, after which validation accuracy was '
               f'{pct(last["val_accuracy"])}.')
  by_epoch = {r['epoch']: r for r in rows}
  best = by_epoch.get(best_epoch)
  if best is not None:
    crit = ('the lowest validation loss' if best_metric == 'val_loss'
            else 'the highest validation accuracy')
    value = (f'{best["val_loss"]:.4f}' if best_metric == 'val_loss'
             else pct(best['val_accuracy']))
    out.append(f'The checkpoint tested on this page is from epoch '
               f'{best_epoch} of {e}, the one with {crit} ({value}).')
    later = [r for r in rows if r['epoch'] > best_epoch]
    if later:
      out.append(f'The {plural(len(later), "later epoch")} did not beat it: '
                 f'the last ended at {pct(last["val_accuracy"])} validation '
                 f'accuracy and {last["val_loss"]:.4f} loss.')
      if (last['val_loss'] > best['val_loss']
          and last['train_loss'] < best['train_loss']):
        out.append(f'Validation loss rose from {best["val_loss"]:.4f} to '
                   f'{last["val_loss"]:.4f} while training loss fell from '
                   f'{best["train_loss"]:.4f} to {last["train_loss"]:.4f}: '
                   'the model began to fit the training images better than '
                   'new ones (overfitting), so the earlier checkpoint is '
                   'kept.')
  above = [r for r in rows if r['val_accuracy'] > r['train_accuracy']]
  if above:
    r = max(above, key=lambda r: r['val_accuracy'] - r['train_accuracy'])
    share = ('In its only epoch' if e == 1 else 'In every epoch'
             if len(above) == e else f'In {num(len(above))} of {e} epochs')
    out.append(f'{share} validation accuracy was above training accuracy '
               f'(epoch {r["epoch"]}: {pct(r["val_accuracy"])} vs '
               f'{pct(r["train_accuracy"])}). That is expected here.')
    out.append('Training accuracy is averaged over the whole epoch, while '
               'the weights were still improving; validation is measured at '
               'the end of the epoch.')
    if augment:
      out.append('The training images are randomly shifted, rotated and '
                 'scaled (--augment), which makes them harder than the '
                 'plain validation images.')
    if dropout_rates:
      rates = ', '.join(f'{x:g}' for x in dropout_rates)
      out.append(f'Dropout (rate {rates}) switches off activations in '
                 'training only; validation uses the whole network.')
  else:
    gap = last['train_accuracy'] - last['val_accuracy']
    out.append(f'Training accuracy stayed at or above validation accuracy '
               f'(last epoch: {pct(last["train_accuracy"])} vs '
               f'{pct(last["val_accuracy"])}, a gap of {100 * gap:.2f} '
               'points).')
  if label_smoothing:
    out.append(f'Label smoothing ({label_smoothing:g}) raises the training '
               'loss above a plain cross-entropy; compare accuracies, not '
               'losses, between training and validation.')
  rates = [r.get('learning_rate') for r in rows
           if r.get('learning_rate') is not None]
  if rates:
    if e == 1:
      out.append(f'The learning rate ({schedule} schedule) ended the epoch '
                 f'at {lr(rates[0])}.')
    elif max(rates) == min(rates):
      out.append(f'The learning rate stayed at {lr(rates[0])}.')
    else:
      peak = int(np.argmax(rates))
      if peak == 0:
        path = (f'was highest at the end of epoch 1 ({lr(rates[0])}) and '
                f'fell to {lr(rates[-1])} by the end')
      elif peak == e - 1:
        path = f'rose from {lr(rates[0])} to {lr(rates[-1])}'
      else:
        path = (f'went from {lr(rates[0])} up to {lr(rates[peak])} at '
                f'epoch {rows[peak]["epoch"]} and down to {lr(rates[-1])}')
      out.append(f'The learning rate ({schedule} schedule, right; recorded '
                 f'at the end of each epoch) {path}'
                 + (': large steps first, small ones to settle.'
                    if rates[-1] < max(rates) else '.'))
  return out


# Evaluation ------------------------------------------------------------------
def per_class(class_names: Sequence[str], recall: np.ndarray,
              overall: float) -> list[str]:
  recall = np.asarray(recall)
  lo, hi = int(np.argmin(recall)), int(np.argmax(recall))
  out = [f'Overall accuracy is {pct(overall)}. Per class (recall: the '
         'share of a class’s test images predicted as that class) it '
         f'ranges from {pct(recall[lo])} for class {cls(class_names[lo])} '
         f'to {pct(recall[hi])} for class {cls(class_names[hi])}.']
  below = [class_names[i] for i in np.flatnonzero(recall < overall)]
  if below:
    verb = 'falls' if len(below) == 1 else 'fall'
    out.append(f'{plural(len(below), "class", "classes")} of '
               f'{len(class_names)} {verb} below the overall accuracy, drawn '
               f'in red: {name_list(below)}.')
  else:
    out.append('No class is below the overall accuracy.')
  return out


def mistakes(cm: np.ndarray, class_names: Sequence[str],
             pairs: Sequence[tuple[int, int, int]], confidences: np.ndarray,
             correct: np.ndarray) -> list[str]:
  total = int(cm.sum())
  wrong = total - int(np.trace(cm))
  if not wrong:
    return [f'No mistakes on the {num(total)} test images: nothing to '
            'study here.']
  out = [f'The model got {num(wrong)} of {num(total)} test images wrong. '
         'The matrix below leaves out the correct ones (the diagonal): each '
         'cell counts the test images of the row’s class predicted as the '
         'column’s class.']
  support = cm.sum(axis=1)
  if pairs:
    t, p, c = pairs[0]
    ties = int((metrics.errors_only(cm) == c).sum())
    share = (f'{pct(c / max(support[t], 1))} of the {num(support[t])} test '
             f'images of class {cls(class_names[t])}')
    if ties == 1:
      out.append(f'The most frequent mistake: class {cls(class_names[t])} '
                 f'predicted as {cls(class_names[p])}, {plural(c, "time")} '
                 f'({share}).')
    else:
      out.append(f'{ties} pairs of classes share the top count, '
                 f'{plural(c, "mistake")} each. The first: class '
                 f'{cls(class_names[t])} predicted as '
                 f'{cls(class_names[p])} ({share}).')
    back = int(cm[p, t])
    if back:
      out.append(f'The other way round, {cls(class_names[p])} as '
                 f'{cls(class_names[t])}, happened {plural(back, "time")}.')
    if len(pairs) > 1:
      top = sum(c for _, _, c in pairs)
      out.append(f'The {len(pairs)} most frequent pairs, shown with examples '
                 f'below, make up {num(top)} of the {num(wrong)} mistakes '
                 f'({pct(top / wrong, 0)}).')
  wrong_conf = np.asarray(confidences)[~np.asarray(correct, bool)]
  sure = int((wrong_conf > CONFIDENT).sum())
  verb = 'was' if sure == 1 else 'were'
  out.append(f'{num(sure)} of the {plural(wrong, "mistake")} {verb} made with '
             f'more than {pct(CONFIDENT, 0)} confidence: sure and wrong. '
             'The gallery shows the most confident ones. Look at them: would '
             'you have given the same label?')
  return out


def calibration(cal: metrics.Calibration, confidences: np.ndarray,
                correct: np.ndarray) -> list[str]:
  mean_conf = float(np.mean(confidences)) if len(confidences) else 0.0
  acc = float(np.mean(correct)) if len(correct) else 0.0
  gap = 100 * abs(mean_conf - acc)
  lean = (f'{"over" if mean_conf > acc else "under"}confident by '
          f'{gap:.2f} points' if round(gap, 2) else 'as confident as right')
  return [f'On average the model gives its answer {pct(mean_conf)} '
          f'probability and is right {pct(acc)} of the time: {lean}. The '
          f'expected calibration error (ECE) is {pct(cal.ece)}, the '
          f'confidence–accuracy gap averaged over {len(cal.counts)} bins.']


def saliency(num_right: int, num_wrong: int) -> list[str]:
  return [f'The first {num_right} correct predictions and the {num_wrong} '
          'most confident mistakes: bright pixels are the ones whose change '
          'moves the predicted class’s score most.']


def compare(label_a: str, label_b: str, acc_a: float, acc_b: float,
            params_a: int, params_b: int, n: int, a_only: int, b_only: int,
            both_wrong: int, class_names: Sequence[str],
            recall_a: np.ndarray, recall_b: np.ndarray) -> list[str]:
  (big, n_big), (small, n_small) = sorted(
      [(label_a, params_a), (label_b, params_b)], key=lambda r: -r[1])
  out = [f'Both runs are tested on the same {num(n)} test images: '
         f'{label_a} scores {pct(acc_a)} with {num(params_a)} parameters, '
         f'{label_b} {pct(acc_b)} with {num(params_b)}.',
         f'{big} has {n_big / max(n_small, 1):.1f}× the parameters of '
         f'{small}.',
         f'{label_a} gets {num(a_only)} images right that {label_b} gets '
         f'wrong; {label_b} gets {num(b_only)} right that {label_a} gets '
         f'wrong; both miss {num(both_wrong)}.']
  diff = np.asarray(recall_b) - np.asarray(recall_a)
  if np.any(diff):
    k = int(np.argmax(np.abs(diff)))
    out.append(f'The largest per-class difference is class '
               f'{cls(class_names[k])}: {pct(recall_a[k])} for {label_a}, '
               f'{pct(recall_b[k])} for {label_b}.')
  else:
    out.append('Per class, the two runs score the same on every class.')
  return out
