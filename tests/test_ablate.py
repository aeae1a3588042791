"""`experiments.ablate`: studies, flags, the sweep runner and its report."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, real_tfds_dir
from cnn_jax import config_flags, registry
from experiments import ablate, ablation_report, ablation_studies


def _main(capsys, *argv: str) -> tuple[int, str, str]:
  code = ablate.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _csv(path) -> list[dict[str, str]]:
  with open(path) as f:
    return list(csv.DictReader(f))


# Studies and flags ---------------------------------------------------------------
def test_studies_vary_what_they_promise():
  studies = ablation_studies.studies()
  assert set(studies) >= {'filters', 'batchnorm_dropout', 'augmentation',
                          'optimizer'}
  assert [v.overrides['width_multiplier'] for v in
          studies['filters'].variants] == [0.5, 1.0, 2.0]
  bd = studies['batchnorm_dropout']
  assert bd.base['model'] == 'deep_cnn'
  assert {(v.columns()['batch_norm'], v.columns()['dropout_rate'])
          for v in bd.variants} == {(b, d) for b in (True, False)
                                    for d in (0.0, 0.25, 0.5)}
  assert {v.overrides['augment'] for v in
          studies['augmentation'].variants} == {True, False}
  opt = studies['optimizer']
  assert {(v.overrides['optimizer'], v.overrides['lr_schedule'])
          for v in opt.variants} == {
              (o, s) for o in ('sgd', 'nesterov', 'adam', 'adamw')
              for s in ('constant', 'cosine', 'onecycle')}
  why = studies['why_conv']
  assert {(v.overrides['model'], v.overrides['permute_pixels'])
          for v in why.variants} == {(m, p) for m in ('simple_cnn', 'mlp')
                                     for p in (False, True)}
  size = studies['data_size']
  assert {(v.overrides['model'], v.knob) for v in size.variants} == {
      (m, n) for m in ('simple_cnn', 'mlp')
      for n in (1_000, 5_000, 15_000, 55_000)}
  for study in studies.values():
    names = [v.name for v in study.variants]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize('quick', [False, True])
def test_every_run_of_every_study_is_a_valid_config(quick, tmp_path):
  recipe = config_flags.config_from_flagfile(
      str(REPO / 'experiments' / 'configs' / 'ablation.flags'))
  for study in ablation_studies.studies().values():
    runs = ablate.plan(study, study.variants, 3, str(tmp_path), quick,
                       ([], []), '/data')
    assert len(runs) == len(study.variants)  # Seeds train together.
    for run in runs:
      config = run.config()
      assert config.tfds_data_dir == '/data'
      assert (config.seed, config.num_models) == (0, 3)
      assert run.seeds == (0, 1, 2)
      for k, v in run.variant.overrides.items():
        if k == 'model_options':
          for name, value in v.items():
            assert config.model_options.get(
                name, registry.options(config.model)[name].default) == value
        else:
          assert getattr(config, k) == v
      if not study.same_steps or quick:
        assert config.epochs == (1 if quick else recipe.epochs)
    separate = ablate.plan(study, study.variants[:1], 2, str(tmp_path),
                           quick, ([], []), '', separate_seeds=True)
    assert [(r.seeds, r.config().num_models, r.name) for r in separate] == [
        ((0,), 1, f'{study.variants[0].name}_seed0'),
        ((1,), 1, f'{study.variants[0].name}_seed1')]


def test_flag_precedence(tmp_path):
  """recipe < study base < flagfile < --quick < command line < variant <
  seeds, all read by absl as cnn_jax.main reads them."""
  flagfile = tmp_path / 'base.flags'
  flagfile.write_text('# a recipe\n--epochs=12\n--width_multiplier=4\n'
                      '--noaugment\n--learning_rate=0.01\n')
  study = ablation_studies.studies()['filters']
  base = ablate.parse_base_options(
      [f'--flagfile={flagfile}', '--learning_rate=0.02',
       '--model_options=dense_features=32'],
      study)
  variant = study.variant('width2')
  recipe = str(REPO / 'experiments' / 'configs' / 'ablation.flags')
  quick = config_flags.config_from_argv(
      ablate.run_argv(study, variant, [3, 4], True, base, recipe, ''))
  assert quick.epochs == 1  # --quick shrinks the flagfile's recipe...
  assert quick.learning_rate == 0.02  # ...command-line options win...
  assert quick.width_multiplier == 2.0  # ...and the variant wins last.
  assert quick.augment is False
  assert quick.model_options == {'dense_features': 32}
  assert (quick.seed, quick.num_models, quick.tfds_data_dir) == (3, 2, '')
  full = config_flags.config_from_argv(
      ablate.run_argv(study, variant, [0], False, base, recipe, '/d'))
  assert full.epochs == 12 and full.tfds_data_dir == '/d'
  assert full.model == 'simple_cnn'  # From the recipe.
  assert ablate.to_argv({'augment': False, 'epochs': 2}) == [
      '--augment=false', '--epochs=2']


def test_list_and_help(capsys):
  code, out, _ = _main(capsys, '--study=list')
  assert code == 0
  for name, study in ablation_studies.studies().items():
    assert name in out and study.description in out
  with pytest.raises(SystemExit) as e:
    ablate.main(['--help'])
  assert e.value.code == 0
  assert 'batchnorm_dropout' in capsys.readouterr().out


@pytest.mark.parametrize('args, words', [
    (['--study=nope'], 'unknown --study'),
    (['--study=filters', '--seeds=0'], '--seeds'),
    (['--study=filters', '--seeds=two'], '--seeds'),
    (['--study=filters', '--jobs=-1'], '--jobs'),
    (['--study=filters', '--width_multiplier=3'], 'varies'),
    (['--study=filters', '--seed=1'], '--seeds'),
    (['--study=filters', '--workdir=/x'], 'set by ablate.py'),
    (['--study=filters', '--num_models=2'], 'set by ablate.py'),
    (['--study=filters', '--bogus=1'], "Unknown command line flag 'bogus'"),
    (['--study=filters', '--epochs=many'], 'int'),
    (['--study=filters', '--augment=maybe'], 'augment'),
    (['--study=filters', '--optimizer=sgdd'], 'unknown --optimizer'),
    (['--study=filters', '--variants=width3'], 'width0.5'),
    (['--study=filters', '--flagfile=/no/such/file'], '/no/such/file'),
    (['--study=filters', '--recipe=/no/such/file'], 'not a readable file'),
    (['--study=filters', 'stray'], 'unexpected argument'),
])
def test_bad_arguments_are_one_error_line(capsys, tmp_path, args, words):
  code, out, err = _main(capsys, *args, f'--out={tmp_path}')
  assert code == 2
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert words in err
  assert not (tmp_path / 'filters').exists()


def test_cli_usage_error_has_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.ablate',
                         '--study=filters'], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert proc.returncode == 2
  assert proc.stderr == 'error: --out is required\n'


def test_dry_run_lists_pending_commands(capsys, tmp_path):
  code, out, _ = _main(capsys, '--study=batchnorm_dropout', '--quick',
                       '--dry_run', f'--out={tmp_path}', '--seeds=1',
                       '--variants=nobn_drop0.5', '--kernels=flax')
  assert code == 0
  cmd = [line for line in out.splitlines() if 'cnn_jax.main' in line]
  assert len(cmd) == 1
  for flag in ('--model=deep_cnn',
               '--model_options=batch_norm=false,dropout_rate=0.5',
               '--kernels=flax',
               '/experiments/configs/quick.flags',
               '/experiments/configs/ablation.flags', '--seed=0',
               '--num_models=1',
               f'--workdir={tmp_path}/batchnorm_dropout/runs/nobn_drop0.5'):
    assert flag in cmd[0]
  assert not (tmp_path / 'batchnorm_dropout').exists()


# Aggregation ------------------------------------------------------------------------
def _fake_run(workdir, accuracy, params=1000, seconds=10.0):
  """A finished one-network run, its results.json in the layout written
  before members were shared by every kind of run (still read)."""
  workdir.mkdir(parents=True)
  (workdir / 'results.json').write_text(json.dumps({
      'model': 'simple_cnn', 'dataset': 'mnist',
      'test_accuracy': accuracy, 'test_loss': 1 - accuracy,
      'best_val_accuracy': accuracy + 0.01, 'num_params': params,
      'train_seconds': seconds, 'train_img_per_s': 1000 / seconds,
      'epochs': 1}))


def test_summary_markdown_csv_and_plots(tmp_path):
  study = ablation_studies.studies()['filters']
  accs = {'width0.5': [0.90, 0.92, 0.97], 'width1': [0.95, 0.96, 0.94]}
  rows = []
  for name, values in accs.items():
    for seed, acc in enumerate(values):
      workdir = tmp_path / 'runs' / f'{name}_seed{seed}'
      _fake_run(workdir, acc, params=100 * (seed + 1), seconds=10 + seed)
      rows += ablation_report.run_rows(study.variant(name), [seed],
                                       str(workdir))
  rows += ablation_report.run_rows(study.variant('width2'), [0],
                                   str(tmp_path / 'x'), 'exit 1: error: boom')
  rows += ablation_report.run_rows(study.variant('width2'), [1],
                                   str(tmp_path / 'never_ran'))

  summaries = {s.variant.name: s for s in ablation_report.summarize(study, rows)}
  for name, values in accs.items():
    s = summaries[name]
    assert s.n == 3 and s.accs == tuple(values)
    assert s.acc_mean == pytest.approx(np.mean(values))
    assert s.acc_std == pytest.approx(np.std(values, ddof=1))
    assert s.num_params == pytest.approx(200) and s.train_seconds == 11
  assert summaries['width2'].n == 0 and summaries['width2'].n_failed == 1
  assert math.isnan(summaries['width2'].acc_mean)

  paths = ablation_report.write_report(str(tmp_path), study, rows, 'quick')
  md = (tmp_path / 'results.md').read_text()
  mean, std = 100 * np.mean(accs['width1']), 100 * np.std(accs['width1'], ddof=1)
  assert f'**{mean:.2f} ± {std:.2f}**' in md  # The best mean is bold.
  assert f'| width0.5 | 0.5 | {100 * np.mean(accs["width0.5"]):.2f} ± ' in md
  assert '| width2 | 2 | no result | 0 (1 failed) |' in md
  assert 'error: boom' in md and 'missing' in md
  table = _csv(tmp_path / 'results.csv')
  assert len(table) == 8
  assert [r['status'] for r in table].count('ok') == 6
  failed = [r for r in table if r['status'] == 'failed']
  assert failed[0]['error'] == 'exit 1: error: boom'
  assert failed[0]['width_multiplier'] == '2.0'
  assert float(table[0]['test_accuracy']) == 0.90
  for name in ('accuracy.png', 'cost.png'):
    assert str(tmp_path / name) in paths
    assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_one_seed_has_no_std(tmp_path):
  study = ablation_studies.studies()['augmentation']
  _fake_run(tmp_path / 'r', 0.5)
  rows = ablation_report.run_rows(study.variant('deep_aug'), [0],
                                 str(tmp_path / 'r'))
  table = ablation_report.markdown_table(
      study, ablation_report.summarize(study, rows))
  assert '| deep_aug | deep_cnn | on | **50.00 ± n/a** | 1 |' in table


# The runner, with a stand-in for cnn_jax.main ---------------------------------
FAKE_MAIN = textwrap.dedent('''\
    import json, os, sys
    from cnn_jax import config_flags
    workdir = sys.argv[1].split('=', 1)[1]
    config = config_flags.config_from_argv(sys.argv[2:])
    with open({calls!r}, 'a') as f:
      f.write(os.path.basename(workdir) + '\\n')
    print('some library noise')
    if config.width_multiplier == 2.0:
      print('error: boom at step 3', file=sys.stderr)
      sys.exit(1)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json())
    seeds = range(config.seed, config.seed + config.num_models)
    accs = [0.5 + 0.1 * config.width_multiplier + 0.01 * s for s in seeds]
    results = {{
        'layout': 2, 'model': config.model, 'dataset': 'mnist',
        'test_examples': 10,
        'members': [{{'name': f'seed{{s}}', 'model': config.model, 'seed': s,
                      'num_params': 7, 'best_epoch': 1,
                      'best_val_accuracy': a, 'best_val_loss': 1.0,
                      'test_accuracy': a, 'test_loss': 1.0}}
                    for s, a in zip(seeds, accs)],
        'training': {{'epochs': 1, 'steps': 1, 'best_metric': 'val_loss',
                      'train_seconds': 2.0 * len(accs),
                      'train_img_per_s': 50.0, 'num_devices': 1,
                      'backend': 'cpu', 'kernels': 'auto'}}}}
    if len(accs) > 1:  # The averaged members.
      results['ensemble'] = {{'test_accuracy': max(accs) + 0.005,
                             'test_loss': 1.0, 'vote_accuracy': max(accs)}}
    json.dump(results, open(os.path.join(workdir, 'results.json'), 'w'))
''')


@pytest.fixture
def fake_main(tmp_path, monkeypatch):
  """Runs a tiny script instead of training; returns the file of its calls."""
  calls = tmp_path / 'calls.txt'
  script = tmp_path / 'fake_main.py'
  script.write_text(FAKE_MAIN.format(calls=str(calls)))
  monkeypatch.setattr(ablate.Run, 'command', lambda self: [
      sys.executable, str(script), f'--workdir={self.workdir}',
      *self.argv])
  return calls


def test_sweep_runs_in_parallel_reports_failures_and_resumes(
    capsys, tmp_path, fake_main):
  out_dir = tmp_path / 'out'
  args = ['--study=filters', '--quick', '--seeds=2', '--jobs=2',
          '--separate_seeds', f'--out={out_dir}']
  code, out, _ = _main(capsys, *args)
  assert code == 1  # width2 fails, the sweep goes on.
  assert sorted(fake_main.read_text().split()) == sorted(
      f'width{w}_seed{s}' for w in ('0.5', '1', '2') for s in (0, 1))
  study_dir = out_dir / 'filters'
  table = _csv(study_dir / 'results.csv')
  assert len(table) == 6
  by_run = {(r['variant'], r['seed']): r for r in table}
  assert float(by_run[('width1', '1')]['test_accuracy']) == pytest.approx(0.61)
  assert by_run[('width2', '0')]['status'] == 'failed'
  assert 'error: boom at step 3' in by_run[('width2', '0')]['error']
  log = (study_dir / 'runs' / 'width2_seed0' / 'log.txt').read_text()
  assert log.startswith('$ ') and 'some library noise' in log
  assert 'FAILED width2_seed0' in out
  assert 'no result: width2 seed 1' in out
  assert (study_dir / 'accuracy.png').exists()

  # Re-running skips the 4 finished runs and retries only the failed ones.
  fake_main.write_text('')
  code, out, _ = _main(capsys, *args)
  assert code == 1
  assert sorted(fake_main.read_text().split()) == ['width2_seed0',
                                                   'width2_seed1']
  assert '4 already finished, 2 to run' in out
  assert len(_csv(study_dir / 'results.csv')) == 6


def test_seeds_of_a_variant_train_as_one_many_member_run(
    capsys, tmp_path, fake_main):
  out_dir = tmp_path / 'out'
  code, out, _ = _main(capsys, '--study=filters', '--quick', '--seeds=3',
                       '--variants=width0.5,width1', f'--out={out_dir}')
  assert code == 0
  assert fake_main.read_text().split() == ['width0.5', 'width1']  # 2 runs.
  assert '2 variants x 3 seeds in 2 runs' in out
  table = _csv(out_dir / 'filters' / 'results.csv')
  assert [(r['variant'], r['seed']) for r in table] == [
      (v, str(s)) for v in ('width0.5', 'width1') for s in range(3)]
  row = table[4]  # width1, seed 1: its member's own figures...
  assert float(row['test_accuracy']) == pytest.approx(0.61)
  assert float(row['train_seconds']) == pytest.approx(2.0)  # 6 s / 3.
  # ...and the accuracy of the three seeds' averaged probabilities.
  assert float(row['ensemble_accuracy']) == pytest.approx(0.625)
  md = (out_dir / 'filters' / 'results.md').read_text()
  assert 'seeds averaged %' in md and '| 62.50 |' in md


def test_full_budget_runs_each_variant_at_its_own_recipe_length(tmp_path):
  recipes = {name: config_flags.config_from_flagfile(
      str(REPO / 'experiments' / 'configs' / f'{name}.flags'))
             for name in ('simple_cnn', 'deep_cnn')}
  augmentation = ablation_studies.studies()['augmentation']
  for run in ablate.plan(augmentation, augmentation.variants, 3,
                         str(tmp_path), False, ([], []), '', budget='full'):
    config = run.config()
    assert run.argv[0].endswith(f'/configs/{config.model}.flags')
    assert config.epochs == recipes[config.model].epochs  # 12 and 18.
  # Models compared under one recipe; fewer images, as many steps.
  size = ablation_studies.studies()['data_size']
  runs = {r.variant.name: r.config() for r in ablate.plan(
      size, size.variants, 3, str(tmp_path), False, ([], []), '',
      budget='full')}
  full = recipes['simple_cnn']
  assert runs['simple_all'].epochs == runs['mlp_all'].epochs == full.epochs
  assert runs['mlp_1000'].epochs == 12 * 55
  assert not runs['mlp_5000'].augment and runs['mlp_5000'].model == 'mlp'
  for config in runs.values():
    steps = (config.train_examples or 55_000) // 128 * config.epochs
    assert abs(steps - full.epochs * (55_000 // 128)) / steps < 0.2


def test_a_run_another_study_finished_with_its_config_is_linked(
    capsys, tmp_path, fake_main):
  """filters/width1 and layer_filters/base are the same configuration:
  the second study links to the first one's finished run."""
  out_dir = tmp_path / 'out'
  assert _main(capsys, '--study=filters', '--quick', '--seeds=2',
               '--variants=width1', f'--out={out_dir}')[0] == 0
  code, out, _ = _main(capsys, '--study=layer_filters', '--quick',
                       '--seeds=2', '--variants=base,conv1x2',
                       f'--out={out_dir}')
  assert code == 0
  assert fake_main.read_text().split() == ['width1', 'conv1x2']  # Not base.
  assert 'same  base: the finished run' in out
  linked = out_dir / 'layer_filters' / 'runs' / 'base'
  assert linked.is_symlink()
  assert linked.resolve() == (out_dir / 'filters' / 'runs' / 'width1').resolve()
  table = {r['variant']: r for r in _csv(out_dir / 'layer_filters' /
                                         'results.csv')}
  assert table['base']['status'] == 'ok'


def test_finished_run_with_another_config_is_not_reused(
    capsys, tmp_path, fake_main):
  args = ['--study=filters', '--quick', '--seeds=1', '--variants=width1',
          f'--out={tmp_path / "out"}']
  assert _main(capsys, *args)[0] == 0
  fake_main.write_text('')
  code, out, _ = _main(capsys, *args, '--epochs=3')
  assert code == 1
  assert fake_main.read_text() == ''
  assert 'different config' in out and "--epochs=1->3" in out
  # Resumable settings (logging, data location) may change.
  assert _main(capsys, *args, '--log_every_steps=2')[0] == 0


# Devices ------------------------------------------------------------------------
def test_one_gpu_per_job():
  env = {'PATH': '/bin'}
  assert ablate.visible_gpus({'CUDA_VISIBLE_DEVICES': '2, 3'}) == ['2', '3']
  assert ablate.visible_gpus({'CUDA_VISIBLE_DEVICES': '-1'}) == []
  two = [ablate.job_env(env, slot, ['2', '3'], 2) for slot in (0, 1)]
  assert [e['CUDA_VISIBLE_DEVICES'] for e in two] == ['2', '3']
  assert 'XLA_PYTHON_CLIENT_PREALLOCATE' not in two[0]
  shared = ablate.job_env(env, 2, ['0'], 3)
  assert shared['CUDA_VISIBLE_DEVICES'] == '0'
  assert shared['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  cpu = ablate.job_env(env, 1, [], 2)
  assert 'CUDA_VISIBLE_DEVICES' not in cpu
  assert cpu['PYTHONPATH'].split(':')[0] == str(REPO)
  assert ablate.job_env(env, 0, ['0', '1'], 1).get(
      'CUDA_VISIBLE_DEVICES') is None


def test_log_error_prefers_the_error_line(tmp_path):
  log = tmp_path / 'log.txt'
  log.write_text('I noise\nerror: --batch_size=64 is larger than 10\nbye\n')
  assert ablate.log_error(str(log), 1) == (
      'exit 1: error: --batch_size=64 is larger than 10')
  log.write_text('Traceback\n  File x\nValueError: bad\n')
  assert ablate.log_error(str(log), 1) == 'exit 1: File x | ValueError: bad'


# Real training ---------------------------------------------------------------------
@pytest.mark.slow
def test_quick_study_trains_on_real_mnist_and_resumes(tmp_path):
  data = real_tfds_dir()
  if data is None:
    pytest.skip('prepared MNIST not found')
  cmd = [sys.executable, '-m', 'experiments.ablate', '--study=filters',
         '--quick', '--seeds=1',
         '--jobs=2', '--variants=width0.5,width1', f'--out={tmp_path}',
         f'--tfds_data_dir={data}', '--download=false', '--noaugment',
         '--train_examples=256', '--val_examples=128', '--test_examples=200']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  study_dir = tmp_path / 'filters'
  table = {r['variant']: r for r in _csv(study_dir / 'results.csv')}
  assert set(table) == {'width0.5', 'width1'}
  assert all(r['status'] == 'ok' for r in table.values())
  assert int(table['width1']['num_params']) == 93_322  # SimpleCNN's size.
  assert int(table['width0.5']['num_params']) < 93_322
  for r in table.values():
    assert 0.0 <= float(r['test_accuracy']) <= 1.0
    results = json.loads((study_dir / 'runs' / r['variant'] /
                          'results.json').read_text())
    assert results['test_examples'] == 200
    assert results['training']['steps'] == 4
  assert (study_dir / 'accuracy.png').read_bytes()[:4] == b'\x89PNG'
  assert '| width1 | 1 |' in (study_dir / 'results.md').read_text()

  again = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=REPO)
  assert again.returncode == 0, again.stdout + again.stderr
  assert '2 already finished, 0 to run' in again.stdout
  assert 'start ' not in again.stdout
