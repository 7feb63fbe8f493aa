"""What each `--mode` does, in terms of the library; `main.py` only calls these.

Every mode takes the run's `RunConfig` and its workdir, and reads and writes
inside the workdir: `prepare` writes splits.csv; `train` and `tune` write
model.keras, labels.txt, report.json and the rest; `evaluate` writes
evaluation_<model>.json; `export` writes model_int8.tflite and its export
report; `report` redraws plots and summary.md from what is already there.
Each records what it wrote in lineage.json (`flowers.lineage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

from flowers import artifacts
from flowers import data as data_lib
from flowers import runs
from flowers import schemas
from flowers import split as split_lib
from flowers.config import OutputFormat
from flowers.config import RunConfig
from flowers.errors import UserError


def prepare(config: RunConfig, workdir: str) -> dict:
  """Writes `splits.csv` and prints a per-split summary. Decodes no image."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  data = config.data
  source = data_lib.load_source(data)
  spec = split_lib.parse_split(data.split, data.split_seed)
  assignment = data_lib.prepare_split(source, workdir, spec)
  summary = split_lib.summarize(assignment, source.label_of(), source.num_classes)
  print(f"{source.name}: {len(assignment)} images, {source.num_classes} classes, "
        f"split {data.split} (split seed {data.split_seed}) -> "
        f"{os.path.join(workdir, artifacts.SPLITS)}")
  print(f"{'split':<6} {'images':>7} {'classes':>8} {'smallest':>9} {'largest':>8}")
  for name, s in summary.items():
    print(f"{name:<6} {s.images:>7} {s.classes:>8} {s.smallest_class:>9} {s.largest_class:>8}")
  print(f"({time.time() - start:.1f} s)")
  return {name: s.__dict__ for name, s in summary.items()}


def _write_plots(workdir: str, enabled: bool) -> None:
  if not enabled:
    return
  from flowers import summary  # pylint: disable=g-import-not-at-top

  try:
    path = summary.write_report(workdir, command=" ".join(sys.argv))
  except Exception as e:  # pylint: disable=broad-except
    # The run's model and numbers are already saved; a plotting failure must not
    # turn it into an error. `--mode=report` retries.
    print(f"flowers_main: warning: the report failed ({type(e).__name__}: {e}); "
          f"run --mode=report --workdir={workdir} to retry.", file=sys.stderr)
    return
  print(f"Report: {path}")


def _print_finished(report: schemas.Report, workdir: str) -> None:
  print(f"{workdir} already holds this run, finished: test_accuracy="
        f"{report['test_accuracy']:.4f} val_accuracy={report.get('val_accuracy', float('nan')):.4f}"
        f" ({report['num_test_examples']} test images) -> "
        f"{os.path.join(workdir, artifacts.MODEL)}; nothing was changed (--overwrite starts "
        "afresh).")


def train(config: RunConfig, workdir: str) -> dict:
  """Two-stage training, test evaluation and artifacts (see `train.py`)."""
  from flowers import train as train_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_source(config.data)
  report = train_lib.train_and_evaluate(config, workdir, source)
  if not report.get("is_chief", True):
    return report
  if report.get("already_finished"):
    _print_finished(report, workdir)
    return report
  print(f"test_accuracy={report['test_accuracy']:.4f} "
        f"test_top5_accuracy={report['test_top5_accuracy']:.4f} "
        f"({report['num_test_examples']} test images, {report['train_seconds']:.0f} s) "
        f"-> {os.path.join(workdir, artifacts.MODEL)}")
  if config.plots:
    from flowers import plots  # pylint: disable=g-import-not-at-top

    plots.write_augmented_samples(workdir, source, config)
  _write_plots(workdir, config.plots)
  return report


def evaluate(config: RunConfig, workdir: str) -> schemas.EvaluationReport:
  """Test metrics of a .keras or .tflite model into `WORKDIR/evaluation_<model>.json`.

  The model is scored on its own run's test split (`runs.model_data`); the
  training report.json is never touched. Results of another run's model are
  written only into that run's folder or a fresh one.
  """
  from flowers import calibrate as calibrate_lib  # pylint: disable=g-import-not-at-top
  from flowers import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flowers import lineage  # pylint: disable=g-import-not-at-top
  from flowers import open_set  # pylint: disable=g-import-not-at-top

  path = config.predict.model_path(workdir)
  predictor, image_size = evaluate_lib.load_predictor(path)
  class_names = evaluate_lib.model_class_names(path)
  evaluate_lib.check_labels(path, class_names, predictor.num_outputs)
  data = dataclasses.replace(runs.model_data(path, workdir, config.data),
                             image_size=image_size)
  splits = data_lib.load_splits(data, workdir=workdir)
  if len(class_names) != len(splits.class_names):
    raise UserError(f"{path} has {len(class_names)} classes but the data has "
                    f"{len(splits.class_names)}; evaluate on the data it was trained on.")
  probs, labels = evaluate_lib.predict_dataset(predictor, splits.test)
  report = evaluate_lib.metrics(probs, labels, class_names)
  # How far its scores are from probabilities: as report.json's "calibration" says.
  report["test_nll"] = calibrate_lib.nll(probs, labels)
  report["test_ece"] = calibrate_lib.expected_calibration_error(probs, labels)
  # The model's own "unknown" threshold (a .tflite's from its metadata, as MediaPipe
  # applies it), and the share of known test images it accepts.
  threshold = open_set.model_threshold(path)
  if threshold is not None:
    report["unknown_threshold"] = threshold
    report["test_accepted"] = open_set.accepted(open_set.max_probability(probs), threshold)
  report["num_skipped_images"] = {"test": evaluate_lib.count_skipped(
      "test", len(splits.keys("test")), len(labels), data.strict)}
  listed = getattr(splits.source, "skipped", None)
  if listed:
    report["num_skipped_images"]["listing"] = len(listed)
  model_sha = lineage.model_sha256(path)
  report.update({"model": os.path.abspath(path), "source": splits.source.name,
                 "split": data.split, "split_seed": data.split_seed})
  name = artifacts.evaluation_report(path)
  out = os.path.join(workdir, name)
  artifacts.write_json(out, report)
  model_dir = os.path.dirname(os.path.abspath(path))
  lineage.record(workdir, name, mode="evaluate", model=model_sha,
                 run=lineage.owner(model_dir) or f"model:{model_sha}")
  print(f"test_accuracy={report['test_accuracy']:.4f} "
        f"test_top5_accuracy={report['test_top5_accuracy']:.4f} "
        f"test_macro_f1={report['test_macro_f1']:.4f} test_ece={report['test_ece']:.4f} "
        + (f"test_accepted={report['test_accepted']:.4f} (unknown below "
           f"{report['unknown_threshold']:.6g}) " if threshold is not None else "")
        + f"({report['num_test_examples']} images) -> {out}")
  return report


def _image_files(paths: Sequence[str]) -> list[str]:
  """The files `--images` names: files as given, folders walked (hidden files left out).

  Whether a file is an image is decided by reading it, not by its extension.
  """
  files = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise UserError(f"--images: {path} does not exist.")
  if not files:
    raise UserError("--images names no image files; give files or folders of images.")
  return files


def predict(config: RunConfig, workdir: str) -> list[dict]:
  """Top-k labels per image, for a .keras or .tflite model; prints them.

  With the model's "unknown" threshold (`open_set.model_threshold`), an image
  whose top score is below it is marked unknown (its guesses still listed).
  """
  from flowers import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flowers import open_set  # pylint: disable=g-import-not-at-top

  options = config.predict
  path = config.predict.model_path(workdir)
  predictor, image_size = evaluate_lib.load_predictor(path)
  class_names = evaluate_lib.model_class_names(path)
  evaluate_lib.check_labels(path, class_names, predictor.num_outputs)
  threshold = open_set.model_threshold(path)
  results = []
  files = _image_files(options.images)
  for file in files:
    try:
      with open(file, "rb") as f:
        encoded = f.read()
    except OSError as e:
      print(f"flowers_main: warning: {file} cannot be read ({e.strerror or e}); skipped.",
            file=sys.stderr)
      continue
    image = data_lib.decode_with_pil(encoded)
    if image is None:
      print(f"flowers_main: warning: {file} is not a readable image; skipped.",
            file=sys.stderr)
      continue
    pixels = data_lib.resize(image, image_size).numpy()
    probs = predictor(pixels[None])
    top = evaluate_lib.top_k(probs, class_names, options.top_k)[0]
    results.append({"image": file, **_unknown(float(probs[0].max()), threshold),
                    "top_k": [{"label": l, "probability": round(p, 6)} for l, p in top]})
  if not results:
    raise UserError(f"None of the {len(files)} file(s) given by --images is a readable "
                    "image; give image files Pillow reads (JPEG, PNG, TIFF, WebP, ...).")
  if len(results) < len(files):
    print(f"flowers_main: warning: {len(files) - len(results)} of the {len(files)} files "
          "were skipped (named above).", file=sys.stderr)
  if options.output is OutputFormat.JSON:
    print(json.dumps(results, indent=2))
  else:
    for r in results:
      print(r["image"])
      if r.get("unknown"):
        print(f"  unknown: top score below the threshold {r['score_threshold']:.4f}; "
              "the guesses:")
      for rank, entry in enumerate(r["top_k"], 1):
        print(f"  {rank}. {entry['label']:<30} {entry['probability']:.4f}")
  return results


def _unknown(top_score: float, threshold: float | None) -> dict:
  """predict's verdict: unknown when the top score is below the model's threshold
  (as MediaPipe Tasks drop every class below it); {} for a model without one."""
  if threshold is None:
    return {}
  return {"unknown": top_score < threshold, "score_threshold": round(threshold, 6)}


def tune(config: RunConfig, workdir: str) -> dict:
  """KerasTuner search, best model evaluated, saved and exported (see `tune.py`)."""
  from flowers import lineage  # pylint: disable=g-import-not-at-top
  from flowers import tune as tune_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_source(config.data)
  report = tune_lib.run_search(config, workdir, source)
  if not report["is_chief"]:
    return report
  if report.get("already_finished"):
    _print_finished(report, workdir)
    return report
  lineage.record(workdir, [artifacts.TRIALS, artifacts.BEST_HPARAMS], mode="tune", model=None)
  if config.export.export_best:
    from flowers import export as export_lib  # pylint: disable=g-import-not-at-top

    export_lib.export_from_workdir(config, workdir, os.path.join(workdir, artifacts.MODEL),
                                   source)
  _write_plots(workdir, config.plots)
  return report


def export(config: RunConfig, workdir: str) -> schemas.ExportReport:
  """int8 (or other) TFLite export, verified on the test split (see `export.py`)."""
  from flowers import export as export_lib  # pylint: disable=g-import-not-at-top

  result = export_lib.export_from_workdir(config, workdir, config.predict.model_path(workdir))
  # summary.md is a run's page: a fresh folder holding only this export has none to update.
  if os.path.exists(os.path.join(workdir, artifacts.REPORT)):
    _write_plots(workdir, config.plots)
  return result


def report(config: RunConfig, workdir: str) -> str:
  """Redraws plots and summary.md from the workdir's saved JSON/CSV."""
  del config  # Everything comes from the workdir.
  from flowers import summary  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} does not exist; run --mode=train first.")
  path = summary.write_report(workdir, command=None)
  print(f"Report: {path}")
  return path


MODES = {"prepare": prepare, "train": train, "evaluate": evaluate, "predict": predict,
         "tune": tune, "export": export, "report": report}
"""`--mode` -> the function that runs it; each takes (RunConfig, workdir)."""
