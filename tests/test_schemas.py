"""flowers.schemas: the JSON files the modes write match their TypedDicts, and
`problems` finds each kind of mismatch.

The files come from a tiny train, evaluate (.keras and .tflite), int8 export
and a 2-trial search, run in-process on a generated image folder.
"""

import dataclasses
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from typing import Mapping, Sequence

from absl.testing import absltest
import pytest

import fake_data
import run_configs
from flowers import artifacts
from flowers import modes
from flowers import schemas

# Each JSON file flowers writes in a workdir (a pattern, relative to it) -> its schema.
SCHEMAS = {
    artifacts.REPORT: schemas.Report,
    "evaluation_*.json": schemas.EvaluationReport,
    artifacts.EXPORT_REPORT: schemas.ExportReport,
    artifacts.HISTORY: schemas.History,
    artifacts.RUN: schemas.RunJson,
    artifacts.LINEAGE: schemas.Lineage,
    artifacts.BEST_HPARAMS: schemas.BestHparams,
    f"{artifacts.TUNER_DIR}/trial_*/{artifacts.TRIAL_RESULT}": schemas.TrialResult,
}
# JSON files in a workdir that are not flowers' artifacts: KerasTuner's own, and the
# frozen-prefix cache's identity (its name is a digest of it).
NOT_ARTIFACTS = (f"{artifacts.TUNER_DIR}/*.json", f"{artifacts.TUNER_DIR}/trial_*/trial.json",
                 f"{artifacts.TUNER_DIR}/trial_*/build_config.json",
                 f"{artifacts.CACHE_DIR}/*.json")


def schema_of(relative: str):
  """The schema of a workdir file, or None."""
  return next((s for pattern, s in SCHEMAS.items() if fnmatch.fnmatch(relative, pattern)), None)


def json_files(workdir: str) -> list[str]:
  """Every .json under `workdir`, relative to it."""
  return sorted(os.path.relpath(os.path.join(root, name), workdir)
                for root, _, names in os.walk(workdir) for name in names
                if name.endswith(".json"))


def read_json(*path):
  with open(os.path.join(*path), encoding="utf-8") as f:
    return json.load(f)


def lineage_record(**changes):
  return {"mode": "train", "run": "0123456789abcdef", "model": None, "sha256": "ab" * 32,
          **changes}


class ProblemsTest(absltest.TestCase):
  """Each kind of problem `problems` reports, and what it lets pass."""

  def test_a_matching_value_has_no_problems(self):
    self.assertEqual(schemas.problems({"owner": None, "files": {"report.json": lineage_record()}},
                                      schemas.Lineage), [])

  def test_a_missing_required_key_is_named_and_a_not_required_one_may_be_absent(self):
    self.assertEqual(schemas.problems({"test": 2, "val": 1}, schemas.SkippedImages), [])
    self.assertEqual(schemas.problems({"val": 1}, schemas.SkippedImages),
                     ["the top level: missing key 'test' (SkippedImages)"])

  def test_an_unknown_key_is_named(self):
    self.assertEqual(schemas.problems({"test": 0, "tset": 1}, schemas.SkippedImages),
                     ["the top level: unknown key 'tset' (SkippedImages has no such key)"])

  def test_a_wrong_json_type_is_named_where_it_is(self):
    self.assertEqual(schemas.problems({"test": "3"}, schemas.SkippedImages),
                     ["test: expected integer, got string"])
    self.assertEqual(schemas.problems({"test": True}, schemas.SkippedImages),
                     ["test: expected integer, got boolean"])  # A bool is no integer.
    self.assertEqual(schemas.problems({"test": 3.0}, schemas.SkippedImages),
                     ["test: expected integer, got number"])
    self.assertEqual(schemas.problems([], schemas.SkippedImages),
                     ["the top level: expected object (SkippedImages), got array"])

  def test_a_number_takes_an_integer_but_not_a_boolean(self):
    median_stop = {"epoch": 2, "best_val_accuracy": 1, "median": 0.5}
    self.assertEqual(schemas.problems(median_stop, schemas.MedianStop), [])
    self.assertEqual(schemas.problems({**median_stop, "median": False}, schemas.MedianStop),
                     ["median: expected number, got boolean"])

  def test_nested_typeddicts_lists_and_dicts_are_checked_inside(self):
    manifest = {"owner": "x", "files": {"a.json": lineage_record(sha256=None),
                                        "b.json": lineage_record(extra=1)}}
    self.assertEqual(schemas.problems(manifest, schemas.Lineage),
                     ["files.a.json.sha256: expected string, got null",
                      "files.b.json: unknown key 'extra' (LineageRecord has no such key)"])
    self.assertEqual(schemas.problems([[1, 2], [3, "4"]], list[list[int]]),
                     ["[1][1]: expected integer, got string"])
    self.assertEqual(schemas.problems({"a": [1.5], "b": 2}, schemas.StageHistory),
                     ["b: expected array, got integer"])
    self.assertEqual(schemas.problems({"a": ["x"]}, Mapping[str, Sequence[float]]),
                     ["a[0]: expected number, got string"])

  def test_an_optional_value_takes_null_or_its_type_only(self):
    record = lineage_record()
    self.assertEqual(schemas.problems({**record, "run": None}, schemas.LineageRecord), [])
    self.assertEqual(schemas.problems({**record, "run": 7}, schemas.LineageRecord),
                     ["run: expected string or null, got integer"])
    stopped = {"epoch": "3", "best_val_accuracy": 0.5, "median": 0.6}
    self.assertEqual(schemas.problems(stopped, schemas.MedianStop | None),
                     ["epoch: expected integer, got string"])  # The inner problem, not "or".

  def test_a_literal_takes_its_values_only(self):
    self.assertEqual(schemas.problems("tune", schemas.Fingerprint.__annotations__["mode"]), [])
    self.assertEqual(schemas.problems("search", schemas.Fingerprint.__annotations__["mode"]),
                     ["the top level: expected one of 'train', 'tune', got 'search'"])

  def test_a_report_is_checked_against_the_closer_of_its_two_kinds(self):
    history = {"frozen": {}, "fine_tune": {}}
    self.assertEqual(schemas.problems(history, schemas.History | schemas.BestHparams), [])
    self.assertEqual(schemas.problems({"frozen": {}}, schemas.History | schemas.BestHparams),
                     ["the top level: missing key 'fine_tune' (History)"])

  def test_an_annotation_json_cannot_hold_is_refused(self):
    with self.assertRaisesRegex(TypeError, "no JSON type"):
      schemas.problems(b"x", bytes)


class SchemasTest(absltest.TestCase):
  """The schemas themselves."""

  def test_each_file_schema_names_its_file_and_its_writer(self):
    for pattern, schema in SCHEMAS.items():
      for kind in getattr(schema, "__args__", (schema,)):  # Report is a union of two.
        doc = kind.__doc__ or ""
        self.assertIn(pattern.split("/")[-1].replace("*", "<model stem>"), doc, kind)
        self.assertIn("Written by", doc, kind)

  def test_the_schemas_import_no_tensorflow(self):
    code = "import sys, flowers.schemas; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    self.assertEqual(out.strip(), "False")

  def test_the_median_stopping_rule_records_a_median_stop(self):
    from flowers import tune  # pylint: disable=g-import-not-at-top

    stopper = tune.MedianStopping([[0.9, 0.9], [0.8, 0.8]], start_epoch=1,
                                  run_dir=self.create_tempdir().full_path)
    stopper.set_model(types.SimpleNamespace(stop_training=False))
    stopper.on_epoch_end(0, {"val_accuracy": 0.1})
    self.assertIsNotNone(stopper.stopped)
    self.assertEqual(schemas.problems(stopper.stopped, schemas.MedianStop), [])


@pytest.mark.slow
class WrittenFilesTest(absltest.TestCase):
  """A train run (evaluated twice, exported to int8) and a 2-trial search, once per class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="flowers_schemas_")
    image_dir = os.path.join(cls.root, "images")
    fake_data.write_image_dir(image_dir, [8, 8, 8], size=40)
    config = run_configs.tiny(data={"image_dir": image_dir},
                              export={"calibration_examples": 16, "max_accuracy_drop": 100.0},
                              epochs=1, fine_tune_epochs=1, class_weight="balanced")
    cls.train_dir = os.path.join(cls.root, "train")
    modes.train(config, cls.train_dir)
    modes.evaluate(config, cls.train_dir)
    modes.export(config, cls.train_dir)
    tflite = os.path.join(cls.train_dir, artifacts.TFLITE_NAMES["int8"])
    modes.evaluate(dataclasses.replace(
        config, predict=dataclasses.replace(config.predict, model=tflite)), cls.train_dir)
    search = {"tuner": "random", "max_trials": 2,
              "dropout_range": (0.1, 0.4), "unfreeze_ratio_range": (0.05, 0.15)}
    cls.tune_dir = os.path.join(cls.root, "tune")
    modes.tune(dataclasses.replace(config, search=dataclasses.replace(config.search, **search),
                                   export=dataclasses.replace(config.export, export_best=False)),
               cls.tune_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def assertMatchesItsSchema(self, workdir: str, relative: str):
    schema = schema_of(relative)
    self.assertIsNotNone(schema, f"{relative} has no schema")
    self.assertEqual(schemas.problems(read_json(workdir, relative), schema), [], relative)

  def test_every_json_file_of_a_train_evaluate_and_export_matches_its_schema(self):
    found = json_files(self.train_dir)
    for name in (artifacts.REPORT, artifacts.EXPORT_REPORT, artifacts.HISTORY, artifacts.RUN,
                 artifacts.LINEAGE, "evaluation_model.json", "evaluation_model_int8.json"):
      self.assertIn(name, found)
    for relative in found:
      if not any(fnmatch.fnmatch(relative, p) for p in NOT_ARTIFACTS):
        self.assertMatchesItsSchema(self.train_dir, relative)

  def test_every_json_file_of_a_search_matches_its_schema(self):
    found = json_files(self.tune_dir)
    results = fnmatch.filter(found, f"{artifacts.TUNER_DIR}/trial_*/{artifacts.TRIAL_RESULT}")
    self.assertLen(results, 2)
    self.assertIn(artifacts.BEST_HPARAMS, found)
    for relative in found:
      if not any(fnmatch.fnmatch(relative, p) for p in NOT_ARTIFACTS):
        self.assertMatchesItsSchema(self.tune_dir, relative)

  def test_a_train_report_and_a_search_report_are_each_of_their_own_kind(self):
    train = read_json(self.train_dir, artifacts.REPORT)
    tune = read_json(self.tune_dir, artifacts.REPORT)
    self.assertEqual(schemas.problems(train, schemas.TrainReport), [])
    self.assertEqual(schemas.problems(tune, schemas.TuneReport), [])
    self.assertIn("the top level: missing key 'best_hparams' (TuneReport)",
                  schemas.problems(train, schemas.TuneReport))
    self.assertIn("the top level: missing key 'train_seconds' (TrainReport)",
                  schemas.problems(tune, schemas.TrainReport))

  def test_the_reports_carry_the_calibration_of_the_model_and_its_export(self):
    for workdir in (self.train_dir, self.tune_dir):
      calibration = read_json(workdir, artifacts.REPORT)["calibration"]
      self.assertEqual(schemas.problems(calibration, schemas.Calibration), [], workdir)
    exported = read_json(self.train_dir, artifacts.EXPORT_REPORT)
    for key in ("float_test_nll", "tflite_test_nll", "float_test_ece", "tflite_test_ece"):
      self.assertIn(key, exported)

  def test_the_reports_carry_the_class_weights_they_trained_with(self):
    for workdir in (self.train_dir, self.tune_dir):
      report = read_json(workdir, artifacts.REPORT)
      self.assertEqual(list(report["class_weights"]), report["class_names"], workdir)

  def test_a_search_records_its_run_with_the_search_settings(self):
    self.assertIn("search", read_json(self.tune_dir, artifacts.RUN))
    self.assertNotIn("search", read_json(self.train_dir, artifacts.RUN))


if __name__ == "__main__":
  absltest.main()
