"""What each `--mode` does, in terms of the library; `main.py` only calls these.

Every mode reads and writes inside its workdir: `prepare` writes splits.csv;
`train` and `tune` write model.keras, labels.txt, report.json and the rest;
`export` writes model_int8.tflite beside the model it converts; `report`
redraws plots and summary.md from what is already there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from flowers import data as data_lib
from flowers import split as split_lib
from flowers.errors import UserError


def prepare(source: data_lib.Source, workdir: str, split: str, seed: int) -> dict:
  """Writes `splits.csv` and prints a per-split summary. Decodes no image."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  spec = split_lib.parse_split(split, seed)
  assignment = data_lib.prepare_split(source, workdir, spec)
  summary = split_lib.summarize(assignment, source.label_of(), source.num_classes)
  print(f"{source.name}: {len(assignment)} images, {source.num_classes} classes, "
        f"split {split} (seed {seed}) -> {os.path.join(workdir, split_lib.MANIFEST_NAME)}")
  print(f"{'split':<6} {'images':>7} {'classes':>8} {'smallest':>9} {'largest':>8}")
  for name, s in summary.items():
    print(f"{name:<6} {s.images:>7} {s.classes:>8} {s.smallest_class:>9} {s.largest_class:>8}")
  print(f"({time.time() - start:.1f} s)")
  return {name: s.__dict__ for name, s in summary.items()}


def _splits_for_workdir(source: data_lib.Source, workdir: str, split: str, seed: int,
                        image_size: int, batch_size: int) -> data_lib.Splits:
  """The workdir's own split (its splits.csv) when present, else a fresh one."""
  return data_lib.load_splits(source, workdir=workdir, split=split, seed=seed,
                              image_size=image_size, batch_size=batch_size)


def _write_plots(workdir: str, enabled: bool) -> None:
  if not enabled:
    return
  from flowers import report  # pylint: disable=g-import-not-at-top

  try:
    path = report.write_report(workdir, command=" ".join(sys.argv))
  except Exception as e:  # pylint: disable=broad-except
    # The run's model and numbers are already saved; a plotting failure must not
    # turn it into an error. `--mode=report` retries.
    print(f"flowers_main: warning: the report failed ({type(e).__name__}: {e}); "
          f"run --mode=report --workdir={workdir} to retry.", file=sys.stderr)
    return
  print(f"Report: {path}")


def train(config, workdir: str, source: data_lib.Source, split: str, cache: str,
          plots: bool = True) -> dict:
  """Two-stage training, test evaluation and artifacts (see `train.py`)."""
  from flowers import train as train_lib  # pylint: disable=g-import-not-at-top

  report = train_lib.train_and_evaluate(config, workdir, source, split, cache)
  print(f"test_accuracy={report['test_accuracy']:.4f} "
        f"test_top5_accuracy={report['test_top5_accuracy']:.4f} "
        f"({report['num_test_examples']} test images, {report['train_seconds']:.0f} s) "
        f"-> {os.path.join(workdir, train_lib.MODEL_NAME)}")
  if plots:
    from flowers import report as report_lib  # pylint: disable=g-import-not-at-top

    report_lib.write_augmented_samples(workdir, source, config)
  _write_plots(workdir, plots)
  return report


def evaluate(model_path: str, workdir: str, source: data_lib.Source, split: str,
             seed: int, batch_size: int) -> dict:
  """Test metrics of a .keras or .tflite model into `WORKDIR/report.json`."""
  from flowers import artifacts  # pylint: disable=g-import-not-at-top
  from flowers import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flowers import train as train_lib  # pylint: disable=g-import-not-at-top

  predictor, image_size = evaluate_lib.load_predictor(model_path)
  splits = _splits_for_workdir(source, workdir, split, seed, image_size, batch_size)
  labels_path = os.path.join(os.path.dirname(os.path.abspath(model_path)),
                             train_lib.LABELS_NAME)
  class_names = train_lib.read_labels(labels_path) if os.path.exists(labels_path) \
      else splits.class_names
  if len(class_names) != len(splits.class_names):
    raise UserError(f"{model_path} has {len(class_names)} classes but the data has "
                    f"{len(splits.class_names)}; evaluate on the data it was trained on.")
  probs, labels = evaluate_lib.predict_dataset(predictor, splits.test)
  report = evaluate_lib.metrics(probs, labels, class_names)
  report.update({"model": os.path.abspath(model_path), "source": source.name,
                 "split": split, "seed": seed})
  out = os.path.join(workdir, train_lib.REPORT_NAME if model_path.endswith(".keras")
                     else "report_tflite.json")
  artifacts.write_json(out, report)
  print(f"test_accuracy={report['test_accuracy']:.4f} "
        f"test_top5_accuracy={report['test_top5_accuracy']:.4f} "
        f"test_macro_f1={report['test_macro_f1']:.4f} "
        f"({report['num_test_examples']} images) -> {out}")
  return report


def _image_files(paths: Sequence[str]) -> list[str]:
  files = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(data_lib.IMAGE_EXTENSIONS)]
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise UserError(f"--images: {path} does not exist.")
  if not files:
    raise UserError("--images names no image files; give files or folders of images.")
  return files


def predict(model_path: str, images: Sequence[str], top_k: int = 5,
            output: str = "table") -> list[dict]:
  """Top-k labels per image, for a .keras or .tflite model; prints them."""
  from flowers import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flowers import train as train_lib  # pylint: disable=g-import-not-at-top

  predictor, image_size = evaluate_lib.load_predictor(model_path)
  class_names = train_lib.read_labels(
      os.path.join(os.path.dirname(os.path.abspath(model_path)), train_lib.LABELS_NAME))
  results = []
  for path in _image_files(images):
    with open(path, "rb") as f:
      encoded = f.read()
    image = data_lib.decode_with_pil(encoded)
    if image is None:
      print(f"flowers_main: warning: {path} is not a readable image; skipped.",
            file=sys.stderr)
      continue
    pixels = data_lib.resize(image, image_size).numpy()
    probs = predictor(pixels[None])
    top = evaluate_lib.top_k(probs, class_names, top_k)[0]
    results.append({"image": path, "top_k": [{"label": l, "probability": round(p, 6)}
                                             for l, p in top]})
  if output == "json":
    print(json.dumps(results, indent=2))
  else:
    for r in results:
      best = r["top_k"]
      print(r["image"])
      for rank, entry in enumerate(best, 1):
        print(f"  {rank}. {entry['label']:<30} {entry['probability']:.4f}")
  return results


def tune(config, search, workdir: str, source: data_lib.Source, split: str, *,
         tuner: str, max_trials: int, executions_per_trial: int, overwrite: bool,
         distribution_strategy: str, export: bool, export_options, plots: bool) -> dict:
  """KerasTuner search, best model evaluated, saved and exported (see `tune.py`)."""
  from flowers import tune as tune_lib  # pylint: disable=g-import-not-at-top

  report = tune_lib.run_search(
      config, search, workdir, source, split, tuner=tuner, max_trials=max_trials,
      executions_per_trial=executions_per_trial, overwrite=overwrite,
      distribution_strategy=distribution_strategy)
  if report.get("is_chief", True) and export:
    from flowers import export as export_lib  # pylint: disable=g-import-not-at-top

    export_lib.export_from_workdir(os.path.join(workdir, "model.keras"), workdir, source,
                                   split, config.seed, export_options)
  if report.get("is_chief", True):
    _write_plots(workdir, plots)
  return report


def export(model_path: str, workdir: str, source: data_lib.Source, split: str,
           seed: int, options, plots: bool = True) -> dict:
  """int8 (or other) TFLite export, verified on the test split (see `export.py`)."""
  from flowers import export as export_lib  # pylint: disable=g-import-not-at-top

  result = export_lib.export_from_workdir(model_path, workdir, source, split, seed, options)
  _write_plots(workdir, plots)
  return result


def report(workdir: str) -> str:
  """Redraws plots and summary.md from the workdir's saved JSON/CSV."""
  from flowers import report as report_lib  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} does not exist; run --mode=train first.")
  path = report_lib.write_report(workdir, command=None)
  print(f"Report: {path}")
  return path
