"""Tests for flowers.summary: plots and summary.md from synthetic artifacts."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
import pytest

from flowers import summary
from flowers.errors import UserError
from test_plots import check_png, class_names, confusion

TRAIN_PLOTS = ("history.png", "class_distribution.png", "confusion_matrix.png",
               "per_class_accuracy.png", "tuning.png")


def write_workdir(workdir, num_classes: int = 5, history: bool = True,
                  trials: bool = True, export: bool = True) -> dict:
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
      "seed": 42,
      "num_train_examples": 123,
      "train_seconds": 61.5,
      "config": {"dropout": 0.2, "epochs": 3, "augmentation": {"flip": True}},
  }
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(result, f)
  if history:
    def stage(n, start):
      e = np.arange(n)
      return {"accuracy": list(start + 0.1 * e), "val_accuracy": list(start + 0.08 * e),
              "loss": list(2.0 - 0.3 * e), "val_loss": list(2.1 - 0.25 * e)}
    with open(os.path.join(workdir, "history.json"), "w") as f:
      json.dump({"stage1": stage(3, 0.3), "stage2": stage(2, 0.6)}, f)
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
                 "passed": True, "class_names": names, "input_shape": [1, 32, 32, 3]}, f)
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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished train run (with an augmented_samples.png) reported once."""
  workdir = str(tmp_path_factory.mktemp("report") / "run")
  result = write_workdir(workdir)
  os.makedirs(os.path.join(workdir, "plots"))
  Image.new("RGB", (400, 300), "white").save(
      os.path.join(workdir, "plots", "augmented_samples.png"))
  path = summary.write_report(workdir, command=COMMAND)
  return workdir, result, path, snapshot(workdir)


def test_write_report_makes_every_plot_and_summary(run_dir):
  workdir, result, path, _ = run_dir
  assert path == os.path.join(workdir, "summary.md")
  for name in TRAIN_PLOTS:
    check_png(os.path.join(workdir, "plots", name))
  text = open(path, encoding="utf-8").read()
  assert f"{result['test_accuracy']:.4f}" in text
  assert "0.9876" in text and "0.8123" in text and "0.8456" in text
  assert COMMAND in text
  for name in TRAIN_PLOTS + ("augmented_samples.png",):
    assert f"(plots/{name})" in text, name
  # Split sizes from splits.csv, export numbers, trials best first.
  assert "| train | 50 |" in text and "| test | 15 |" in text
  assert "0.9700" in text and "2.38 MiB" in text and "| Quantization | int8 |" in text
  assert "flower 4, " not in text  # export_report.json's class list is not dumped.
  tuning = text[text.index("## Tuning"):]
  assert tuning.index("| 01 |") < tuning.index("| 00 |") < tuning.index("| 02 |") \
      < tuning.index("| 03 |")
  # The 102-class test below covers the big matrix; here the pairs are listed.
  assert "most confused pairs" in text and "flower 0" in text


def test_write_report_is_idempotent(run_dir):
  workdir, _, _, first = run_dir
  # As --mode=report does: no command given, so the recorded one is kept; the
  # augmented samples (drawn from images by training) are left as they were.
  summary.write_report(workdir)
  second = snapshot(workdir)
  assert sorted(first) == sorted(second)
  assert first["summary.md"] == second["summary.md"]
  for name in first:
    assert first[name] == second[name], f"{name} differs between runs"
  assert not [n for n in os.listdir(os.path.join(workdir, "plots")) if n.startswith(".tmp")]


def test_evaluate_only_workdir(tmp_path):
  """No history, trials or export: those are skipped; the command is from flags.cfg."""
  workdir = str(tmp_path / "evaluated")
  write_workdir(workdir, history=False, trials=False, export=False)
  with open(os.path.join(workdir, "flags.cfg"), "w") as f:
    f.write("--mode=train\n--epochs=3\n")
  text = open(summary.write_report(workdir), encoding="utf-8").read()
  assert "flowers_main --mode=train --epochs=3" in text
  assert not os.path.exists(os.path.join(workdir, "plots", "history.png"))
  assert not os.path.exists(os.path.join(workdir, "plots", "tuning.png"))
  assert "history.json not found" in text
  assert "plots/history.png" not in text and "## Tuning" not in text
  assert "## Export" not in text and "augmented_samples" not in text
  check_png(os.path.join(workdir, "plots", "confusion_matrix.png"))


def test_missing_report_json_names_the_mode(tmp_path):
  workdir = str(tmp_path / "empty")
  os.makedirs(workdir)
  with pytest.raises(UserError, match=r"report\.json not found.*--mode=train"):
    summary.write_report(workdir)
