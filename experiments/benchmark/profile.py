r"""Where a training step's time goes: one traced chunk of ours per model,
the XLA ops that take the most time with the layer each came from, and the
time per layer beside the PyTorch peer's (timed with module hooks).

  python -m experiments.benchmark.profile --host_devices=2 --single_thread
  taskset -c 0 python -m experiments.benchmark.profile --host_devices=1 \
      --batch_size=64      # per core: the kernels themselves
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from absl import app, flags

from experiments.benchmark import common, peers
from experiments.benchmark.peers import layer_group
from experiments.benchmark.common import (FLAGS, JaxRunner, installed,
                                          synthetic_data, timed)

flags.DEFINE_integer('top_ops', 15, 'How many ops to list.')

common.define_flags()


def _hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, JAX op_name) of compiled HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if m:
      src = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), src.group(1) if src else '')
  return out


def _source(op_name: str) -> str:
  """'forward|backward: <layer path>' from a JAX op_name."""
  first, *more = op_name.split(':')  # Multi-output fusions list several.
  direction = 'backward' if 'transpose(jvp(' in first else 'forward'
  path = re.sub(r'^\(?.*?closed_call/', '', first)
  path = re.sub(r'^(transpose\()?jvp\(\w+\)\)?/', '', path)
  return f'{direction}: {path}' + (f' (+{len(more)} more)' if more else '')


def _layers(ops: dict[str, float], sources: dict[str, tuple[str, str]],
            wall_ms: float) -> dict[str, dict[str, float]]:
  """Op times summed by the layer their JAX op_name names; ``rest`` (ReLU,
  pooling, loss, optimizer, waits) is the step's wall time minus the rest."""
  layers: dict[str, dict[str, float]] = {}
  for op, ms in ops.items():
    source = _source(sources[op][1])
    direction, path = source.split(': ', 1)
    group = next((g for g in map(layer_group, re.split(r'[/ ]', path))
                  if g != 'rest'), 'rest')
    if group != 'rest':
      t = layers.setdefault(group, {'forward_ms': 0.0, 'backward_ms': 0.0})
      t[f'{direction}_ms'] += ms
  return _with_rest(layers, wall_ms)


def _with_rest(layers: dict[str, dict[str, float]],
               wall_ms: float) -> dict[str, dict[str, float]]:
  layers = {k: v for k, v in layers.items() if k != 'rest'}
  named = sum(sum(t.values()) for t in layers.values())
  return {**layers, 'rest': {'ms': wall_ms - named}}


def profile(s: dict[str, Any]) -> dict[str, Any]:
  """Per-op and per-layer time of one traced training chunk, per model.

  Op times are XLA:CPU thunk events summed over the traced chunk and divided
  by steps x devices: milliseconds per step on one device. They do not
  include the time devices wait for each other (``sync_ms``: rendezvous and
  waits), so ``op_ms`` + ``sync_ms`` is about one step's wall time.
  ``layers`` sums them per layer and direction; with the PyTorch peer,
  ``torch_layers`` times its modules the same way (hooks), for a layer by
  layer comparison (pin both to one core to compare kernels:
  ``taskset -c 0 ... --host_devices=1 --batch_size=64``).
  """
  import glob
  import jax
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF is a dep.
  n = s['steps'] * s['batch_size']
  images, labels = synthetic_data(n)
  data = (images, labels, synthetic_data(s['eval_batch_size'], seed=1)[0])
  results: dict[str, Any] = {}
  for model_name in s['models']:
    runner = JaxRunner(model_name, s, data)
    for _ in range(1 + s['warmup']):
      runner.train()
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d)
      runner.train()
      jax.profiler.stop_trace()
      space = xplane_pb2.XSpace()
      with open(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0],
                'rb') as f:
        space.ParseFromString(f.read())
    run = runner.run
    idx = run.trainer.epoch_indices(run.key, 0, len(run.labels))
    sources = _hlo_sources(run.trainer.train_chunk.lower(
        runner.state, run.images, run.labels, idx).compile().as_text())
    per = s['steps'] * jax.device_count()
    ops: dict[str, float] = {}
    sync = 0.0
    for plane in space.planes:
      names = {k: v.name for k, v in plane.event_metadata.items()}
      for line in plane.lines:
        for ev in line.events:
          name = names.get(ev.metadata_id, '')
          ms = ev.duration_ps / 1e9 / per
          if name in sources:
            ops[name] = ops.get(name, 0.0) + ms
          elif name.startswith(('Rendezvous', 'Wait:')):
            sync += ms
    if not ops:
      raise SystemExit('error: --profile found no XLA:CPU op events in the '
                       f'trace (backend {jax.default_backend()!r}); it reads '
                       'CPU traces only')
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:FLAGS.top_ops]
    wall = 1e3 * timed(runner.train) / s['steps']
    results[model_name] = r = {
        'op_ms': sum(ops.values()), 'sync_ms': sync, 'wall_ms_per_step': wall,
        'layers': _layers(ops, sources, wall),
        'top_ops': [{'op': k, 'ms': v, 'shape': sources[k][0],
                     'source': _source(sources[k][1])} for k, v in top]}
    if 'torch' in s['peers'] and installed('torch'):
      peer = peers.TorchRunner(model_name, s, data)
      for _ in range(1 + s['warmup']):
        peer.train()
      layers, r['torch_wall_ms_per_step'] = peer.layer_times()
      r['torch_threads'] = peer.torch.get_num_threads()
      r['torch_layers'] = _with_rest(layers, r['torch_wall_ms_per_step'])
  results['settings'] = {**s, 'num_devices': jax.device_count(),
                         'load_average_1min': os.getloadavg()[0]}
  return results


def table(results: dict[str, Any]) -> str:
  """The top ops of each model, then its layers beside PyTorch's."""
  rows = []
  for model_name, r in results.items():
    if model_name == 'settings':
      continue
    rows.append(f'{model_name}: ops {r["op_ms"]:.1f} ms + sync '
                f'{r["sync_ms"]:.1f} ms per step and device (wall '
                f'{r["wall_ms_per_step"]:.1f} ms per step)')
    rows += [f'  {o["ms"]:6.2f} ms  {o["shape"][:30]:30s} {o["source"]}'
             for o in r['top_ops']]
    covered = (r['op_ms'] + r['sync_ms']) / r['wall_ms_per_step']
    if covered < 0.9:
      rows.append(f'  (the trace covers {covered:.0%} of the step: with '
                  'several devices some Eigen ops run outside it; for '
                  'per-layer times profile one device on one core)')
    rows += _layer_rows(r)
  return '\n'.join(rows)


def _layer_rows(r: dict[str, Any]) -> list[str]:
  """Ours vs the PyTorch peer per layer: forward / backward ms per step."""
  peer = r.get('torch_layers', {})
  def fmt(t: dict[str, float] | None) -> str:
    if not t:
      return ''
    if 'ms' in t:
      return f'{t["ms"]:13.2f}'
    return ' '.join(f'{t[d]:6.2f}' if d in t else f'{"-":>6s}'
                    for d in ('forward_ms', 'backward_ms'))

  rows = [f'  {"layer":12s} {"cnn_jax fwd / bwd ms":>20s}'
          + ('   torch fwd / bwd ms' if peer else '')]
  for group in sorted(set(r['layers']) | set(peer), key=lambda g: (
      g == 'rest', g.startswith(('batch', 'drop')), g)):
    rows.append(f'  {group:12s} {fmt(r["layers"].get(group)):>20s}   '
                f'{fmt(peer.get(group)):>18s}'.rstrip())
  rows.append(f'  {"step (wall)":12s} {r["wall_ms_per_step"]:20.2f}   '
              + (f'{r["torch_wall_ms_per_step"]:18.2f}' if peer else ''))
  return rows


def main(argv: list[str]) -> None:
  del argv
  common.run_tool(profile, table)


if __name__ == '__main__':
  app.run(main)
