"""A serving artifact of a run's best params that runs without cnn_jax.

``python -m cnn_jax.main --mode=export --workdir=W`` writes ``W/export/``:

* ``model.stablehlo``: a `jax.export` serialized function ``uint8 images
  [b, H, W, C] -> float32 class probabilities [b, num_classes]`` with the
  params baked in and a symbolic batch size ``b``, lowered for CPU, CUDA and
  TPU. Load it with ``jax.export.deserialize`` and call ``.call(images)``.
* ``signature.json``: input/output shapes and dtypes, class names, the
  preprocessing the model expects, model name and accuracies.
* ``serve_example.py``: a standalone script that loads and runs the artifact
  with only JAX and NumPy.
* ``saved_model/``: the same function as a TensorFlow SavedModel (via
  `jax2tf`, signature ``serving_default``), unless TF cannot convert it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp

from cnn_jax import inference, input_pipeline
from cnn_jax import results as results_lib
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, CnnJaxError

PLATFORMS = ('cpu', 'cuda', 'tpu')
MODEL_FILE = 'model.stablehlo'
PREPROCESSING = (
    'uint8 grayscale images of the dataset\'s shape (MNIST: 28x28x1), light '
    'digit (255) on a dark background (0), the digit fitted in a 20x20 box '
    'keeping its aspect ratio and centred in the field by its centre of mass, '
    'as MNIST was made; cnn_jax.preprocess_image.mnist_style does this to any '
    'image. The function divides by 255 itself.')

SERVE_EXAMPLE = '''\
"""Classifies images with the exported model, using only JAX and NumPy.

Usage:  python serve_example.py [images.npy ...]

Each .npy holds uint8 images already preprocessed like the training data
(see "preprocessing" in signature.json), shaped [N, H, W, C], [N, H, W] or
[H, W]. Without arguments a few synthetic images are classified.
"""

import json
import pathlib
import sys

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def load(directory=HERE):
  """(exported function, signature dict) from an export folder."""
  signature = json.loads((directory / "signature.json").read_text())
  blob = (directory / signature["file"]).read_bytes()
  return jax.export.deserialize(bytearray(blob)), signature


def as_batch(array, shape):
  """uint8 array -> [N, *shape] batch of images."""
  array = np.asarray(array, dtype=np.uint8)
  return array.reshape((-1, *shape))


def synthetic_images(shape):
  """A vertical stroke and a ring: something like a 1 and a 0."""
  h, w = shape[0], shape[1]
  y, x = np.mgrid[:h, :w]
  stroke = (abs(x - w // 2) <= 1) & (abs(y - h // 2) <= h * 5 // 14)
  radius = np.hypot(y - h / 2, x - w / 2)
  ring = (radius > h * 4 / 28) & (radius < h * 8 / 28)
  images = np.stack([stroke, ring]).astype(np.uint8) * 255
  return images.reshape((2, *shape))


def main(argv):
  exported, signature = load()
  shape = tuple(signature["input"]["shape"][1:])
  names, batches = [], []
  for path in argv[1:]:
    batch = as_batch(np.load(path), shape)
    names += [f"{path}[{i}]" for i in range(len(batch))]
    batches.append(batch)
  if not batches:
    names, batches = ["synthetic stroke", "synthetic ring"], [
        synthetic_images(shape)]
  probabilities = np.asarray(exported.call(np.concatenate(batches)))
  classes = signature["class_names"]
  for name, p in zip(names, probabilities):
    k = int(p.argmax())
    print(f"{name}: {classes[k]} ({100 * p[k]:.1f}%)")


if __name__ == "__main__":
  main(sys.argv)
'''


def probability_fn(ensemble: inference.Ensemble
                   ) -> Callable[[jax.Array], jax.Array]:
  """uint8 images -> softmax probabilities, every member's variables baked
  in and their probabilities averaged (one member for a plain run).

  The models are the stock-Flax inference models (`inference.restore`):
  XLA's own convolution is the fastest forward pass on every platform, so
  one multi-platform artifact is fast everywhere.
  """
  runs = [(run.model, jax.device_get(run.variables), run.num_members)
          for run in ensemble.runs]

  def probabilities(images: jax.Array) -> jax.Array:
    x = input_pipeline.normalize(images)
    total = 0.0
    for model, variables, members in runs:
      for k in range(members):
        v = jax.tree_util.tree_map(lambda a, k=k: a[k], variables)
        total += jax.nn.softmax(
            model.apply(v, x, train=False).astype(jnp.float32), axis=-1)
    return total / ensemble.num_members

  return probabilities


def input_spec(info: input_pipeline.DatasetInfo) -> jax.ShapeDtypeStruct:
  """uint8 [b, H, W, C] with a symbolic batch dimension ``b``."""
  dims = ', '.join(str(d) for d in info.image_shape)
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'b, {dims}'),
                              jnp.uint8)


def export_stablehlo(fn: Callable[[jax.Array], jax.Array],
                     info: input_pipeline.DatasetInfo
                     ) -> jax.export.Exported:
  """`fn` exported for every platform in `PLATFORMS`, any batch size."""
  return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(input_spec(info))


def _write(path: str, data: bytes | str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  os.replace(tmp, path)


def _save_tf(fn: Callable[[jax.Array], jax.Array],
             info: input_pipeline.DatasetInfo, path: str) -> str | None:
  """Writes a TF SavedModel of `fn`; returns None (and warns) if TF fails."""
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
    dims = ', '.join(str(d) for d in info.image_shape)
    tf_fn = tf.function(
        jax2tf.convert(fn, polymorphic_shapes=[f'(b, {dims})'],
                       native_serialization_platforms=PLATFORMS),
        autograph=False,
        input_signature=[tf.TensorSpec([None, *info.image_shape], tf.uint8,
                                       name='images')])
    module = tf.Module()
    module.probabilities = tf_fn
    shutil.rmtree(path, ignore_errors=True)
    tf.saved_model.save(module, path, signatures=tf_fn)
  except Exception as e:  # Optional artifact: jax2tf/TF version mismatches.
    logging.warning('skipped the TF SavedModel (%s: %s)', type(e).__name__,
                    ' '.join(str(e).split())[:300])
    shutil.rmtree(path, ignore_errors=True)
    return None
  return os.path.basename(path)


def signature(config: Config, ensemble: inference.Ensemble,
              exported: jax.export.Exported,
              results: results_lib.Results | None,
              saved_model: str | None) -> dict[str, Any]:
  """The contents of ``signature.json``: how to call the artifact, what it
  expects (the input contract) and what it returns."""
  info = ensemble.info
  networks = ensemble.networks
  single = networks[0] if len(networks) == 1 else None
  return {
      'format': 'jax.export serialized StableHLO (jax.export.deserialize)',
      'file': MODEL_FILE,
      'saved_model': saved_model,
      'jax_version': jax.__version__,
      'platforms': list(exported.platforms),
      'calling_convention_version': exported.calling_convention_version,
      'input': {'name': 'images', 'shape': ['b', *info.image_shape],
                **input_pipeline.INPUT_CONTRACT},
      'output': {'name': 'probabilities',
                 'shape': ['b', info.num_classes], 'dtype': 'float32'},
      'class_names': list(info.class_names),
      'preprocessing': PREPROCESSING,
      'model': config.model,
      'dataset': info.name,
      'num_params': ensemble.num_params(),
      'num_members': len(networks),
      'best_epoch': single.best_epoch if single else None,
      'val_accuracy': single.best_val_accuracy if single else None,
      'members': [{'model': n.model, 'seed': n.seed,
                   'best_epoch': n.best_epoch,
                   'val_accuracy': n.best_val_accuracy} for n in networks],
      'test_accuracy': results.accuracy if results else None,
      'config': json.loads(config.to_json()),
  }


def export(config: Config, workdir: str, saved_model: bool = True) -> str:
  """Writes ``workdir/export/`` from the best checkpoint; returns its path.

  Needs only the workdir: the dataset info is the one saved with the run.
  Any workdir: a run, a many-member run or an ensemble (averaged).
  """
  inference.check_plain_pixels(config, workdir, 'export')
  ensemble = inference.load(workdir, config)
  info = ensemble.info
  out = os.path.join(workdir, 'export')
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise CnnJaxError(f'cannot create {out}: {e.strerror or e}') from e
  fn = probability_fn(ensemble)
  exported = export_stablehlo(fn, info)
  tf_dir = (_save_tf(fn, info, os.path.join(out, 'saved_model'))
            if saved_model else None)
  sig = signature(config, ensemble, exported,
                  workdir_lib.read_results(workdir), tf_dir)
  try:
    _write(os.path.join(out, MODEL_FILE), bytes(exported.serialize()))
    _write(os.path.join(out, 'signature.json'),
           json.dumps(sig, indent=2) + '\n')
    _write(os.path.join(out, 'serve_example.py'), SERVE_EXAMPLE)
  except OSError as e:
    raise CnnJaxError(f'cannot write the export to {out}: '
                      f'{e.strerror or e}') from e
  logging.info('exported %s (%s) for %s to %s', config.model, info.name,
               ', '.join(exported.platforms), out)
  return out
