"""The ensemble part of the report: where a workdir's networks disagree.

For a ``--num_models`` run or a ``--mode=ensemble`` workdir, from every
member's test probabilities (``[M, N, C]``) and the labels: each member's
accuracy, the averaged probabilities' and the majority vote's, how often
the members disagree, and which mistakes averaging fixes or makes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from matplotlib.figure import Figure
import numpy as np

from cnn_jax import inference
from cnn_jax.analysis import captions
from cnn_jax.analysis.files import ReportFiles
from cnn_jax.analysis.plots import save, show_image
from cnn_jax.losses import probability_metrics

MAX_SHOWN = 24


def summarize(member_probs: np.ndarray, labels: np.ndarray
              ) -> dict[str, Any]:
  """The numbers of the section, all from the members' probabilities."""
  preds = member_probs.argmax(-1)  # [M, N]
  ensemble = member_probs.mean(0).argmax(-1)
  metrics = probability_metrics(member_probs, labels)
  member_right = preds == labels
  disagree = np.flatnonzero((preds != preds[:1]).any(0))
  fixed = np.flatnonzero(~member_right.all(0) & (ensemble == labels))
  broken = np.flatnonzero(member_right.any(0) & (ensemble != labels))
  return {
      'member_accuracy': member_right.mean(1).tolist(),
      'accuracy': metrics['accuracy'], 'vote_accuracy': metrics['vote_accuracy'],
      'disagree': disagree, 'disagree_right': int(
          (ensemble[disagree] == labels[disagree]).sum()),
      'fixed': fixed, 'broken': broken,
      'all_wrong': int((~member_right).all(0).sum()),
      'predictions': preds, 'ensemble_predictions': ensemble}


def sentences(names: Sequence[str], s: dict[str, Any], n: int) -> list[str]:
  """Computed captions: every number read from ``s``."""
  accs = s['member_accuracy']
  out = [
      f'This workdir holds {len(accs)} networks. On their own they score '
      f'{captions.pct(min(accs))} to {captions.pct(max(accs))} on the '
      f'{captions.num(n)} test images; averaging their probabilities scores '
      f'{captions.pct(s["accuracy"])}, and a majority vote '
      f'{captions.pct(s["vote_accuracy"])}.',
      f'They disagree on {captions.plural(len(s["disagree"]), "test image")}'
      f'; the average is right on {captions.num(s["disagree_right"])} of '
      'them.']
  out.append(
      f'Averaging fixes {captions.plural(len(s["fixed"]), "image")} that at '
      f'least one network got wrong, and gets '
      f'{captions.plural(len(s["broken"]), "image")} wrong that at least one '
      'got right. '
      + (f'{captions.plural(s["all_wrong"], "image")} every network gets '
         'wrong: no average can fix those.' if s['all_wrong'] else
         'No test image is wrong for every network.'))
  if accs and max(accs) >= s['accuracy']:
    out.append('Here the average is no better than the best single network: '
               'the networks make the same mistakes.')
  return out


def disagreements_figure(images: np.ndarray, labels: np.ndarray,
                         preds: np.ndarray, ensemble: np.ndarray,
                         indices: np.ndarray, names: Sequence[str],
                         path: str) -> str:
  """Test images the networks disagree on, each network's answer shown."""
  cols = 8
  shown = indices[:MAX_SHOWN]
  rows = max(1, math.ceil(len(shown) / cols))
  fig = Figure(figsize=(1.8 * cols, 2.2 * rows + 0.5), constrained_layout=True)
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for ax in axes[len(shown):]:
    ax.axis('off')
  for ax, i in zip(axes, shown):
    show_image(ax, images[i])
    answers = ' '.join(str(names[p]) for p in preds[:, i])
    ok = 'right' if ensemble[i] == labels[i] else 'wrong'
    ax.set_title(f'#{i} true {names[labels[i]]}\nnets: {answers}\n'
                 f'average: {names[ensemble[i]]} ({ok})', fontsize=7)
  fig.suptitle(f'test images the networks disagree on '
               f'({len(indices)}; first {len(shown)} shown)'
               if len(indices) else 'the networks agree on every test image')
  return save(fig, path)


def write(files: ReportFiles, images: np.ndarray, labels: np.ndarray,
          member_probs: np.ndarray, networks: Sequence[inference.Network],
          names: Sequence[str]) -> dict[str, Any]:
  """The section's figure, captions and member table."""
  s = summarize(member_probs, labels)
  files.add('members', disagreements_figure(
      images, labels, s['predictions'], s['ensemble_predictions'],
      s['disagree'], names, files.path('members_disagree.png')),
            'where the networks disagree')
  return {
      'captions': sentences(names, s, len(labels)),
      'rows': [{'name': m.name, 'model': m.model, 'seed': m.seed,
                'best_epoch': m.best_epoch, 'test_accuracy': a}
               for m, a in zip(networks, s['member_accuracy'])],
      'accuracy': s['accuracy'], 'vote_accuracy': s['vote_accuracy'],
      'disagree': len(s['disagree']),
      'figures': files.figures('members')}
