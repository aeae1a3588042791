"""Matplotlib figures of the analysis report (Agg backend, no pyplot state).

Each function draws one figure from plain numpy data, writes it to ``path``
as a PNG and returns ``path``. Figures are built with `matplotlib.figure.Figure`
directly, so nothing is kept in a global figure registry between calls.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')

from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from cnn_jax.analysis import metrics  # noqa: E402

DPI = 100
MISTAKE = '#c0392b'
CORRECT = '#1e7b34'


def class_axis(ax: Any, class_names: Sequence[str], shown: np.ndarray
               ) -> None:
  """Classes along x; a percentage y axis zoomed to the ``shown`` values."""
  lo = max(0.0, math.floor(float(shown.min()) - 0.05 * (100 - shown.min())
                           - 0.5))
  ax.set_ylim(lo, 100 + 0.08 * (100 - lo))
  ax.set_xticks(np.arange(len(class_names)))
  ax.set_xticklabels(class_names, rotation=45 if len(class_names) > 10 else 0)
  ax.set_xlabel('class')


def save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=DPI, bbox_inches='tight', facecolor='white')
  return path


def show_image(ax: Any, image: np.ndarray) -> None:
  """Draws a uint8 HWC image (grayscale or RGB) without axes."""
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=255,
              interpolation='nearest')
  else:
    ax.imshow(image, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([])


def _grid(n: int, max_cols: int) -> tuple[int, int]:
  cols = max(1, min(n, max_cols))
  return math.ceil(n / cols), cols


def montage(tiles: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
  """``[n, h, w]`` tiles -> one 2-D image, row-major, NaN between tiles."""
  n, h, w = tiles.shape
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan,
                np.float32)
  for i in range(n):
    r, c = divmod(i, cols)
    out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = (
        tiles[i])
  return out


def _montage_axes(ax: Any, n: int, cols: int, h: int, w: int,
                  gap: int = 1) -> None:
  """Ticks that name the channel of each tile: row start + column offset."""
  rows = math.ceil(n / cols)
  ax.set_xticks([c * (w + gap) + (w - 1) / 2 for c in range(cols)])
  ax.set_xticklabels([f'+{c}' for c in range(cols)], fontsize=7)
  ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(rows)])
  ax.set_yticklabels([str(r * cols) for r in range(rows)], fontsize=7)
  ax.tick_params(length=0)
  ax.set_xlabel('channel = row start + column offset', fontsize=8)
  for side in ax.spines.values():
    side.set_visible(False)


def value_norm(values: np.ndarray) -> tuple[str, mcolors.Normalize]:
  """Diverging colours around 0 for signed data, sequential otherwise."""
  lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
  if lo < 0:
    m = max(abs(lo), abs(hi), 1e-12)
    return 'RdBu_r', mcolors.Normalize(-m, m)
  return 'viridis', mcolors.Normalize(0.0, max(hi, 1e-12))


# Training --------------------------------------------------------------------
def history(rows: Sequence[dict[str, Any]], path: str,
            best_epoch: int | None = None) -> str:
  """Loss, accuracy and learning rate per epoch (from ``metrics.jsonl``),
  with the epoch of the tested checkpoint marked."""
  fig = Figure(figsize=(15, 4), constrained_layout=True)
  epochs = [r['epoch'] for r in rows]
  axes = fig.subplots(1, 3)
  for ax, key, label in zip(axes, ('loss', 'accuracy'),
                            ('cross-entropy loss', 'accuracy')):
    for split, style in (('train', 'o-'), ('val', 's--')):
      values = [r.get(f'{split}_{key}') for r in rows]
      if key == 'accuracy':
        values = [None if v is None else 100 * v for v in values]
      ax.plot(epochs, values, style, label=split, markersize=6)
    ax.set_ylabel(label + (' (%)' if key == 'accuracy' else ''))
    ax.set_title(f'{key} per epoch')
  rates = [r.get('learning_rate') for r in rows]
  ax_lr = axes[2]
  if any(v is not None for v in rates):
    ax_lr.plot(epochs, rates, 'o-', color='#8c564b', markersize=6,
               label='learning rate')
    shown = [v for v in rates if v]
    if shown and max(shown) / min(shown) > 100:
      ax_lr.set_yscale('log')
  ax_lr.set_ylabel('learning rate (end of epoch)')
  ax_lr.set_title('learning rate per epoch')
  for ax in axes:
    ax.set_xlabel('epoch')
    if epochs:
      ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
    if best_epoch in epochs:
      ax.axvline(best_epoch, color='k', ls=':', lw=1,
                 label=f'tested checkpoint (epoch {best_epoch})')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if not rows:
    fig.suptitle('no metrics.jsonl rows found in the workdir')
  return save(fig, path)


# Data -------------------------------------------------------------------------
def samples(images: np.ndarray, labels: np.ndarray,
            class_names: Sequence[str], path: str, title: str) -> str:
  """A grid of images titled with their index and label."""
  rows, cols = _grid(len(images), 8)
  fig = Figure(figsize=(1.5 * cols, 1.7 * rows + 0.4))
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for i, ax in enumerate(axes):
    if i >= len(images):
      ax.axis('off')
      continue
    show_image(ax, images[i])
    ax.set_title(f'#{i}: {class_names[labels[i]]}', fontsize=9)
  fig.suptitle(title)
  return save(fig, path)


def input_image(image: np.ndarray, title: str, path: str) -> str:
  """One input image, large, for the feature-map section."""
  fig = Figure(figsize=(2.6, 2.9))
  ax = fig.subplots()
  show_image(ax, image)
  ax.set_title(title, fontsize=9)
  return save(fig, path)


# Feature maps and filters -----------------------------------------------------
def feature_map(fmap: np.ndarray, title: str, path: str) -> str:
  """All channels of one ``[H, W, C]`` activation, one tile per channel.

  One colour scale per layer (so channels are comparable), with a colour bar.
  """
  h, w, c = fmap.shape
  cols = min(c, 8 if c <= 64 else 16)
  tiles = np.moveaxis(fmap, -1, 0)
  rows = math.ceil(c / cols)
  cmap, norm = value_norm(tiles)
  fig = Figure(figsize=(min(1.1 * cols + 1.8, 20), min(1.1 * rows + 1.2, 24)))
  ax = fig.subplots()
  im = ax.imshow(montage(tiles, cols), cmap=cmap, norm=norm,
                 interpolation='nearest')
  _montage_axes(ax, c, cols, h, w)
  ax.set_ylabel('channel (row start)', fontsize=8)
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label='activation')
  return save(fig, path)


def first_layer_filters(name: str, kernel: np.ndarray, path: str) -> str:
  """First-layer HWIO kernels as images (mean over input channels if > 1)."""
  kh, kw, cin, cout = kernel.shape
  tiles = np.moveaxis(kernel.mean(axis=2), -1, 0)
  cols = min(cout, 8 if cout <= 64 else 16)
  rows = math.ceil(cout / cols)
  m = float(np.abs(tiles).max()) or 1.0
  fig = Figure(figsize=(1.0 * cols + 1.8, 1.0 * rows + 1.3))
  ax = fig.subplots()
  im = ax.imshow(montage(tiles, cols), cmap='RdBu_r', vmin=-m, vmax=m,
                 interpolation='nearest')
  _montage_axes(ax, cout, cols, kh, kw)
  ax.set_ylabel('filter (row start)', fontsize=8)
  mean_note = f', mean over {cin} input channels' if cin > 1 else ''
  ax.set_title(f'{name}: {cout} first-layer {kh}x{kw} kernels{mean_note}',
               fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label='weight')
  return save(fig, path)


def kernel_norms(kernels: Sequence[tuple[str, np.ndarray]], path: str) -> str:
  """Deeper conv layers: L2 norm of each (input, output) 2-D kernel as a
  heatmap, and each output filter's total L2 norm as bars."""
  n = len(kernels)
  fig = Figure(figsize=(13, 3.8 * n), constrained_layout=True)
  axes = np.asarray(fig.subplots(n, 2, squeeze=False,
                                 gridspec_kw={'width_ratios': [1.1, 1]}))
  for (name, k), (ax_map, ax_bar) in zip(kernels, axes):
    pair = np.sqrt((k ** 2).sum(axis=(0, 1)))  # [in, out]
    im = ax_map.imshow(pair, aspect='auto', cmap='magma',
                       interpolation='nearest')
    ax_map.set_xlabel('output filter')
    ax_map.set_ylabel('input channel')
    ax_map.set_title(f'{name}: L2 norm of each {k.shape[0]}x{k.shape[1]} '
                     'kernel slice', fontsize=10)
    fig.colorbar(im, ax=ax_map, label='L2 norm')
    per_filter = np.sqrt((k ** 2).sum(axis=(0, 1, 2)))
    ax_bar.bar(np.arange(len(per_filter)), per_filter, color='#4c72b0')
    ax_bar.set_xlabel('output filter')
    ax_bar.set_ylabel('L2 norm')
    ax_bar.set_title(f'{name}: L2 norm per filter ({k.shape[2]} inputs)',
                     fontsize=10)
    ax_bar.set_xlim(-0.6, len(per_filter) - 0.4)
    ax_bar.grid(axis='y', alpha=0.3)
  return save(fig, path)


def top_activations(images: np.ndarray, maxima: np.ndarray, layer: str,
                    path: str, num_channels: int = 8, per_channel: int = 6
                    ) -> str:
  """The test images that most activate the strongest channels of a layer.

  ``maxima`` is ``[N, C]`` (spatial max per image and channel); the channels
  shown are those with the highest mean maximum.
  """
  channels = np.argsort(-maxima.mean(axis=0), kind='stable')[:num_channels]
  per_channel = min(per_channel, len(images))
  fig = Figure(figsize=(1.3 * per_channel + 1.2, 1.6 * len(channels) + 0.8),
               constrained_layout=True)
  axes = np.asarray(fig.subplots(len(channels), per_channel, squeeze=False))
  for row, ch in zip(axes, channels):
    best = np.argsort(-maxima[:, ch], kind='stable')[:per_channel]
    for j, (ax, i) in enumerate(zip(row, best)):
      show_image(ax, images[i])
      ax.set_title(f'test #{i}\nmax {maxima[i, ch]:.2f}', fontsize=7)
      if j == 0:
        ax.set_ylabel(f'channel {ch}', fontsize=9)
  fig.suptitle(f'{layer}: test images with the highest activation, for the '
               f'{len(channels)} most active channels\n(of the first '
               f'{len(images)} test images)', fontsize=10)
  return save(fig, path)


# Evaluation -------------------------------------------------------------------
def _matrix_axes(ax: Any, class_names: Sequence[str]) -> None:
  k = len(class_names)
  ax.set_xticks(range(k))
  ax.set_yticks(range(k))
  ax.set_xticklabels(class_names, rotation=45 if k > 10 else 0,
                     ha='right' if k > 10 else 'center')
  ax.set_yticklabels(class_names)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')


def _annotate(ax: Any, data: np.ndarray, top: float) -> None:
  k = data.shape[0]
  if k > 20:
    return
  for (i, j), v in np.ndenumerate(data):
    if v:
      ax.text(j, i, f'{int(v)}', ha='center', va='center',
              fontsize=7 if k > 10 else 8,
              color='white' if v > 0.6 * top else 'black')


def confusion(cm: np.ndarray, class_names: Sequence[str], path: str) -> str:
  """The confusion matrix as counts (rows: true class)."""
  k = len(class_names)
  size = max(5.0, 0.55 * k + 2)
  fig = Figure(figsize=(size + 1.5, size), constrained_layout=True)
  ax = fig.subplots()
  im = ax.imshow(cm, cmap='Blues', interpolation='nearest', vmin=0)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label='test images')
  _matrix_axes(ax, class_names)
  _annotate(ax, cm, float(cm.max()) or 1.0)
  ax.set_title(f'confusion matrix: counts ({int(cm.sum()):,} test images)')
  return save(fig, path)


def confusion_errors(errors: np.ndarray, class_names: Sequence[str],
                     path: str) -> str:
  """Mistakes only: the confusion counts with the diagonal removed (grey)."""
  k = len(class_names)
  size = max(5.0, 0.55 * k + 2)
  fig = Figure(figsize=(size + 1.5, size), constrained_layout=True)
  ax = fig.subplots()
  top = float(errors.max()) or 1.0
  shown = np.ma.masked_where(np.eye(k, dtype=bool), errors)
  cmap = matplotlib.colormaps['Reds'].with_extremes(bad='#dddddd')
  im = ax.imshow(shown, cmap=cmap, interpolation='nearest', vmin=0, vmax=top)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label='mistakes')
  _matrix_axes(ax, class_names)
  _annotate(ax, errors, top)
  ax.set_title(f'mistakes only: {int(errors.sum()):,} test images '
               '(diagonal removed)')
  return save(fig, path)


def per_class(scores: metrics.PerClass, class_names: Sequence[str],
              overall: float, path: str) -> str:
  """Per-class precision / recall (= class accuracy) / F1 as grouped bars;
  recall bars of classes below the overall accuracy are red."""
  k = len(class_names)
  x = np.arange(k)
  fig = Figure(figsize=(max(8.0, 0.8 * k + 2), 4.5))
  ax = fig.subplots()
  width = 0.27
  low = scores.recall < overall
  ax.bar(x - width, 100 * scores.precision, width, label='precision',
         color='#8da0cb')
  ax.bar(x, 100 * scores.recall, width, color=np.where(low, MISTAKE,
                                                       '#4c72b0'))
  ax.bar([], [], color='#4c72b0', label='recall (class accuracy)')
  if low.any():
    ax.bar([], [], color=MISTAKE, label='recall below overall accuracy')
  ax.bar(x + width, 100 * scores.f1, width, label='F1', color='#66c2a5')
  for i, r in enumerate(scores.recall):
    ax.text(i, 100 * r, f'{100 * r:.1f}', ha='center', va='bottom',
            fontsize=7, color=MISTAKE if low[i] else 'black')
  ax.axhline(100 * overall, color='k', ls=':', lw=1,
             label=f'overall accuracy {100 * overall:.2f}%')
  class_axis(ax, class_names, 100 * np.concatenate(
      [scores.precision, scores.recall, scores.f1]))
  ax.set_ylabel('%')
  note = '' if low.any() else ' (no class below the overall accuracy)'
  ax.set_title('per-class precision, recall and F1 on the test set' + note)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8)
  return save(fig, path)


def _border(ax: Any, color: str, width: float) -> None:
  for side in ax.spines.values():
    side.set_visible(True)
    side.set_edgecolor(color)
    side.set_linewidth(width)


def gallery(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
            confidences: np.ndarray, class_names: Sequence[str],
            right: np.ndarray, wrong: np.ndarray, path: str) -> str:
  """Correct predictions, then the most confident mistakes in red."""
  cols = 8
  sections = [(right, 'correct predictions (first in test order)', CORRECT),
              (wrong, 'most confident mistakes', MISTAKE)]
  sections = [s for s in sections if len(s[0])]
  rows = [math.ceil(len(idx) / cols) for idx, _, _ in sections]
  fig = Figure(figsize=(1.6 * cols, 2.0 * sum(rows) + 0.6 * len(sections)),
               constrained_layout=True)
  subfigs = np.atleast_1d(fig.subfigures(len(sections), 1,
                                         height_ratios=rows or [1]))
  for sub, (idx, heading, color), nrows in zip(subfigs, sections, rows):
    axes = np.atleast_1d(sub.subplots(nrows, cols)).ravel()
    for ax in axes[len(idx):]:
      ax.axis('off')
    for ax, i in zip(axes, idx):
      show_image(ax, images[i])
      ax.set_title(f'#{i} pred {class_names[predictions[i]]} '
                   f'({100 * confidences[i]:.0f}%)\ntrue '
                   f'{class_names[labels[i]]}', fontsize=8, color=color)
      _border(ax, color, 3 if color == MISTAKE else 1)
    sub.suptitle(heading, color=color, fontsize=11)
  if not sections:
    fig.suptitle('no test examples')
  return save(fig, path)


def saliency(images: np.ndarray, maps: np.ndarray, labels: np.ndarray,
             predictions: np.ndarray, confidences: np.ndarray,
             class_names: Sequence[str], path: str) -> str:
  """Each image above its input-gradient map (normalized per image)."""
  n = len(images)
  cols = min(max(n, 1), 8)
  blocks = math.ceil(n / cols)
  fig = Figure(figsize=(1.6 * cols + 1.2, 3.4 * blocks + 0.6),
               constrained_layout=True)
  axes = np.asarray(fig.subplots(2 * blocks, cols, squeeze=False))
  im = None
  for ax in axes.ravel():
    ax.axis('off')
  for i in range(n):
    b, c = divmod(i, cols)
    ax_img, ax_sal = axes[2 * b, c], axes[2 * b + 1, c]
    ax_img.axis('on')
    show_image(ax_img, images[i])
    wrong = labels[i] != predictions[i]
    color = MISTAKE if wrong else CORRECT
    ax_img.set_title(f'pred {class_names[predictions[i]]} '
                     f'({100 * confidences[i]:.0f}%)\ntrue '
                     f'{class_names[labels[i]]}', fontsize=8, color=color)
    _border(ax_img, color, 3 if wrong else 1)
    m = maps[i] / (maps[i].max() or 1.0)
    im = ax_sal.imshow(m, cmap='inferno', vmin=0, vmax=1,
                       interpolation='nearest')
    ax_sal.axis('on')
    ax_sal.set_xticks([])
    ax_sal.set_yticks([])
  if im is not None:
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01,
                 label='|d logit(pred) / d pixel| (per-image max = 1)')
  fig.suptitle('saliency: input gradient of the predicted class logit '
               '(red titles = mistakes)', fontsize=11)
  return save(fig, path)


def calibration(cal: metrics.Calibration, path: str) -> str:
  """Reliability diagram (accuracy vs confidence) and confidence histogram."""
  fig = Figure(figsize=(6.5, 7), constrained_layout=True)
  ax, ax_hist = fig.subplots(2, 1, gridspec_kw={'height_ratios': [3, 1.2]},
                             sharex=True)
  lefts = cal.edges[:-1]
  width = np.diff(cal.edges)
  filled = cal.counts > 0
  ax.bar(lefts[filled], cal.accuracy[filled], width[filled], align='edge',
         color='#4c72b0', edgecolor='white', label='accuracy in bin')
  gap_lo = np.minimum(cal.accuracy, cal.confidence)[filled]
  gap_hi = np.maximum(cal.accuracy, cal.confidence)[filled]
  ax.bar(lefts[filled], gap_hi - gap_lo, width[filled], bottom=gap_lo,
         align='edge', color=MISTAKE, alpha=0.35, hatch='//',
         edgecolor=MISTAKE, label='gap to mean confidence')
  ax.plot([0, 1], [0, 1], 'k--', lw=1, label='perfect calibration')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel('accuracy')
  ax.set_title(f'reliability diagram (ECE = {100 * cal.ece:.2f}%, '
               f'{len(cal.counts)} bins)')
  ax.legend(loc='upper left', fontsize=8)
  ax.grid(alpha=0.3)
  ax_hist.bar(lefts, np.maximum(cal.counts, 0), width, align='edge',
              color='#888888', edgecolor='white')
  if cal.counts.max() > 0:
    ax_hist.set_yscale('log')
  ax_hist.set_xlabel('confidence (top-1 softmax probability)')
  ax_hist.set_ylabel('examples (log)')
  ax_hist.grid(alpha=0.3)
  return save(fig, path)

