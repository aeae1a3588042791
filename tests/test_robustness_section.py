"""The robustness section of the analysis report: shown when the workdir
has ``robustness.json``, from its numbers only."""

from __future__ import annotations

import copy
import html.parser
import json
import pathlib
import shutil

import pytest
import tensorflow_datasets as tfds

from cnn_jax import robustness
from cnn_jax import workdir as workdir_lib
from cnn_jax.analysis import page, report, robustness_section
from cnn_jax.analysis.files import ReportFiles
from conftest import MOCK_EXAMPLES
from helpers.fonts import dejavu_dir


class _Page(html.parser.HTMLParser):
  """Ids, image sources and the robustness table's rows of a page."""

  def __init__(self):
    super().__init__()
    self.ids, self.images, self.kinds = [], [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if 'id' in attrs:
      self.ids.append(attrs['id'])
    if tag == 'img':
      self.images.append(attrs['src'])
    if 'data-kind' in attrs:
      self.kinds.append(attrs['data-kind'])


@pytest.fixture(scope='module')
def robust_run(trained_simple, tmp_path_factory):
  """A copy of the tiny run with robustness.json (two kinds, TTA 1)."""
  root = tmp_path_factory.mktemp('robust_report')
  workdir = str(root / 'run')
  shutil.copytree(trained_simple[1], workdir)
  config = workdir_lib.load_config(workdir).replace(tta=1)
  options = robustness.Options(font_dirs=(dejavu_dir(root / 'fonts'),),
                               font_examples=20,
                               corruptions=('translate', 'canny_edges'))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    result = robustness.run(workdir, config, options)
  return workdir, result


def test_report_shows_the_section(robust_run):
  workdir, result = robust_run
  config = workdir_lib.load_config(workdir)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    index = report.analyze(config, workdir, examples=[0])
  doc = _Page()
  doc.feed(pathlib.Path(index).read_text())
  summary = json.loads((pathlib.Path(workdir) / 'analysis' /
                        'summary.json').read_text())
  assert summary['sections'] == list(page.section_ids(False, False, True))
  assert [s for s in doc.ids if s in summary['sections']] == summary[
      'sections']
  assert doc.kinds == ['translate', 'canny_edges']
  for name in ('robustness_bars.png', 'robustness_examples.png',
               'robustness_mistakes.png', 'robustness_fonts.png',
               'robustness_font_mistakes.png'):
    assert name in doc.images and name in summary['files']
    assert (pathlib.Path(workdir) / 'analysis' / name).stat().st_size > 0
  text = pathlib.Path(index).read_text()
  own = result['results'][0]
  assert robustness_section.captions.pct(
      own['mean_corruption_accuracy']) in text
  assert robustness_section.captions.pct(own['font_accuracy']) in text


def test_no_section_without_the_file_or_with_another_format(robust_run,
                                                           tmp_path):
  files = ReportFiles(str(tmp_path))
  assert robustness_section.write(files, str(tmp_path), list('0123456789')) \
      is None
  workdir, result = robust_run
  other = tmp_path / 'other'
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns('analysis'))
  old = dict(result, format=robustness.FORMAT + 1)
  (other / robustness.FILE).write_text(json.dumps(old))
  assert robustness_section.write(files, str(other), list('0123456789')) \
      is None
  assert not files.all()


def test_sentences_and_bars_compare_what_the_workdir_has(robust_run):
  _, result = robust_run
  shown = robustness_section.shown_rows(result)
  assert [label for label, _ in shown] == ['the network',
                                           'the network + TTA 1']
  own = result['results'][0]
  lines = robustness_section.sentences(result)
  assert robustness_section.captions.pct(own['clean_accuracy']) in lines[0]
  assert 'Under 2 kinds of corruption' in lines[0]
  worst = min((a, k, s + 1) for k, v in own['corruption_accuracy'].items()
              for s, a in enumerate(v))
  assert lines[1].startswith(f'Hardest: {worst[1]} at severity {worst[2]}')
  assert any('test-time augmentation over 1' in line for line in lines)
  # Several members: one network, their average and its TTA are compared.
  members = copy.deepcopy(result)
  rows = members['results']
  members['results'] = [
      dict(rows[0], role='member', name='a'), dict(rows[0], role='member',
                                                   name='b'),
      dict(rows[0], role='ensemble', name='ensemble'),
      dict(rows[1], role='ensemble', name='ensemble')]
  assert [label for label, _ in robustness_section.shown_rows(members)] == [
      'one network', '2 networks averaged', '2 networks averaged + TTA 1']
  assert any(line.startswith('The 2 networks alone')
             for line in robustness_section.sentences(members))
  table = robustness_section.table(members)
  assert table['levels'] == 3 and len(table['columns']) == 3
  assert table['rows'][1]['values'][0][1:] == [None, None]  # Edges: one.
