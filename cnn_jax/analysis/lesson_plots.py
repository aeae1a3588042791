"""Figures of the report's lesson: one filter's path to the decision,
receptive-field patches, confused pairs and two runs side by side.

Like `plots`, each function draws one `matplotlib.figure.Figure` (Agg, no
pyplot state) from plain numpy data, writes a PNG to ``path`` and returns it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from cnn_jax.analysis.captions import prob
from cnn_jax.analysis.plots import (CORRECT, MISTAKE, class_axis, save,
                                    show_image, value_norm)


def _weights(ax: Any, kernel: np.ndarray, title: str) -> None:
  """A filter's ``[kh, kw]`` weights as a signed heatmap, values written in."""
  m = float(np.abs(kernel).max()) or 1.0
  ax.imshow(kernel, cmap='RdBu_r', vmin=-m, vmax=m, interpolation='nearest')
  if kernel.size <= 49:
    for (i, j), v in np.ndenumerate(kernel):
      ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7,
              color='white' if abs(v) > 0.6 * m else 'black')
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=9)


def filter_map_pool(image: np.ndarray, kernel: np.ndarray, kernel_title: str,
                    panels: Sequence[tuple[str, np.ndarray]], path: str
                    ) -> str:
  """Input image, one filter's weights, then its map through each stage."""
  n = 2 + len(panels)
  fig = Figure(figsize=(2.9 * n, 3.3), constrained_layout=True)
  axes = np.atleast_1d(fig.subplots(1, n))
  show_image(axes[0], image)
  axes[0].set_title('1. input image', fontsize=9)
  _weights(axes[1], kernel, f'2. {kernel_title}')
  for k, (ax, (title, value)) in enumerate(zip(axes[2:], panels), start=3):
    cmap, norm = value_norm(value)
    im = ax.imshow(value, cmap=cmap, norm=norm, interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f'{k}. {title}', fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
  return save(fig, path)


def deeper_maps(rows: Sequence[tuple[str, np.ndarray, Sequence[int]]],
                probs: np.ndarray, class_names: Sequence[str], label: int,
                path: str) -> str:
  """Each deeper stage's most active channels, then the class probabilities.

  ``rows`` are (title, ``[k, h, w]`` maps, their channel numbers).
  """
  cols = max([len(r[1]) for r in rows] + [1])
  nrows = max(len(rows), 1)
  k = len(class_names)
  fig = Figure(figsize=(1.6 * cols + 4.5, max(1.7 * nrows + 0.6,
                                              0.28 * k + 1.2)),
               constrained_layout=True)
  grid = fig.add_gridspec(nrows, cols + 1, width_ratios=[1] * cols + [2.6])
  for r, (title, maps, channels) in enumerate(rows):
    cmap, norm = value_norm(maps)
    for c in range(cols):
      ax = fig.add_subplot(grid[r, c])
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(maps):
        ax.axis('off')
        continue
      ax.imshow(maps[c], cmap=cmap, norm=norm, interpolation='nearest')
      ax.set_title(f'channel {channels[c]}', fontsize=7)
      if c == 0:
        ax.set_ylabel(title, fontsize=8)
  ax = fig.add_subplot(grid[:, cols])
  pred = int(np.argmax(probs))
  colors = ['#bbbbbb'] * k
  colors[pred] = CORRECT if pred == label else MISTAKE
  y = np.arange(k)
  ax.barh(y, 100 * probs, color=colors)
  ax.set_yticks(y)
  ax.set_yticklabels(class_names, fontsize=8)
  ax.get_yticklabels()[label].set_fontweight('bold')
  ax.invert_yaxis()
  ax.set_xlim(0, 105)
  ax.set_xlabel('probability (%)')
  ax.set_title(f'decision: {class_names[pred]} ({prob(probs[pred])})\n'
               f'true class (bold): {class_names[label]}', fontsize=9)
  for i, p in enumerate(probs):
    ax.text(100 * p + 1, i, f'{100 * p:.1f}', va='center', fontsize=7)
  ax.grid(axis='x', alpha=0.3)
  fig.suptitle(f'deeper stages: the {cols} most active channels of each, '
               'for this image (one colour scale per row)', fontsize=10)
  return save(fig, path)


def receptive_patches(groups: Sequence[dict[str, Any]], path: str) -> str:
  """Per layer, per channel: its filter (if given) and its top input patches.

  Each group: ``title``, and ``rows`` of (channel, kernel ``[kh, kw]`` or
  None, crops ``[uint8 HWC]``, test indices).
  """
  cols = 1 + max(len(r[2]) for g in groups for r in g['rows'])
  heights = [len(g['rows']) for g in groups]
  fig = Figure(figsize=(1.45 * cols + 0.5, 1.55 * sum(heights)
                        + 0.7 * len(groups)), constrained_layout=True)
  subs = np.atleast_1d(fig.subfigures(len(groups), 1, height_ratios=heights))
  for sub, group in zip(subs, groups):
    axes = np.asarray(sub.subplots(len(group['rows']), cols, squeeze=False))
    for row_axes, (channel, kernel, crops, indices) in zip(axes,
                                                           group['rows']):
      for ax in row_axes:
        ax.set_xticks([])
        ax.set_yticks([])
      if kernel is not None:
        _weights(row_axes[0], kernel, f'filter {channel}')
      else:
        row_axes[0].axis('off')
        row_axes[0].text(0.5, 0.5, f'channel\n{channel}', ha='center',
                         va='center', fontsize=9)
      for ax, crop, i in zip(row_axes[1:], crops, indices):
        show_image(ax, crop)
        ax.set_title(f'test #{i}', fontsize=7)
      for ax in row_axes[1 + len(crops):]:
        ax.axis('off')
    sub.suptitle(group['title'], fontsize=10)
  return save(fig, path)


def confused_pairs(images: np.ndarray, pairs: Sequence[tuple[int, int, int,
                                                             np.ndarray]],
                   confidences: np.ndarray, class_names: Sequence[str],
                   path: str) -> str:
  """One row per (true, predicted) pair: its count and example images."""
  cols = max([len(p[3]) for p in pairs] + [1])
  fig = Figure(figsize=(1.5 * cols + 1.6, 1.75 * max(len(pairs), 1) + 0.5),
               constrained_layout=True)
  axes = np.asarray(fig.subplots(max(len(pairs), 1), cols, squeeze=False))
  for ax in axes.ravel():
    ax.axis('off')
  for row, (t, p, count, idx) in zip(axes, pairs):
    for j, (ax, i) in enumerate(zip(row, idx)):
      ax.axis('on')
      show_image(ax, images[i])
      ax.set_title(f'#{i} ({100 * confidences[i]:.0f}%)', fontsize=7,
                   color=MISTAKE)
      if j == 0:
        ax.set_ylabel(f'true {class_names[t]}\n→ pred {class_names[p]}\n'
                      f'{count}×', fontsize=8)
  fig.suptitle('most frequent mistakes: true class → predicted class, how '
               'often, and examples (most confident first)', fontsize=10)
  return save(fig, path)


def compare_per_class(class_names: Sequence[str], recall_a: np.ndarray,
                      recall_b: np.ndarray, label_a: str, label_b: str,
                      path: str) -> str:
  """Per-class accuracy of two runs, side by side."""
  k = len(class_names)
  x = np.arange(k)
  fig = Figure(figsize=(max(8.0, 0.8 * k + 2), 4.2), constrained_layout=True)
  ax = fig.subplots()
  ax.bar(x - 0.2, 100 * recall_a, 0.4, label=label_a, color='#4c72b0')
  ax.bar(x + 0.2, 100 * recall_b, 0.4, label=label_b, color='#dd8452')
  class_axis(ax, class_names, 100 * np.concatenate([recall_a, recall_b]))
  ax.set_ylabel('recall = class accuracy (%)')
  ax.set_title('per-class accuracy of the two runs')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8)
  return save(fig, path)


def compare_disagreements(images: np.ndarray, labels: np.ndarray,
                          preds_a: np.ndarray, preds_b: np.ndarray,
                          groups: Sequence[tuple[str, np.ndarray]],
                          label_a: str, label_b: str,
                          class_names: Sequence[str], path: str) -> str:
  """Test images one run gets right and the other wrong, per group."""
  cols = 8
  groups = [g for g in groups if len(g[1])]
  rows = [math.ceil(len(idx) / cols) for _, idx in groups]
  fig = Figure(figsize=(1.7 * cols, 2.1 * max(sum(rows), 1)
                        + 0.6 * len(groups)), constrained_layout=True)
  if not groups:
    fig.suptitle(f'{label_a} and {label_b} agree on every test image')
    return save(fig, path)
  subs = np.atleast_1d(fig.subfigures(len(groups), 1, height_ratios=rows))
  for sub, (title, idx), nrows in zip(subs, groups, rows):
    axes = np.atleast_1d(sub.subplots(nrows, cols)).ravel()
    for ax in axes[len(idx):]:
      ax.axis('off')
    for ax, i in zip(axes, idx):
      show_image(ax, images[i])
      ax.set_title(f'#{i} true {class_names[labels[i]]}\n'
                   f'{label_a[:12]}: {class_names[preds_a[i]]} | '
                   f'{label_b[:12]}: {class_names[preds_b[i]]}', fontsize=7)
    sub.suptitle(title, fontsize=10)
  return save(fig, path)
