"""What each panel of the explorer shows, as plain data (no Gradio).

`read_drawing` and `read_upload` turn what the browser sends (a canvas as
a PNG ``data:`` URI, an uploaded file's bytes) into a grayscale image with
`cnn_jax.predict`'s readers; `prepare` makes the model input with
`cnn_jax.preprocess_image.mnist_style_steps`, keeping every step. The
other functions summarise the networks' outputs for one panel each: the
decision and how far members agree, a channel beside its filter, the what-if
comparison. `Explorer` ties one or two workdirs (``--compare``) together.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Sequence

import numpy as np

from cnn_jax import predict
from cnn_jax.explore.networks import Inside, Networks, Stage
from cnn_jax.preprocess_image import (PreprocessError, Steps,
                                      mnist_style_steps)

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 16_000_000  # 4000x4000: a photo, not a bomb.
DRAWING_PREFIX = 'data:image/png;base64,'
MAX_DRAWING_CHARS = 4 * 2**20


class InputProblem(ValueError):
  """An input the explorer cannot use; its message is shown in the page."""


def read_upload(data: bytes | None, name: str = 'the file') -> np.ndarray:
  """An uploaded file's first image as float32 HxW grayscale in [0, 1].

  The bytes are decoded in memory (no path is ever opened), with the size
  and pixel limits checked before decoding. Raises InputProblem.
  """
  if data is None:
    raise InputProblem('no file received')
  try:
    grays, _ = predict.read_bytes(bytes(data), MAX_UPLOAD_BYTES,
                                  MAX_UPLOAD_PIXELS)
  except predict.InputError as e:
    raise InputProblem(f'{name}: {e}') from e
  return grays[0]


def read_drawing(uri: str) -> np.ndarray | None:
  """The canvas (a PNG ``data:`` URI) as grayscale; None when empty."""
  if not uri:
    return None
  if len(uri) > MAX_DRAWING_CHARS or not uri.startswith(DRAWING_PREFIX):
    raise InputProblem('the drawing did not arrive as a PNG image')
  try:
    data = base64.b64decode(uri[len(DRAWING_PREFIX):], validate=True)
  except binascii.Error as e:
    raise InputProblem('the drawing did not arrive as a PNG image') from e
  return read_upload(data, 'the drawing')


def prepare(gray: np.ndarray, hw: Sequence[int]) -> Steps:
  """MNIST-style preprocessing with every step kept. Raises InputProblem
  for an image without a digit (blank, or fully transparent)."""
  try:
    return mnist_style_steps(gray, tuple(hw))
  except PreprocessError as e:
    raise InputProblem(str(e)) from e


@dataclasses.dataclass(frozen=True)
class Decision:
  """Every network's class probabilities and what they add up to."""

  class_names: tuple[str, ...]
  member_names: tuple[str, ...]
  member_probabilities: np.ndarray  # [networks, classes]

  @property
  def probabilities(self) -> np.ndarray:
    """The averaged probabilities: the workdir's answer."""
    return self.member_probabilities.mean(0)

  @property
  def prediction(self) -> int:
    return int(np.argmax(self.probabilities))

  @property
  def member_predictions(self) -> np.ndarray:
    return self.member_probabilities.argmax(-1)

  @property
  def agreeing(self) -> int:
    """Networks whose own answer is the averaged answer."""
    return int((self.member_predictions == self.prediction).sum())

  def label(self) -> dict[str, float]:
    """``{class name: probability}`` of every class (for ``gr.Label``)."""
    return {n: float(p) for n, p in zip(self.class_names, self.probabilities)}

  def agreement(self) -> str:
    """One sentence on how far the networks agree (empty for one)."""
    n = len(self.member_names)
    if n == 1:
      return ''
    answer = self.class_names[self.prediction]
    p = self.member_probabilities[:, self.prediction]
    spread = (f'their probabilities of “{answer}” range from '
              f'{100 * p.min():.0f}% to {100 * p.max():.0f}%')
    if self.agreeing == n:
      return f'All {n} networks answer “{answer}”; {spread}.'
    others = [f'{name} says “{self.class_names[k]}”'
              for name, k in zip(self.member_names, self.member_predictions)
              if k != self.prediction]
    return (f'{self.agreeing} of {n} networks answer “{answer}” '
            f'({"; ".join(others)}); {spread}.')

  def rows(self) -> list[dict[str, object]]:
    """One row per network: its answer, confidence, agreement."""
    out = []
    for name, probs in zip(self.member_names, self.member_probabilities):
      k = int(np.argmax(probs))
      out.append({'name': name, 'answer': self.class_names[k],
                  'confidence': float(probs[k]),
                  'of_answer': float(probs[self.prediction]),
                  'agrees': k == self.prediction})
    return out


@dataclasses.dataclass(frozen=True)
class Channel:
  """One channel of one stage, beside the filter that made it."""

  stage: Stage
  index: int
  values: np.ndarray  # [H, W]
  conv: str | None
  filter: np.ndarray | None  # [kh, kw]: the weights (mean over inputs).
  inputs: int  # Input channels the filter spans.


def channel(inside: Inside, kernels: dict[str, np.ndarray], stage: str,
            index: int) -> Channel:
  """Channel ``index`` of ``stage`` (clipped to the stage's channels), with
  the filter of the convolution that made it: its 3x3 weights, or their
  mean over input channels when there are several (as the report shows)."""
  names = [s.name for s in inside.stages]
  i = names.index(stage) if stage in names else 0
  s, maps = inside.stages[i], inside.maps[i]
  index = int(min(max(index, 0), maps.shape[-1] - 1))
  kernel = kernels.get(s.conv) if s.conv else None
  weights, inputs = None, 0
  if kernel is not None and index < kernel.shape[-1]:
    inputs = kernel.shape[2]
    weights = kernel[..., index].mean(axis=2)
  return Channel(s, index, maps[..., index], s.conv, weights, inputs)


@dataclasses.dataclass(frozen=True)
class WhatIf:
  """The edited input and each workdir's answer before and after."""

  image: np.ndarray  # [H, W] in [0, 1]
  before: tuple[Decision, ...]
  after: tuple[Decision, ...]
  moves: tuple[int, int, int, int, int]  # dy, dx, top, left, size


@dataclasses.dataclass(frozen=True)
class Answer:
  """Everything one workdir says about one input."""

  networks: Networks
  decision: Decision
  inside: Inside

  @property
  def network(self) -> int:
    return self.inside.network


class Explorer:
  """One workdir, or two side by side (``--compare``), answering inputs."""

  def __init__(self, runs: Sequence[Networks]):
    self.runs = list(runs)
    self.info = self.runs[0].info
    self.hw = self.runs[0].image_hw

  def decision(self, networks: Networks, probs: np.ndarray) -> Decision:
    return Decision(tuple(networks.class_names),
                    tuple(n.name for n in networks.networks), probs)

  def answer(self, image: np.ndarray, chosen: Sequence[int]
             ) -> list[Answer]:
    """Every workdir's answer to one uint8 ``[H, W, 1]`` model input;
    ``chosen[i]`` is the network of workdir i whose inside is shown. The
    workdirs' programs are all started before any is waited for."""
    pending = [n.dispatch(image, self.clip(i, c))
               for i, (n, c) in enumerate(zip(self.runs, chosen))]
    out = []
    for networks, p in zip(self.runs, pending):
      probs, inside = networks.collect(p)
      out.append(Answer(networks, self.decision(networks, probs), inside))
    return out

  def clip(self, run: int, network: int) -> int:
    return int(min(max(network, 0), len(self.runs[run].networks) - 1))

  def what_if(self, image: np.ndarray, dy: int, dx: int, top: int,
              left: int, size: int,
              before: Sequence[Decision] | None = None) -> WhatIf:
    """The input moved by (dy, dx) and a ``size`` square at (top, left)
    covered, and every workdir's answer to it beside the original's
    (``before``, computed here unless given)."""
    after, edited = [], None
    for networks in self.runs:
      edited, probs = networks.what_if(image, dy, dx, top, left, size)
      after.append(self.decision(networks, probs))
    if before is None:
      before = [self.decision(n, n.probabilities(image)) for n in self.runs]
    return WhatIf(edited[..., 0], tuple(before), tuple(after),
                  (dy, dx, top, left, size))
