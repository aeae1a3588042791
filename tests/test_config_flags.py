"""`cnn_jax.config_flags`: Config <-> absl flags, and flagfiles read by absl."""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from cnn_jax import config_flags
from cnn_jax.config import Config
from conftest import REPO

CONFIGS = REPO / 'experiments' / 'configs'


def test_flagfile_config_reads_the_recipes():
  before = set(flags.FLAGS)
  fast = config_flags.config_from_flagfile(str(CONFIGS / 'fast.flags'))
  deep = config_flags.config_from_flagfile(str(CONFIGS / 'deep_cnn.flags'))
  assert (fast.model, fast.epochs, fast.learning_rate, fast.lr_schedule,
          fast.adam_b2, fast.label_smoothing, fast.augment) == (
              'simple_cnn', 1, 1.2e-2, 'onecycle', 0.99, 0.1, False)
  assert deep.model_options == {} and deep.augment  # The defaults: BN, 0.25.
  assert deep.best_metric == 'val_loss' and deep.epochs == 18
  ensemble = config_flags.config_from_flagfile(str(CONFIGS / 'ensemble.flags'))
  assert ensemble == dataclasses.replace(deep, num_models=3)
  robust = config_flags.config_from_flagfile(str(CONFIGS / 'robust.flags'))
  assert robust == dataclasses.replace(deep, aug_levels=0.6, aug_noise=0.3,
                                       aug_thickness=0.5, aug_blur=1.0)
  # Parsed privately: the process's own flags are left alone.
  assert set(flags.FLAGS) == before


def test_every_recipe_reads():
  names = sorted(p.name for p in CONFIGS.glob('*.flags'))
  assert 'robust.flags' in names and len(names) >= 10
  for name in names:
    config = config_flags.config_from_flagfile(str(CONFIGS / name))
    assert config.epochs >= 1, name


def test_overrides_and_defaults():
  config = config_flags.config_from_flagfile(
      str(CONFIGS / 'fast.flags'), tfds_data_dir='/data', download=False)
  assert (config.tfds_data_dir, config.download) == ('/data', False)
  fv = flags.FlagValues()
  config_flags.define_config_flags(fv)
  fv(['prog'])
  assert config_flags.config_from_flags(fv) == Config()
  assert {f.name for f in dataclasses.fields(Config)} <= set(fv)


def test_model_options_merge_flagfile_then_command_line(tmp_path):
  recipe = tmp_path / 'r.flags'
  recipe.write_text('--model=deep_cnn\n'
                    '--model_options=dropout_rate=0.5,stage_features=16,32\n')
  config = config_flags.config_from_argv(
      [f'--flagfile={recipe}', '--model_options=dropout_rate=0.1',
       '--model_options=batch_norm=false'])
  assert config.model_options == {'batch_norm': False, 'dropout_rate': 0.1,
                                  'stage_features': [16, 32]}
  # Recorded in config.json as typed values, read back the same.
  assert Config.from_dict(json.loads(config.to_json())) == config
