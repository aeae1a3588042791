"""`experiments/colab_tpu.ipynb` and the `colab_steps` functions it calls."""

from __future__ import annotations

import ast
import base64
import csv
import inspect
import json
import os
import sys

import pytest

from conftest import REPO

from experiments import colab_steps

NOTEBOOK = REPO / 'experiments' / 'colab_tpu.ipynb'
SETTINGS = 'QUICK = '  # The settings cell starts with this assignment.


def _notebook() -> dict:
  with open(NOTEBOOK) as f:
    return json.load(f)


def _code_cells() -> list[str]:
  return [''.join(c['source']) for c in _notebook()['cells']
          if c['cell_type'] == 'code']


def test_notebook_is_valid_nbformat_4():
  nb = _notebook()
  assert nb['nbformat'] == 4 and nb['nbformat_minor'] >= 5
  assert nb['metadata']['kernelspec']['language'] == 'python'
  ids = [c['id'] for c in nb['cells']]
  assert len(set(ids)) == len(ids)
  for cell in nb['cells']:
    assert cell['cell_type'] in ('markdown', 'code')
    assert isinstance(cell['metadata'], dict)
    assert isinstance(cell['source'], list)
    assert all(isinstance(line, str) for line in cell['source'])
    assert all(line.endswith('\n') for line in cell['source'][:-1])
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None
  assert nb['cells'][0]['cell_type'] == 'markdown'


def test_notebook_passes_the_nbformat_schema():
  import nbformat  # The test extra installs it.
  nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


def test_code_cells_are_plain_python_calling_existing_steps():
  cells = _code_cells()
  assert cells[0].startswith('REPO_URL = ')
  called = set()
  for source in cells:
    tree = ast.parse(source)  # No IPython magics: runs in any kernel.
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name)
              and node.func.value.id == 'steps'):
        continue
      fn = getattr(colab_steps, node.func.attr)
      inspect.signature(fn).bind(*node.args,
                                 **{k.arg: k.value for k in node.keywords})
      called.add(node.func.attr)
  assert {'check_devices', 'train', 'ablate', 'analyze',
          'show_report'} <= called
  assert any(c.startswith(SETTINGS) for c in cells)


def test_commands_use_the_recipes():
  simple = colab_steps.recipe('simple_cnn')
  assert simple == ['--flagfile=experiments/configs/simple_cnn.flags']
  deep = colab_steps.recipe('deep_cnn')
  flagfile = deep[0].split('=', 1)[1]
  assert (REPO / flagfile).is_file()
  assert deep[1:] in ([], ['--model=deep_cnn'])
  assert '--epochs=1' in colab_steps.quick_flags()


def test_inline_images_embeds_local_files_only(tmp_path):
  (tmp_path / 'a b.png').write_bytes(b'\x89PNG fake')
  page = ('<img src="a b.png"><img src="https://x/y.png">'
          '<img src="missing.png"><img src="/abs.png">')
  out = colab_steps.inline_images(page, tmp_path)
  data = base64.b64encode(b'\x89PNG fake').decode()
  assert f'<img src="data:image/png;base64,{data}">' in out
  assert '<img src="https://x/y.png"><img src="missing.png">' in out
  assert '<img src="/abs.png">' in out


def test_progress_filter_drops_library_info():
  keep = colab_steps.progress_filter()
  assert keep('I1125 17:59:21.487999 1398 train.py:441] epoch 1/1 step 4/4\n')
  assert not keep('I1125 17:59:25.341 1398 checkpoint_manager.py:20] saved\n')
  assert keep('E1125 17:59:25.341 1398 xla_bridge.py:20] TPU failed\n')
  assert keep('error: --workdir is required\n')
  assert not keep('WARNING: All log messages before absl::InitializeLog() '
                  'is called are written to STDERR\n')
  assert keep('{\n')


def test_failed_step_raises_with_log_tail(tmp_path, capsys):
  log = tmp_path / 'sub' / 'log.txt'
  with pytest.raises(colab_steps.StepError, match='exit 3.*last words'):
    colab_steps.run_logged(
        [sys.executable, '-c', 'print("hidden"); print("last words"); '
         'raise SystemExit(3)'], log, keep=lambda line: 'last' in line)
  assert log.read_text() == 'hidden\nlast words\n'
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith('$ ') and out[1:] == ['last words']


@pytest.mark.slow
def test_notebook_runs_on_cpu_in_quick_mode(tmp_path, monkeypatch, capsys,
                                           real_mnist_dir):
  """Executes every code cell, made even smaller by overriding settings."""
  data = real_mnist_dir
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  tiny = ['--noaugment', '--train_examples=256', '--val_examples=128',
          '--test_examples=200', '--download=false']
  runs_before = (REPO / 'runs').exists()
  ns: dict = {'__name__': '__notebook__'}
  for source in _code_cells():
    exec(compile(source, 'cell', 'exec'), ns)  # pylint: disable=exec-used
    if source.startswith(SETTINGS):
      assert ns['QUICK'] == (ns['BACKEND'] == 'cpu')
      ns.update(WORK_DIR=str(tmp_path), TFDS_DATA_DIR=data, EXTRA_FLAGS=tiny,
                SEEDS=1, ABLATION_VARIANTS='width1')
  out = capsys.readouterr().out
  assert 'backend: ' in out
  assert '--flagfile=experiments/configs/simple_cnn.flags' in out
  assert ns['simple'].members[0].num_params == 93_322
  assert ns['deep'].model == 'deep_cnn'
  for results in (ns['simple'], ns['deep']):
    assert results.test_examples == 200 and results.training.steps == 4
  with open(os.path.join(ns['study_dir'], 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(r['variant'], r['status']) for r in rows] == [('width1', 'ok')]
  assert ns['index_html'] == str(tmp_path / 'simple_cnn' / 'analysis' /
                                 'index.html')
  with open(ns['index_html']) as f:
    page = colab_steps.inline_images(f.read(), os.path.dirname(ns['index_html']))
  assert 'src="data:image/png;base64,' in page
  assert (REPO / 'runs').exists() == runs_before  # Nothing written there.
