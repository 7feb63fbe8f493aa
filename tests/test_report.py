"""Tests for flowers.report: plots and summary.md from synthetic artifacts."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
import pytest

from flowers import report
from flowers.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_PLOTS = ("history.png", "class_distribution.png", "confusion_matrix.png",
               "per_class_accuracy.png", "tuning.png")


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
  path = report.write_report(workdir, command=COMMAND)
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
  report.write_report(workdir)
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
  text = open(report.write_report(workdir), encoding="utf-8").read()
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
    report.write_report(workdir)


def test_confusion_plot_with_102_classes(tmp_path):
  names = class_names(102)
  cm = confusion(102, 10, seed=1)
  path = report.plot_confusion(cm, names, str(tmp_path / "cm.png"))
  width, height = check_png(path, min_side=600)
  assert width > height


def test_most_confused_on_hand_made_matrix():
  cm = [[5, 3, 0, 1],
        [0, 7, 4, 0],
        [2, 0, 6, 3],
        [0, 9, 0, 1]]
  names = ["a", "b", "c", "d"]
  pairs = report.most_confused(cm, names, k=4)
  assert [(p.true_name, p.predicted_name, p.count) for p in pairs] == [
      ("d", "b", 9), ("b", "c", 4), ("a", "b", 3), ("c", "d", 3)]
  assert (pairs[0].true_index, pairs[0].predicted_index) == (3, 1)
  # Zero cells and the diagonal never appear, so fewer than k may come back.
  assert len(report.most_confused(cm, names, k=100)) == 6
  assert report.most_confused(np.eye(3, dtype=int) * 4, ["x", "y", "z"]) == []


def test_worst_classes_and_concat_history():
  assert report.worst_classes({"a": 0.9, "b": 0.5, "c": 0.5, "d": 1.0}, k=3) == [
      ("b", 0.5), ("c", 0.5), ("a", 0.9)]
  metrics, n1 = report.concat_history(
      {"stage1": {"loss": [3.0, 2.0], "val_loss": [3.5, 2.5]}, "stage2": {"loss": [1.0]}})
  assert n1 == 2
  np.testing.assert_allclose(metrics["loss"], [3.0, 2.0, 1.0])
  assert np.isnan(metrics["val_loss"][2])


def test_plot_history_with_empty_stage2(tmp_path):
  path = report.plot_history({"stage1": {"accuracy": [0.2, 0.4], "loss": [2.0, 1.5]},
                              "stage2": {}}, str(tmp_path / "h.png"))
  check_png(path)
  assert report.plot_history({"stage1": {}, "stage2": {}}, str(tmp_path / "none.png")) is None


def test_write_augmented_samples_on_mock_data(tmp_path):
  import fake_data  # pylint: disable=g-import-not-at-top
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers import train as train_lib  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  config = train_lib.TrainConfig(image_size=32, seed=3,
                                 augmentation=model_lib.Augmentation(rotation_degrees=30))
  with fake_data.mock_flowers(fake_data.uniform_counts(4, 4, 2, 2), size=40):
    source = data_lib.load_tfds()
    data_lib.load_splits(source, workdir=workdir, split="64,16,20", seed=config.seed,
                         image_size=32)  # Writes splits.csv, as training does.
    path = report.write_augmented_samples(workdir, source, config, count=8, columns=4)
    assert path == os.path.join(workdir, "plots", "augmented_samples.png")
    check_png(path)
    first = open(path, "rb").read()
    report.write_augmented_samples(workdir, source, config, count=8, columns=4)
    assert open(path, "rb").read() == first  # Seeded: the same picture again.
  assert report.write_augmented_samples(
      workdir, source, train_lib.TrainConfig(augment=False)) is None


def test_sample_keys_spreads_over_classes():
  keys = [f"k{i:02d}" for i in range(12)]
  label_of = {k: i % 4 for i, k in enumerate(keys)}
  chosen = report.sample_keys(keys, label_of, 6, seed=0)
  assert len(chosen) == len(set(chosen)) == 6
  assert {label_of[k] for k in chosen} == {0, 1, 2, 3}
  assert chosen == report.sample_keys(list(reversed(keys)), label_of, 6, seed=0)
