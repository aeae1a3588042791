"""Where a command's wall time goes: named phases, logged at the end of a run.

`Phases` adds up the seconds spent in each named phase (data loading,
compiling, training, validation, checkpoints, testing); `process_seconds`
is the time since the process started, so the entry point can report the
start-up (interpreter and imports) before its first phase and the total.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator


def process_seconds() -> float | None:
  """Wall seconds since this process started (Linux), else None."""
  try:
    with open('/proc/self/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return uptime - int(fields[19]) / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return None


class Phases:
  """Seconds per named phase, in the order the phases first ran."""

  def __init__(self) -> None:
    self.seconds: dict[str, float] = {}
    self._mark = time.perf_counter()

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  def lap(self, name: str) -> None:
    """Adds the time since the previous lap (or the start) to ``name``."""
    now = time.perf_counter()
    self.add(name, now - self._mark)
    self._mark = now

  def summary(self) -> str:
    """``name 1.2s, other 0.3s`` for a log line."""
    return ', '.join(f'{k} {v:.2f}s' for k, v in self.seconds.items())


COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')


@contextlib.contextmanager
def compile_time() -> Iterator[dict[str, float]]:
  """Adds up JAX's tracing, lowering and XLA compile time inside the block.

  Yields ``{'seconds': ..., 'programs': ..., 'cache_hits': ...}``, filled
  in as programs compile; ``cache_hits`` counts programs loaded from the
  persistent compilation cache (included in ``seconds``).
  """
  from jax import monitoring
  out = {'seconds': 0.0, 'programs': 0, 'cache_hits': 0}

  def on_duration(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
      out['seconds'] += seconds
      out['programs'] += event == COMPILE_EVENTS[-1]

  def on_event(event: str, **_) -> None:
    out['cache_hits'] += event == '/jax/compilation_cache/cache_hits'

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)
  try:
    yield out
  finally:
    monitoring.unregister_event_duration_listener(on_duration)
    monitoring.unregister_event_listener(on_event)
