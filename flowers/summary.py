"""`summary.md`: a run's results in one readable page, and the report that writes it.

`write_report` is the whole of `--mode=report` (and the end of every run with
plots on): it reads what a run left in its workdir (report.json and, when
present, history.json, splits.csv, labels.txt, export_report.json, trials.csv,
best_hparams.json), draws every figure those allow through `flowers.plots`, and
writes `summary_markdown`'s text beside them. It needs no TensorFlow, data or
model, so a report can be redrawn anywhere the workdir is; the same artifacts
always give the same summary.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from flowers import artifacts
from flowers import lineage
from flowers import plots as plots_lib
from flowers import split as split_lib
from flowers.errors import UserError

NO_COMMAND = "(not recorded)"
# export_report.json entries shown in summary.md, in order, with their labels.
EXPORT_ROWS = (
    ("quantization", "Quantization"),
    ("io_dtype", "Input/output type"),
    ("float_test_accuracy", "Keras model test accuracy"),
    ("tflite_test_accuracy", "TFLite model test accuracy"),
    ("accuracy_drop_points", "Accuracy drop (points)"),
    ("max_accuracy_drop", "Allowed drop (points)"),
    ("passed", "Passed"),
    ("top1_agreement", "Top-1 agreement"),
    ("max_abs_probability_diff", "Largest probability difference"),
    ("size_bytes", "TFLite size"),
    ("keras_size_bytes", "Keras size"),
    ("calibration_examples", "Calibration images"),
    ("path", "File"),
)


# Tables and cells.


def _cell(value: Any) -> str:
  return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           align: Sequence[str] | None = None) -> str:
  align = align or ["l"] * len(header)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def _fmt(value: Any) -> str:
  """A table cell: 4 decimals for metrics, 3 significant digits for tiny values."""
  if isinstance(value, float) and math.isfinite(value):
    if value != 0 and abs(value) < 1e-3:
      return f"{value:.3g}"
    if abs(value) >= 1000:
      return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
    return f"{value:.4f}"
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
    return f"{value:,}"
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return str(value)


def _trial_cell(column: str, value: Any) -> str:
  """A trials.csv cell: ids as written, accuracy to 4 places, seconds whole."""
  if not plots_lib.is_number(value) or column == "trial_id":
    return "" if value is None else _fmt(value)
  if column.endswith("accuracy"):
    return f"{value:.4f}"
  if column == "seconds":
    return f"{value:.0f}"
  if "learning_rate" in column:
    return f"{value:.2e}"
  return f"{value:.3g}"


# summary.md.


_COMMAND_RE = re.compile(r"^## Command\n\n```sh\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def previous_command(workdir: str) -> str | None:
  """The command recorded in an earlier summary.md, else rebuilt from flags.cfg."""
  summary = os.path.join(workdir, artifacts.SUMMARY)
  if os.path.exists(summary):
    with open(summary, encoding="utf-8") as f:
      match = _COMMAND_RE.search(f.read())
    if match and match.group(1) != NO_COMMAND:
      return match.group(1)
  flags_path = os.path.join(workdir, artifacts.FLAGS)
  if os.path.exists(flags_path):
    with open(flags_path, encoding="utf-8") as f:
      flags = [line.strip() for line in f if line.strip()]
    return "flowers_main " + " ".join(flags)
  return None


def _image(title: str, name: str) -> str:
  return f"![{title}]({artifacts.PLOTS_DIR}/{name})"


def summary_markdown(workdir: str, report: Mapping[str, Any], *,
                     command: str | None = None,
                     split_summary: Mapping[str, split_lib.SplitSummary] | None = None,
                     plots: Mapping[str, str] | None = None,
                     history_found: bool = True,
                     export_report: Mapping[str, Any] | None = None,
                     trials: Sequence[Mapping[str, Any]] | None = None,
                     best_hparams: Any = None,
                     dropped: Sequence[tuple[str, str]] = ()) -> str:
  """The text of summary.md; `plots` maps picture names to their file names.

  `dropped` lists the workdir's files left out, with why (`flowers.lineage`).
  """
  plots = plots or {}
  class_names = list(report.get("class_names") or [])
  out = [f"# flowers run: {os.path.basename(os.path.abspath(workdir))}", ""]
  out += ["## Command", "", "```sh", command or NO_COMMAND, "```", ""]

  out += ["## Data", ""]
  facts = [f"{k}: {_fmt(report[k])}" for k in ("source", "split", "seed")
           if report.get(k) is not None]
  if facts:
    out += ["; ".join(facts) + ".", ""]
  if split_summary:
    total = sum(s.images for s in split_summary.values()) or 1
    out += [_table(
        ("split", "images", "share", "classes", "smallest class", "largest class"),
        [(name, s.images, f"{s.images / total:.1%}", s.classes, s.smallest_class,
          s.largest_class) for name, s in split_summary.items()],
        ("l", "r", "r", "r", "r", "r")), ""]
  else:
    out += [f"{artifacts.SPLITS} not found: no split sizes.", ""]
  if "class_distribution" in plots:
    out += [_image("class distribution", plots["class_distribution"]), ""]
  if "augmented_samples" in plots:
    out += ["Augmented training samples:", "",
            _image("augmented samples", plots["augmented_samples"]), ""]

  out += ["## Results", ""]
  rows = []
  for key, label in (("test_accuracy", "Test accuracy"),
                     ("test_top5_accuracy", "Test top-5 accuracy"),
                     ("test_macro_f1", "Test macro F1"),
                     ("num_test_examples", "Test images"),
                     ("val_accuracy", "Val accuracy"),
                     ("val_top5_accuracy", "Val top-5 accuracy"),
                     ("val_macro_f1", "Val macro F1"),
                     ("num_val_examples", "Val images"),
                     ("num_train_examples", "Train images"),
                     ("train_seconds", "Train seconds")):
    if report.get(key) is not None:
      rows.append((label, _fmt(report[key])))
  out += [_table(("metric", "value"), rows, ("l", "r")), ""]

  if export_report:
    out += ["## Export", ""]
    rows = []
    for key, label in EXPORT_ROWS:
      value = export_report.get(key)
      if value is None:
        continue
      if key.endswith("size_bytes") and plots_lib.is_number(value):
        rows.append((label, f"{value / 2**20:.2f} MiB ({int(value):,} bytes)"))
      else:
        rows.append((label, _fmt(value)))
    out += [_table(("", "value"), rows, ("l", "r")), ""]

  if trials:
    out += ["## Tuning", ""]
    columns = [c for c in trials[0] if any(t.get(c) not in (None, "") for t in trials)]
    numeric = {c for c in columns
               if c != "trial_id" and any(plots_lib.is_number(t.get(c)) for t in trials)}
    out += [_table(columns, [[_trial_cell(c, t.get(c)) for c in columns]
                             for t in plots_lib.sort_trials(trials)],
                   ["r" if c in numeric else "l" for c in columns]), ""]
    if best_hparams:
      if isinstance(best_hparams, Mapping):
        out += ["Best hyperparameters: " + ", ".join(
            f"{k}={_trial_cell(k, v)}" for k, v in sorted(best_hparams.items())) + ".", ""]
      else:
        out += [f"Best hyperparameters: {_fmt(best_hparams)}.", ""]
    if "tuning" in plots:
      out += [_image("tuning", plots["tuning"]), ""]

  out += ["## Training history", ""]
  if "history" in plots:
    out += [_image("history", plots["history"]), ""]
  elif history_found:
    out += [f"{artifacts.HISTORY} holds no epochs: no training curves.", ""]
  else:
    out += [f"{artifacts.HISTORY} not found (--mode=train and --mode=tune write it): "
            "no training curves.", ""]

  cm = report.get("confusion_matrix")
  if cm and class_names:
    m = np.asarray(cm, np.int64)
    support = m.sum(axis=1)
    out += ["## Confusion", ""]
    if "confusion" in plots:
      out += [_image("confusion matrix", plots["confusion"]), ""]
    pairs = plots_lib.most_confused(m, class_names, plots_lib.TOP_CONFUSED)
    out += [f"The {len(pairs)} most confused pairs (test images of the true class "
            "predicted as the other):", ""]
    out += [_table(("#", "true class", "predicted as", "images", "share of true class"),
                   [(r, f"{p.true_index}: {p.true_name}",
                     f"{p.predicted_index}: {p.predicted_name}", p.count,
                     f"{p.count / max(int(support[p.true_index]), 1):.0%}")
                    for r, p in enumerate(pairs, 1)],
                   ("r", "l", "l", "r", "r")) if pairs else "No errors.", ""]

  per_class = report.get("per_class_accuracy") or {}
  if per_class:
    index = {n: i for i, n in enumerate(class_names)}
    m = np.asarray(cm, np.int64) if cm else None
    out += ["## Worst classes", ""]
    if "per_class_accuracy" in plots:
      out += [_image("per-class accuracy", plots["per_class_accuracy"]), ""]
    rows = []
    worst = plots_lib.worst_classes(per_class, plots_lib.WORST_CLASSES)
    for rank, (name, acc) in enumerate(worst, 1):
      i = index.get(name)
      images, mistaken = "", ""
      if m is not None and i is not None:
        images = int(m[i].sum())
        row = m[i].copy()
        row[i] = 0
        if row.any():
          j = int(row.argmax())
          mistaken = f"{j}: {class_names[j]} ({int(row[j])})"
      rows.append((rank, f"{i}: {name}" if i is not None else name, f"{acc:.3f}",
                   images, mistaken))
    out += [_table(("#", "class", "accuracy", "test images", "most often predicted as"),
                   rows, ("r", "l", "r", "r", "l")), ""]

  if dropped:
    out += ["## Left out", "",
            "These files are in the folder but were not made from this run and model, so "
            "nothing above comes from them:", ""]
    out += [f"- `{name}`: {why}." for name, why in dropped] + [""]

  config = report.get("config")
  if isinstance(config, Mapping) and config:
    out += ["## Configuration", "",
            _table(("setting", "value"), [(k, _fmt(v)) for k, v in sorted(config.items())]),
            ""]
  return "\n".join(out).rstrip("\n") + "\n"


# The whole report.


def write_report(workdir: str, command: str | None = None) -> str:
  """Draws every plot the workdir's artifacts allow and writes summary.md.

  Needs report.json (from --mode=train, tune or evaluate); the rest is used
  when present. An existing augmented_samples.png (drawn by training, from
  the images) is kept and linked. Returns the path of summary.md.

  Args:
    workdir: the run's folder; plots go to its plots/ folder.
    command: the command line to record; None keeps the one an earlier
      summary.md recorded, else rebuilds it from flags.cfg.
  """
  checked = os.path.exists(os.path.join(workdir, artifacts.LINEAGE))
  model = lineage.workdir_model(workdir)
  dropped: list[tuple[str, str]] = []

  def usable(name: str, describes_model: bool = True) -> bool:
    """Whether `name` is there and this run's (and this model's); notes a drop."""
    if not os.path.exists(os.path.join(workdir, name)):
      return False
    if not checked:  # A workdir of an older flowers: nothing to check against.
      return True
    why = lineage.check(workdir, name, model=model if describes_model else None)
    if why is not None:
      dropped.append((name, why))
      print(f"flowers_main: warning: {os.path.join(workdir, name)} left out of the "
            f"summary: {why}.", file=sys.stderr)
    return why is None

  evaluations = sorted((n for n in os.listdir(workdir) if n.startswith("evaluation_")
                        and n.endswith(".json")) if os.path.isdir(workdir) else [],
                       key=lambda n: (n != artifacts.evaluation_report(artifacts.MODEL), n))
  found = next((n for n in [artifacts.REPORT] + evaluations if usable(n)), None)
  if found is None:
    why = f" ({dropped[0][1]})" if dropped else ""
    raise UserError(f"{os.path.join(workdir, artifacts.REPORT)} not found{why} (run "
                    "--mode=train, --mode=tune or --mode=evaluate first).")
  report = artifacts.read_json(os.path.join(workdir, found))
  plots_dir = os.path.join(workdir, artifacts.PLOTS_DIR)
  os.makedirs(plots_dir, exist_ok=True)
  plots: dict[str, str] = {}

  def made(name: str, file_name: str, path: str | None) -> None:
    if path:
      plots[name] = file_name

  def plot_path(file_name: str) -> str:
    return os.path.join(plots_dir, file_name)

  class_names = list(report.get("class_names") or [])
  labels_path = os.path.join(workdir, artifacts.LABELS)
  if not class_names and os.path.exists(labels_path):
    class_names = artifacts.read_labels(labels_path)
  report = {**report, "class_names": class_names}

  history_path = os.path.join(workdir, artifacts.HISTORY)
  history_found = usable(artifacts.HISTORY)
  if history_found:
    made("history", artifacts.HISTORY_PNG, plots_lib.plot_history(
        artifacts.read_json(history_path), plot_path(artifacts.HISTORY_PNG)))

  split_summary = None
  manifest = os.path.join(workdir, artifacts.SPLITS)
  if os.path.exists(manifest):
    assignment, labels = split_lib.read_manifest(manifest)
    num_classes = max(len(class_names), max(labels.values(), default=-1) + 1)
    split_summary = split_lib.summarize(assignment, labels, num_classes)
    if num_classes:
      made("class_distribution", artifacts.DISTRIBUTION_PNG, plots_lib.plot_class_distribution(
          plots_lib.class_counts(assignment, labels, num_classes),
          plot_path(artifacts.DISTRIBUTION_PNG)))

  if os.path.exists(plot_path(artifacts.AUGMENTED_PNG)):
    plots["augmented_samples"] = artifacts.AUGMENTED_PNG

  cm = report.get("confusion_matrix")
  if cm and class_names:
    made("confusion", artifacts.CONFUSION_PNG, plots_lib.plot_confusion(
        cm, class_names, plot_path(artifacts.CONFUSION_PNG)))
  per_class = report.get("per_class_accuracy") or {}
  if per_class:
    support = None
    if cm and class_names:
      rows = np.asarray(cm, np.int64).sum(axis=1)
      support = {n: int(rows[i]) for i, n in enumerate(class_names)}
    made("per_class_accuracy", artifacts.PER_CLASS_PNG, plots_lib.plot_per_class_accuracy(
        per_class, plot_path(artifacts.PER_CLASS_PNG), support=support,
        overall=report.get("test_accuracy"), class_names=class_names))

  export_path = os.path.join(workdir, artifacts.EXPORT_REPORT)
  export_report = artifacts.read_json(export_path) if usable(artifacts.EXPORT_REPORT) else None

  trials = None
  trials_path = os.path.join(workdir, artifacts.TRIALS)
  if usable(artifacts.TRIALS, describes_model=False):
    trials = plots_lib.read_trials(trials_path)
    made("tuning", artifacts.TUNING_PNG,
         plots_lib.plot_tuning(trials, plot_path(artifacts.TUNING_PNG)))
  best_path = os.path.join(workdir, artifacts.BEST_HPARAMS)
  best_hparams = (artifacts.read_json(best_path)
                  if usable(artifacts.BEST_HPARAMS, describes_model=False) else None)

  text = summary_markdown(
      workdir, report, command=command or previous_command(workdir),
      split_summary=split_summary, plots=plots, history_found=history_found,
      export_report=export_report, trials=trials, best_hparams=best_hparams,
      dropped=dropped)
  path = os.path.join(workdir, artifacts.SUMMARY)
  artifacts.write_text(path, text)
  if checked:
    lineage.record(workdir, [artifacts.SUMMARY] + [
        os.path.join(artifacts.PLOTS_DIR, f) for f in sorted(set(plots.values()))
        if os.path.exists(os.path.join(plots_dir, f))], mode="report", model=model)
  return path
