"""Stopping training cleanly: SIGTERM and SIGINT become a flag that the
training loop checks between chunks of steps, and `Stop` (raised after the
latest state is saved) ends the run with exit status 143."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator


class Stop(Exception):
  """Raised when SIGTERM/SIGINT asked training to stop after a checkpoint."""


@contextlib.contextmanager
def on_signals() -> Iterator[dict[str, Any]]:
  """Turns SIGTERM/SIGINT into a flag checked between chunks of steps."""
  flag: dict[str, Any] = {'signal': None}
  handled = (signal.SIGTERM, signal.SIGINT)
  try:
    previous = {s: signal.signal(s, lambda num, _: flag.update(signal=num))
                for s in handled}
  except ValueError:  # Not the main thread: no signal handling.
    previous = {}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
