"""cnn_jax: convolutional networks on MNIST-style data in JAX/Flax."""

import os as _os
import re as _re

__version__ = '0.1.0'


def _jaxlib_at_least(major: int, minor: int) -> bool:
  """Whether the installed jaxlib is >= major.minor (without importing it)."""
  from importlib import metadata
  try:
    version = metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return False
  m = _re.match(r'(\d+)\.(\d+)', version)
  return bool(m) and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def _default_xla_cpu_flags() -> None:
  """XLA:CPU settings for data-parallel host devices, unless the user chose.

  * Single-threaded kernels: on small-core CPUs XLA's multi-threaded Eigen
    pool is no faster for these models, and when cores are oversubscribed
    (tests in parallel, a sweep with --jobs) it degrades by orders of
    magnitude. Parallelism on CPU comes from data-parallel host devices.
  * No concurrency-optimized scheduling (jaxlib >= 0.10, where it was
    measured): that scheduler orders a program to run independent ops at
    once at the cost of memory, which single-threaded devices cannot use;
    without it training steps were ~5% faster on a 2-core CPU
    (experiments/PERFORMANCE.md). It only reorders ops: same results.

  Only XLA:CPU reads these flags, so GPU and TPU runs are unaffected. A flag
  the user already set in XLA_FLAGS is left alone; CNN_JAX_XLA_DEFAULTS=0
  opts out of all of them.
  """
  if _os.environ.get('CNN_JAX_XLA_DEFAULTS', '1') == '0':
    return
  defaults = {'xla_cpu_multi_thread_eigen': 'false'}
  if _jaxlib_at_least(0, 10):
    defaults['xla_cpu_enable_concurrency_optimized_scheduler'] = 'false'
  flags = _os.environ.get('XLA_FLAGS', '')
  for name, value in defaults.items():
    if name not in flags:
      flags = f'{flags} --{name}={value}'.strip()
  _os.environ['XLA_FLAGS'] = flags


_default_xla_cpu_flags()
