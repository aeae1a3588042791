"""Multi-process (multi-host) set-up: one JAX process per host, one mesh.

`initialize` connects this process to the others with
`jax.distributed.initialize`; afterwards `jax.devices()` lists the devices of
every process, so the trainer's 1-D ``data`` mesh spans all hosts and the
same jitted program runs data-parallel across them. It must run before any
other JAX call.

Where the coordinator address, process count and process id come from, in
order: the arguments (``--coordinator_address``, ``--num_processes``,
``--process_id``), then ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES``
and ``$JAX_PROCESS_ID``, then JAX's own cluster detection (Cloud TPU, SLURM,
Open MPI, Kubernetes). On CPU, cross-process collectives use Gloo over TCP.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from cnn_jax.config import CnnJaxError

ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
CPU_COLLECTIVES = 'gloo'

_USAGE = ('give --coordinator_address=host:port, --num_processes and '
          f'--process_id (or ${ENV_ADDRESS}, ${ENV_NUM_PROCESSES}, '
          f'${ENV_PROCESS_ID}), or run where JAX detects the cluster '
          '(Cloud TPU, SLURM, Open MPI)')


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name, '').strip()
  if not raw:
    return None
  try:
    return int(raw)
  except ValueError:
    raise CnnJaxError(f'${name}={raw!r} must be an integer') from None


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise CnnJaxError(f'--coordinator_address={address!r} must be host:port '
                      '(e.g. 10.0.0.1:1234) with a port in 1..65535')


def resolve(coordinator_address: str | None = None,
            num_processes: int | None = None,
            process_id: int | None = None
            ) -> tuple[str | None, int | None, int | None]:
  """(address, count, id) from the arguments, else the environment.

  Values still None are left to JAX's cluster detection. Raises CnnJaxError
  on malformed or inconsistent values.
  """
  address = (coordinator_address or os.environ.get(ENV_ADDRESS, '').strip()
             or None)
  count = num_processes if num_processes is not None else _env_int(
      ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if address is not None:
    _check_address(address)
  if count is not None and count < 1:
    raise CnnJaxError(f'--num_processes must be >= 1, got {count}')
  if pid is not None and pid < 0:
    raise CnnJaxError(f'--process_id must be >= 0, got {pid}')
  if count is not None and pid is not None and pid >= count:
    raise CnnJaxError(f'--process_id={pid} must be less than '
                      f'--num_processes={count}')
  return address, count, pid


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until ``address`` accepts TCP connections, else CnnJaxError.

  JAX aborts the whole process (no Python exception) when its client cannot
  register with the coordinator, so processes other than 0 check first.
  """
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise CnnJaxError(
            f'could not reach the coordinator at {address} within '
            f'{timeout_s:g}s ({e.strerror or e}); start process 0 with the '
            'same --coordinator_address, reachable from this host') from e
      time.sleep(0.25)


def _enable_cpu_collectives() -> None:
  """Gloo for cross-process collectives of the CPU backend, unless chosen.

  The option only concerns CPU clients, so it is harmless on GPU/TPU hosts;
  a choice already made (``$JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``) stays.
  Without it, CPU processes could not run the trainer's cross-process psums.
  """
  if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', CPU_COLLECTIVES)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               timeout_s: int = 300, **kwargs: Any) -> int:
  """Joins the multi-process run; returns this process's index.

  Call once per process before any other JAX call. Processes other than 0
  first wait up to ``timeout_s`` for the coordinator to listen, then log at
  WARNING and above only, so progress is reported once. Extra keyword
  arguments go to `jax.distributed.initialize`.
  """
  address, count, pid = resolve(coordinator_address, num_processes,
                                process_id)
  if address is not None and pid not in (None, 0):
    wait_for_coordinator(address, timeout_s)
  _enable_cpu_collectives()
  try:
    jax.distributed.initialize(address, count, pid,
                               initialization_timeout=timeout_s, **kwargs)
  except (ValueError, TypeError) as e:
    raise CnnJaxError(f'cannot start the distributed run ({e}); '
                      f'{_USAGE}') from e
  except RuntimeError as e:
    detail = ' '.join(str(e).split())[:300]
    if 'called before' in detail or 'only be called once' in detail:
      raise CnnJaxError('cnn_jax.distributed.initialize must be called once, '
                        f'before any other JAX call ({detail})') from e
    raise CnnJaxError(f'could not join the distributed run at '
                      f'{address or "the detected coordinator"} within '
                      f'{timeout_s}s: {detail}') from e
  index = jax.process_index()
  if index != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('distributed: process %d of %d, %d local / %d global devices '
               '[%s]', index, jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  return index


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any of them.

  Decisions that change the sequence of collective calls (stopping on a
  signal that reached one host first) must be taken by all processes alike,
  or they deadlock. A no-op with one process.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())
