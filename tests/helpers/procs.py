"""Starting fresh JAX processes from tests: environment, ports, timeouts."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
HELPERS = REPO / 'tests' / 'helpers'
TIMEOUT_S = 420  # A hang fails the test instead of blocking CI.
# Variables through which JAX could join a real cluster or pick a device.
_CLUSTER_ENV_PREFIXES = ('JAX_', 'SLURM_', 'OMPI_', 'PMI_', 'TPU_',
                         'KUBERNETES_', 'MEGASCALE_', 'CLOUD_TPU')


def jax_env(num_cpu_devices: int = 1) -> dict[str, str]:
  """The environment of a CPU-only JAX process with that many devices.

  XLA:CPU's LLVM optimization is turned off: compiling dominates these
  short runs, and sharding (the SPMD partitioner) happens in HLO passes that
  still run, so the programs compared are partitioned exactly as usual.
  """
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(_CLUSTER_ENV_PREFIXES)}
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith(('--xla_force_host_platform_device_count',
                                '--xla_backend_optimization_level'))]
  flags += [f'--xla_force_host_platform_device_count={num_cpu_devices}',
            '--xla_backend_optimization_level=0']
  env.update(XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=os.pathsep.join(
                 [str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep))
  return env


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with contextlib.closing(socket.socket()) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_python(args: list[str], env: dict[str, str],
               timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
  """``python ARGS`` in the repo root; raises TimeoutExpired on a hang."""
  return subprocess.run([sys.executable, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def run_together(argvs: list[list[str]], env: dict[str, str],
                 logdir: pathlib.Path, timeout: float = TIMEOUT_S
                 ) -> list[tuple[int | None, str]]:
  """Runs ``python ARGV`` for each argv at once; (exit code, output) each.

  A process still running after ``timeout`` seconds is killed and gets exit
  code None; so are the others once the first one times out.
  """
  logdir.mkdir(parents=True, exist_ok=True)
  procs, logs, codes = [], [], []
  try:
    for i, argv in enumerate(argvs):
      log = open(logdir / f'proc{i}.log', 'w+')
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO,
                                    env=env, stdout=log,
                                    stderr=subprocess.STDOUT, text=True))
    for p in procs:
      try:
        codes.append(p.wait(timeout=timeout))
      except subprocess.TimeoutExpired:
        codes.append(None)
        timeout = 1
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  return list(zip(codes, outputs))
