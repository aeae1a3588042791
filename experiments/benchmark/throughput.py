r"""Training and evaluation speed of cnn_jax against Keras 3 and PyTorch.

For each model the same architecture (built for the peers from the stock
model's layer table, `peers.description`), optimizer (Adam, same learning
rate) and batch size in each framework, on the same synthetic uint8
MNIST-shaped data held in memory. Ours is timed over the library's own jitted
multi-step chunk (`cnn_jax.train.setup`), Keras over `train_on_batch` (its
TensorFlow backend, default settings, so no XLA on CPU), PyTorch over a
plain eager loop. The frameworks take turns within each repeat, so load from
other processes hits them alike; medians are reported.

  python -m experiments.benchmark                    # both models, a table
  python -m experiments.benchmark --json --models=simple_cnn --repeats=5
  python -m experiments.benchmark --kernels=flax --peers=   # ours only
  python -m experiments.benchmark --host_devices=2 --single_thread

The other tools: `experiments.benchmark.kernel_sweep` (what each CPU kernel
adds), `.profile` (where a training step's time goes, layer by layer) and
`.whole_run` (one real run, input loading included).

Figures per framework: ``train_img_per_s`` (steady state), ``eval_img_per_s``
(batches of 1000, inference mode), ``compile_seconds`` (first training call
minus a steady one: tracing + compilation for JAX, graph tracing for Keras,
~0 for eager PyTorch), ``peak_rss_mb`` (process peak RSS when its warm-up
ended: exact for ours, which is set up first; the peers' include what was
loaded before them) and ``rss_growth_mb`` (resident memory its import, model
and warm-up added).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from absl import app

from experiments.benchmark import common, peers
from experiments.benchmark.common import (JaxRunner, current_rss_mb,
                                          installed, peak_rss_mb,
                                          synthetic_data, timed)

common.define_flags()


def setup(cls: type, model_name: str, s: dict[str, Any], data: tuple
          ) -> tuple[Any, dict[str, Any]]:
  """Builds a runner, runs its first (compiling) and warm-up chunks."""
  rss0 = current_rss_mb()
  runner = cls(model_name, s, data)
  first = timed(runner.train)
  for _ in range(s['warmup']):
    runner.train()
  first_eval = timed(runner.evaluate)
  return runner, {'first_train_seconds': first,
                  'first_eval_seconds': first_eval,
                  'peak_rss_mb': peak_rss_mb(),
                  'rss_growth_mb': current_rss_mb() - rss0}


def benchmark(s: dict[str, Any]) -> dict[str, Any]:
  """Sets every (framework, model) up, then times them in turns."""
  n = s['steps'] * s['batch_size']
  images, labels = synthetic_data(n)
  eval_images, _ = synthetic_data(s['eval_examples'], seed=1)
  data = (images, labels, eval_images)
  peer_names = [p for p in s['peers'] if installed(p)]
  # Ours first, for all models, so its peak RSS holds no other framework.
  classes = [JaxRunner] + [peers.RUNNERS[p] for p in peer_names]
  runners: dict[str, dict[str, tuple[Any, dict]]] = {}
  for cls in classes:
    for model_name in s['models']:
      runners.setdefault(model_name, {})[cls.name] = setup(
          cls, model_name, s, data)

  results: dict[str, Any] = {}
  for model_name, by_framework in runners.items():
    train_t: dict[str, list[float]] = {k: [] for k in by_framework}
    eval_t: dict[str, list[float]] = {k: [] for k in by_framework}
    for _ in range(s['repeats']):
      for name, (runner, _) in by_framework.items():
        train_t[name].append(timed(runner.train))
      for name, (runner, _) in by_framework.items():
        eval_t[name].append(timed(runner.evaluate))
    figures = {}
    for name, (runner, info) in by_framework.items():
      t_train = statistics.median(train_t[name])
      t_eval = statistics.median(eval_t[name])
      members = s['num_models'] if name == 'cnn_jax' else 1
      figures[name] = {
          'train_img_per_s': n * members / t_train,
          'eval_img_per_s': s['eval_examples'] * members / t_eval,
          'compile_seconds': max(0.0, info['first_train_seconds'] - t_train),
          'peak_rss_mb': info['peak_rss_mb'],
          'rss_growth_mb': info['rss_growth_mb'],
          'train_seconds_per_chunk': train_t[name],
          **runner.extra()}
    ours = figures.pop('cnn_jax')
    for peer, fig in figures.items():
      ours[peer] = fig
      ours[f'ratio_vs_{peer}'] = (ours['train_img_per_s']
                                  / fig['train_img_per_s'])
      ours[f'eval_ratio_vs_{peer}'] = (ours['eval_img_per_s']
                                       / fig['eval_img_per_s'])
    results[model_name] = ours
  results['settings'] = {**s, 'peers_run': peer_names,
                         'peers_skipped': [p for p in s['peers']
                                           if p not in peer_names],
                         'cpu_count': os.cpu_count(),
                         'load_average_1min': os.getloadavg()[0]}
  return results


def table(results: dict[str, Any]) -> str:
  """Ours and the peers per model: img/s, compile, memory, our ratio."""
  rows = [f'{"model":10s} {"framework":8s} {"train img/s":>11s} '
          f'{"eval img/s":>10s} {"compile s":>9s} {"peak RSS MB":>11s} '
          f'{"+RSS MB":>8s} {"ours/this":>9s}']
  for model_name, fig in results.items():
    if model_name == 'settings':
      continue
    for name, f in [('cnn_jax', fig)] + [(p, fig[p]) for p in ('keras', 'torch')
                                          if p in fig]:
      ratio = fig.get(f'ratio_vs_{name}', 1.0)
      rows.append(f'{model_name:10s} {name:8s} {f["train_img_per_s"]:11.0f} '
                  f'{f["eval_img_per_s"]:10.0f} {f["compile_seconds"]:9.2f} '
                  f'{f["peak_rss_mb"]:11.0f} {f["rss_growth_mb"]:8.0f} '
                  f'{ratio:9.2f}')
  return '\n'.join(rows)




def main(argv: list[str]) -> None:
  del argv
  common.run_tool(benchmark, table)


if __name__ == '__main__':
  app.run(main)
