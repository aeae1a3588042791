r"""What each CPU kernel of `cnn_jax.kernels` adds to a whole training step:
each model timed with stock Flax layers, with every CPU kernel, and with
every kernel but one, taking turns (ours only).

  python -m experiments.benchmark.kernel_sweep --repeats=7
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from absl import app

from experiments.benchmark import common
from experiments.benchmark.common import JaxRunner, synthetic_data, timed

common.define_flags()


def kernel_variants() -> dict[str, dict[str, Any]]:
  """Layer overrides by name: flax, cpu, and cpu without each kernel."""
  from cnn_jax import kernels
  out: dict[str, dict[str, Any]] = {'flax': {}, 'cpu': kernels.cpu_layers()}
  for left_out in kernels.CPU_LAYERS:
    out[f'cpu-{left_out}'] = kernels.cpu_layers(
        [k for k in kernels.CPU_LAYERS if k != left_out])
  return out


def layer_names(model: Any) -> dict[str, str]:
  """The model's swappable layers (field -> module.name of the type)."""
  from cnn_jax import kernels
  return {field: f'{layer.__module__}.{layer.__qualname__}'
          for field in kernels.CPU_LAYERS
          if (layer := getattr(model, field, None)) is not None}


def kernel_sweep(s: dict[str, Any]) -> dict[str, Any]:
  """Training img/s of each model per kernel variant, taking turns."""
  n = s['steps'] * s['batch_size']
  images, labels = synthetic_data(n)
  data = (images, labels, images[:s['eval_batch_size']])  # No eval timed.
  out: dict[str, Any] = {}
  for model_name in s['models']:
    runs = {}
    for name, layers in kernel_variants().items():
      runner = JaxRunner(model_name, s, data, layers)
      left_out = name.partition('-')[2]
      if left_out and left_out not in runner.model.__dataclass_fields__:
        continue  # The model has no such layer to leave out.
      run = runner.train
      first = timed(run)
      for _ in range(s['warmup']):
        run()
      runs[name] = (run, first, [], layer_names(runner.model))
    for _ in range(s['repeats']):
      for run, _, times, _ in runs.values():
        times.append(timed(run))
    out[model_name] = {
        name: {'train_img_per_s': n / statistics.median(times),
               'compile_seconds': max(0.0, first - statistics.median(times)),
               'train_img_per_s_each': [n / x for x in times],
               'layers': layers}
        for name, (_, first, times, layers) in runs.items()}
  return {'kernel_sweep': out, 'settings': {
      **s, 'load_average_1min': os.getloadavg()[0]}}


def table(results: dict[str, Any]) -> str:
  return '\n'.join(f'{model:10s} {name:12s} {f["train_img_per_s"]:7.0f} '
                   f'img/s  compile {f["compile_seconds"]:.1f}s'
                   for model, by in results['kernel_sweep'].items()
                   for name, f in by.items())


def main(argv: list[str]) -> None:
  del argv
  common.run_tool(kernel_sweep, table)


if __name__ == '__main__':
  app.run(main)
