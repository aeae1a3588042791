"""Classifies users' own images with the best params of a trained run.

``python -m cnn_jax.main --mode=predict --workdir=W a.png b.jpg dir/ x.npy``

Inputs are image files (anything Pillow reads), directories (their image and
.npy files, sorted, not recursive) and .npy arrays (HxW, HxWx1, or a batch
NxHxW[x1]; uint8 0-255 or float 0-1). Every image is preprocessed the way
MNIST was made (`cnn_jax.preprocess_image.mnist_style`), then all of them go
through the model in one batched forward pass.

A file that cannot be used gets one line naming it and why (stderr, or an
``error`` object with --json); the others are still classified, and the exit
code is 2 when anything failed, 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import sys
import warnings
from typing import Any, BinaryIO, Sequence, TextIO

import numpy as np
from PIL import Image, ImageOps

from cnn_jax import input_pipeline
from cnn_jax.config import Config, CnnJaxError
from cnn_jax.preprocess_image import PreprocessError, mnist_style, to_unit_range

MAX_FILE_BYTES = 100 * 2**20
MAX_PIXELS = 50_000_000
NPY_MAGIC = b'\x93NUMPY'
IMAGE_EXTENSIONS = frozenset({
    '.png', '.jpg', '.jpeg', '.jfif', '.bmp', '.dib', '.gif', '.tif', '.tiff',
    '.webp', '.pgm', '.ppm', '.pbm', '.pnm', '.tga', '.ico', '.qoi'})
EXIT_SOME_FAILED = 2


class InputError(ValueError):
  """A file that cannot be used as a model input; its message says why."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: its display path and either its images or an error."""

  path: str
  original: np.ndarray | None = None  # float32 HxW in [0, 1], as read.
  image: np.ndarray | None = None  # uint8 HxWx1, the model's input.
  error: str | None = None


# Reading -------------------------------------------------------------------
def expand_paths(paths: Sequence[str]) -> list[tuple[str, str | None]]:
  """(path, error or None) per input file; directories become their files."""
  out: list[tuple[str, str | None]] = []
  for path in paths:
    if not os.path.isdir(path):
      out.append((path, None))
      continue
    try:
      names = sorted(os.listdir(path))
    except OSError as e:
      out.append((path, f'cannot list directory: {e.strerror or e}'))
      continue
    files = [os.path.join(path, n) for n in names
             if not n.startswith('.')
             and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS | {'.npy'}
             and os.path.isfile(os.path.join(path, n))]
    if not files:
      out.append((path, 'directory holds no image or .npy files'))
    out.extend((f, None) for f in files)
  return out


def _check_file(path: str, max_bytes: int) -> None:
  """Raises InputError for missing, non-regular, empty or too-big files."""
  try:
    st = os.stat(path)
  except FileNotFoundError as e:
    raise InputError('no such file or directory') from e
  except OSError as e:
    raise InputError(f'cannot read: {e.strerror or e}') from e
  if not stat.S_ISREG(st.st_mode):
    raise InputError('not a regular file')
  if st.st_size == 0:
    raise InputError('empty file')
  if st.st_size > max_bytes:
    raise InputError(f'file is {st.st_size / 2**20:.1f} MiB, over the '
                     f'{max_bytes / 2**20:g} MiB limit')


def _image_to_gray(img: Image.Image) -> np.ndarray:
  """A Pillow image as float32 HxW luminance in [0, 1].

  Transparent pixels are filled with the colour that contrasts with the
  opaque ink, so a digit drawn on a transparent canvas stays visible.
  """
  if img.mode.startswith('I;16'):
    return np.asarray(img, dtype=np.float32) / 65535.0
  if img.mode in ('I', 'F'):
    a = np.asarray(img, dtype=np.float32)
    hi = float(a.max()) if a.size else 0.0
    scale = 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0
    return np.clip(a / scale, 0.0, 1.0)
  if 'A' in img.mode or 'transparency' in img.info:
    rgba = np.asarray(img.convert('RGBA'), dtype=np.float32) / 255.0
    lum = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    alpha = rgba[..., 3]
    if alpha.min() < 1.0:
      ink = float((lum * alpha).sum() / max(float(alpha.sum()), 1e-6))
      background = 1.0 if ink < 0.5 else 0.0
      lum = alpha * lum + (1.0 - alpha) * background
    return lum.astype(np.float32)
  return np.asarray(img.convert('L'), dtype=np.float32) / 255.0


def read_image(path: str | BinaryIO, max_pixels: int = MAX_PIXELS
               ) -> np.ndarray:
  """An image file's (or binary file object's) first frame as float32 HxW
  grayscale in [0, 1]."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    try:
      with Image.open(path) as img:
        w, h = img.size
        if w * h > max_pixels:
          raise InputError(f'image is {w}x{h} ({w * h / 1e6:.1f} MP), over '
                           f'the {max_pixels / 1e6:g} MP limit')
        if w == 0 or h == 0:
          raise InputError(f'image has no pixels ({w}x{h})')
        return _image_to_gray(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
      raise InputError(f'image dimensions are over the {max_pixels / 1e6:g} '
                       'MP limit') from e
    except Image.UnidentifiedImageError as e:
      raise InputError('not an image (unrecognized file format)') from e


def read_npy(path: str | BinaryIO, max_pixels: int = MAX_PIXELS
             ) -> tuple[list[np.ndarray], bool]:
  """A .npy file's images as float32 HxW in [0, 1], and whether a batch.

  Accepts HxW, HxWx1 (one image) and NxHxW, NxHxWx1 (a batch).
  """
  try:
    a = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise InputError(f'not a readable .npy array ({_first_line(e)})') from e
  if not isinstance(a, np.ndarray):
    a.close()
    raise InputError('is an .npz archive, not a .npy array')
  shape = a.shape
  if a.ndim in (3, 4) and shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3):
    raise InputError(f'array of shape {shape} is not an image (HxW, HxWx1) '
                     'or a batch of them (NxHxW, NxHxWx1)')
  batch = a.ndim == 3
  if a.size == 0:
    raise InputError(f'array of shape {shape} is empty')
  if a.shape[-1] * a.shape[-2] > max_pixels:
    raise InputError(f'images of {a.shape[-1]}x{a.shape[-2]} are over the '
                     f'{max_pixels / 1e6:g} MP limit')
  try:
    a = to_unit_range(a)
  except PreprocessError as e:
    raise InputError(str(e)) from e
  return (list(a) if batch else [a]), batch


def _first_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return (text[:200] or type(e).__name__)


def _is_npy(path: str | BinaryIO) -> bool:
  if not isinstance(path, str):
    start = path.tell()
    magic = path.read(len(NPY_MAGIC))
    path.seek(start)
    return magic == NPY_MAGIC
  if path.lower().endswith('.npy'):
    return True
  with open(path, 'rb') as f:
    return f.read(len(NPY_MAGIC)) == NPY_MAGIC


def read_grays(path: str | BinaryIO, max_pixels: int = MAX_PIXELS
               ) -> tuple[list[np.ndarray], bool]:
  """An image or .npy source as float32 HxW images in [0, 1], and whether
  it held a batch. Raises InputError, with the reason, when it cannot be
  used, whatever the decoder raised."""
  try:
    if _is_npy(path):
      return read_npy(path, max_pixels)
    return [read_image(path, max_pixels)], False
  except InputError:
    raise
  except PermissionError as e:
    raise InputError('permission denied') from e
  except Exception as e:  # Decoders raise many types on corrupt files.
    raise InputError(f'cannot decode ({type(e).__name__}: '
                     f'{_first_line(e)})') from e


def read_bytes(data: bytes, max_bytes: int = MAX_FILE_BYTES,
               max_pixels: int = MAX_PIXELS
               ) -> tuple[list[np.ndarray], bool]:
  """`read_grays` of a file's contents (an upload); never touches a path."""
  if not data:
    raise InputError('empty file')
  if len(data) > max_bytes:
    raise InputError(f'file is {len(data) / 2**20:.1f} MiB, over the '
                     f'{max_bytes / 2**20:g} MiB limit')
  return read_grays(io.BytesIO(data), max_pixels)


def _prepare(path: str, gray: np.ndarray, shape: tuple[int, int],
             keep_original: bool) -> Item:
  try:
    image = mnist_style(gray, shape)[..., None]
  except PreprocessError as e:
    return Item(path, error=str(e))
  return Item(path, original=gray if keep_original else None, image=image)


def load_inputs(paths: Sequence[str], shape: tuple[int, int],
                max_bytes: int = MAX_FILE_BYTES,
                max_pixels: int = MAX_PIXELS, keep_original: bool = False
                ) -> list[Item]:
  """Reads and preprocesses every input; failures become error Items.

  `keep_original` keeps each image as read (for figures); otherwise only the
  small model inputs are held, whatever the size of the files.
  """
  items: list[Item] = []
  for path, error in expand_paths(paths):
    if error:
      items.append(Item(path, error=error))
      continue
    try:
      _check_file(path, max_bytes)
      grays, batch = read_grays(path, max_pixels)
    except InputError as e:
      items.append(Item(path, error=str(e)))
      continue
    names = ([f'{path}[{i}]' for i in range(len(grays))] if batch
             else [path])
    items.extend(_prepare(n, g, shape, keep_original)
                 for n, g in zip(names, grays))
  return items


# Model ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Classifier:
  """A restored workdir's best params, ready to classify uint8 images."""

  info: input_pipeline.DatasetInfo
  ensemble: Any  # inference.Ensemble: one or more members.

  @classmethod
  def restore(cls, config: Config, workdir: str) -> 'Classifier':
    """The workdir's models, best params and dataset info (a run, a
    many-member run or an ensemble); no TFDS needed."""
    from cnn_jax import inference  # Imports JAX.
    inference.check_plain_pixels(config, workdir, 'predict')
    ensemble = inference.load(workdir, config)
    info = ensemble.info
    if len(info.image_shape) != 3 or info.image_shape[-1] != 1:
      raise CnnJaxError(f'predict supports grayscale (HxWx1) datasets; '
                        f'{info.name!r} has images of shape {info.image_shape}')
    return cls(info, ensemble)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Softmax class probabilities of uint8 NHWC images (members averaged,
    with the workdir's --tta), one forward pass per member."""
    return self.ensemble.probabilities(images)


# Output --------------------------------------------------------------------
def text_line(path: str, probs: np.ndarray, class_names: Sequence[str],
              top_k: int) -> str:
  """``path: 7 (97.1%), 2 (1.5%), ...`` with the top-k classes."""
  order = np.argsort(-probs, kind='stable')[:top_k]
  shown = ', '.join(f'{class_names[i]} ({100 * probs[i]:.1f}%)' for i in order)
  return f'{path}: {shown}'


def json_record(path: str, probs: np.ndarray,
                class_names: Sequence[str]) -> dict[str, Any]:
  """The --json object of one classified input."""
  pred = int(np.argmax(probs))
  return {'path': path, 'prediction': pred, 'label': class_names[pred],
          'probabilities': [round(float(p), 6) for p in probs]}


def _safe_name(index: int, path: str) -> str:
  """``003_digit_png.png`` for the 4th input ``some/dir/digit.png``."""
  base = os.path.basename(path.rstrip('/\\')) or 'input'
  base = ''.join(c if c.isalnum() or c in '-' else '_' for c in base)
  return f'{index:03d}_{base.strip("_")}.png'


def save_figure(out_path: str, item: Item, probs: np.ndarray,
                class_names: Sequence[str]) -> None:
  """Original | preprocessed input | probability bars, as one PNG.

  `item` must have been loaded with ``keep_original=True``.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  original = item.original
  if max(original.shape) > 512:
    scale = 512 / max(original.shape)
    size = (max(1, round(original.shape[1] * scale)),
            max(1, round(original.shape[0] * scale)))
    original = np.asarray(Image.fromarray(original, mode='F').resize(
        size, Image.Resampling.BOX))
  pred = int(np.argmax(probs))
  fig = Figure(figsize=(10, 3.4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3, gridspec_kw={'width_ratios': [1, 1, 1.6]})
  axes[0].imshow(original, cmap='gray', vmin=0, vmax=1)
  axes[0].set_title(f'input {item.original.shape[1]}x{item.original.shape[0]}')
  axes[1].imshow(item.image[..., 0], cmap='gray', vmin=0, vmax=255)
  axes[1].set_title(f'model input {item.image.shape[1]}x{item.image.shape[0]}')
  for ax in axes[:2]:
    ax.set_xticks([])
    ax.set_yticks([])
  colors = ['tab:orange' if i == pred else 'tab:blue'
            for i in range(len(probs))]
  axes[2].bar(range(len(probs)), probs, color=colors)
  axes[2].set_xticks(range(len(probs)), [str(c) for c in class_names],
                     rotation=45 if max(map(len, class_names)) > 2 else 0,
                     fontsize=8)
  axes[2].set_ylim(0, 1)
  axes[2].set_ylabel('probability')
  axes[2].set_title(f'prediction: {class_names[pred]} '
                    f'({100 * probs[pred]:.1f}%)')
  fig.suptitle(item.path, fontsize=9)
  fig.tight_layout()
  try:
    fig.savefig(out_path, dpi=100)
  except OSError as e:
    raise CnnJaxError(f'cannot write {out_path}: {e.strerror or e}') from e


def _print(obj: str, stream: TextIO) -> None:
  print(obj, file=stream, flush=True)


def classify_and_report(classifier: Classifier, paths: Sequence[str],
                        top_k: int = 3, as_json: bool = False,
                        save_dir: str | None = None) -> int:
  """Classifies `paths`, prints one result per input; returns the exit code.

  Results go to stdout in input order; in text mode errors go to stderr.
  """
  info = classifier.info
  items = load_inputs(paths, tuple(info.image_shape[:2]),
                      keep_original=bool(save_dir))
  good = [it for it in items if it.error is None]
  probs = (classifier.probabilities(np.stack([it.image for it in good]))
           if good else np.zeros((0, info.num_classes), np.float32))
  by_item = {id(it): p for it, p in zip(good, probs)}
  names = info.class_names
  for index, item in enumerate(items):
    if item.error is not None:
      if as_json:
        _print(json.dumps({'path': item.path, 'error': item.error}), sys.stdout)
      else:
        _print(f'{item.path}: error: {item.error}', sys.stderr)
      continue
    p = by_item[id(item)]
    if as_json:
      _print(json.dumps(json_record(item.path, p, names)), sys.stdout)
    else:
      _print(text_line(item.path, p, names, min(top_k, len(names))), sys.stdout)
    if save_dir:
      save_figure(os.path.join(save_dir, _safe_name(index, item.path)), item,
                  p, names)
  failed = len(items) - len(good)
  if failed:
    _print(f'{failed} of {len(items)} inputs could not be classified',
           sys.stderr)
    return EXIT_SOME_FAILED
  return 0


def main(config: Config, workdir: str, paths: Sequence[str], top_k: int = 3,
         as_json: bool = False, save_dir: str | None = None) -> int:
  """The predict mode: restores `workdir`'s best params, classifies `paths`.

  Returns the process exit code: 0 if every input was classified, 2 if some
  could not be read. Raises CnnJaxError for bad arguments or a bad workdir.
  """
  if not paths:
    raise CnnJaxError('predict needs image files, directories or .npy files '
                      'as arguments, e.g. --mode=predict --workdir=W digit.png')
  if top_k < 1:
    raise CnnJaxError(f'--top_k must be a positive integer, got {top_k}')
  if save_dir:
    try:
      os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
      raise CnnJaxError(f'cannot create --save_preprocessed={save_dir}: '
                        f'{e.strerror or e}') from e
  classifier = Classifier.restore(config, workdir)
  return classify_and_report(classifier, paths, top_k=top_k, as_json=as_json,
                             save_dir=save_dir)
