"""cnn_jax: convolutional networks on MNIST-style data in JAX/Flax."""

import os as _os

__version__ = '0.1.0'


def _default_xla_cpu_flags() -> None:
  """Single-threaded XLA:CPU kernels unless the user chose otherwise.

  On small-core CPUs XLA's multi-threaded Eigen pool is no faster for these
  models, and when cores are oversubscribed (tests in parallel, a sweep with
  --jobs) it degrades by orders of magnitude. Parallelism on CPU comes from
  data-parallel host devices instead. Only XLA:CPU reads this flag, so GPU and
  TPU runs are unaffected. Set CNN_JAX_XLA_DEFAULTS=0 to opt out.
  """
  if _os.environ.get('CNN_JAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = _os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_multi_thread_eigen' not in flags:
    _os.environ['XLA_FLAGS'] = (
        flags + ' --xla_cpu_multi_thread_eigen=false').strip()


_default_xla_cpu_flags()
