"""`summary.md`: a run's results in one readable page, and the report that writes it.

`write_report` is the whole of `--mode=report` (and the end of every run with
plots on): it reads what a run left in its workdir (report.json and, when
present, history.json, splits.csv, labels.txt, export_report.json, trials.csv,
best_hparams.json), draws every figure those allow through `flowers.plots`, and
writes `summary_markdown`'s text beside them. It needs no TensorFlow, data or
model, so a report can be redrawn anywhere the workdir is; the same artifacts
always give the same summary.md.

The page is built one section at a time, one function each in the page's
order (`_data_section`, `_results_section`, ...), from the formatting helpers
at the top. `write_report` is four steps: collect the workdir's current files
(`flowers.lineage` decides; the rest are listed under "Left out"), draw the
figures, build the text, then write it and record it in lineage.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

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
    ("unknown_threshold", "Unknown threshold (TFLite metadata)"),
    ("tflite_test_accepted", "TFLite test images accepted"),
    ("path", "File"),
)


SMALLEST_CLASSES = 5  # Rows of the "Smallest classes" table.

RESULT_ROWS = (
    ("test_accuracy", "Test accuracy"),
    ("test_top5_accuracy", "Test top-5 accuracy"),
    ("test_macro_f1", "Test macro F1"),
    ("num_test_examples", "Test images"),
    ("val_accuracy", "Val accuracy"),
    ("val_top5_accuracy", "Val top-5 accuracy"),
    ("val_macro_f1", "Val macro F1"),
    ("num_val_examples", "Val images"),
    ("num_train_examples", "Train images"),
    ("train_seconds", "Train seconds"),
)


# Formatting: every cell, table, figure link and section heading of summary.md.


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


def _size(num_bytes: float) -> str:
  """A file size in MiB, with the exact bytes."""
  return f"{num_bytes / 2**20:.2f} MiB ({int(num_bytes):,} bytes)"


def _image(title: str, name: str) -> str:
  return f"![{title}]({artifacts.PLOTS_DIR}/{name})"


def _section(title: str, *paragraphs: str) -> list[str]:
  """A `## title` section: its heading, then its paragraphs."""
  return [f"## {title}", *paragraphs]


def _markdown(paragraphs: Iterable[str]) -> str:
  """Paragraphs with one blank line between them, ending in one newline."""
  return "\n\n".join(paragraphs).rstrip("\n") + "\n"


# The recorded command.


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


# summary.md, one function per section, in the page's order.


def summary_markdown(workdir: str, report: Mapping[str, Any], *,
                     command: str | None = None,
                     split_summary: Mapping[str, split_lib.SplitSummary] | None = None,
                     plots: Mapping[str, str] | None = None,
                     history_found: bool = True,
                     export_report: Mapping[str, Any] | None = None,
                     trials: Sequence[Mapping[str, Any]] | None = None,
                     best_hparams: Any = None,
                     dropped: Sequence[tuple[str, str]] = (),
                     train_counts: Mapping[str, int] | None = None) -> str:
  """The text of summary.md; `plots` maps picture names to their file names.

  `train_counts` (class name -> training images, from splits.csv) shows the
  smallest classes' test recall when the classes are unequal.

  `dropped` lists the workdir's files left out, with why (`flowers.lineage`).
  A section without its inputs is left out; Data and Training history say
  instead which file is missing.
  """
  plots = plots or {}
  sections = (
      _title(workdir),
      _command_section(command),
      _data_section(report, split_summary, plots),
      _results_section(report),
      _export_section(export_report),
      _calibration_section(report, export_report, plots),
      _unknowns_section(report, export_report),
      _tuning_section(trials, best_hparams, report.get("search_work"), plots),
      _history_section(plots, history_found),
      _confusion_section(report, plots),
      _worst_classes_section(report, plots),
      _smallest_classes_section(report, train_counts),
      _left_out_section(dropped),
      _configuration_section(report),
  )
  return _markdown(p for section in sections for p in section)


def _title(workdir: str) -> list[str]:
  return [f"# flowers run: {os.path.basename(os.path.abspath(workdir))}"]


def _command_section(command: str | None) -> list[str]:
  return _section("Command", f"```sh\n{command or NO_COMMAND}\n```")


def _data_section(report: Mapping[str, Any],
                  split_summary: Mapping[str, split_lib.SplitSummary] | None,
                  plots: Mapping[str, str]) -> list[str]:
  """Where the images came from, the split's sizes and the class distribution."""
  paragraphs = []
  facts = [f"{k}: {_fmt(report[k])}" for k in ("source", "split", "split_seed", "seed")
           if report.get(k) is not None]
  if facts:
    paragraphs.append("; ".join(facts) + ".")
  paragraphs.append(_split_table(split_summary) if split_summary
                    else f"{artifacts.SPLITS} not found: no split sizes.")
  if "class_distribution" in plots:
    paragraphs.append(_image("class distribution", plots["class_distribution"]))
  if "augmented_samples" in plots:
    paragraphs += ["Augmented training samples:",
                   _image("augmented samples", plots["augmented_samples"])]
  return _section("Data", *paragraphs)


def _split_table(split_summary: Mapping[str, split_lib.SplitSummary]) -> str:
  total = sum(s.images for s in split_summary.values()) or 1
  return _table(
      ("split", "images", "share", "classes", "smallest class", "largest class"),
      [(name, s.images, f"{s.images / total:.1%}", s.classes, s.smallest_class,
        s.largest_class) for name, s in split_summary.items()],
      ("l", "r", "r", "r", "r", "r"))


def _results_section(report: Mapping[str, Any]) -> list[str]:
  rows = [(label, _fmt(report[key])) for key, label in RESULT_ROWS
          if report.get(key) is not None]
  return _section("Results", _table(("metric", "value"), rows, ("l", "r")))


def _export_section(export_report: Mapping[str, Any] | None) -> list[str]:
  if not export_report:
    return []
  rows = [(label, _export_cell(key, export_report[key])) for key, label in EXPORT_ROWS
          if export_report.get(key) is not None]
  return _section("Export", _table(("", "value"), rows, ("l", "r")))


def _export_cell(key: str, value: Any) -> str:
  if key.endswith("size_bytes") and plots_lib.is_number(value):
    return _size(value)
  return _fmt(value)


def _calibration_section(report: Mapping[str, Any], export_report: Mapping[str, Any] | None,
                         plots: Mapping[str, str]) -> list[str]:
  """The temperature, NLL and ECE before and after it, the export's, the diagram."""
  calibration = report.get("calibration")
  if not isinstance(calibration, Mapping):
    return []
  paragraphs = [_calibration_line(calibration)]
  rows = [(f"{split.capitalize()} {name}", _fmt(calibration[f"{split}_{key}_before"]),
           _fmt(calibration[f"{split}_{key}_after"]))
          for split in ("val", "test") for key, name in (("nll", "NLL"), ("ece", "ECE"))
          if f"{split}_{key}_before" in calibration]
  if rows:
    paragraphs.append(_table(("", "before", "after"), rows, ("l", "r", "r")))
  if export_report and "tflite_test_ece" in export_report:
    paragraphs.append(_table(("shipped model", "test NLL", "test ECE"), [
        ("Keras", _fmt(export_report["float_test_nll"]), _fmt(export_report["float_test_ece"])),
        (f"TFLite ({export_report.get('quantization', '?')})",
         _fmt(export_report["tflite_test_nll"]), _fmt(export_report["tflite_test_ece"]))],
        ("l", "r", "r")))
  if "reliability" in plots:
    paragraphs.append(_image("reliability", plots["reliability"]))
  return _section("Calibration", *paragraphs)


def _calibration_line(calibration: Mapping[str, Any]) -> str:
  """What was chosen and why, in one sentence."""
  temperature = calibration.get("temperature")
  if temperature is None:
    return f"No temperature: {calibration.get('reason', 'none fitted')}."
  verb = "folded into" if calibration.get("applied") else "not folded into"
  return (f"Temperature {temperature:.4f}, fitted on val (NLL), {verb} the classifier: "
          f"{calibration.get('reason', '')}. NLL in nats per image, ECE over 15 "
          "confidence bins; top-1 is unchanged.")


def _unknowns_section(report: Mapping[str, Any],
                      export_report: Mapping[str, Any] | None) -> list[str]:
  """The "unknown" threshold, and under --holdout_classes each score's open-set figures."""
  chosen, open_set = report.get("unknown_threshold"), report.get("open_set")
  paragraphs = []
  if isinstance(chosen, Mapping):
    shipped = ""
    if export_report and "unknown_threshold" in export_report:
      shipped = (f" (the .tflite's metadata: {export_report['unknown_threshold']:.4f}, chosen "
                 "the same way on its own scores)")
    paragraphs.append(
        f"An image whose top score is below {chosen['score']:.4f}{shipped} is unknown: the "
        f"threshold that keeps {chosen['true_accept_rate']:.0%} of val images, chosen on val "
        f"(it keeps {chosen['test_accepted']:.2%} of test images).")
  if isinstance(open_set, Mapping):
    paragraphs.append(
        f"Held out of training: {', '.join(open_set['held_out_classes'])}; their "
        f"{open_set['num_test_unknown']} test images are the unknowns. Each score's "
        f"threshold keeps {open_set['true_accept_rate']:.0%} of known val images; val "
        f"chose {open_set['chosen_score']}.")
    rows = [(name, _fmt(f["val_auroc"]), _fmt(f["test_auroc"]), _fmt(f["test_false_accept"]),
             _fmt(f["test_true_accept"])) for name, f in open_set["scores"].items()]
    paragraphs.append(_table(("score", "val AUROC", "test AUROC", "test false-accept",
                              "test true-accept"), rows, ("l", "r", "r", "r", "r")))
  return _section("Unknown images", *paragraphs) if paragraphs else []


def _tuning_section(trials: Sequence[Mapping[str, Any]] | None, best_hparams: Any,
                    work: Any, plots: Mapping[str, str]) -> list[str]:
  """The trials, best first, the best hyperparameters and the search's figure."""
  if not trials:
    return []
  paragraphs = [_trials_table(trials)]
  if best_hparams:
    paragraphs.append(_best_hparams_line(best_hparams))
  if isinstance(work, Mapping):
    paragraphs.append(search_work_line(work))
  if "tuning" in plots:
    paragraphs.append(_image("tuning", plots["tuning"]))
  return _section("Tuning", *paragraphs)


def search_work_line(work: Mapping[str, Any]) -> str:
  """The search's work in one line: trials, epochs of each stage (and successive
  halving's budget), the cache's images, each beside its seconds."""
  budget = work.get("fine_tune_epoch_budget")
  fixed = f" (fixed by the schedule: {budget})" if budget is not None else ""
  cache = (f"; frozen-prefix cache of {work['cache_images']} images, "
           f"{work['inputs_seconds']:.0f} s" if work.get("cache_images") else "")
  frozen = f" in {work['frozen_seconds']:.0f} s" if work.get("frozen_seconds") else ""
  passes = (f", {work['val_passes']} full-model val passes to score them"
            if "val_passes" in work else "")
  return (f"Search work: {work['trials']} trials, {work['frozen_epochs']} stage 1 epochs"
          f"{frozen}, {work['fine_tune_epochs']} stage 2 epochs{fixed} in "
          f"{work['fine_tune_seconds']:.0f} s{passes}, of the trials' "
          f"{work['trial_seconds']:.0f} s{cache}.")


def _trials_table(trials: Sequence[Mapping[str, Any]]) -> str:
  """trials.csv's columns that hold anything, numbers right-aligned."""
  columns = [c for c in trials[0] if any(t.get(c) not in (None, "") for t in trials)]
  numeric = {c for c in columns
             if c != "trial_id" and any(plots_lib.is_number(t.get(c)) for t in trials)}
  return _table(columns, [[_trial_cell(c, t.get(c)) for c in columns]
                          for t in plots_lib.sort_trials(trials)],
                ["r" if c in numeric else "l" for c in columns])


def _best_hparams_line(best_hparams: Any) -> str:
  if isinstance(best_hparams, Mapping):
    return "Best hyperparameters: " + ", ".join(
        f"{k}={_trial_cell(k, v)}" for k, v in sorted(best_hparams.items())) + "."
  return f"Best hyperparameters: {_fmt(best_hparams)}."


def _history_section(plots: Mapping[str, str], history_found: bool) -> list[str]:
  if "history" in plots:
    return _section("Training history", _image("history", plots["history"]))
  if history_found:
    return _section("Training history",
                    f"{artifacts.HISTORY} holds no epochs: no training curves.")
  return _section("Training history",
                  f"{artifacts.HISTORY} not found (--mode=train and --mode=tune write it): "
                  "no training curves.")


def _confusion_matrix(report: Mapping[str, Any]) -> np.ndarray | None:
  """The test confusion matrix as integers; None without it or the class names."""
  cm = report.get("confusion_matrix")
  if cm and report.get("class_names"):
    return np.asarray(cm, np.int64)
  return None


def _confusion_section(report: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
  """The confusion matrix's figure and its most confused pairs."""
  m = _confusion_matrix(report)
  if m is None:
    return []
  paragraphs = []
  if "confusion" in plots:
    paragraphs.append(_image("confusion matrix", plots["confusion"]))
  pairs = plots_lib.most_confused(m, list(report["class_names"]), plots_lib.TOP_CONFUSED)
  paragraphs += [f"The {len(pairs)} most confused pairs (test images of the true class "
                 "predicted as the other):",
                 _pairs_table(pairs, m.sum(axis=1)) if pairs else "No errors."]
  return _section("Confusion", *paragraphs)


def _pairs_table(pairs: Sequence[Any], support: np.ndarray) -> str:
  return _table(("#", "true class", "predicted as", "images", "share of true class"),
                [(r, f"{p.true_index}: {p.true_name}",
                  f"{p.predicted_index}: {p.predicted_name}", p.count,
                  f"{p.count / max(int(support[p.true_index]), 1):.0%}")
                 for r, p in enumerate(pairs, 1)],
                ("r", "l", "l", "r", "r"))


def _worst_classes_section(report: Mapping[str, Any],
                           plots: Mapping[str, str]) -> list[str]:
  """The per-class accuracy figure and the worst classes, each with its usual mistake."""
  per_class = report.get("per_class_accuracy") or {}
  if not per_class:
    return []
  paragraphs = []
  if "per_class_accuracy" in plots:
    paragraphs.append(_image("per-class accuracy", plots["per_class_accuracy"]))
  class_names = list(report.get("class_names") or [])
  index = {n: i for i, n in enumerate(class_names)}
  m = _confusion_matrix(report)
  rows = [_worst_class_row(rank, name, accuracy, index.get(name), class_names, m)
          for rank, (name, accuracy) in enumerate(
              plots_lib.worst_classes(per_class, plots_lib.WORST_CLASSES), 1)]
  paragraphs.append(
      _table(("#", "class", "accuracy", "test images", "most often predicted as"),
             rows, ("r", "l", "r", "r", "l")))
  return _section("Worst classes", *paragraphs)


def _worst_class_row(rank: int, name: str, accuracy: float, i: int | None,
                     class_names: Sequence[str], m: np.ndarray | None) -> tuple[Any, ...]:
  """A worst-classes row: `i` is the class's index, `m` the confusion matrix."""
  images, mistaken = "", ""
  if m is not None and i is not None:
    images = int(m[i].sum())
    row = m[i].copy()
    row[i] = 0
    if row.any():
      j = int(row.argmax())
      mistaken = f"{j}: {class_names[j]} ({int(row[j])})"
  return (rank, f"{i}: {name}" if i is not None else name, f"{accuracy:.3f}", images,
          mistaken)


def _smallest_classes_section(report: Mapping[str, Any],
                              train_counts: Mapping[str, int] | None) -> list[str]:
  """The classes with the fewest training images and their test recall, when the
  classes are unequal: whether the model serves its small classes too."""
  recall = report.get("per_class_accuracy") or {}
  counts = {n: int(train_counts[n]) for n in recall if n in (train_counts or {})}
  if not counts or min(counts.values()) == max(counts.values()):
    return []
  weights = report.get("class_weights") or {}
  index = {n: i for i, n in enumerate(report.get("class_names") or [])}
  m = _confusion_matrix(report)
  smallest = sorted(counts, key=lambda n: (counts[n], n))[:SMALLEST_CLASSES]
  rows = []
  for name in smallest:
    i = index.get(name)
    test_images = int(m[i].sum()) if m is not None and i is not None else ""
    weight = [f"{weights[name]:.3f}" if name in weights else ""] if weights else []
    rows.append((f"{i}: {name}" if i is not None else name, counts[name], *weight,
                 test_images, f"{recall[name]:.3f}"))
  header = ("class", "train images", *(["class weight"] if weights else []), "test images",
            "test recall")
  return _section(
      "Smallest classes",
      f"The {len(rows)} classes with the fewest training images, and the share of their "
      "test images the model names right (recall); --class_weight=balanced weighs them up.",
      _table(header, rows, ("l",) + ("r",) * (len(header) - 1)))


def _left_out_section(dropped: Sequence[tuple[str, str]]) -> list[str]:
  if not dropped:
    return []
  return _section("Left out",
                  "These files are in the folder but were not made from this run and "
                  "model, so nothing above comes from them:",
                  "\n".join(f"- `{name}`: {why}." for name, why in dropped))


def _configuration_section(report: Mapping[str, Any]) -> list[str]:
  config = report.get("config")
  if not (isinstance(config, Mapping) and config):
    return []
  return _section("Configuration", _table(
      ("setting", "value"), [(k, _fmt(v)) for k, v in sorted(config.items())]))


# The whole report: collect the workdir's current files, draw, build, write, record.


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
  inputs = _collect(workdir)
  plots = _draw_plots(workdir, inputs)
  text = _build(workdir, inputs, plots, command or previous_command(workdir))
  path = os.path.join(workdir, artifacts.SUMMARY)
  artifacts.write_text(path, text)
  _record(inputs.files, plots)
  return path


class _CurrentFiles:
  """The workdir's files a report may use, by `flowers.lineage`; notes those left out.

  A file is usable when it is there and, in a workdir with lineage.json, its
  record says it is this run's (and, unless it describes no model, this
  model's). A workdir of an older flowers has nothing to check against.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.checked = os.path.exists(os.path.join(workdir, artifacts.LINEAGE))
    self.model = lineage.workdir_model(workdir)
    self.dropped: list[tuple[str, str]] = []

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def usable(self, name: str, describes_model: bool = True) -> bool:
    """Whether `name` is there and this run's (and this model's); warns of a drop."""
    if not os.path.exists(self.path(name)):
      return False
    if not self.checked:
      return True
    why = lineage.check(self.workdir, name, model=self.model if describes_model else None)
    if why is not None:
      self.dropped.append((name, why))
      print(f"flowers_main: warning: {self.path(name)} left out of the summary: {why}.",
            file=sys.stderr)
    return why is None

  def read_json(self, name: str, describes_model: bool = True) -> Any:
    """`name`'s contents when usable, else None."""
    return artifacts.read_json(self.path(name)) if self.usable(name, describes_model) else None


@dataclasses.dataclass(frozen=True)
class _Split:
  """splits.csv: key -> split, key -> label, and how many classes there are."""
  assignment: dict[str, str]
  labels: dict[str, int]
  num_classes: int


@dataclasses.dataclass(frozen=True)
class _Inputs:
  """What a report is made of: the workdir's usable files, read."""
  files: _CurrentFiles
  report: dict[str, Any]
  history_found: bool
  history: Any
  split: _Split | None
  export_report: Mapping[str, Any] | None
  trials: list[dict[str, Any]] | None
  best_hparams: Any


def _collect(workdir: str) -> _Inputs:
  """Reads the workdir's usable files; the report must be there.

  Checked in a fixed order (report, history, export, trials, best
  hyperparameters): the warnings and the "Left out" list follow it.
  """
  files = _CurrentFiles(workdir)
  report = _read_report(files)
  history_found = files.usable(artifacts.HISTORY)
  history = (artifacts.upgrade_history(artifacts.read_json(files.path(artifacts.HISTORY)))
             if history_found else None)
  split = _read_split(workdir, report["class_names"])
  export_report = files.read_json(artifacts.EXPORT_REPORT)
  trials = (plots_lib.read_trials(files.path(artifacts.TRIALS))
            if files.usable(artifacts.TRIALS, describes_model=False) else None)
  best_hparams = files.read_json(artifacts.BEST_HPARAMS, describes_model=False)
  return _Inputs(files, report, history_found, history, split, export_report, trials,
                 best_hparams)


def _report_names(workdir: str) -> list[str]:
  """report.json, then the evaluation reports: the model.keras one first."""
  evaluations = sorted((n for n in os.listdir(workdir) if n.startswith("evaluation_")
                        and n.endswith(".json")) if os.path.isdir(workdir) else [],
                       key=lambda n: (n != artifacts.evaluation_report(artifacts.MODEL), n))
  return [artifacts.REPORT] + evaluations


def _read_report(files: _CurrentFiles) -> dict[str, Any]:
  """The first usable report, with class names (from labels.txt when it has none)."""
  found = next((n for n in _report_names(files.workdir) if files.usable(n)), None)
  if found is None:
    why = f" ({files.dropped[0][1]})" if files.dropped else ""
    raise UserError(f"{files.path(artifacts.REPORT)} not found{why} (run "
                    "--mode=train, --mode=tune or --mode=evaluate first).")
  report = artifacts.read_json(files.path(found))
  class_names = list(report.get("class_names") or [])
  labels_path = files.path(artifacts.LABELS)
  if not class_names and os.path.exists(labels_path):
    class_names = artifacts.read_labels(labels_path)
  return {**report, "class_names": class_names}


def _read_split(workdir: str, class_names: Sequence[str]) -> _Split | None:
  """splits.csv when there (it is not checked: it only ever describes the data)."""
  manifest = os.path.join(workdir, artifacts.SPLITS)
  if not os.path.exists(manifest):
    return None
  assignment, labels = split_lib.read_manifest(manifest)
  num_classes = max(len(class_names), max(labels.values(), default=-1) + 1)
  return _Split(assignment, labels, num_classes)


_Figure = Callable[[str], str | None]


def _draw_plots(workdir: str, inputs: _Inputs) -> dict[str, str]:
  """Draws every figure the inputs allow into plots/; {picture name: file name}."""
  plots_dir = os.path.join(workdir, artifacts.PLOTS_DIR)
  os.makedirs(plots_dir, exist_ok=True)
  plots = {}
  for name, file_name, draw in _figures(inputs):
    if draw(os.path.join(plots_dir, file_name)):
      plots[name] = file_name
  return plots


def _figures(inputs: _Inputs) -> list[tuple[str, str, _Figure]]:
  """(picture name, file name, draw to a path) of each figure the inputs allow.

  The augmented samples are drawn by training, from the images: kept if there.
  """
  report, split = inputs.report, inputs.split
  figures: list[tuple[str, str, _Figure]] = []
  if inputs.history_found:
    figures.append(("history", artifacts.HISTORY_PNG,
                    functools.partial(plots_lib.plot_history, inputs.history)))
  if split and split.num_classes:
    figures.append(("class_distribution", artifacts.DISTRIBUTION_PNG, functools.partial(
        plots_lib.plot_class_distribution,
        plots_lib.class_counts(split.assignment, split.labels, split.num_classes))))
  figures.append(("augmented_samples", artifacts.AUGMENTED_PNG,
                  lambda path: path if os.path.exists(path) else None))
  m = _confusion_matrix(report)
  if m is not None:
    figures.append(("confusion", artifacts.CONFUSION_PNG, functools.partial(
        plots_lib.plot_confusion, report["confusion_matrix"], report["class_names"])))
  if report.get("per_class_accuracy"):
    support = None
    if m is not None:
      rows = m.sum(axis=1)
      support = {n: int(rows[i]) for i, n in enumerate(report["class_names"])}
    figures.append(("per_class_accuracy", artifacts.PER_CLASS_PNG, functools.partial(
        plots_lib.plot_per_class_accuracy, report["per_class_accuracy"], support=support,
        overall=report.get("test_accuracy"), class_names=report["class_names"])))
  if isinstance(report.get("calibration"), Mapping):
    figures.append(("reliability", artifacts.RELIABILITY_PNG,
                    functools.partial(plots_lib.plot_reliability, report["calibration"])))
  if inputs.trials is not None:
    figures.append(("tuning", artifacts.TUNING_PNG, functools.partial(
        plots_lib.plot_tuning, inputs.trials, rungs=_halving_rungs(report))))
  return figures


def _halving_rungs(report: Mapping[str, Any]) -> list[int] | None:
  """Successive halving's stage 2 epoch of each rung (report.json's search_work); None
  for another search."""
  work = report.get("search_work")
  schedule = work.get("halving_schedule") if isinstance(work, Mapping) else None
  return [int(epochs) for _, epochs in schedule] if schedule else None


def _build(workdir: str, inputs: _Inputs, plots: Mapping[str, str],
           command: str | None) -> str:
  """summary.md's text from the collected inputs and the figures drawn."""
  split = inputs.split
  return summary_markdown(
      workdir, inputs.report, command=command,
      split_summary=(split_lib.summarize(split.assignment, split.labels, split.num_classes)
                     if split else None),
      plots=plots, history_found=inputs.history_found,
      export_report=inputs.export_report, trials=inputs.trials,
      best_hparams=inputs.best_hparams, dropped=inputs.files.dropped,
      train_counts=_train_counts(split, inputs.report["class_names"]))


def _train_counts(split: _Split | None, class_names: Sequence[str]) -> dict[str, int] | None:
  """Training images per class name, from splits.csv."""
  if split is None:
    return None
  counts = plots_lib.class_counts(split.assignment, split.labels, split.num_classes)["train"]
  return {name: int(counts[i]) for i, name in enumerate(class_names) if i < len(counts)}


def _record(files: _CurrentFiles, plots: Mapping[str, str]) -> None:
  """Records summary.md and the figures in lineage.json, when the workdir keeps one."""
  if not files.checked:
    return
  drawn = [os.path.join(artifacts.PLOTS_DIR, f) for f in sorted(set(plots.values()))
           if os.path.exists(files.path(os.path.join(artifacts.PLOTS_DIR, f)))]
  lineage.record(files.workdir, [artifacts.SUMMARY] + drawn, mode="report",
                 model=files.model)
