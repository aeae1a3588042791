"""The report's computed sentences, on hand-made numbers and class names that
are not digits: every number they state comes from the data given."""

from __future__ import annotations

import numpy as np

from cnn_jax.analysis import captions, metrics

FASHION = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
           'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


def _text(lines: list[str]) -> str:
  assert lines and all(isinstance(s, str) and s for s in lines)
  text = ' '.join(lines)
  assert 'digit' not in text.lower()
  return text


def _history(*rows):
  keys = ('epoch', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
          'learning_rate')
  return [dict(zip(keys, r)) for r in rows]


def test_data_names_classes_and_counts_pixels():
  text = _text(captions.data(FASHION, (28, 28, 1), 10_000))
  assert '10,000 grayscale images of 28×28 pixels in 10 classes' in text
  assert '“T-shirt/top”' in text and '“Ankle boot”' in text
  assert '28×28×1 = 784 numbers' in text
  text = _text(captions.data(['cat', 'dog'], (32, 32, 3), 2))
  assert '2 3-channel images of 32×32 pixels in 2 classes' in text
  assert '32×32×3 = 3,072 numbers' in text
  assert '“cat” and “dog”' in text


def test_training_explains_validation_above_training_and_overfitting():
  rows = _history((1, 0.50, 0.80, 0.30, 0.90, 1e-3),
                  (2, 0.20, 0.93, 0.25, 0.92, 3e-3),
                  (3, 0.10, 0.97, 0.28, 0.915, 1e-5))
  text = _text(captions.training(rows, 2, 'val_accuracy', True, [0.25], 0.1,
                                 'onecycle'))
  assert 'Training ran 3 epochs' in text
  assert 'from 90.00% after epoch 1 to 91.50% after epoch 3' in text
  assert ('epoch 2 of 3, the one with the highest validation accuracy '
          '(92.00%)') in text
  assert 'The 1 later epoch did not beat it' in text
  assert ('rose from 0.2500 to 0.2800 while training loss fell from 0.2000 '
          'to 0.1000') in text
  assert ('In 1 of 3 epochs validation accuracy was above training accuracy '
          '(epoch 1: 90.00% vs 80.00%)') in text
  assert '--augment' in text and 'Dropout (rate 0.25)' in text
  assert 'Label smoothing (0.1)' in text
  assert 'went from 0.001 up to 0.003 at epoch 2 and down to 1e-05' in text


def test_training_without_regularizers_and_best_last():
  rows = _history((1, 0.3, 0.95, 0.4, 0.90, 0.01),
                  (2, 0.1, 0.99, 0.35, 0.93, 0.01))
  text = _text(captions.training(rows, 2, 'val_loss', False, [], 0.0,
                                 'constant'))
  assert 'the lowest validation loss (0.3500)' in text
  assert 'later epoch' not in text
  assert ('stayed at or above validation accuracy (last epoch: 99.00% vs '
          '93.00%, a gap of 6.00 points)') in text
  assert 'Dropout' not in text and 'augment' not in text
  assert 'The learning rate stayed at 0.01.' in text
  assert captions.training([], 1, 'val_loss', False, [], 0.0, 'constant')


def test_per_class_marks_exactly_the_classes_below_overall():
  recall = np.array([0.9, 1.0, 0.8, 1.0])
  text = _text(captions.per_class(FASHION[:4], recall, 0.925))
  assert ('from 80.00% for class “Pullover” to 100.00% for class '
          '“Trouser”') in text
  assert '2 classes of 4 fall below the overall accuracy' in text
  assert '“T-shirt/top” and “Pullover”' in text
  assert '“Dress”' not in text
  text = _text(captions.per_class(FASHION[:2], np.array([1.0, 1.0]), 1.0))
  assert 'No class is below the overall accuracy.' in text


def test_mistakes_name_the_pairs_with_counts():
  labels = np.array([6] * 10 + [0] * 10 + [3] * 5)
  preds = np.array([6] * 6 + [0] * 4 + [0] * 9 + [6] + [3] * 4 + [4])
  cm = metrics.confusion_matrix(labels, preds, 10)
  pairs = metrics.confused_pairs(cm, 5)
  assert pairs == [(6, 0, 4), (0, 6, 1), (3, 4, 1)]
  correct = labels == preds
  conf = np.where(correct, 0.99, 0.95)
  conf[np.flatnonzero(~correct)[0]] = 0.6
  text = _text(captions.mistakes(cm, FASHION, pairs, conf, correct))
  assert 'got 6 of 25 test images wrong' in text
  assert ('class “Shirt” predicted as “T-shirt/top”, 4 times (40.00% of the '
          '10 test images of class “Shirt”)') in text
  assert '“T-shirt/top” as “Shirt”, happened 1 time' in text
  assert 'The 3 most frequent pairs' in text
  assert '6 of the 6 mistakes (100%)' in text
  assert '5 of the 6 mistakes were made with more than 90% confidence' in text
  tied = metrics.confusion_matrix(np.array([0, 1]), np.array([1, 0]), 2)
  text = _text(captions.mistakes(tied, ['Bag', 'Coat'],
                                 metrics.confused_pairs(tied, 5),
                                 np.array([0.5, 0.5]), np.array([False] * 2)))
  assert '2 pairs of classes share the top count, 1 mistake each' in text
  perfect = metrics.confusion_matrix(np.arange(3), np.arange(3), 3)
  assert 'No mistakes on the 3 test images' in _text(
      captions.mistakes(perfect, FASHION[:3], [], np.ones(3), np.ones(3, bool)))


def test_calibration_compare_and_number_formats():
  conf = np.array([0.9, 0.8, 0.7, 0.6])
  correct = np.array([True, True, True, False])
  cal = metrics.calibration(conf, correct, num_bins=5)
  text = _text(captions.calibration(cal, conf, correct))
  assert ('75.00% probability and is right 75.00% of the time: as '
          'confident as right') in text
  assert f'ECE) is {100 * cal.ece:.2f}%' in text and 'over 5 bins' in text
  text = _text(captions.compare(
      'a', 'b', 0.9, 0.95, 1000, 2500, 200, 3, 13, 7, FASHION[:3],
      np.array([0.9, 0.8, 1.0]), np.array([0.9, 0.95, 1.0])))
  assert 'the same 200 test images' in text
  assert 'b has 2.5× the parameters of a.' in text
  assert 'a gets 3 images right that b gets wrong; b gets 13 right' in text
  assert 'both miss 7' in text
  assert 'class “Trouser”: 80.00% for a, 95.00% for b' in text
  assert captions.prob(0.999995) == 'over 99.99%'
  assert captions.prob(3e-6) == 'under 0.01%'
  assert captions.prob(0.5) == '50.00%'
  assert captions.name_list(list('abcdefghijklmn'), limit=3) == (
      '“a”, “b”, “c” and 11 more')


def test_plural():
  assert captions.plural(1, 'epoch') == '1 epoch'
  assert captions.plural(2, 'epoch') == '2 epochs'
  assert captions.plural(1000, 'class', 'classes') == '1,000 classes'
