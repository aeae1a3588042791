"""The model-internals part of the report, from (model, variables) alone.

The layer table, one filter's path from a test image to the decision, the
deeper layers' maps, receptive-field patches of an early and a deep layer,
the filters, every stage's feature maps and saliency. All of it comes from
the real model: `architecture.describe` and `intermediates` run the model's
own ``apply`` (``capture_intermediates``, ``sow``), never a copy of it.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import input_pipeline
from cnn_jax.analysis import (architecture, captions, intermediates,
                              lesson_plots, plots)
from cnn_jax.analysis.architecture import Architecture, Stage, shape_text
from cnn_jax.analysis.files import ReportFiles

TOP_ACTIVATION_IMAGES = 2000
PATCH_CHANNELS, PATCHES = 4, 6
DEEP_CHANNELS = 6


def _slug(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'layer'


def _filter_image(kernel: np.ndarray) -> tuple[np.ndarray, str]:
  """A ``[kh, kw, cin]`` filter as a 2-D image (mean over input channels)."""
  kh, kw, cin = kernel.shape
  if cin == 1:
    return kernel[..., 0], f'{kh}×{kw}×1 weights'
  return kernel.mean(axis=-1), f'{kh}×{kw}×{cin} weights, mean over {cin}'


def _strip(arch: Architecture) -> list[Stage]:
  """The first conv, its batch norm / activation, and the pooling after."""
  convs = arch.convs()
  if not convs:
    return []
  conv = convs[0]
  out = arch.output_of(conv)
  stages = list(arch.stages[arch.stages.index(conv):
                            arch.stages.index(out) + 1])
  pool = arch.next_pool(out)
  return stages + ([pool] if pool else [])


def _deeper(arch: Architecture, after: Stage) -> list[Stage]:
  """Each later conv's output maps and each pooling, in order."""
  outputs = {arch.output_of(c).name for c in arch.convs()}
  start = arch.stages.index(after) + 1
  return [s for s in arch.stages[start:]
          if len(s.out_shape) == 3 and (s.name in outputs or s.window)]


def _lesson(files: ReportFiles, variables: Any, arch: Architecture,
            maps: dict[str, np.ndarray], row: int, index: int,
            image: np.ndarray, label: int, probs: np.ndarray,
            class_names: Sequence[str]) -> dict[str, Any]:
  """One test image: filter -> map -> pooling, deeper maps, decision."""
  strip = [s for s in _strip(arch) if s.name in maps]
  if not strip:
    return {'index': index, 'captions': [], 'figures': []}
  conv, out = strip[0], arch.output_of(strip[0])
  out_map = maps[out.name if out.name in maps else conv.name][row]
  channel = int(out_map.mean(axis=(0, 1)).argmax())
  kernel = np.asarray(variables['params'][conv.name]['kernel'])[..., channel]
  weights, what = _filter_image(kernel)
  values = {s.name: maps[s.name][row][..., channel] for s in strip}
  panels = [(f'{s.name} ({s.kind}): {shape_text(s.out_shape[:2])}',
             values[s.name]) for s in strip]
  panels[0] = (f'{conv.name} feature map {channel}: '
               f'{shape_text(conv.out_shape[:2])}', values[conv.name])
  section = f'lesson_{index}'
  files.add(section, lesson_plots.filter_map_pool(
      image, weights, f'{conv.name} filter {channel}: {what}', panels,
      files.path(f'lesson_ex{index}_filter_map_pool.png')),
            f'test #{index}: one filter and its feature map'
            + (' through ' + ' and '.join(s.kind for s in strip[1:])
               if len(strip) > 1 else ''))
  rows = []
  for s in _deeper(arch, strip[-1]):
    if s.name not in maps:
      continue
    value = maps[s.name][row]
    top = np.argsort(-value.mean(axis=(0, 1)), kind='stable')[:DEEP_CHANNELS]
    rows.append((f'{s.name}\n{shape_text(s.out_shape)}',
                 np.moveaxis(value[..., top], -1, 0), [int(c) for c in top]))
  files.add(section, lesson_plots.deeper_maps(
      rows, probs, class_names, label,
      files.path(f'lesson_ex{index}_deeper.png')),
            f'test #{index}: deeper maps and the decision')
  return {'index': index, 'figures': files.figures(section),
          'captions': captions.filter_to_decision(
              arch, strip, channel, values, index, class_names[label], probs,
              class_names, full=row == 0)}


def _stage_maps(files: ReportFiles, maps: list[intermediates.FeatureMap],
                images: np.ndarray, labels: np.ndarray,
                class_names: Sequence[str], examples: Sequence[int]) -> None:
  """Every 4-D stage of each chosen example, one figure per stage."""
  for row, idx in enumerate(examples):
    section = f'fmaps_{idx}'
    label = class_names[labels[row]]
    files.add(section, plots.input_image(
        images[row], f'test #{idx}: label {label}',
        files.path(f'fmap_ex{idx}_00_input.png')), 'input')
    for i, fm in enumerate(maps, start=1):
      h, w, c = fm.value.shape[1:]
      files.add(section, plots.feature_map(
          fm.value[row], f'{fm.name} | test #{idx} (label {label}) | '
          f'{h}x{w}x{c}, one tile per channel',
          files.path(f'fmap_ex{idx}_{i:02d}_{_slug(fm.name)}.png')),
                f'{fm.name} ({h}x{w}x{c})')


def _patches(conv: Stage, peaks: tuple[np.ndarray, np.ndarray],
             images: np.ndarray, kernel: np.ndarray | None
             ) -> tuple[list[tuple], list[float]]:
  """The top channels of ``conv``'s output and each one's top input
  patches; given the layer's kernel, also the correlation of each
  channel's mean patch with its filter weights."""
  maxima, where = peaks
  channels = np.argsort(-maxima.mean(axis=0), kind='stable')[:PATCH_CHANNELS]
  rows, corr = [], []
  for ch in channels:
    best = np.argsort(-maxima[:, ch], kind='stable')[:PATCHES]
    crops = [images[i][conv.field.patch(*where[i, ch], images.shape[1:3])]
             for i in best]
    weights = None
    if kernel is not None:
      weights = _filter_image(kernel[..., ch])[0]
      full = [c for c in crops if c.shape == kernel.shape[:3]]
      if full:
        mean = np.mean(np.stack(full).astype(np.float64), axis=0).ravel()
        k = kernel[..., ch].ravel()
        if mean.std() > 0 and k.std() > 0:
          corr.append(float(np.corrcoef(mean, k)[0, 1]))
    rows.append((int(ch), weights, crops, [int(i) for i in best]))
  return rows, corr


def _early_vs_deep(files: ReportFiles, model: Any, variables: Any,
                   arch: Architecture, images: np.ndarray, last_map: str,
                   batch_size: int) -> list[str]:
  """Receptive-field patches of the first and last conv and the first-layer
  filters (and, for the reference, the last map's top images, the deeper
  kernels' norms); returns the captions."""
  convs = [c for c in arch.convs() if c.field]
  layers = [arch.output_of(c).name for c in convs[:1] + convs[-1:]]
  sample = images[:TOP_ACTIVATION_IMAGES]
  peaks = intermediates.channel_peaks(model, variables, sample,
                                      layers + [last_map], batch_size)
  lines: list[str] = []
  if len(convs) > 1:
    first, last = convs[0], convs[-1]
    kernel = np.asarray(variables['params'][first.name]['kernel'])
    first_rows, corr = _patches(first, peaks[layers[0]], sample, kernel)
    last_rows, _ = _patches(last, peaks[layers[1]], sample, None)
    groups = [{'title': f'{first.name}: each unit sees {first.field_text} '
                        'pixels; its filter, then its top patches',
               'rows': first_rows},
              {'title': f'{last.name}: each unit sees {last.field_text} '
                        'pixels; its top patches',
               'rows': last_rows}]
    files.add('early_deep', lesson_plots.receptive_patches(
        groups, files.path('receptive_fields.png')),
              'the input patches that most activate an early and a deep '
              'layer, at their receptive-field size')
    lines = captions.receptive_fields(first, last, arch.image_shape,
                                      len(sample), PATCHES)
    if corr:
      r = float(np.mean(corr))
      lines.append(f'Evidence: the average of each {first.name} channel’s '
                   'top patches correlates with its filter weights at r = '
                   f'{r:.2f} (mean over the {len(corr)} channels shown)'
                   + (': the filter is a template of the small pattern it '
                      'detects.' if r > 0.5 else '.'))
  kernels = intermediates.conv_kernels(variables['params'],
                                       [s.name for s in arch.stages])
  if kernels:
    name, k = kernels[0]
    files.add('early_deep', plots.first_layer_filters(
        name, k, files.path('filters_first_layer.png')),
              f'{name}: all first-layer filters')
  if len(kernels) > 1:
    files.add('reference_internals', plots.kernel_norms(
        kernels[1:], files.path('filters_deeper_norms.png')),
              'deeper conv layers: kernel L2 norms')
  files.add('reference_internals', plots.top_activations(
      sample, peaks[last_map][0], last_map,
      files.path('top_activations.png')),
            f'{last_map}: maximally activating test images')
  return lines


def write(files: ReportFiles, model: Any, variables: Any, images: np.ndarray,
          labels: np.ndarray, class_names: Sequence[str],
          examples: Sequence[int],
          saliency_of: tuple[np.ndarray, np.ndarray, np.ndarray],
          batch_size: int) -> dict[str, Any]:
  """Writes the internals figures; returns the page's parts.

  ``examples`` are test indices drawn stage by stage (each as a lesson);
  ``saliency_of`` is (test indices, predicted class, confidence) of the
  examples whose input gradients to draw.
  """
  chosen = list(examples) or [0]
  x = input_pipeline.normalize(jnp.asarray(images[chosen]))
  arch = architecture.describe(model, variables, x[:1])
  fmaps = intermediates.capture(model, variables, x)
  probs = np.asarray(jax.nn.softmax(model.apply(variables, x, train=False)))
  maps = {m.name: m.value for m in fmaps}
  lessons = [_lesson(files, variables, arch, maps, row, idx, images[idx],
                     int(labels[idx]), probs[row], class_names)
             for row, idx in enumerate(examples)]
  _stage_maps(files, fmaps, images[chosen], labels[chosen], class_names,
              examples)
  early_deep = (_early_vs_deep(files, model, variables, arch, images,
                               fmaps[-1].name, batch_size) if fmaps else
                [captions.no_feature_maps(arch)])
  idx, classes, confidences = saliency_of
  if len(idx):
    sal = intermediates.saliency(
        model, variables, input_pipeline.normalize(jnp.asarray(images[idx])),
        classes)
    files.add('reference_internals', plots.saliency(
        images[idx], sal, labels[idx], classes, confidences, class_names,
        files.path('saliency.png')), 'saliency: input gradients')
  return {'architecture': arch,
          'lessons': captions.architecture(arch),
          'examples': lessons,
          'early_deep': early_deep,
          'feature_map_layers': [m.name for m in fmaps]}
