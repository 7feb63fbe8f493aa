"""Tests for flowers.summary: plots and summary.md from synthetic artifacts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from flowers import lineage
from flowers import summary
from flowers.errors import UserError
from test_plots import calibration, check_png, class_names, confusion

TRAIN_PLOTS = ("history.png", "class_distribution.png", "confusion_matrix.png",
               "per_class_accuracy.png", "tuning.png", "reliability.png")


def write_workdir(workdir, num_classes: int = 5, history: bool = True,
                  trials: bool = True, export: bool = True, calibrated: bool = True) -> dict:
  """Writes the artifacts of a finished run; returns its report."""
  os.makedirs(workdir, exist_ok=True)
  names = class_names(num_classes)
  with open(os.path.join(workdir, "labels.txt"), "w") as f:
    f.write("".join(n + "\n" for n in names))
  with open(os.path.join(workdir, "splits.csv"), "w") as f:
    f.write("file_name,label,split\n")
    serial = 0
    for label in range(num_classes):
      for split, count in (("train", 8 + label), ("val", 2), ("test", 3)):
        for _ in range(count):
          serial += 1
          f.write(f"image_{serial:05d}.jpg,{label},{split}\n")
  cm = confusion(num_classes, 10)
  recall = np.diag(cm) / cm.sum(axis=1)
  result = {
      "test_accuracy": float(np.trace(cm) / cm.sum()),
      "test_top5_accuracy": 0.9876,
      "test_macro_f1": 0.8123,
      "num_test_examples": int(cm.sum()),
      "per_class_accuracy": {n: float(r) for n, r in zip(names, recall)},
      "confusion_matrix": cm.tolist(),
      "class_names": names,
      "val_accuracy": 0.8456,
      "num_val_examples": 2 * num_classes,
      "source": "tfds:oxford_flowers102",
      "split": "64,16,20",
      "split_seed": 42,
      "seed": 42,
      "num_train_examples": 123,
      "train_seconds": 61.5,
      "config": {"dropout": 0.2, "epochs": 3, "augmentation": {"flip": True}},
  }
  if calibrated:
    result["calibration"] = calibration()
    result["unknown_threshold"] = {"score": 0.4321, "true_accept_rate": 0.95,
                                   "val_accepted": 0.95, "test_accepted": 0.9412}
    figures = {"threshold": 0.4, "val_auroc": 0.91, "val_false_accept": 0.3,
               "test_auroc": 0.9, "test_false_accept": 0.35, "test_true_accept": 0.94}
    result["open_set"] = {"held_out_classes": ["flower 8", "flower 9"],
                          "true_accept_rate": 0.95, "num_val_unknown": 4,
                          "num_test_unknown": 20, "chosen_score": "energy",
                          "scores": {"max_probability": figures,
                                     "energy": {**figures, "test_auroc": 0.95}}}
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(result, f)
  if history:
    def stage(n, start):
      e = np.arange(n)
      return {"accuracy": list(start + 0.1 * e), "val_accuracy": list(start + 0.08 * e),
              "loss": list(2.0 - 0.3 * e), "val_loss": list(2.1 - 0.25 * e)}
    with open(os.path.join(workdir, "history.json"), "w") as f:
      json.dump({"frozen": stage(3, 0.3), "fine_tune": stage(2, 0.6)}, f)
  if trials:
    with open(os.path.join(workdir, "trials.csv"), "w") as f:
      # As flowers.tune writes it (TRIAL_COLUMNS); the last trial failed.
      f.write("trial_id,dropout,unfreeze_ratio,fine_tune_learning_rate,val_accuracy,"
              "seconds,status,tuner_id\n"
              "00,0.1,0.2,1e-4,0.71,100.5,COMPLETED,\n"
              "01,0.3,0.1,3e-5,0.83,98.0,COMPLETED,\n"
              "02,0.4,0.4,5e-4,0.65,120.0,COMPLETED,\n"
              "03,0.2,0.3,2e-4,,,FAILED,\n")
  if export:
    with open(os.path.join(workdir, "export_report.json"), "w") as f:
      json.dump({"float_test_accuracy": 0.8, "int8_test_accuracy": 0.79,
                 "tflite_test_accuracy": 0.79, "top1_agreement": 0.97,
                 "size_bytes": 2_500_000, "quantization": "int8", "io_dtype": "uint8",
                 "accuracy_drop_points": 1.0, "path": "model_int8.tflite",
                 "passed": True, "class_names": names, "input_shape": [1, 32, 32, 3],
                 "float_test_nll": 0.6123, "tflite_test_nll": 0.6345,
                 "float_test_ece": 0.0312, "tflite_test_ece": 0.0356}, f)
  return result


def snapshot(workdir) -> dict[str, bytes]:
  """Every file report writes (summary.md and plots/), by relative path."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel == "summary.md" or rel.startswith("plots"):
        with open(path, "rb") as f:
          out[rel] = f.read()
  return out


COMMAND = "flowers_main --mode=train --workdir=run"


def headings(text: str) -> list[str]:
  """The page's title and section headings, in order."""
  return re.findall(r"^#{1,2} .*$", text, re.MULTILINE)


class WriteReportTest(absltest.TestCase):
  """A finished train run (with an augmented_samples.png) reported once."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, tmp, ignore_errors=True)
    cls.workdir = os.path.join(tmp, "run")
    cls.result = write_workdir(cls.workdir)
    os.makedirs(os.path.join(cls.workdir, "plots"))
    Image.new("RGB", (400, 300), "white").save(
        os.path.join(cls.workdir, "plots", "augmented_samples.png"))
    cls.path = summary.write_report(cls.workdir, command=COMMAND)
    cls.first = snapshot(cls.workdir)

  def test_write_report_makes_every_plot_and_summary(self):
    workdir, result, path = self.workdir, self.result, self.path
    self.assertEqual(path, os.path.join(workdir, "summary.md"))
    for name in TRAIN_PLOTS:
      check_png(os.path.join(workdir, "plots", name))
    text = open(path, encoding="utf-8").read()
    self.assertIn(f"{result['test_accuracy']:.4f}", text)
    for figure in ("0.9876", "0.8123", "0.8456"):
      self.assertIn(figure, text)
    self.assertIn(COMMAND, text)
    for name in TRAIN_PLOTS + ("augmented_samples.png",):
      self.assertIn(f"(plots/{name})", text, name)
    # Split sizes from splits.csv, export numbers, trials best first.
    for part in ("| train | 50 |", "| test | 15 |", "0.9700", "2.38 MiB",
                 "| Quantization | int8 |"):
      self.assertIn(part, text)
    self.assertNotIn("flower 4, ", text)  # export_report.json's class list is not dumped.
    tuning = text[text.index("## Tuning"):]
    self.assertTrue(tuning.index("| 01 |") < tuning.index("| 00 |") < tuning.index("| 02 |")
                    < tuning.index("| 03 |"))
    # The 102-class test below covers the big matrix; here the pairs are listed.
    self.assertIn("most confused pairs", text)
    self.assertIn("flower 0", text)

  def test_sections_come_in_order(self):
    text = open(self.path, encoding="utf-8").read()
    self.assertEqual(headings(text), [
        "# flowers run: run", "## Command", "## Data", "## Results", "## Export",
        "## Calibration", "## Unknown images", "## Tuning", "## Training history",
        "## Confusion", "## Worst classes", "## Smallest classes", "## Configuration"])
    self.assertIn("## Command\n\n```sh\n" + COMMAND + "\n```\n\n## Data\n\n"
                  "source: tfds:oxford_flowers102; split: 64,16,20; split_seed: 42; "
                  "seed: 42.\n\n", text)
    self.assertIn(f"| Test accuracy | {self.result['test_accuracy']:.4f} |\n"
                  "| Test top-5 accuracy | 0.9876 |", text)
    self.assertIn("| 1 | 0: flower 0 | 0.700 | 10 | 2: flower 2 (3) |", text)
    # splits.csv's train counts (8 + class index) beside the test recall.
    self.assertIn("| 0: flower 0 | 8 | 10 | 0.700 |\n| 1: flower 1 | 9 |", text)
    self.assertIn("| TFLite size | 2.38 MiB (2,500,000 bytes) |", text)
    self.assertIn("| setting | value |\n| --- | --- |\n"
                  '| augmentation | {"flip": true} |\n| dropout | 0.2000 |\n'
                  "| epochs | 3 |\n", text)
    self.assertTrue(text.endswith(" |\n") and not text.endswith("\n\n"))

  def test_unknown_images_shows_the_threshold_and_each_open_set_score(self):
    text = open(self.path, encoding="utf-8").read()
    section = text[text.index("## Unknown images"):text.index("## Tuning")]
    self.assertIn("An image whose top score is below 0.4321", section)
    self.assertIn("keeps 94.12% of test images", section)
    self.assertIn("Held out of training: flower 8, flower 9; their 20 test images are the "
                  "unknowns.", section)
    self.assertIn("val chose energy.", section)
    self.assertIn("| max_probability | 0.9100 | 0.9000 | 0.3500 | 0.9400 |\n"
                  "| energy | 0.9100 | 0.9500 | 0.3500 | 0.9400 |", section)

  def test_calibration_shows_the_temperature_before_after_and_the_export(self):
    text = open(self.path, encoding="utf-8").read()
    section = text[text.index("## Calibration"):text.index("## Unknown images")]
    c = self.result["calibration"]
    self.assertIn("Temperature 2.0000, fitted on val (NLL), folded into the classifier: "
                  "it lowers val NLL.", section)
    self.assertIn("| Val NLL | 1.5000 | 1.2000 |\n| Val ECE | 0.2100 | 0.0400 |\n"
                  f"| Test NLL | {c['test_nll_before']:.4f} | {c['test_nll_after']:.4f} |\n"
                  f"| Test ECE | {c['test_ece_before']:.4f} | {c['test_ece_after']:.4f} |",
                  section)
    self.assertIn("| Keras | 0.6123 | 0.0312 |\n| TFLite (int8) | 0.6345 | 0.0356 |", section)
    self.assertIn("![reliability](plots/reliability.png)", section)

  def test_write_report_is_idempotent(self):
    workdir, first = self.workdir, self.first
    # As --mode=report does: no command given, so the recorded one is kept; the
    # augmented samples (drawn from images by training) are left as they were.
    summary.write_report(workdir)
    second = snapshot(workdir)
    self.assertEqual(sorted(first), sorted(second))
    self.assertEqual(first["summary.md"], second["summary.md"])
    for name in first:
      self.assertEqual(first[name], second[name], f"{name} differs between runs")
    self.assertEmpty([n for n in os.listdir(os.path.join(workdir, "plots"))
                      if n.startswith(".tmp")])


class PartialWorkdirTest(absltest.TestCase):

  def test_evaluate_only_workdir(self):
    """No history, trials or export: those are skipped; the command is from flags.cfg."""
    workdir = os.path.join(self.create_tempdir(), "evaluated")
    write_workdir(workdir, history=False, trials=False, export=False, calibrated=False)
    with open(os.path.join(workdir, "flags.cfg"), "w") as f:
      f.write("--mode=train\n--epochs=3\n")
    text = open(summary.write_report(workdir), encoding="utf-8").read()
    self.assertIn("flowers_main --mode=train --epochs=3", text)
    self.assertFalse(os.path.exists(os.path.join(workdir, "plots", "history.png")))
    self.assertFalse(os.path.exists(os.path.join(workdir, "plots", "tuning.png")))
    self.assertIn("history.json not found", text)
    for absent in ("plots/history.png", "## Tuning", "## Export", "augmented_samples",
                   "## Calibration", "reliability.png"):
      self.assertNotIn(absent, text)
    check_png(os.path.join(workdir, "plots", "confusion_matrix.png"))

  def test_evaluate_only_sections(self):
    workdir = os.path.join(self.create_tempdir(), "evaluated")
    write_workdir(workdir, history=False, trials=False, export=False, calibrated=False)
    text = open(summary.write_report(workdir), encoding="utf-8").read()
    self.assertEqual(headings(text), [
        "# flowers run: evaluated", "## Command", "## Data", "## Results",
        "## Training history", "## Confusion", "## Worst classes", "## Smallest classes",
        "## Configuration"])
    self.assertIn("```sh\n(not recorded)\n```", text)

  def test_files_lineage_rejects_are_left_out_and_listed_in_order(self):
    """Unrecorded, changed and another run's files are left out, each with why."""
    workdir = os.path.join(self.create_tempdir(), "run")
    write_workdir(workdir)
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump({"seed": 42}, f)
    with open(os.path.join(workdir, "best_hparams.json"), "w") as f:
      json.dump({"dropout": 0.3}, f)
    lineage.record(workdir, ["report.json", "export_report.json", "trials.csv"],
                   mode="train", model=None)
    lineage.record(workdir, ["best_hparams.json"], mode="tune", model=None, run="another")
    with open(os.path.join(workdir, "trials.csv"), "a") as f:
      f.write("04,0.2,0.3,2e-4,0.5,1.0,COMPLETED,\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      text = open(summary.write_report(workdir), encoding="utf-8").read()
    self.assertEqual(headings(text), [
        "# flowers run: run", "## Command", "## Data", "## Results", "## Export",
        "## Calibration", "## Unknown images", "## Training history", "## Confusion",
        "## Worst classes", "## Smallest classes",
        "## Left out",
        "## Configuration"])
    self.assertIn(
        "## Left out\n\nThese files are in the folder but were not made from this run "
        "and model, so nothing above comes from them:\n\n"
        "- `history.json`: it has no lineage record (made by an older flowers, or copied "
        "in).\n"
        "- `trials.csv`: it changed after it was written.\n"
        "- `best_hparams.json`: it was made by another run in this folder.\n\n"
        "## Configuration", text)
    self.assertIn("history.json not found", text)
    self.assertEqual(len(err.getvalue().splitlines()), 3)
    self.assertIn("trials.csv left out of the summary", err.getvalue())
    recorded = lineage.recorded(workdir)
    self.assertIn("summary.md", recorded)
    self.assertIn(os.path.join("plots", "confusion_matrix.png"), recorded)
    self.assertNotIn(os.path.join("plots", "history.png"), recorded)

  def test_missing_report_json_names_the_mode(self):
    workdir = os.path.join(self.create_tempdir(), "empty")
    os.makedirs(workdir)
    with self.assertRaisesRegex(UserError, r"report\.json not found.*--mode=train"):
      summary.write_report(workdir)


class SummaryMarkdownTest(absltest.TestCase):

  def test_a_bare_report_gives_the_whole_page(self):
    text = summary.summary_markdown("/somewhere/run", {"test_accuracy": 0.5},
                                    history_found=False)
    self.assertEqual(text, (
        "# flowers run: run\n\n"
        "## Command\n\n```sh\n(not recorded)\n```\n\n"
        "## Data\n\nsplits.csv not found: no split sizes.\n\n"
        "## Results\n\n| metric | value |\n| --- | ---: |\n| Test accuracy | 0.5000 |\n\n"
        "## Training history\n\nhistory.json not found (--mode=train and --mode=tune "
        "write it): no training curves.\n"))

  def test_tuning_lists_best_hyperparameters_and_no_errors_has_no_pairs(self):
    text = summary.summary_markdown(
        "run", {"confusion_matrix": [[2, 0], [0, 1]], "class_names": ["a", "b"],
                "per_class_accuracy": {"a": 1.0, "b": 1.0}},
        trials=[{"trial_id": "00", "fine_tune_learning_rate": 3e-5, "val_accuracy": 0.5,
                 "seconds": 12.4, "note": ""}],
        best_hparams={"fine_tune_learning_rate": 3e-5, "dropout": 0.25})
    self.assertIn("| trial_id | fine_tune_learning_rate | val_accuracy | seconds |\n"
                  "| --- | ---: | ---: | ---: |\n| 00 | 3.00e-05 | 0.5000 | 12 |\n\n"
                  "Best hyperparameters: dropout=0.25, fine_tune_learning_rate=3.00e-05.\n",
                  text)
    self.assertIn("## Confusion\n\nThe 0 most confused pairs (test images of the true "
                  "class predicted as the other):\n\nNo errors.\n\n## Worst classes", text)
    self.assertIn("| 1 | 0: a | 1.000 | 2 |  |", text)

  def test_a_halving_search_draws_its_trials_by_the_epoch_each_reached(self):
    # plots/tuning.png takes successive halving's rungs from report.json's search work.
    report = {"search_work": {"trials": 6, "halving_schedule": [[6, 2], [3, 4], [2, 12]]}}
    self.assertEqual(summary._halving_rungs(report), [2, 4, 12])
    for other in ({"search_work": {"trials": 3}}, {}):  # Another search; a train run.
      self.assertIsNone(summary._halving_rungs(other))


  def test_smallest_classes_show_their_train_images_weight_and_test_recall(self):
    names = [f"c{i}" for i in range(7)]
    train_counts = dict(zip(names, (60, 6, 40, 9, 25, 12, 18)))
    report = {"class_names": names, "confusion_matrix": np.diag([4] * 7).tolist(),
              "per_class_accuracy": {n: 0.1 * i for i, n in enumerate(names)},
              "class_weights": {"c1": 3.5, "c3": 2.25}}
    text = summary.summary_markdown("run", report, train_counts=train_counts)
    section = text[text.index("## Smallest classes"):]
    self.assertIn("| class | train images | class weight | test images | test recall |\n"
                  "| --- | ---: | ---: | ---: | ---: |\n"
                  "| 1: c1 | 6 | 3.500 | 4 | 0.100 |\n"
                  "| 3: c3 | 9 | 2.250 | 4 | 0.300 |\n"
                  "| 5: c5 | 12 |  | 4 | 0.500 |\n"
                  "| 6: c6 | 18 |  | 4 | 0.600 |\n"
                  "| 4: c4 | 25 |  | 4 | 0.400 |\n", section)
    self.assertNotIn("c0", section)  # The two largest are left out.
    self.assertNotIn("c2", section)

  def test_equal_classes_have_no_smallest_classes(self):
    report = {"class_names": ["a", "b"], "per_class_accuracy": {"a": 1.0, "b": 0.5}}
    text = summary.summary_markdown("run", report, train_counts={"a": 5, "b": 5})
    self.assertNotIn("## Smallest classes", text)
    without_weights = summary.summary_markdown("run", report, train_counts={"a": 5, "b": 9})
    self.assertIn("| class | train images | test images | test recall |", without_weights)
    self.assertIn("| 1: b | 9 |  | 0.500 |", without_weights)


if __name__ == "__main__":
  absltest.main()
