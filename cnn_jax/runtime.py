"""Process-wide settings, applied by entry points before JAX starts.

Library modules change no global state. ``cnn_jax.main``, the scripts in
``experiments/`` and the test suite call `configure_xla` once, before the
first JAX computation (importing JAX is fine; XLA reads ``XLA_FLAGS`` when
its backend starts). This is the one place these defaults are set:

* ``--xla_cpu_multi_thread_eigen=false``: each XLA:CPU device runs its
  kernels on one thread. On small-core CPUs XLA's multi-threaded Eigen pool
  is no faster for these models, and when cores are oversubscribed (tests in
  parallel, sweeps with ``--jobs``) it degrades by orders of magnitude.
* ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (jaxlib >=
  0.10, which has the flag): that scheduler orders a program so independent
  ops can run at once, at the cost of memory, which single-threaded devices
  cannot use; without it training steps are faster. It only reorders ops.
* ``--xla_force_host_platform_device_count=N``: the CPU is split into N
  host devices and training is data-parallel over them, which is how a run
  uses every core. N is ``--host_devices``, or by default the largest count
  up to the number of cores that divides the batch size.

Only XLA:CPU reads these flags: GPU and TPU runs are unaffected. A flag the
user already put in ``XLA_FLAGS`` is kept as it is; ``CNN_JAX_XLA_DEFAULTS=0``
leaves out the first two.

`enable_compilation_cache` turns on JAX's persistent compilation cache, so a
second run of the same config loads its compiled programs instead of
compiling them again (``cnn_jax.main --nocompilation_cache`` leaves it off).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import MutableMapping

DEVICE_COUNT_FLAG = 'xla_force_host_platform_device_count'


def jaxlib_at_least(major: int, minor: int) -> bool:
  """Whether the installed jaxlib is >= major.minor (without importing it)."""
  try:
    version = metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return False
  m = re.match(r'(\d+)\.(\d+)', version)
  return bool(m) and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def default_host_devices(batch_size: int | None,
                         cores: int | None = None) -> int:
  """Largest device count <= cores that divides ``batch_size``."""
  cores = cores or os.cpu_count() or 1
  if not batch_size:
    return cores
  return max(d for d in range(1, cores + 1) if batch_size % d == 0)


def xla_flags(current: str, host_devices: int, defaults: bool = True) -> str:
  """``current`` XLA_FLAGS plus the defaults it does not already set."""
  wanted = {}
  if defaults:
    wanted['xla_cpu_multi_thread_eigen'] = 'false'
    if jaxlib_at_least(0, 10):
      wanted['xla_cpu_enable_concurrency_optimized_scheduler'] = 'false'
  if host_devices > 1:
    wanted[DEVICE_COUNT_FLAG] = str(host_devices)
  flags = current
  for name, value in wanted.items():
    if name not in flags:
      flags = f'{flags} --{name}={value}'.strip()
  return flags


def configure_xla(host_devices: int = 0, batch_size: int | None = None,
                  environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets ``XLA_FLAGS`` for this process; call before JAX starts a backend.

  ``host_devices=0`` picks the count from the cores and ``batch_size``.
  """
  if host_devices < 0:
    raise ValueError(f'host_devices must be >= 0, got {host_devices}')
  count = host_devices or default_host_devices(batch_size)
  environ['XLA_FLAGS'] = xla_flags(
      environ.get('XLA_FLAGS', ''), count,
      defaults=environ.get('CNN_JAX_XLA_DEFAULTS', '1') != '0')


def compilation_cache_dir(cache_dir: str = '') -> str:
  """Where compiled programs are kept: ``<cnn_jax cache dir>/xla``."""
  from cnn_jax import data_cache  # Light: no JAX import.
  return os.path.join(data_cache.resolve_root(cache_dir), 'xla')


def enable_compilation_cache(directory: str) -> bool:
  """Turns on JAX's persistent compilation cache in ``directory``.

  Every program is cached, however small or quick to compile: on CPU the
  programs of a run compile in well under JAX's default 1 s threshold each,
  yet add up to seconds. Returns False (and changes nothing) when the
  folder cannot be created.
  """
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return False
  import jax
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return True
