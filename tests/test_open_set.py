"""Tests for flowers.open_set: the "unknown" threshold from val to report, metadata and predict.

`ThresholdRunTest` saves a run (`train.save_run`) of a nearest-colour model on
mock data, exports it, and predicts on photos of the classes' own colours and
on grey images no class is near: the threshold chosen on val reaches
report.json, the .tflite's metadata and `--mode=predict`, for .keras and
.tflite alike.
"""

import contextlib
import io
import json
import os

from absl.testing import absltest
import numpy as np
from PIL import Image

import fake_data
import run_configs
from flowers import artifacts
from flowers import evaluate
from flowers import export
from flowers import modes
from flowers import open_set
from flowers import runs
from flowers import schemas
from flowers import split as split_lib
from flowers import tflite_metadata
from flowers import train
from flowers.config import ExportConfig
from flowers.config import PredictConfig
from flowers.config import RunConfig
from flowers.errors import UserError
from test_tflite_metadata import colour_model

COUNTS = fake_data.uniform_counts(4, train=6, val=10, test=6)


class ScoresTest(absltest.TestCase):

  def test_the_threshold_is_the_largest_that_keeps_the_rate(self):
    scores = np.random.default_rng(0).random(40)
    for rate in (0.5, 0.9, 0.95, 0.975, 1.0):
      threshold = open_set.choose_threshold(scores, rate)
      self.assertGreaterEqual(open_set.accepted(scores, threshold), rate)
      above = scores[scores > threshold].min()  # The next score up keeps too few.
      self.assertLess(open_set.accepted(scores, above), rate)
    self.assertIsNone(open_set.choose_threshold(scores, 0.0))

  def test_a_saturated_int8_output_keeps_its_known_images(self):
    # Val all correct: the float model's top scores sit at 1 (a temperature at its floor),
    # and the int8 model's at the top of its output, 255/256, with a few below.
    rng = np.random.default_rng(3)
    float_scores = 1.0 - rng.random(40) * 1e-4
    int8_scores = np.where(np.arange(40) < 36, 255, rng.integers(200, 255, 40)) / 256
    float_threshold = open_set.choose_threshold(float_scores, 0.95)
    # What shipping the float model's threshold gave: every photo unknown.
    self.assertEqual(open_set.accepted(int8_scores, float_threshold), 0.0)
    max_score = open_set.max_output_score("uint8", (1 / 256, 0))
    chosen = open_set.exported_threshold(int8_scores, 0.95, max_score, float_threshold)
    self.assertLessEqual(chosen["score"], max_score)
    self.assertGreaterEqual(chosen["val_accepted"], 0.95)
    self.assertEqual(chosen["val_accepted"], open_set.accepted(int8_scores, chosen["score"]))
    self.assertEqual((chosen["run_val_accepted"], chosen["lowered"]), (0.0, True))
    # The largest that keeps the rate: the next level up keeps too few.
    self.assertLess(open_set.accepted(int8_scores, chosen["score"] + 1 / 256), 0.95)

  def test_scores_tied_at_the_top_are_all_accepted(self):
    for scores, max_score in (
        (np.full(30, 255 / 256), open_set.max_output_score("uint8", (1 / 256, 0))),
        (np.full(30, 255 / 256), open_set.max_output_score("int8", (1 / 256, -128))),
        (np.ones(30), open_set.max_output_score("float32", (0.0, 0)))):
      chosen = open_set.exported_threshold(scores, 0.95, max_score, run_threshold=0.99995)
      self.assertEqual(chosen["score"], max_score)
      self.assertEqual(chosen["val_accepted"], 1.0)
      self.assertEqual(chosen["lowered"], max_score < 0.99995)
    self.assertIsNone(open_set.exported_threshold(np.ones(30), 0.0, 1.0))

  def test_the_highest_score_an_output_can_reach(self):
    self.assertEqual(open_set.max_output_score("uint8", (1 / 256, 0)), 255 / 256)
    self.assertEqual(open_set.max_output_score("int8", (1 / 256, -128)), 255 / 256)
    self.assertAlmostEqual(open_set.max_output_score("int8", (0.0045, -100)), 0.0045 * 227,
                           places=6)
    self.assertEqual(open_set.max_output_score("float32", (0.0, 0)), 1.0)

  def test_an_older_run_json_chose_no_threshold(self):
    self.assertEqual(runs.upgrade({"train": {}})["train"]["true_accept_rate"], 0.0)


def write_png(folder, name, pixels):
  path = os.path.join(folder, name)
  Image.fromarray(pixels).save(path)
  return path


class ThresholdRunTest(absltest.TestCase):
  """A saved run's threshold, through report.json, the export's metadata and predict."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = cls.enterClassContext(_tempdir())
    cls.config = run_configs.tiny(calibrate=False, int8_grid_weights=False)
    with fake_data.mock_flowers(COUNTS):
      from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
      cls.source = data_lib.load_tfds()
      splits = train.load_splits_seeded(cls.config, cls.source, cls.workdir)
      runs.begin(cls.config, cls.workdir, "train", cls.source, feature_cache=False)
      model = colour_model(4, 32, num_outputs=len(splits.class_names), temperature=0.1)
      cls.report = train.save_run(model, splits, cls.config, cls.workdir, cls.workdir,
                                  train_seconds=0.0)
      cls.val_probs = train._split_probs(model, splits, "val")[0]  # pylint: disable=protected-access
      config = RunConfig(data=cls.config.data,
                         export=ExportConfig(max_accuracy_drop=100.0))
      with contextlib.redirect_stdout(io.StringIO()):
        cls.export_report = export.export_from_workdir(
            config, cls.workdir, os.path.join(cls.workdir, artifacts.MODEL), cls.source)
    images = cls.enterClassContext(_tempdir())
    centroids = [fake_data.class_image(l, 0, size=32).reshape(-1, 3).mean(0) for l in range(4)]
    # Class 1 is the one the model is least sure of: its val images set the threshold.
    cls.known = [write_png(images, f"class{l}.png",
                           np.full((32, 32, 3), np.round(centroids[l]), np.uint8))
                 for l in (0, 2, 3)]
    cls.unknown = [write_png(images, f"grey{v}.png", np.full((32, 32, 3), v, np.uint8))
                   for v in (60, 128)]

  def test_report_holds_the_threshold_chosen_on_val(self):
    chosen = self.report["unknown_threshold"]
    self.assertEqual(schemas.problems(self.report, schemas.TrainReport), [])
    self.assertEqual(chosen["true_accept_rate"], 0.95)
    self.assertEqual(chosen["score"], open_set.choose_threshold(self.val_probs.max(1), 0.95))
    self.assertGreaterEqual(chosen["val_accepted"], 0.95)

  def test_the_export_metadata_holds_the_runs_rule_on_its_own_val_scores(self):
    path = os.path.join(self.workdir, "model_int8.tflite")
    threshold = tflite_metadata.read_score_threshold(path)
    with fake_data.mock_flowers(COUNTS):
      splits = train.load_splits_seeded(self.config, self.source, self.workdir)
      val_probs, _ = evaluate.predict_dataset(evaluate.tflite_predictor(path), splits.val)
    self.assertEqual(threshold, open_set.choose_threshold(val_probs.max(1), 0.95))
    self.assertEqual(self.export_report["unknown_threshold"], threshold)
    self.assertEqual(self.export_report["float_unknown_threshold"],
                     self.report["unknown_threshold"]["score"])
    self.assertEqual(schemas.problems(self.export_report, schemas.ExportReport), [])

  def predict(self, model_name, output="json"):
    config = RunConfig(predict=PredictConfig(
        model=os.path.join(self.workdir, model_name), images=tuple(self.known + self.unknown),
        top_k=2, output=output))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      results = modes.predict(config, self.workdir)
    return results, out.getvalue()

  def test_predict_says_unknown_below_the_threshold_for_keras_and_tflite(self):
    for name in ("model.keras", "model_int8.tflite"):
      results, _ = self.predict(name)
      path = os.path.join(self.workdir, name)
      threshold = open_set.model_threshold(path)
      predictor, _ = evaluate.load_predictor(path)
      for r in results:
        top = float(predictor(np.asarray(Image.open(r["image"]))[None]).max())
        self.assertEqual(r["unknown"], top < threshold, (name, r))
        self.assertLen(r["top_k"], 2)  # The guesses are still listed.
      self.assertEqual([r["unknown"] for r in results],
                       [False] * len(self.known) + [True] * len(self.unknown), name)
      _, table = self.predict(name, output="table")
      self.assertEqual(table.count("unknown: top score below the threshold"),
                       len(self.unknown), table)

  def test_a_model_without_its_runs_report_has_no_threshold(self):
    folder = self.enterContext(_tempdir())
    for name in (artifacts.MODEL, artifacts.LABELS):
      with open(os.path.join(self.workdir, name), "rb") as f, \
          open(os.path.join(folder, name), "wb") as g:
        g.write(f.read())
    self.assertIsNone(open_set.model_threshold(os.path.join(folder, artifacts.MODEL)))
    config = RunConfig(predict=PredictConfig(model=os.path.join(folder, artifacts.MODEL),
                                             images=tuple(self.unknown), output="json"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
      results = modes.predict(config, folder)
    self.assertNotIn("unknown", results[0])
    self.assertNotIn("unknown", json.loads(out.getvalue())[0])


@contextlib.contextmanager
def _tempdir():
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  folder = tempfile.mkdtemp()
  try:
    yield folder
  finally:
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  absltest.main()


class OpenSetScoresTest(absltest.TestCase):
  """The open-set protocol's scores, AUROC and choice, on made-up logits."""

  def test_auroc_is_the_chance_a_known_image_scores_higher_ties_half(self):
    rng = np.random.default_rng(1)
    known, unknown = np.round(rng.normal(1, 1, 60)), np.round(rng.normal(0, 1, 40))
    pairs = [(k > u) + 0.5 * (k == u) for k in known for u in unknown]
    self.assertAlmostEqual(open_set.auroc(known, unknown), np.mean(pairs))
    self.assertEqual(open_set.auroc([2.0, 3.0], [0.0, 1.0]), 1.0)

  def test_scores_from_logits(self):
    logits = np.array([[2.0, 0.0, -1.0], [500.0, 499.0, 0.0]])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(open_set.score(logits, "max_probability"), probs.max(1))
    np.testing.assert_allclose(open_set.score(logits, "max_logit"), [2.0, 500.0])
    np.testing.assert_allclose(open_set.score(logits, "energy"),
                               [np.log(np.exp(logits[0]).sum()), 500.0 + np.log1p(np.exp(-1.0))])

  def test_the_score_is_chosen_on_val_and_test_only_reported(self):
    rng = np.random.default_rng(2)
    # Known images: two large logits, so a split probability. Unknowns: one smaller
    # logit, so a sure probability: max_probability gets them backwards, the logit not.
    known = np.concatenate([rng.normal(8, 0.2, (50, 2)), rng.normal(0, 0.5, (50, 2))], 1)
    unknown = np.concatenate([rng.normal(4, 0.2, (50, 1)), rng.normal(0, 0.5, (50, 3))], 1)
    logits = {"val_known": known, "val_unknown": unknown,
              "test_known": known[::-1], "test_unknown": known[:10]}
    report = open_set.open_set_report(logits, ["held"], 0.95)
    self.assertEqual(report["chosen_score"], "max_logit")
    self.assertEqual(report["scores"]["max_logit"]["val_auroc"], 1.0)
    self.assertLess(report["scores"]["max_probability"]["val_auroc"], 0.5)
    # Test (here: unknowns that look known) changes the figures, never the choice.
    self.assertEqual(report["scores"]["max_logit"]["test_false_accept"], 1.0)
    self.assertEqual(schemas.problems(report, schemas.OpenSet), [])
    self.assertEqual(open_set.open_set_report(logits, ["held"], 0.0)["true_accept_rate"], 0.95)


HOLDOUT_COUNTS = fake_data.uniform_counts(6, train=6, val=6, test=6)


class HoldOutRunTest(absltest.TestCase):
  """--holdout_classes=2 on 6 mock classes: the split, a saved run's report, its lineage."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = cls.enterClassContext(_tempdir())
    cls.config = run_configs.tiny(data={"holdout_classes": 2}, calibrate=False,
                                  int8_grid_weights=False)
    with fake_data.mock_flowers(HOLDOUT_COUNTS):
      from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
      cls.data_lib = data_lib
      cls.source = data_lib.load_tfds()
      cls.splits = train.load_splits_seeded(cls.config, cls.source, cls.workdir)
      runs.begin(cls.config, cls.workdir, "train", cls.source, feature_cache=False)
      # Mock TFDS names 102 classes; 6 have images, 4 of them known.
      names = cls.source.class_names
      known = [names.index(n) for n in cls.splits.class_names if names.index(n) < 6]
      cls.model = colour_model(4, 32, num_outputs=len(cls.splits.class_names),
                               temperature=0.1, classes=known)
      cls.report = train.save_run(cls.model, cls.splits, cls.config, cls.workdir, cls.workdir,
                                  train_seconds=0.0)
      to_logits = train.logits_predictor(cls.model)
      cls.test_logits = [to_logits(data_lib.make_dataset(source, keys, image_size=32,
                                                         cache="none"))
                         for source, keys in (
                             (cls.splits.source, cls.splits.keys("test")),
                             (cls.splits.held_out, cls.splits.held_out_keys("test")))]

  def test_held_out_classes_are_left_out_of_the_split_and_scored_as_unknowns(self):
    held_out = self.report["open_set"]["held_out_classes"]
    self.assertLen(held_out, 2)
    self.assertEqual(sorted(held_out + self.splits.class_names), sorted(self.source.class_names))
    self.assertEqual([self.source.class_names.index(n) < 6 for n in held_out], [True, True])
    label_of = self.source.label_of()
    names = self.source.class_names
    for split in ("train", "val", "test"):
      self.assertTrue(self.splits.keys(split))
      self.assertNotIn({names[label_of[k]] for k in self.splits.keys(split)}.intersection(
          held_out), [set(held_out)] + [{n} for n in held_out])
    for split in ("val", "test"):
      self.assertEqual({names[label_of[k]] for k in self.splits.held_out_keys(split)},
                       set(held_out))
    assignment, _ = split_lib.read_manifest(os.path.join(self.workdir, "splits.csv"))
    self.assertEqual(set(assignment), set(self.splits.assignment))
    self.assertEqual(self.report["open_set"]["num_test_unknown"],
                     len(self.splits.held_out_keys("test")))

  def test_the_report_measures_every_score(self):
    report = self.report["open_set"]
    self.assertEqual(schemas.problems(self.report, schemas.TrainReport), [])
    self.assertCountEqual(report["scores"], open_set.SCORES)
    # The figures are those of the model's own logits on the known and held-out test images.
    for name in open_set.SCORES:
      known, unknown = (open_set.score(l, name) for l in self.test_logits)
      self.assertAlmostEqual(report["scores"][name]["test_auroc"],
                             open_set.auroc(known, unknown), places=6)
    # The nearest-colour model is less sure of colours it was not given (two of the six
    # mock colours are close, so far from perfectly).
    self.assertGreater(report["scores"]["max_probability"]["test_auroc"], 0.6)
    self.assertEqual(self.report["class_names"], self.splits.class_names)

  def test_the_choice_is_seeded_and_later_modes_use_the_runs(self):
    again, _ = self.data_lib.hold_out(self.source, 2, self.config.data.split_seed)
    self.assertEqual(again.class_names, self.splits.class_names)
    others = {tuple(self.data_lib.hold_out(self.source, 2, seed)[1].class_names)
              for seed in range(5)}
    self.assertGreater(len(others), 1)
    data = runs.data_of_run(runs.read_run(self.workdir), RunConfig().data)
    self.assertEqual(data.holdout_classes, 2)

  def test_holding_out_all_but_one_class_is_refused(self):
    with self.assertRaisesRegex(UserError, "--holdout_classes=5 leaves fewer than 2"):
      self.data_lib.hold_out(self.source, 5, 42)
