"""Mixed precision (``--dtype=bfloat16``): bf16 compute, float32 state.

The measurements run in one subprocess (`tests/helpers/precision_run.py`,
fresh JAX, see `procs.jax_env`); the checks are here.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.procs import HELPERS, jax_env, run_python


@pytest.fixture(scope='module')
def measured(tmp_path_factory) -> dict[str, np.ndarray]:
  out = tmp_path_factory.mktemp('precision') / 'precision.npz'
  proc = run_python([str(HELPERS / 'precision_run.py'), f'--out={out}'],
                    jax_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    return dict(f)


def test_bf16_logits_close_to_f32_with_the_same_params(measured):
  want, got = measured['logits_f32'], measured['logits_bf16']
  assert want.shape == got.shape == (128, 10)
  # Hidden layers run in bf16; logits come back as float32.
  assert str(measured['hidden_dtype_bf16']) == 'bfloat16'
  assert got.dtype == np.float32
  err = np.abs(got - want).max()
  assert 0 < err < 0.05 * np.abs(want).max(), err
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def test_bf16_training_keeps_float32_state(measured):
  """Params, Adam moments and BN statistics of a bf16 DeepCNN stay f32."""
  assert int(measured['steps']) == len(measured['losses'])
  assert int(measured['num_batch_stats']) > 0
  assert list(measured['state_dtypes']) == ['float32']


def test_bf16_training_lowers_the_loss(measured):
  losses = measured['losses']
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
