"""Tests for flowers.calibrate and the calibration step of train.save_run."""

import math
import os

from absl.testing import absltest
import keras
import numpy as np

import fake_data
import run_configs
from flowers import artifacts
from flowers import calibrate
from flowers import model as model_lib
from flowers import schemas
from flowers import train

COUNTS = fake_data.uniform_counts(4, train=4, val=6, test=6)


def softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def overconfident(model: keras.Model, factor: float = 30.0) -> keras.Model:
  """`model` with its classifier's kernel and bias scaled up: near one-hot scores."""
  layer = model.get_layer(model_lib.CLASSIFIER_NAME)
  layer.kernel.assign(layer.kernel.numpy() * factor)
  layer.bias.assign(np.linspace(-1.0, 1.0, layer.bias.shape[0]).astype(np.float32) * factor)
  return model


class MetricsTest(absltest.TestCase):
  """NLL, ECE and the reliability table against figures worked out by hand."""

  probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.25, 0.75]])
  labels = np.array([0, 1, 1, 0])

  def test_nll_is_the_mean_minus_log_of_the_true_class(self):
    expected = -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.25)) / 4
    self.assertAlmostEqual(calibrate.nll(self.probs, self.labels), expected, places=12)

  def test_a_zero_probability_is_clipped_not_infinite(self):
    self.assertAlmostEqual(calibrate.nll(np.array([[1.0, 0.0]]), np.array([1])),
                           -math.log(calibrate.EPSILON), places=9)

  def test_reliability_bins_by_top1_confidence(self):
    # Top-1: 0.9 right, 0.6 wrong, 0.7 right, 0.75 wrong. Five bins of 0.2.
    table = calibrate.reliability(self.probs, self.labels, bins=5)
    self.assertEqual(table["bins"], 5)
    self.assertEqual(table["count"], [0, 0, 0, 3, 1])
    self.assertEqual(table["confidence"][:3], [None, None, None])
    self.assertAlmostEqual(table["confidence"][3], (0.6 + 0.7 + 0.75) / 3)
    self.assertAlmostEqual(table["accuracy"][3], 1 / 3)
    self.assertEqual((table["confidence"][4], table["accuracy"][4]), (0.9, 1.0))

  def test_ece_is_the_image_weighted_gap_of_the_bins(self):
    expected = 3 / 4 * abs(1 / 3 - (0.6 + 0.7 + 0.75) / 3) + 1 / 4 * abs(1.0 - 0.9)
    self.assertAlmostEqual(calibrate.expected_calibration_error(self.probs, self.labels, 5),
                           expected, places=12)
    # A confidence of exactly 1 falls in the last bin; a perfect model has no gap.
    self.assertEqual(calibrate.expected_calibration_error(np.eye(3), np.arange(3)), 0.0)


class FitTemperatureTest(absltest.TestCase):

  def test_recovers_the_temperature_that_made_scores_overconfident(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (20000, 5))
    true = softmax(logits)
    labels = np.array([rng.choice(5, p=p) for p in true])  # Calibrated at T = 1.
    for made_with in (0.5, 2.5):
      fitted = calibrate.fit_temperature(softmax(logits / made_with), labels)
      self.assertAlmostEqual(fitted, 1 / made_with, delta=0.05 / made_with, msg=made_with)

  def test_is_deterministic_and_scaling_by_it_lowers_nll(self):
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(0.0, 6.0, (300, 4)))
    labels = rng.integers(0, 4, 300)
    t = calibrate.fit_temperature(probs, labels)
    self.assertEqual(t, calibrate.fit_temperature(probs, labels))
    self.assertGreater(t, 1.0)  # Random labels: the scores are far too sure.
    self.assertLess(calibrate.nll(calibrate.scale(probs, t), labels),
                    calibrate.nll(probs, labels))
    np.testing.assert_array_equal(calibrate.scale(probs, t).argmax(1), probs.argmax(1))


class FoldTemperatureTest(absltest.TestCase):

  def test_fold_keeps_the_top1_and_gives_the_scaled_scores(self):
    model = overconfident(model_lib.build_model(
        4, image_size=32, weights=None, augment=False, seed=3))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 24)
    before = model.predict(images, verbose=0)
    t = calibrate.fit_temperature(before, labels)
    calibrate.fold_temperature(model, t)
    after = model.predict(images, verbose=0)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))
    self.assertLess(calibrate.nll(after, labels), calibrate.nll(before, labels))
    np.testing.assert_allclose(after, calibrate.scale(before, t), atol=1e-4)

  def test_a_temperature_must_be_positive(self):
    model = model_lib.build_model(2, image_size=32, weights=None, augment=False)
    with self.assertRaises(ValueError):
      calibrate.fold_temperature(model, 0.0)


class SaveRunTest(absltest.TestCase):
  """`train.save_run` on an untrained, over-confident model: no stages to wait for."""

  def save_run(self, data=None, **train_settings):
    workdir = self.create_tempdir().full_path
    config = run_configs.tiny(data=data, **train_settings)
    with fake_data.mock_flowers(COUNTS):
      from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
      splits = train.load_splits_seeded(config, data_lib.load_tfds(), workdir)
      model = overconfident(train.new_model(config, len(splits.class_names)))
      unfolded = overconfident(train.new_model(config, len(splits.class_names)))
      report = train.save_run(model, splits, config, workdir, workdir, train_seconds=0.0)
      if config.train.int8_grid_weights:
        train.round_for_int8(unfolded, config, train.calibration_images(config, splits))
      expected = train.evaluate_split(unfolded, splits, "test")["test_accuracy"]
    self.assertEqual(schemas.problems(report, schemas.TrainReport), [])
    self.assertEqual(report, artifacts.read_json(os.path.join(workdir, artifacts.REPORT)))
    self.unfolded = unfolded
    return report, expected, workdir

  def test_the_temperature_is_folded_and_reported_with_top1_unchanged(self):
    report, unfolded_accuracy, workdir = self.save_run()
    calibration = report["calibration"]
    self.assertTrue(calibration["applied"], calibration)
    self.assertGreater(calibration["temperature"], 1.0)
    self.assertLess(calibration["val_nll_after"], calibration["val_nll_before"])
    self.assertLess(calibration["test_nll_after"], calibration["test_nll_before"])
    self.assertEqual(report["test_accuracy"], unfolded_accuracy)
    for when in ("before", "after"):
      table = calibration[f"test_reliability_{when}"]
      self.assertEqual((table["bins"], sum(table["count"])), (15, report["num_test_examples"]))
      self.assertAlmostEqual(calibrate.ece_of_reliability(table),
                             calibration[f"test_ece_{when}"], places=12)
    saved = keras.models.load_model(os.path.join(workdir, artifacts.MODEL))
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(
          getattr(saved.get_layer(model_lib.CLASSIFIER_NAME), name).numpy(),
          getattr(self.unfolded.get_layer(model_lib.CLASSIFIER_NAME), name).numpy()
          / calibration["temperature"], rtol=1e-5, err_msg=name)

  def test_nocalibrate_gives_the_report_without_calibration(self):
    report, unfolded_accuracy, _ = self.save_run(calibrate=False, int8_grid_weights=False)
    self.assertNotIn("calibration", report)
    self.assertEqual(report["test_accuracy"], unfolded_accuracy)

  def test_without_a_val_split_nothing_is_folded_and_the_report_says_why(self):
    report, _, _ = self.save_run(data={"split": "70,0,30"}, int8_grid_weights=False)
    calibration = report["calibration"]
    self.assertFalse(calibration["applied"])
    self.assertIn("no val split", calibration["reason"])
    self.assertNotIn("temperature", calibration)
    self.assertEqual(calibration["test_nll_before"], calibration["test_nll_after"])


if __name__ == "__main__":
  absltest.main()
