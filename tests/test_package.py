"""`import cnn_jax` sets XLA:CPU defaults without overriding the user's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

CONCURRENCY = 'xla_cpu_enable_concurrency_optimized_scheduler'


def _xla_flags_after_import(**env: str) -> str:
  base = {k: v for k, v in os.environ.items()
          if k not in ('XLA_FLAGS', 'CNN_JAX_XLA_DEFAULTS')}
  proc = subprocess.run(
      [sys.executable, '-c',
       'import os, cnn_jax; print(os.environ.get("XLA_FLAGS", ""))'],
      capture_output=True, text=True, timeout=120, cwd=REPO,
      env={**base, **env})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def test_defaults_are_added_once():
  flags = _xla_flags_after_import(XLA_FLAGS='--xla_dump_to=/tmp/x').split()
  assert flags[0] == '--xla_dump_to=/tmp/x'
  assert flags.count('--xla_cpu_multi_thread_eigen=false') == 1
  import cnn_jax
  if cnn_jax._jaxlib_at_least(0, 10):
    assert flags.count(f'--{CONCURRENCY}=false') == 1


def test_a_flag_the_user_set_is_kept():
  flags = _xla_flags_after_import(
      XLA_FLAGS=f'--xla_cpu_multi_thread_eigen=true --{CONCURRENCY}=true')
  assert flags.split() == ['--xla_cpu_multi_thread_eigen=true',
                           f'--{CONCURRENCY}=true']


def test_opt_out():
  assert _xla_flags_after_import(CNN_JAX_XLA_DEFAULTS='0') == ''


@pytest.mark.parametrize('version, expected', [
    ('0.10.2', True), ('0.11.0', True), ('1.0', True), ('0.9.9', False),
    ('0.4.35', False)])
def test_jaxlib_version_gate(monkeypatch, version, expected):
  import importlib.metadata
  import cnn_jax
  monkeypatch.setattr(importlib.metadata, 'version', lambda _: version)
  assert cnn_jax._jaxlib_at_least(0, 10) is expected
