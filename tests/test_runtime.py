"""`cnn_jax.runtime`: the process-wide XLA defaults entry points apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnn_jax import runtime
from conftest import REPO

CONCURRENCY = 'xla_cpu_enable_concurrency_optimized_scheduler'


def test_defaults_are_added_once_after_the_users_flags():
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  runtime.configure_xla(host_devices=2, environ=env)
  runtime.configure_xla(host_devices=2, environ=env)
  flags = env['XLA_FLAGS'].split()
  assert flags[0] == '--xla_dump_to=/tmp/x'
  assert flags.count('--xla_cpu_multi_thread_eigen=false') == 1
  assert flags.count('--xla_force_host_platform_device_count=2') == 1
  if runtime.jaxlib_at_least(0, 10):
    assert flags.count(f'--{CONCURRENCY}=false') == 1


def test_a_flag_the_user_set_is_kept():
  env = {'XLA_FLAGS': f'--xla_cpu_multi_thread_eigen=true --{CONCURRENCY}=true '
                      '--xla_force_host_platform_device_count=3'}
  runtime.configure_xla(host_devices=2, environ=env)
  assert env['XLA_FLAGS'].split() == [
      '--xla_cpu_multi_thread_eigen=true', f'--{CONCURRENCY}=true',
      '--xla_force_host_platform_device_count=3']


def test_opt_out_keeps_only_the_device_count():
  env = {'CNN_JAX_XLA_DEFAULTS': '0'}
  runtime.configure_xla(host_devices=1, environ=env)
  assert env['XLA_FLAGS'] == ''
  runtime.configure_xla(host_devices=4, environ=env)
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'


@pytest.mark.parametrize('batch,cores,expected', [
    (128, 2, 2), (127, 2, 1), (96, 8, 8), (100, 8, 5), (None, 4, 4)])
def test_default_host_devices_divide_the_batch(batch, cores, expected):
  assert runtime.default_host_devices(batch, cores) == expected


def test_negative_device_count_is_refused():
  with pytest.raises(ValueError, match='host_devices'):
    runtime.configure_xla(host_devices=-1, environ={})


@pytest.mark.parametrize('version, expected', [
    ('0.10.2', True), ('0.11.0', True), ('1.0', True), ('0.9.9', False),
    ('0.4.35', False)])
def test_jaxlib_version_gate(monkeypatch, version, expected):
  import importlib.metadata
  monkeypatch.setattr(importlib.metadata, 'version', lambda _: version)
  assert runtime.jaxlib_at_least(0, 10) is expected


def test_importing_the_library_changes_no_global_state():
  """No environment variable and no JAX setting changes on import.

  (Importing JAX itself sets a few variables; they are read after it.)
  """
  code = '''
import os, json, sys
import jax, flax.linen, optax, orbax.checkpoint, absl.logging
before = dict(os.environ)
config_before = dict(jax.config.values)
import cnn_jax, cnn_jax.train, cnn_jax.inference, cnn_jax.predict
import cnn_jax.export, cnn_jax.evaluate, cnn_jax.analysis.report, cnn_jax.main
changed_env = sorted(k for k in set(before) | set(os.environ)
                     if before.get(k) != os.environ.get(k))
changed_jax = sorted(k for k, v in jax.config.values.items()
                     if config_before.get(k) != v)
print(json.dumps([changed_env, changed_jax]))
'''
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL')}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, cwd=REPO, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == '[[], []]'


def test_compilation_cache_is_enabled_only_when_asked(tmp_path):
  """Off until an entry point calls it; then every program is cached."""
  code = f'''
import json, jax
from cnn_jax import runtime
before = jax.config.jax_compilation_cache_dir
bad = runtime.enable_compilation_cache({str(tmp_path / 'file' / 'xla')!r})
ok = runtime.enable_compilation_cache(runtime.compilation_cache_dir(
    {str(tmp_path / 'cache')!r}))
jax.jit(lambda x: x + 1)(1.0).block_until_ready()
print(json.dumps([before, bad, ok, jax.config.jax_compilation_cache_dir,
                  jax.config.jax_persistent_cache_min_compile_time_secs]))
'''
  (tmp_path / 'file').write_text('a file, not a folder')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  before, bad, ok, directory, min_secs = json.loads(
      out.stdout.strip().splitlines()[-1])
  assert before is None and bad is False and ok is True
  assert directory == str(tmp_path / 'cache' / 'xla') and min_secs == 0
  assert any((tmp_path / 'cache' / 'xla').iterdir())
