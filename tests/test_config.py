"""`Config`: every rule of `validate`, and the JSON a workdir keeps."""

import dataclasses
import json
import math

import pytest

from cnn_jax.config import Config, CnnJaxError, validate

NAN, INF = math.nan, math.inf

BAD_VALUES = [
    # Names from a fixed list.
    ('model', 'resnet', "unknown --model='resnet'; choose one of: "
     'simple_cnn, deep_cnn'),
    ('optimizer', 'adagrad', "unknown --optimizer='adagrad'"),
    ('lr_schedule', 'linear', "unknown --lr_schedule='linear'"),
    ('dtype', 'float16', "unknown --dtype='float16'"),
    ('kernels', 'fast', "unknown --kernels='fast'"),
    ('best_metric', 'test_accuracy', "unknown --best_metric='test_accuracy'"),
    # Positive integers.
    ('epochs', 0, '--epochs must be a positive integer, got 0'),
    ('batch_size', -32, '--batch_size must be a positive integer, got -32'),
    ('eval_batch_size', 0, '--eval_batch_size must be a positive integer'),
    ('log_every_steps', 0, '--log_every_steps must be a positive integer'),
    ('num_models', 0, '--num_models must be a positive integer, got 0'),
    # Test-time augmentation: up to 8 one-pixel shifts.
    ('tta', -1, '--tta must be between 0 and 8'),
    ('tta', 9, '--tta must be between 0 and 8'),
    # Model options: the module's fields, typed and checked.
    ('model_options', {'features': '32,,64'}, 'must be whole numbers'),
    ('model_options', {'features': '32,0,64'},
     'features=32,0,64 for --model=simple_cnn must be positive'),
    ('model_options', {'dropout_rate': 0.5}, 'simple_cnn has no dropout_rate'),
    # 'ensemble' is the model of --mode=ensemble workdirs only.
    ('model', 'ensemble', "unknown --model='ensemble'"),
    # Positive finite numbers.
    ('learning_rate', 0.0, '--learning_rate must be a positive number'),
    ('learning_rate', -1e-3, '--learning_rate must be a positive number'),
    ('learning_rate', NAN, '--learning_rate must be a positive number'),
    ('learning_rate', INF, '--learning_rate must be a positive number'),
    ('width_multiplier', 0.0, '--width_multiplier must be a positive number'),
    ('width_multiplier', INF, '--width_multiplier must be a positive number'),
    # Finite numbers >= 0.
    ('val_examples', -1, '--val_examples must be >= 0, got -1'),
    ('train_examples', -1, '--train_examples must be >= 0'),
    ('test_examples', -1, '--test_examples must be >= 0'),
    ('checkpoint_every_steps', -1, '--checkpoint_every_steps must be >= 0'),
    ('warmup_epochs', -0.5, '--warmup_epochs must be >= 0'),
    ('warmup_epochs', NAN, '--warmup_epochs must be >= 0'),
    ('weight_decay', -1e-4, '--weight_decay must be >= 0'),
    ('weight_decay', INF, '--weight_decay must be >= 0'),
    ('grad_clip_norm', -1.0, '--grad_clip_norm must be >= 0'),
    ('grad_clip_norm', NAN, '--grad_clip_norm must be >= 0'),
    ('aug_max_shift', -1.0, '--aug_max_shift must be >= 0'),
    ('aug_max_shift', INF, '--aug_max_shift must be >= 0'),
    ('aug_max_rotation', -5.0, '--aug_max_rotation must be >= 0'),
    # Fractions in [0, 1).
    ('label_smoothing', 1.0, '--label_smoothing must be in [0, 1)'),
    ('label_smoothing', NAN, '--label_smoothing must be in [0, 1)'),
    ('momentum', 1.0, '--momentum must be in [0, 1)'),
    ('momentum', -0.5, '--momentum must be in [0, 1)'),
    # A zoom of 100% or more could scale an image by 0 or flip it.
    ('aug_max_scale', 1.0, '--aug_max_scale must be in [0, 1)'),
    ('aug_max_scale', -0.1, '--aug_max_scale must be in [0, 1)'),
    ('aug_levels', 1.0, '--aug_levels must be in [0, 1)'),
    # A dataset name.
    ('dataset', '  ', '--dataset must name a TFDS dataset'),
]


@pytest.mark.parametrize('field,value,message', BAD_VALUES,
                         ids=[f'{f}={v}' for f, v, _ in BAD_VALUES])
def test_each_bad_value_is_refused_naming_its_flag(field, value, message):
  with pytest.raises(CnnJaxError) as info:
    validate(Config(**{field: value}))
  assert message in str(info.value)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('schedule', ['cosine', 'onecycle'])
def test_warmup_must_end_before_training_for_decaying_schedules(schedule):
  with pytest.raises(CnnJaxError, match=r'--warmup_epochs \(3.0\) must be '
                     r'less than --epochs \(3\)'):
    validate(Config(lr_schedule=schedule, epochs=3, warmup_epochs=3.0))
  validate(Config(lr_schedule=schedule, epochs=3, warmup_epochs=2.5))


@pytest.mark.parametrize('schedule', ['constant', 'step'])
def test_warmup_as_long_as_training_is_allowed_for_flat_schedules(schedule):
  validate(Config(lr_schedule=schedule, epochs=3, warmup_epochs=3.0))


def test_good_configs_pass_unchanged():
  config = Config()
  assert validate(config) is config
  edge = Config(model='deep_cnn', optimizer='nesterov', lr_schedule='step',
                dtype='bfloat16', kernels='flax', best_metric='val_loss',
                val_examples=0, model_options={'dropout_rate': 0.0},
                momentum=0.0,
                aug_max_scale=0.99, weight_decay=0.0, grad_clip_norm=0.0,
                width_multiplier=0.25, learning_rate=1e-9)
  assert validate(edge) is edge


def test_json_round_trip_keeps_every_field():
  config = Config(model='deep_cnn', learning_rate=3e-3, augment=True,
                  warmup_epochs=1.5, dataset='kmnist', seed=7)
  saved = json.loads(config.to_json())
  assert set(saved) == {f.name for f in dataclasses.fields(Config)}
  assert Config.from_dict(saved) == config


def test_from_dict_ignores_unknown_keys_and_defaults_missing_ones():
  config = Config.from_dict({'epochs': 3, 'conv_impl': 'im2col',
                             'no_such_flag': 1})
  assert config == Config(epochs=3)


def test_data_dir_prefers_the_flag_then_the_environment(monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', '/from/env')
  assert Config(tfds_data_dir='/from/flag').data_dir == '/from/flag'
  assert Config().data_dir == '/from/env'
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert Config().data_dir is None


def test_config_is_immutable_and_replace_makes_a_new_one():
  config = Config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.epochs = 3  # type: ignore[misc]
  assert config.replace(epochs=3).epochs == 3 and config.epochs == 10


def test_an_ensemble_config_names_its_members():
  config = Config(model='ensemble', members='members/0,members/1')
  assert validate(config) is config


def test_warnings_name_settings_that_are_valid_but_unwise_together():
  from cnn_jax.config import warnings
  assert warnings(Config()) == []
  said = warnings(Config(best_metric='val_loss', label_smoothing=0.1,
                         epochs=18))
  assert len(said) == 1 and 'label_smoothing=0.1' in said[0]
  assert warnings(Config(best_metric='val_loss', label_smoothing=0.1,
                         epochs=1)) == []  # One epoch: nothing to choose.
