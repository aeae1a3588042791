"""A workdir's networks, ready to answer one image at a time, fast.

`load` reads any workdir `--mode=predict` serves (a run, a ``--num_models``
run, an ensemble) into `Networks`: every network (one per member) with its
run's stock Flax model. Each run gets a few jitted programs on fixed shapes,
compiled once when `Networks` is built (then read from JAX's persistent
compilation cache on later starts), so a new drawing costs only their
execution:

* `probabilities`: every network's class probabilities of one image;
* `look_inside`: one network's stage maps (Flax ``capture_intermediates``,
  as the analysis report captures them), its integrated-gradients saliency
  for its answer, and an occlusion map (how much covering each part of the
  image lowers that answer's probability);
* `what_if`: the image shifted and partly covered, and every network's
  probabilities of that.

Nothing here re-implements a model: every number comes from
``model.apply`` of the run's own module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import inference, input_pipeline
from cnn_jax import workdir as workdir_lib
from cnn_jax.analysis import architecture, intermediates
from cnn_jax.config import Config, CnnJaxError

IG_STEPS = 16  # Points on the integrated-gradients path (midpoint rule).
OCCLUSION = (8, 4)  # Occluding square's side and stride, in pixels.
MAX_SHIFT = 4  # What-if shifts go up to this many pixels each way.


@dataclasses.dataclass(frozen=True)
class Network:
  """One network of a workdir: a member of one of its runs."""

  name: str  # As `inference.Network` names it.
  model: str  # The run's --model.
  run: int  # Index into `Networks.runs`.
  member: int  # Index along the run's member axis (0 for a single run).


@dataclasses.dataclass(frozen=True)
class Stage:
  """A captured 4-D stage, named as the analysis report names it."""

  name: str
  kind: str  # 'convolution', 'ReLU', 'max-pool', 'batch norm', ...
  shape: tuple[int, ...]  # Per example: (H, W, C).
  conv: str | None  # The convolution whose filters made these channels.


@dataclasses.dataclass(frozen=True)
class Inside:
  """What one network computes on one image."""

  network: int
  stages: tuple[Stage, ...]
  maps: tuple[np.ndarray, ...]  # One [H, W, C] per stage.
  probabilities: np.ndarray  # [classes], this network's.
  predicted: int  # This network's answer.
  saliency: np.ndarray  # [H, W] integrated gradients of its answer's logit.
  occlusion: np.ndarray  # [H, W] drop in its answer's probability.
  logit_gap: float  # logit(image) - logit(black image) of its answer.


def _member(variables: Any, k: jax.Array | int) -> Any:
  """Member ``k`` of stacked variables (traced index: one compilation)."""
  return jax.tree_util.tree_map(
      lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), variables)


def occlusion_masks(hw: Sequence[int], size: int, stride: int) -> np.ndarray:
  """``[P, H, W]`` float32 masks, 1 inside each occluding square.

  Squares of side ``size`` every ``stride`` pixels, the last row and column
  of squares flush with the far edges, so every pixel is covered at least
  once.
  """
  def starts(n: int) -> list[int]:
    last = max(n - size, 0)
    return sorted(set(range(0, last + 1, stride)) | {last})
  masks = []
  for top in starts(hw[0]):
    for left in starts(hw[1]):
      m = np.zeros(hw, np.float32)
      m[top:top + size, left:left + size] = 1.0
      masks.append(m)
  return np.stack(masks)


def integrated_gradients(model: nn.Module, variables: Any, x: jax.Array,
                         cls: jax.Array, steps: int) -> jax.Array:
  """``[H, W, C]`` integrated gradients of logit ``cls`` at ``x``
  (``[1, H, W, C]``), from a black baseline, midpoint rule.

  The attributions add up to about logit(x) - logit(black): the share of
  the answer's score each pixel brings (Sundararajan et al., 2017).
  """
  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  path = alphas[:, None, None, None] * x

  def score(images: jax.Array) -> jax.Array:
    logits = model.apply(variables, images, train=False)
    return jnp.take(logits, cls, axis=1).sum()

  return x[0] * jax.grad(score)(path).mean(axis=0)


def edit(x: jax.Array, dy: jax.Array, dx: jax.Array, top: jax.Array,
         left: jax.Array, size: jax.Array) -> jax.Array:
  """``x`` (``[1, H, W, C]``) moved by (dy, dx) pixels (clipped to
  `MAX_SHIFT`), then a ``size`` square at (top, left) set to background."""
  _, h, w, c = x.shape
  dy = jnp.clip(dy, -MAX_SHIFT, MAX_SHIFT)
  dx = jnp.clip(dx, -MAX_SHIFT, MAX_SHIFT)
  padded = jnp.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT),
                       (0, 0)))
  moved = jax.lax.dynamic_slice(padded, (0, MAX_SHIFT - dy, MAX_SHIFT - dx, 0),
                                (1, h, w, c))
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  covered = ((rows >= top) & (rows < top + size) & (cols >= left)
             & (cols < left + size))
  return jnp.where(covered[None, :, :, None], 0.0, moved)


class RunPrograms:
  """The jitted programs of one restored run, on one device."""

  def __init__(self, run: inference.Restored, device: jax.Device,
               ig_steps: int = IG_STEPS):
    self.run, self.model = run, run.model
    self.members = run.num_members  # Its variables: stacked, [K, ...].
    self.device = device
    self.variables = jax.device_put(jax.device_get(run.variables), device)
    self.image_shape = tuple(run.info.image_shape)
    masks = occlusion_masks(self.image_shape[:2], *OCCLUSION)
    self.masks = jax.device_put(masks[..., None], device)
    self.stages = self._stages()
    names = [s.name for s in self.stages]
    self._probs = jax.jit(self._probabilities)
    self._inside = jax.jit(functools.partial(self._look_inside, names,
                                             ig_steps))
    self._what_if = jax.jit(self._edited_probabilities)

  def member_params(self, k: int) -> Any:
    """Member ``k``'s params on the host."""
    params = jax.device_get(self.run.variables['params'])
    return jax.tree_util.tree_map(lambda a: np.asarray(a[k]), params)

  def _stages(self) -> tuple[Stage, ...]:
    """The 4-D stages `intermediates.capture` keeps, with the report's
    names and kinds (`architecture.describe`), from a probe image."""
    probe = jax.device_put(
        np.random.default_rng(0).uniform(size=(1, *self.image_shape)).astype(
            np.float32), self.device)
    variables = jax.device_get(_member(self.variables, 0))
    kept = intermediates.capture(self.model, variables, probe)
    kinds = {s.name: s.kind for s in architecture.describe(
        self.model, variables, probe).stages}
    convs = {name for name, _ in intermediates.conv_kernels(
        variables['params'], [fm.name for fm in kept])}
    stages, conv = [], None
    for fm in kept:
      conv = fm.name if fm.name in convs else conv
      stages.append(Stage(fm.name, kinds.get(fm.name, 'stage'),
                          tuple(fm.value.shape[1:]), conv))
    return tuple(stages)

  def _apply_all(self, variables: Any, x: jax.Array) -> jax.Array:
    """``[K, N, classes]`` logits of every member."""
    if self.members == 1:
      return self.model.apply(_member(variables, 0), x, train=False)[None]
    return jax.lax.map(lambda v: self.model.apply(v, x, train=False),
                       variables)

  def _probabilities(self, variables: Any, image: jax.Array) -> jax.Array:
    x = input_pipeline.normalize(image)[None]
    return jax.nn.softmax(self._apply_all(variables, x)[:, 0], axis=-1)

  def _edited_probabilities(self, variables: Any, image: jax.Array,
                            moves: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = edit(input_pipeline.normalize(image)[None], *moves)
    probs = jax.nn.softmax(self._apply_all(variables, x)[:, 0], axis=-1)
    return x[0], probs

  def _look_inside(self, names: Sequence[str], steps: int, variables: Any,
                   k: jax.Array, image: jax.Array) -> dict[str, Any]:
    v = _member(variables, k)
    x = input_pipeline.normalize(image)[None]
    found = dict(intermediates.traced(self.model, v, x))
    logits = self.model.apply(v, x, train=False)[0]
    cls = jnp.argmax(logits)
    probs = jax.nn.softmax(logits)
    saliency = integrated_gradients(self.model, v, x, cls, steps).sum(-1)
    covered = x * (1.0 - self.masks)
    drops = probs[cls] - jax.nn.softmax(
        self.model.apply(v, covered, train=False), axis=-1)[:, cls]
    masks = self.masks[..., 0]
    occlusion = (drops[:, None, None] * masks).sum(0) / masks.sum(0)
    black = self.model.apply(v, jnp.zeros_like(x), train=False)[0, cls]
    return {'maps': [found[n][0].astype(jnp.float32) for n in names],
            'probs': probs, 'cls': cls, 'saliency': saliency,
            'occlusion': occlusion, 'gap': logits[cls] - black}

  def put(self, image: np.ndarray) -> jax.Array:
    return jax.device_put(np.asarray(image, np.uint8), self.device)

  def probabilities(self, image: jax.Array) -> jax.Array:
    """``[K, classes]``, not waited for (dispatch is asynchronous)."""
    return self._probs(self.variables, image)

  def inside(self, k: int, image: jax.Array) -> dict[str, Any]:
    return self._inside(self.variables, jnp.int32(k), image)

  def what_if(self, image: jax.Array, moves: Sequence[int]
              ) -> tuple[jax.Array, jax.Array]:
    return self._what_if(self.variables, image,
                         jnp.asarray(moves, jnp.int32))


class Networks:
  """Every network of a workdir, with its programs compiled.

  ``device`` (default: the first) holds the variables and runs the
  programs; two `Networks` on two host devices answer in parallel.
  """

  def __init__(self, ensemble: inference.Ensemble,
               device: jax.Device | None = None, ig_steps: int = IG_STEPS):
    self.info = ensemble.info
    check_grayscale(self.info)
    self.class_names = [str(n) for n in self.info.class_names]
    device = device or jax.devices()[0]
    self.runs = [RunPrograms(run, device, ig_steps)
                 for run in ensemble.runs]
    self.networks = []
    for r, run in enumerate(ensemble.runs):
      for k, net in enumerate(run.networks):
        self.networks.append(Network(net.name, net.model, r, k))
    self._kernels: dict[int, dict[str, np.ndarray]] = {}
    self.warm_up()

  @property
  def image_hw(self) -> tuple[int, int]:
    return tuple(self.info.image_shape[:2])

  def warm_up(self) -> None:
    """Runs every program once, so each is compiled (or read from the
    persistent compilation cache) before the first request."""
    blank = np.zeros(self.info.image_shape, np.uint8)
    for run in self.runs:
      image = run.put(blank)
      jax.block_until_ready((run.probabilities(image), run.inside(0, image),
                             run.what_if(image, (0, 0, 0, 0, 0))))

  def stages(self, network: int) -> tuple[Stage, ...]:
    return self.runs[self.networks[network].run].stages

  def kernels(self, network: int) -> dict[str, np.ndarray]:
    """``{conv name: HWIO kernel}`` of one network (on the host)."""
    if network not in self._kernels:
      net = self.networks[network]
      run = self.runs[net.run]
      params = run.member_params(net.member)
      self._kernels[network] = dict(intermediates.conv_kernels(
          params, [s.name for s in run.stages]))
    return self._kernels[network]

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """``[networks, classes]`` of one uint8 ``[H, W, 1]`` image."""
    out = [run.probabilities(run.put(image)) for run in self.runs]
    return np.concatenate([np.asarray(p, np.float64) for p in out])

  def dispatch(self, image: np.ndarray, network: int) -> Any:
    """Starts every program an update needs; `collect` waits for them.

    Split in two so that two workdirs (``--compare``) on two devices
    compute at the same time.
    """
    net = self.networks[network]
    images = [run.put(image) for run in self.runs]
    probs = [run.probabilities(im) for run, im in zip(self.runs, images)]
    inside = self.runs[net.run].inside(net.member, images[net.run])
    return network, probs, inside

  def collect(self, pending: Any) -> tuple[np.ndarray, Inside]:
    """``([networks, classes] probabilities, Inside)`` of `dispatch`."""
    network, probs, inside = jax.device_get(pending)
    stages = self.stages(network)
    return (np.concatenate([np.asarray(p, np.float64) for p in probs]),
            Inside(network, stages,
                   tuple(np.asarray(m) for m in inside['maps']),
                   np.asarray(inside['probs'], np.float64),
                   int(inside['cls']), np.asarray(inside['saliency']),
                   np.asarray(inside['occlusion']), float(inside['gap'])))

  def what_if(self, image: np.ndarray, dy: int, dx: int, top: int,
              left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The edited image (float ``[H, W, 1]`` in [0, 1]) and every
    network's probabilities of it, ``[networks, classes]``."""
    moves = (dy, dx, top, left, size)
    out = [run.what_if(run.put(image), moves) for run in self.runs]
    out = jax.device_get(out)
    return (np.asarray(out[0][0]),
            np.concatenate([np.asarray(p, np.float64) for _, p in out]))


def check_grayscale(info: input_pipeline.DatasetInfo) -> None:
  """The explorer's inputs are grayscale drawings, as predict's are."""
  if len(info.image_shape) != 3 or info.image_shape[-1] != 1:
    raise CnnJaxError(f'explore supports grayscale (HxWx1) datasets; '
                      f'{info.name!r} has images of shape '
                      f'{tuple(info.image_shape)}')


def load(workdir: str, config: Config | None = None,
         device: jax.Device | None = None,
         ig_steps: int = IG_STEPS) -> Networks:
  """The networks of any workdir `--mode=predict` serves, compiled.

  Raises CnnJaxError for a missing or invalid workdir.
  """
  if not os.path.isdir(workdir):
    raise CnnJaxError(f'--workdir={workdir} does not exist; train first '
                      'with --mode=train and the same --workdir')
  config = config or workdir_lib.load_config(workdir)
  check_grayscale(workdir_lib.dataset_info(workdir, config))
  ensemble = inference.load(workdir, config)
  return Networks(ensemble, device, ig_steps)
