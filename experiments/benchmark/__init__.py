"""Benchmarks of cnn_jax, one module a tool:

* `throughput` (``python -m experiments.benchmark``): training and
  evaluation img/s against Keras 3 and PyTorch, the same models built from
  one description (`peers`);
* `kernel_sweep`: what each CPU kernel adds to a training step;
* `profile`: where a training step's time goes, layer by layer;
* `whole_run`: one real run, input loading included, against the Keras
  recipe.

`common` holds the shared flags, data, timers and cnn_jax's runner.
"""
