"""Tests for flowers.plots: each figure, its data helpers, the augmented samples."""

from __future__ import annotations

import os
from unittest import mock

from absl.testing import absltest
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from flowers import calibrate
from flowers import config as config_lib
from flowers import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path: str, min_side: int = 300) -> tuple[int, int]:
  """Asserts `path` is a decodable PNG of a sensible size; returns (width, height)."""
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  with Image.open(path) as im:
    im.load()
    width, height = im.size
  assert min_side <= width <= 4000 and min_side <= height <= 4000, (path, im.size)
  return width, height


def class_names(num_classes: int) -> list[str]:
  return [f"flower {i}" for i in range(num_classes)]


def confusion(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
  """A plausible confusion matrix: mostly right, some errors to neighbours."""
  rng = np.random.default_rng(seed)
  cm = np.zeros((num_classes, num_classes), np.int64)
  for i in range(num_classes):
    for _ in range(per_class):
      j = i if rng.random() < 0.8 else int((i + rng.integers(1, 3)) % num_classes)
      cm[i, j] += 1
  return cm


def calibration(seed: int = 0) -> dict:
  """report.json's "calibration" for over-confident scores mended by T = 2."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, 200)
  logits = rng.normal(0.0, 1.0, (200, 5))
  logits[np.arange(200), labels] += 1.5
  before = calibrate.scale(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 0.4)
  after = calibrate.scale(before, 2.0)
  return {"applied": True, "reason": "it lowers val NLL", "temperature": 2.0,
          "val_nll_before": 1.5, "val_nll_after": 1.2, "val_ece_before": 0.21,
          "val_ece_after": 0.04,
          "test_nll_before": calibrate.nll(before, labels),
          "test_nll_after": calibrate.nll(after, labels),
          "test_ece_before": calibrate.expected_calibration_error(before, labels),
          "test_ece_after": calibrate.expected_calibration_error(after, labels),
          "test_reliability_before": calibrate.reliability(before, labels),
          "test_reliability_after": calibrate.reliability(after, labels)}


def halving_trials() -> list[dict]:
  """trials.csv rows of a successive halving search (rungs at stage 2 epochs 2, 4, 12), as
  `plots.read_trials` gives them: the best score is a trial stopped at epoch 2."""
  rows = [("0", 0.1, 0.91, 2), ("1", 0.2, 0.80, 2), ("2", 0.3, 0.85, 4), ("3", 0.4, 0.88, 12),
          ("4", 0.25, 0.84, 4), ("5", 0.15, "", "")]  # Trial 5 failed: no score.
  return [{"trial_id": i, "dropout": d, "unfreeze_ratio": 0.3,
           "fine_tune_learning_rate": 1e-3 * (1 + k), "val_accuracy": acc, "seconds": 60.0,
           "status": "COMPLETED" if acc else "FAILED", "tuner_id": "tuner0", "median_stop": "",
           "fine_tune_epochs": float(e) if e else ""}
          for k, (i, d, acc, e) in enumerate(rows)]


def drawn(draw, folder: str) -> Figure:
  """The figure `draw(path)` saves, as a PNG in `folder` that `check_png` accepts."""
  figures = []
  save = plots.save_figure

  def keep(fig, path):
    figures.append(fig)
    return save(fig, path)

  with mock.patch.object(plots, "save_figure", keep):
    check_png(draw(os.path.join(folder, "tuning.png")))
  return figures[0]


class PlotsTest(absltest.TestCase):

  def test_tuning_under_halving_marks_each_trial_by_the_stage_2_epoch_it_reached(self):
    trials = halving_trials()
    fig = drawn(lambda path: plots.plot_tuning(trials, path, rungs=[2, 4, 12]),
                self.create_tempdir().full_path)
    self.assertEqual([t.get_text() for t in fig.legends[0].get_texts()], [
        "stopped at stage 2 epoch 2 (2 trials)", "stopped at stage 2 epoch 4 (2 trials)",
        "trained to stage 2 epoch 12 (1 trial)", "the search's pick"])
    self.assertIn("each at the stage 2 epoch it reached", fig.get_suptitle())
    self.assertIn("scores at different epochs", fig.get_suptitle())
    for ax in fig.axes:  # One scatter per epoch, holding exactly that epoch's trials.
      *groups, star = ax.collections
      self.assertEqual([sorted(g.get_offsets()[:, 1].tolist()) for g in groups],
                       [[0.80, 0.91], [0.84, 0.85], [0.88]])
      self.assertEqual(len({g.get_paths()[0].vertices.tobytes() for g in groups}), 3)  # Markers.
      # The pick is the best at the furthest epoch (as trials.csv ranks), not the 0.91 at 2.
      self.assertEqual(star.get_offsets()[:, 1].tolist(), [0.88])
    self.assertIn("the best at epoch 12, 0.8800", fig.get_suptitle())

  def test_tuning_of_another_search_is_one_scatter_as_before(self):
    trials = [t for t in halving_trials() if t["val_accuracy"] != ""]
    for t in trials:
      t["fine_tune_epochs"] = 12.0  # E.g. a random search: every trial to the end.
    fig = drawn(lambda path: plots.plot_tuning(trials, path), self.create_tempdir().full_path)
    self.assertEqual(fig.legends, [])
    self.assertEqual(fig.get_suptitle(),
                     "Tuning: val accuracy of 5 trials (red star: the best, 0.9100)")
    for ax in fig.axes:
      points, star = ax.collections
      self.assertLen(points.get_offsets(), 5)
      self.assertEqual(star.get_offsets()[:, 1].tolist(), [0.91])

  def test_reliability_diagram_from_the_report_numbers(self):
    path = os.path.join(self.create_tempdir(), "reliability.png")
    self.assertEqual(plots.plot_reliability(calibration(), path), path)
    check_png(path)
    with open(path, "rb") as f:
      first = f.read()
    plots.plot_reliability(calibration(), path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(), first)  # The same numbers, the same bytes.
    # Without reliability tables (no test images) nothing is drawn.
    empty = os.path.join(self.create_tempdir(), "none.png")
    self.assertIsNone(plots.plot_reliability({"applied": False}, empty))
    self.assertFalse(os.path.exists(empty))

  def test_reliability_points_skip_empty_bins(self):
    table = {"bins": 3, "count": [2, 0, 1], "confidence": [0.2, None, 0.9],
             "accuracy": [0.5, None, 1.0]}
    confidence, accuracy = plots._reliability_points(table)
    np.testing.assert_array_equal(confidence, [0.2, 0.9])
    np.testing.assert_array_equal(accuracy, [0.5, 1.0])

  def test_confusion_plot_with_102_classes(self):
    names = class_names(102)
    cm = confusion(102, 10, seed=1)
    path = plots.plot_confusion(cm, names, os.path.join(self.create_tempdir(), "cm.png"))
    width, height = check_png(path, min_side=600)
    self.assertGreater(width, height)

  def test_most_confused_on_hand_made_matrix(self):
    cm = [[5, 3, 0, 1],
          [0, 7, 4, 0],
          [2, 0, 6, 3],
          [0, 9, 0, 1]]
    names = ["a", "b", "c", "d"]
    pairs = plots.most_confused(cm, names, k=4)
    self.assertEqual([(p.true_name, p.predicted_name, p.count) for p in pairs], [
        ("d", "b", 9), ("b", "c", 4), ("a", "b", 3), ("c", "d", 3)])
    self.assertEqual((pairs[0].true_index, pairs[0].predicted_index), (3, 1))
    # Zero cells and the diagonal never appear, so fewer than k may come back.
    self.assertLen(plots.most_confused(cm, names, k=100), 6)
    self.assertEqual(plots.most_confused(np.eye(3, dtype=int) * 4, ["x", "y", "z"]), [])

  def test_worst_classes_and_concat_history(self):
    self.assertEqual(plots.worst_classes({"a": 0.9, "b": 0.5, "c": 0.5, "d": 1.0}, k=3), [
        ("b", 0.5), ("c", 0.5), ("a", 0.9)])
    metrics, n1 = plots.concat_history(
        {"frozen": {"loss": [3.0, 2.0], "val_loss": [3.5, 2.5]}, "fine_tune": {"loss": [1.0]}})
    self.assertEqual(n1, 2)
    np.testing.assert_allclose(metrics["loss"], [3.0, 2.0, 1.0])
    self.assertTrue(np.isnan(metrics["val_loss"][2]))

  def test_plot_history_with_empty_fine_tune(self):
    tmp = self.create_tempdir().full_path
    path = plots.plot_history({"frozen": {"accuracy": [0.2, 0.4], "loss": [2.0, 1.5]},
                                "fine_tune": {}}, os.path.join(tmp, "h.png"))
    check_png(path)
    self.assertIsNone(plots.plot_history({"frozen": {}, "fine_tune": {}},
                                         os.path.join(tmp, "none.png")))

  def test_write_augmented_samples_on_mock_data(self):
    import fake_data  # pylint: disable=g-import-not-at-top
    from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

    workdir = os.path.join(self.create_tempdir(), "run")
    config = config_lib.RunConfig(
        data=config_lib.DataConfig(image_size=32, split_seed=3),
        train=config_lib.TrainConfig(seed=3, augmentation=config_lib.Augmentation(rotation=30)))
    with fake_data.mock_flowers(fake_data.uniform_counts(4, 4, 2, 2), size=40):
      source = data_lib.load_tfds()
      # Writes splits.csv, as training does.
      data_lib.load_splits(config.data, source=source, workdir=workdir)
      path = plots.write_augmented_samples(workdir, source, config, count=8, columns=4)
      self.assertEqual(path, os.path.join(workdir, "plots", "augmented_samples.png"))
      check_png(path)
      first = open(path, "rb").read()
      plots.write_augmented_samples(workdir, source, config, count=8, columns=4)
      self.assertEqual(open(path, "rb").read(), first)  # Seeded: the same picture again.
    self.assertIsNone(plots.write_augmented_samples(workdir, source, config_lib.RunConfig(
        train=config_lib.TrainConfig(augment=False))))

  def test_sample_keys_spreads_over_classes(self):
    keys = [f"k{i:02d}" for i in range(12)]
    label_of = {k: i % 4 for i, k in enumerate(keys)}
    chosen = plots.sample_keys(keys, label_of, 6, seed=0)
    self.assertLen(chosen, 6)
    self.assertLen(set(chosen), 6)
    self.assertEqual({label_of[k] for k in chosen}, {0, 1, 2, 3})
    self.assertEqual(chosen, plots.sample_keys(list(reversed(keys)), label_of, 6, seed=0))


if __name__ == "__main__":
  absltest.main()
