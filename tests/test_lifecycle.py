"""The workdir's lifecycle: every file knows what made it, nothing stale, nothing lost.

Runs the modes in-process on a tiny generated image folder, as a user would
chain them (train, export, rerun, --overwrite, evaluate into the run's own and
into another run's folder), and checks what each leaves in the workdir.
"""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import pytest

import fake_data
from workdir_files import snapshot
import run_configs
from flowers import artifacts
from flowers import config as config_lib
from flowers import lineage
from flowers import modes
from flowers import runs
from flowers.errors import UserError


def tiny_config(image_dir: str, **train) -> config_lib.RunConfig:
  config = run_configs.tiny(data={"image_dir": image_dir},
                            export={"calibration_examples": 16, "max_accuracy_drop": 100.0},
                            **{"epochs": 1, "fine_tune_epochs": 1, **train})
  return dataclasses.replace(config, plots=True)



def read_json(*path):
  with open(os.path.join(*path), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
class LifecycleTest(absltest.TestCase):
  """Two finished runs on one split (A exported, B another dropout), copied per test."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="flowers_lifecycle_")
    cls.image_dir = os.path.join(cls.root, "images")
    fake_data.write_image_dir(cls.image_dir, [8, 8, 8], size=40)
    cls.config = tiny_config(cls.image_dir)
    cls.run_a = os.path.join(cls.root, "a")
    modes.train(cls.config, cls.run_a)
    modes.export(cls.config, cls.run_a)
    cls.run_b = os.path.join(cls.root, "b")
    modes.train(run_configs.with_train(cls.config, dropout=0.5), cls.run_b)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def copy_of(self, run: str) -> str:
    workdir = os.path.join(self.create_tempdir().full_path, "run")
    shutil.copytree(run, workdir)
    return workdir

  def test_rerunning_a_finished_train_changes_nothing(self):
    workdir = self.copy_of(self.run_a)
    before = snapshot(workdir)
    report = modes.train(self.config, workdir)
    self.assertEqual(snapshot(workdir), before)  # Same bytes, not even rewritten.
    self.assertEqual(report["test_accuracy"], read_json(workdir, "report.json")["test_accuracy"])

  def test_a_run_json_with_older_names_is_the_same_run(self):
    # A run recorded by an older flowers: one seed for split and training, the
    # feature-cache settings without their prefix. It still reads as this run.
    workdir = self.copy_of(self.run_a)
    run = read_json(workdir, "run.json")
    old = json.loads(json.dumps(run))
    old["data"]["seed"] = old["data"].pop("split_seed")
    del old["train"]["seed"]
    old["train"]["cache_views"] = old["train"].pop("feature_cache_views")
    old["train"]["cache_cut_ratio"] = old["train"].pop("feature_cache_cut_ratio")
    with open(os.path.join(workdir, "lineage.json"), encoding="utf-8") as f:
      records = f.read().replace(lineage.fingerprint_id(run), lineage.fingerprint_id(old))
    for name, text in (("run.json", json.dumps(old)), ("lineage.json", records)):
      with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(text)
    self.assertEqual(runs.differences(runs.read_run(workdir), run), [])
    before = snapshot(workdir)
    report = modes.train(self.config, workdir)  # Finished: reported, nothing retrained.
    self.assertEqual(snapshot(workdir), before)
    self.assertEqual(report["test_accuracy"], read_json(workdir, "report.json")["test_accuracy"])
    seven = dataclasses.replace(self.config,
                                train=dataclasses.replace(self.config.train, seed=7))
    with self.assertRaisesRegex(UserError, r"train\.seed: 42 -> 7"):
      modes.train(seven, workdir)

  def test_rerunning_a_run_json_from_before_calibration_reads_it_uncalibrated(self):
    # An older flowers shipped uncalibrated scores: its run.json, without the
    # setting, is a run with --nocalibrate, and reads as finished under it.
    workdir = self.copy_of(self.run_a)
    run = read_json(workdir, "run.json")
    old = json.loads(json.dumps(run))
    del old["train"]["calibrate"]
    with open(os.path.join(workdir, "lineage.json"), encoding="utf-8") as f:
      records = f.read().replace(lineage.fingerprint_id(run), lineage.fingerprint_id(old))
    for name, text in (("run.json", json.dumps(old)), ("lineage.json", records)):
      with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(text)
    self.assertEqual(runs.differences(runs.read_run(workdir), run),
                     ["train.calibrate: False -> True"])
    before = snapshot(workdir)
    with self.assertRaisesRegex(UserError, r"train\.calibrate: False -> True"):
      modes.train(self.config, workdir)
    modes.train(run_configs.with_train(self.config, calibrate=False), workdir)
    self.assertEqual(snapshot(workdir), before)

  def test_overwrite_removes_what_the_old_model_derived(self):
    workdir = self.copy_of(self.run_a)
    self.assertTrue(os.path.exists(os.path.join(workdir, "model_int8.tflite")))
    config = dataclasses.replace(run_configs.with_train(self.config, dropout=0.4),
                                 overwrite=True)
    modes.train(config, workdir)
    for name in ("model_int8.tflite", "export_report.json"):
      self.assertFalse(os.path.exists(os.path.join(workdir, name)), name)
    self.assertEqual(read_json(workdir, "report.json")["config"]["train"]["dropout"], 0.4)
    with open(os.path.join(workdir, "summary.md"), encoding="utf-8") as f:
      self.assertNotIn("## Export", f.read())

  def test_flags_cfg_records_settings_not_the_overwrite(self):
    workdir = self.copy_of(self.run_a)
    modes.train(dataclasses.replace(self.config, overwrite=True), workdir)
    with open(os.path.join(workdir, "flags.cfg"), encoding="utf-8") as f:
      saved = f.read()
    self.assertNotIn("overwrite", [line.lstrip("-").split("=")[0].removeprefix("no")
                                   for line in saved.splitlines()])
    self.assertIn("--image_size=32", saved)

  def test_summary_leaves_out_files_of_another_model_or_run(self):
    workdir = self.copy_of(self.run_a)
    # B's model (another run, same split) put beside A's export and A's reports.
    shutil.copyfile(os.path.join(self.run_b, "model.keras"), os.path.join(workdir, "model.keras"))
    with open(os.path.join(workdir, "trials.csv"), "w", encoding="utf-8") as f:
      f.write("trial_id,dropout,val_accuracy\n0,0.1,0.99\n")
    from flowers import summary  # pylint: disable=g-import-not-at-top

    with self.assertRaisesRegex(UserError, "report.json not found"):
      summary.write_report(workdir)  # A's report describes A's model, not the one there.
    shutil.copyfile(os.path.join(self.run_a, "model.keras"), os.path.join(workdir, "model.keras"))
    text = open(summary.write_report(workdir), encoding="utf-8").read()
    self.assertIn("## Export", text)  # A's own export is A's model's.
    self.assertIn("`trials.csv`", text.split("## Left out")[1])
    self.assertNotIn("## Tuning", text)

  def test_evaluate_writes_its_own_report_and_keeps_the_training_one(self):
    workdir = self.copy_of(self.run_a)
    with open(os.path.join(workdir, "report.json"), "rb") as f:
      training_report = f.read()
    report = modes.evaluate(self.config, workdir)
    with open(os.path.join(workdir, "report.json"), "rb") as f:
      self.assertEqual(f.read(), training_report)
    saved = read_json(workdir, "evaluation_model.json")
    self.assertEqual(saved["test_accuracy"], report["test_accuracy"])
    self.assertEqual(saved["test_accuracy"], json.loads(training_report)["test_accuracy"])
    self.assertIn("val_accuracy", json.loads(training_report))
    # The shipped model's calibration, measured again: the same figures training wrote.
    shipped = json.loads(training_report)["calibration"]
    self.assertAlmostEqual(saved["test_ece"], shipped["test_ece_after"], places=6)
    self.assertAlmostEqual(saved["test_nll"], shipped["test_nll_after"], places=5)

  def test_another_runs_model_is_not_written_into_a_run_folder(self):
    workdir = self.copy_of(self.run_b)
    before = snapshot(workdir)
    foreign = dataclasses.replace(self.config, predict=config_lib.PredictConfig(
        model=os.path.join(self.run_a, "model.keras")))
    with self.assertRaisesRegex(UserError, "holds another run"):
      modes.evaluate(foreign, workdir)
    with self.assertRaisesRegex(UserError, "holds another run"):
      modes.export(foreign, workdir)
    self.assertEqual(snapshot(workdir), before)

  def test_evaluate_reads_the_data_settings_from_the_run(self):
    # Given only the model, not where its images are: the run's run.json says it.
    config = config_lib.RunConfig(
        data=config_lib.DataConfig(download=False),
        predict=config_lib.PredictConfig(model=os.path.join(self.run_a, "model.keras")),
        plots=False)
    workdir = os.path.join(self.create_tempdir().full_path, "eval")
    report = modes.evaluate(config, workdir)
    self.assertEqual(report["test_accuracy"],
                     read_json(self.run_a, "report.json")["test_accuracy"])

  def test_a_moved_image_folder_and_another_spelling_of_the_split_resume(self):
    workdir = self.copy_of(self.run_a)
    moved = os.path.join(self.create_tempdir().full_path, "moved_images")
    shutil.copytree(self.image_dir, moved)
    config = dataclasses.replace(self.config, data=dataclasses.replace(
        self.config.data, image_dir=moved, split="0.64,0.16,0.2", strict=True))
    before = snapshot(workdir)
    modes.train(config, workdir)  # Not refused, and finished already.
    self.assertEqual({k: v[0] for k, v in snapshot(workdir).items()},
                     {k: v[0] for k, v in before.items()})

  def test_settings_that_change_the_model_refuse_a_resume(self):
    workdir = self.copy_of(self.run_a)
    config = dataclasses.replace(self.config, export=dataclasses.replace(
        self.config.export, calibration_examples=8))
    with self.assertRaisesRegex(UserError, "calibration_examples: 16 -> 8"):
      modes.train(config, workdir)

  def test_an_export_into_a_fresh_folder_writes_no_summary_and_no_warning(self):
    fresh = os.path.join(self.create_tempdir().full_path, "export")
    config = dataclasses.replace(self.config, predict=dataclasses.replace(
        self.config.predict, model=os.path.join(self.run_a, "model.keras")))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      modes.export(config, fresh)
    self.assertNotIn("warning", err.getvalue())
    self.assertTrue(os.path.exists(os.path.join(fresh, "model_int8.tflite")))
    self.assertFalse(os.path.exists(os.path.join(fresh, "summary.md")))

  def test_a_failed_export_leaves_no_export_of_another_model(self):
    workdir = self.copy_of(self.run_a)
    # A new model where A's export lies (as a model copied in, or a run with older flowers).
    shutil.copyfile(os.path.join(self.run_b, "model.keras"), os.path.join(workdir, "model.keras"))
    from flowers import export as export_lib  # pylint: disable=g-import-not-at-top

    with mock.patch.object(export_lib, "convert", side_effect=RuntimeError("converter")):
      with self.assertRaises(RuntimeError):
        modes.export(self.config, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "model_int8.tflite")))
    self.assertFalse(os.path.exists(os.path.join(workdir, "export_report.json")))

  def test_predict_refuses_labels_that_do_not_match_the_outputs(self):
    workdir = self.copy_of(self.run_a)
    with open(os.path.join(workdir, "labels.txt"), "w", encoding="utf-8") as f:
      f.write("only\ntwo\n")
    config = dataclasses.replace(self.config, predict=config_lib.PredictConfig(
        images=(os.path.join(self.image_dir, "class_00"),)))
    with self.assertRaisesRegex(UserError, "3 outputs but its labels name 2 classes"):
      modes.predict(config, workdir)

  def test_the_model_folder_under_another_spelling_is_the_same_folder(self):
    workdir = self.copy_of(self.run_a)
    alias = os.path.join(self.create_tempdir().full_path, "alias")
    os.symlink(workdir, alias)
    config = dataclasses.replace(self.config, predict=config_lib.PredictConfig(
        model=os.path.join(alias, "model.keras")))
    report = modes.evaluate(config, workdir)  # No SameFileError, no refusal.
    self.assertIn("test_accuracy", report)

  def test_damaged_json_is_a_one_line_error(self):
    workdir = self.copy_of(self.run_a)
    with open(os.path.join(workdir, "run.json"), "w", encoding="utf-8") as f:
      f.write('{"mode": "tr')
    with self.assertRaisesRegex(UserError, r"run\.json is damaged.*--overwrite"):
      modes.train(self.config, workdir)

  def test_exporting_a_keras_model_flowers_did_not_make_is_refused(self):
    import keras  # pylint: disable=g-import-not-at-top

    folder = self.copy_of(self.run_a)
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs).save(os.path.join(folder, "model.keras"))
    with self.assertRaisesRegex(UserError, "not one flowers made"):
      modes.export(self.config, folder)


class TemporariesTest(absltest.TestCase):

  def test_orphaned_temporaries_of_dead_processes_are_removed(self):
    workdir = self.create_tempdir().full_path
    with artifacts.atomic_path(os.path.join(workdir, "x.json")) as live:
      with open(live, "w", encoding="utf-8") as f:
        f.write("{}")
      prefix = os.path.basename(live).split("-")
      dead = os.path.join(workdir, "-".join(prefix[:2] + ["999999999"] + prefix[3:]))
      with open(dead, "w", encoding="utf-8") as f:
        f.write("half a file")
      os.makedirs(os.path.join(workdir, "cache"))
      older = os.path.join(workdir, "cache", ".tmp-abc123-prefix_train.npy")
      with open(older, "w", encoding="utf-8") as f:
        f.write("left by an older flowers")
      self.assertEqual(artifacts.remove_orphaned_temporaries(workdir), 2)
      self.assertTrue(os.path.exists(live))  # This process is alive: its file stays.
    self.assertFalse(os.path.exists(dead) or os.path.exists(older))


class WorkdirFlagTest(absltest.TestCase):

  def test_a_workdir_that_is_a_file_is_a_one_line_error(self):
    from flowers import cli  # pylint: disable=g-import-not-at-top

    path = self.create_tempfile().full_path
    with self.assertRaisesRegex(UserError, "is a file"):
      cli.check_inputs("train", config_lib.RunConfig(), path)


if __name__ == "__main__":
  absltest.main()
