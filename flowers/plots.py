"""Every figure of a run, drawn from its saved artifacts (or, once, its images).

`flowers.summary` calls the `plot_*` functions to draw the PNGs under
`WORKDIR/plots/` that summary.md links; they read nothing but the numbers they
are given, so `--mode=report` can redraw them without TensorFlow, data or a
model. `write_augmented_samples` is the one figure that needs the images:
training calls it once, and later reports keep the picture it made.

Figures are drawn on matplotlib's Agg canvas directly (`Figure` +
`FigureCanvasAgg`, never pyplot), so nothing needs a display and the process's
global backend is left alone. Sizes, dpi, style and PNG metadata are fixed, so
redrawing the same artifacts gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Sequence

import matplotlib
from matplotlib import colors as mcolors
from matplotlib import patches
from matplotlib import style as mstyle
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from flowers import artifacts
from flowers import split as split_lib

if TYPE_CHECKING:  # Type hints only: importing flowers.data loads TensorFlow.
  from flowers.config import RunConfig
  from flowers.data import Source

DPI = 100
TOP_CONFUSED = 15
WORST_CLASSES = 20
# Columns of trials.csv (written by flowers.tune) that are not hyperparameters.
TRIAL_RESULT_COLUMNS = ("trial_id",) + artifacts.TRIAL_RESULTS

# Pinned on top of matplotlib's defaults, so a user's matplotlibrc cannot change
# the pictures.
_STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "svg.hashsalt": "flowers",
}
_SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}


# Drawing and saving.


def _figure(width: float, height: float) -> Figure:
  """A figure on its own Agg canvas (no pyplot, no display, no global state)."""
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path: str) -> str:
  """Saves `fig` as a PNG atomically, without metadata that changes per run."""
  with artifacts.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
  return path


@contextlib.contextmanager
def _style() -> Iterator[None]:
  """matplotlib's defaults plus `_STYLE`, whatever the user's matplotlibrc says."""
  with mstyle.context("default"), matplotlib.rc_context(_STYLE):
    yield


# Data helpers.


def _number(text: str) -> Any:
  try:
    return float(text)
  except (TypeError, ValueError):
    return text


def read_trials(path: str) -> list[dict[str, Any]]:
  """trials.csv rows; numeric cells as floats (trial_id, blank and text cells kept)."""
  with open(path, newline="", encoding="utf-8") as f:
    return [{k: v if k == "trial_id" else _number(v) for k, v in row.items()}
            for row in csv.DictReader(f)]


def is_number(value: Any) -> bool:
  """A finite int or float (not a bool): a cell that can be plotted or formatted."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and \
      math.isfinite(value)


def sort_trials(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Best val accuracy first; trials without one last, in their original order."""
  def key(item):
    i, t = item
    acc = t.get("val_accuracy")
    return (0, -acc, i) if is_number(acc) else (1, 0.0, i)
  return [t for _, t in sorted(enumerate(trials), key=key)]


def class_counts(assignment: Mapping[str, str], labels: Mapping[str, int],
                 num_classes: int) -> dict[str, np.ndarray]:
  """Images per class in each split: {split: int array of length num_classes}."""
  counts = {s: np.zeros(num_classes, np.int64) for s in split_lib.SPLITS}
  for key, split in assignment.items():
    counts[split][labels[key]] += 1
  return counts


def concat_history(history: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
  """Both stages' metrics on one epoch axis, and the number of stage 1 epochs.

  A metric missing from one stage is NaN there. A flat {metric: [...]} history
  (no stages) counts as stage 1.
  """
  if "frozen" in history or "fine_tune" in history:
    stages = [history.get("frozen") or {}, history.get("fine_tune") or {}]
  else:
    stages = [history, {}]
  lengths = [max((len(v) for v in s.values()), default=0) for s in stages]
  names = sorted(set(stages[0]) | set(stages[1]))
  out = {}
  for name in names:
    parts = []
    for stage, n in zip(stages, lengths):
      values = [math.nan if v is None else float(v) for v in stage.get(name, [])]
      parts.append(values + [math.nan] * (n - len(values)))
    out[name] = np.asarray(parts[0] + parts[1], np.float64)
  return out, lengths[0]


# Analysis (shared with flowers.summary).


class Confusion(NamedTuple):
  """One off-diagonal cell of the confusion matrix."""

  true_index: int
  predicted_index: int
  true_name: str
  predicted_name: str
  count: int


def most_confused(cm: Any, class_names: Sequence[str],
                  k: int = TOP_CONFUSED) -> list[Confusion]:
  """The k largest off-diagonal (true, predicted) cells, largest first.

  Ties go to the smaller true index, then the smaller predicted index; cells of
  zero are never listed, so fewer than k may come back.
  """
  m = np.asarray(cm, np.int64)
  off = m.copy()
  np.fill_diagonal(off, 0)
  rows, cols = np.nonzero(off)
  order = sorted(zip(-off[rows, cols], rows, cols))[:k]
  return [Confusion(int(i), int(j), class_names[i], class_names[j], int(-neg))
          for neg, i, j in order]


def worst_classes(per_class_accuracy: Mapping[str, float],
                  k: int = WORST_CLASSES) -> list[tuple[str, float]]:
  """The k classes of lowest accuracy, worst first (ties by name)."""
  return sorted(per_class_accuracy.items(), key=lambda kv: (kv[1], kv[0]))[:k]


# Plots.


def plot_history(history: Mapping[str, Any], path: str) -> str | None:
  """Loss and accuracy, train vs val, stage 2 after stage 1 on one epoch axis.

  Returns None (and writes nothing) when the history holds no epoch.
  """
  metrics, n1 = concat_history(history)
  n = max((len(v) for v in metrics.values()), default=0)
  if n == 0:
    return None
  epochs = np.arange(1, n + 1)
  with _style():
    fig = _figure(12, 4.5)
    axes = fig.subplots(1, 2)
    for ax, name, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
      for prefix, label, line in (("", "train", "-"), ("val_", "val", "--")):
        values = metrics.get(prefix + name)
        if values is not None and np.isfinite(values).any():
          ax.plot(epochs, values, line, marker="o", markersize=3, label=label,
                  color=_SPLIT_COLORS[label])
      low, high = ax.get_ylim()
      ax.set_ylim(low, high + 0.12 * (high - low))  # Room for the stage labels.
      if 0 < n1 < n:
        ax.axvspan(n1 + 0.5, n + 0.5, color="0.93", zorder=0)
        ax.axvline(n1 + 0.5, color="0.3", linestyle=":", linewidth=1.2)
        where = ax.get_xaxis_transform()
        ax.text(n1 + 0.4, 0.985, "stage 1 ", transform=where, ha="right", va="top",
                fontsize=8, color="0.2")
        ax.text(n1 + 0.6, 0.985, " stage 2 (fine-tune)", transform=where, ha="left",
                va="top", fontsize=8, color="0.2")
      ax.set_title(title)
      ax.set_xlabel(f"epoch (stage 2 from epoch {n1 + 1})" if 0 < n1 < n else "epoch")
      ax.set_xlim(0.5, n + 0.5)
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      ax.grid(True, alpha=0.3)
      if ax.lines:
        ax.legend(loc="best")
    val = metrics.get("val_accuracy")
    if val is not None and np.isfinite(val).any():
      best = int(np.nanargmax(val))
      axes[1].plot(epochs[best], val[best], marker="*", markersize=12, color="black",
                   linestyle="none", label=f"best val {val[best]:.3f} (epoch {best + 1})")
      axes[1].legend(loc="best")
    fig.suptitle("Training history")
    return save_figure(fig, path)


def plot_class_distribution(counts: Mapping[str, Sequence[int]], path: str) -> str:
  """Each split's share of images per class, side by side, to show stratification."""
  num_classes = len(next(iter(counts.values())))
  x = np.arange(num_classes)
  width = 0.8 / max(len(counts), 1)
  with _style():
    fig = _figure(max(8.0, min(20.0, 0.18 * num_classes * len(counts) / 1.5)), 4.8)
    ax = fig.subplots()
    for i, (split, c) in enumerate(counts.items()):
      c = np.asarray(c, np.float64)
      total = c.sum()
      share = c / total if total else c
      ax.bar(x + (i - (len(counts) - 1) / 2) * width, share, width,
             label=f"{split} ({int(total):,} images)",
             color=_SPLIT_COLORS.get(split), linewidth=0)
    ax.axhline(1.0 / num_classes, color="0.3", linestyle=":", linewidth=1,
               label=f"uniform (1/{num_classes})")
    ax.set_xlim(-0.7, num_classes - 0.3)
    step = 1 if num_classes <= 20 else 5
    ax.set_xticks(np.arange(0, num_classes, step))
    if num_classes > 20:
      ax.set_xticks(x, minor=True)
    ax.tick_params(axis="x", labelsize=8)
    ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=1))
    ax.set_xlabel("class index")
    ax.set_ylabel("share of the split's images")
    ax.set_title("Class distribution per split (stratified: the splits should match)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncols=4)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # Room for the legend.
    return save_figure(fig, path)


def _short(name: str, width: int = 24) -> str:
  return name if len(name) <= width else name[:width - 1] + "…"


def plot_confusion(cm: Any, class_names: Sequence[str], path: str,
                   k: int = TOP_CONFUSED) -> str:
  """The confusion matrix (log colour scale, zeros blank) and its k worst cells."""
  m = np.asarray(cm, np.int64)
  c = m.shape[0]
  pairs = most_confused(m, class_names, k)
  with _style():
    fig = _figure(15, 8.5)
    grid = fig.add_gridspec(1, 2, width_ratios=(3.0, 1.9))
    ax = fig.add_subplot(grid[0])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, interpolation="nearest",
                      norm=mcolors.LogNorm(vmin=1, vmax=max(int(m.max()), 2)))
    bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02,
                       label="test images (log scale; 0 is blank)")
    bar.set_ticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                   if t <= max(m.max(), 2)])
    bar.ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    step = 1 if c <= 20 else 10
    ax.set_xticks(np.arange(0, c, step))
    ax.set_yticks(np.arange(0, c, step))
    ax.set_xlabel("predicted class index")
    ax.set_ylabel("true class index")
    ax.set_title(f"Confusion matrix ({c} classes, {int(m.sum()):,} test images)")
    if c <= 20:
      for (i, j), v in np.ndenumerate(m):
        if v:
          ax.text(j, i, str(v), ha="center", va="center", fontsize=7 if c > 10 else 10,
                  color="black" if v > m.max() ** 0.5 else "white")
    box = 1 if c <= 20 else 3  # Cells; a 102-class cell is too small to frame alone.
    for p in pairs:
      ax.add_patch(patches.Rectangle(
          (p.predicted_index - box / 2, p.true_index - box / 2), box, box, fill=False,
          edgecolor="red", linewidth=1.2))
    side = fig.add_subplot(grid[1])
    side.axis("off")
    side.set_title(f"The {len(pairs)} most confused pairs (framed in red)", loc="left")
    lines = [f"{'true class':<26}  {'predicted as':<26} n"]
    lines += [f"{p.true_index:>3} {_short(p.true_name, 22):<22}  "
              f"{p.predicted_index:>3} {_short(p.predicted_name, 22):<22} {p.count:>2}"
              for p in pairs]
    side.text(0.0, 1.0, "\n".join(lines) if pairs else "No errors.",
              transform=side.transAxes, ha="left", va="top", family="DejaVu Sans Mono",
              fontsize=9, linespacing=1.5).set_in_layout(False)
    return save_figure(fig, path)


def plot_per_class_accuracy(per_class_accuracy: Mapping[str, float], path: str,
                            k: int = WORST_CLASSES, support: Mapping[str, int] | None = None,
                            overall: float | None = None,
                            class_names: Sequence[str] | None = None) -> str:
  """Horizontal bars of the k least accurate classes, worst at the top."""
  worst = worst_classes(per_class_accuracy, k)
  names = [n for n, _ in worst]
  values = [v for _, v in worst]
  with _style():
    fig = _figure(9, 1.4 + 0.3 * max(len(worst), 8))
    ax = fig.subplots()
    y = np.arange(len(worst))
    ax.barh(y, values, color="#d62728", alpha=0.8)
    index = {n: i for i, n in enumerate(class_names or [])}
    ax.set_yticks(y, [f"{index[n]}: {_short(n, 26)}" if n in index else _short(n, 30)
                      for n in names])
    ax.invert_yaxis()
    for yi, (name, v) in zip(y, worst):
      text = f"{v:.2f}"
      if support and support.get(name):
        text += f" ({round(v * support[name])}/{support[name]})"
      ax.text(v + 0.01, yi, text, va="center", fontsize=8, zorder=3,
              bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    title = f"The {len(worst)} least accurate classes"
    if overall is not None:
      ax.axvline(overall, color="0.3", linestyle="--", linewidth=1)
      title += f" (dashed: overall accuracy {overall:.3f})"
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("test accuracy (recall) of the class")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)


def hyperparameter_columns(trials: Sequence[Mapping[str, Any]]) -> list[str]:
  """Numeric trials.csv columns that are hyperparameters, in file order."""
  if not trials:
    return []
  columns = [c for c in trials[0] if c not in TRIAL_RESULT_COLUMNS]
  return [c for c in columns if any(is_number(t.get(c)) for t in trials)]


def plot_tuning(trials: Sequence[Mapping[str, Any]], path: str,
                rungs: Sequence[int] | None = None) -> str | None:
  """Val accuracy against each hyperparameter, one panel each (learning rates on log x).

  `rungs`: successive halving's stage 2 epochs, one per rung (report.json's
  halving schedule). Its trials are scored at the epoch they reached
  (trials.csv's fine_tune_epochs), so each epoch gets its own marker and legend
  entry, and the star is the search's pick: the best of the furthest epoch.
  """
  columns = hyperparameter_columns(trials)
  done = [t for t in trials if is_number(t.get("val_accuracy"))]
  if not columns or not done:
    return None
  if rungs:
    return _plot_tuning_by_epoch(done, columns, path, rungs)
  best = sort_trials(done)[0]
  with _style():
    fig = _figure(4.2 * len(columns), 4)
    axes = np.atleast_1d(fig.subplots(1, len(columns), sharey=True))
    for ax, column in zip(axes, columns):
      points = [(t[column], t["val_accuracy"]) for t in done if is_number(t.get(column))]
      xs = np.array([p[0] for p in points])
      ys = np.array([p[1] for p in points])
      ax.scatter(xs, ys, s=30, color="#1f77b4", alpha=0.8)
      if is_number(best.get(column)):
        ax.scatter([best[column]], [best["val_accuracy"]], s=160, marker="*",
                   color="#d62728", zorder=3)
      if "learning_rate" in column and len(xs) and (xs > 0).all():
        ax.set_xscale("log")
      ax.set_xlabel(column)
      ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("val accuracy")
    low, high = axes[0].get_ylim()
    axes[0].set_ylim(low, high + 0.05 * (high - low))
    fig.suptitle(f"Tuning: val accuracy of {len(done)} trials "
                 f"(red star: the best, {best['val_accuracy']:.4f})")
    return save_figure(fig, path)


_EPOCH_MARKERS = ("o", "s", "D", "^", "v", "P", "X")


def tuning_groups(done: Sequence[Mapping[str, Any]]) -> list[tuple[int | None, list[Any]]]:
  """Scored trials by the stage 2 epoch they reached, fewest epochs first (unknown last)."""
  groups: dict[int | None, list[Any]] = {}
  for t in done:
    epochs = t.get("fine_tune_epochs")
    groups.setdefault(int(epochs) if is_number(epochs) else None, []).append(t)
  return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))


def _plot_tuning_by_epoch(done: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str,
                          rungs: Sequence[int]) -> str:
  """`plot_tuning` under successive halving: one marker per stage 2 epoch reached."""
  groups = tuning_groups(done)
  reached = {id(t): e for e, members in groups for t in members}
  # The pick, as trials.csv ranks them: the furthest epoch, then val accuracy.
  best = min(enumerate(done), key=lambda it: (-(reached[id(it[1])] or 0),
                                              -it[1]["val_accuracy"], it[0]))[1]
  colors = matplotlib.colormaps["viridis"](np.linspace(0.8, 0.1, max(len(groups), 2)))
  last = max(rungs)
  with _style():
    fig = _figure(4.2 * len(columns), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(columns), sharey=True))
    for ax, column in zip(axes, columns):
      for i, (epochs, members) in enumerate(groups):
        points = [(t[column], t["val_accuracy"]) for t in members if is_number(t.get(column))]
        n = len(members)
        what = ("epoch unknown" if epochs is None else
                f"trained to stage 2 epoch {epochs}" if epochs >= last else
                f"stopped at stage 2 epoch {epochs}")
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=26 + 14 * i,
                   marker=_EPOCH_MARKERS[i % len(_EPOCH_MARKERS)], color=colors[i],
                   alpha=0.85, edgecolors="0.2", linewidths=0.5, zorder=3,
                   label=f"{what} ({n} trial{'s' if n != 1 else ''})")
      if is_number(best.get(column)):  # Behind its own marker, which stays visible.
        ax.scatter([best[column]], [best["val_accuracy"]], s=420, marker="*",
                   color="#d62728", zorder=2, label="the search's pick")
      xs = np.array([t[column] for t in done if is_number(t.get(column))])
      if "learning_rate" in column and len(xs) and (xs > 0).all():
        ax.set_xscale("log")
        # A range inside one decade (1e-4 to 4e-4) has no major tick: label a few ticks
        # across it instead of none.
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
      ax.set_xlabel(column)
      ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("val accuracy at the epoch reached")
    low, high = axes[0].get_ylim()
    axes[0].set_ylim(low, high + 0.05 * (high - low))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    at = "" if reached[id(best)] is None else f" at epoch {reached[id(best)]}"
    fig.suptitle(f"Tuning, successive halving: val accuracy of {len(done)} trials, each at the "
                 "stage 2 epoch it reached\n(scores at different epochs: compare within one; "
                 f"red star: the best{at}, {best['val_accuracy']:.4f})")
    return save_figure(fig, path)


def _reliability_points(table: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(mean confidence, accuracy) of a reliability table's non-empty bins."""
  pairs = [(c, a) for n, c, a in zip(table["count"], table["confidence"], table["accuracy"])
           if n]
  return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def plot_reliability(calibration: Mapping[str, Any], path: str) -> str | None:
  """Test accuracy against top-1 confidence per bin, before and after calibration.

  Drawn from report.json's "calibration" (its reliability tables); on the
  diagonal a model is calibrated. None (nothing written) without the tables.
  """
  tables = [(calibration.get(f"test_reliability_{when}"), when, color, marker)
            for when, color, marker in (("before", "#d62728", "o"), ("after", "#1f77b4", "s"))]
  tables = [t for t in tables if t[0] and any(t[0]["count"])]
  if not tables:
    return None
  with _style():
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="0.4", linewidth=1, label="calibrated")
    for table, when, color, marker in tables:
      confidence, accuracy = _reliability_points(table)
      ece = calibration.get(f"test_ece_{when}")
      label = when if ece is None else f"{when} (ECE {ece:.3f})"
      ax.plot(confidence, accuracy, "-", marker=marker, markersize=4, color=color, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(f"top-1 confidence (mean of each of {tables[0][0]['bins']} bins)")
    ax.set_ylabel("test accuracy in the bin")
    temperature = calibration.get("temperature")
    applied = "folded" if calibration.get("applied") else "not folded"
    ax.set_title("Reliability on test" + (f" (temperature {temperature:.3f}, {applied})"
                                          if temperature is not None else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def write_augmented_samples(workdir: str, source: Source, config: RunConfig,
                            count: int = 24, columns: int = 6) -> str | None:
  """Draws `count` augmented training images into plots/augmented_samples.png.

  Best effort: the run's model is already saved when this is called, so a
  failure is logged and None returned rather than failing the run. Also None
  when the config has augmentation switched off (there is nothing to show).

  Args:
    workdir: the run's folder (its splits.csv and labels.txt are used).
    source: the `flowers.data.Source` the run trained on.
    config: the run's `flowers.config.RunConfig` (its data settings: split, seed and
      image size; its train settings: augment and augmentation).
    count: how many images.
    columns: images per row.
  """
  if not config.train.augment:
    return None
  try:
    return draw_augmented_samples(workdir, source, config, count, columns)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not draw augmented samples: %s: %s", type(e).__name__, e)
    return None


def sample_keys(keys: Sequence[str], label_of: Mapping[str, int], count: int,
                seed: int) -> list[str]:
  """`count` keys spread over as many classes as possible, chosen by `seed`."""
  by_class: dict[int, list[str]] = {}
  for key in sorted(keys):
    by_class.setdefault(label_of[key], []).append(key)
  rng = np.random.default_rng(seed)
  classes = sorted(by_class)
  classes = [classes[i] for i in rng.permutation(len(classes))]
  for label in classes:
    members = by_class[label]
    by_class[label] = [members[i] for i in rng.permutation(len(members))]
  chosen: list[str] = []
  for round_ in range(max((len(v) for v in by_class.values()), default=0)):
    for label in classes:
      if len(chosen) < count and round_ < len(by_class[label]):
        chosen.append(by_class[label][round_])
  return chosen


def draw_augmented_samples(workdir: str, source: Source, config: RunConfig,
                           count: int = 24, columns: int = 6) -> str | None:
  """`write_augmented_samples` without its safety net (errors propagate)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import augment  # pylint: disable=g-import-not-at-top

  seed = config.train.seed
  if config.data.holdout_classes:  # The classes the run trained on, numbered as it did.
    source, _ = data_lib.hold_out(source, config.data.holdout_classes, config.data.split_seed)
  manifest = os.path.join(workdir, artifacts.SPLITS)
  if os.path.exists(manifest):
    assignment, _ = split_lib.read_manifest(manifest)
  else:
    assignment = data_lib.prepare_split(source, None,
                                        split_lib.parse_split(config.data.split,
                                                              config.data.split_seed))
  label_of = source.label_of()
  keys = sample_keys([k for k in split_lib.keys_of(assignment, "train") if k in label_of],
                     label_of, count, seed)
  if not keys:
    return None
  dataset = data_lib.make_dataset(source, keys, image_size=config.data.image_size,
                                  batch_size=None, shuffle=False, cache="none")
  pairs = list(dataset.as_numpy_iterator())
  images = tf.constant(np.stack([p[0] for p in pairs]), tf.float32)
  labels = [int(p[1]) for p in pairs]
  for layer in augment.augmentation_layers(config.train.augmentation, seed):
    images = layer(images, training=True)
  images = np.clip(np.round(np.asarray(images)), 0, 255).astype(np.uint8)
  labels_path = os.path.join(workdir, artifacts.LABELS)
  class_names = ((artifacts.read_labels(labels_path) if os.path.exists(labels_path)
                  else None) or source.class_names)
  return plot_image_grid(images, [f"{l}: {class_names[l]}" for l in labels],
                         os.path.join(workdir, artifacts.PLOTS_DIR, artifacts.AUGMENTED_PNG),
                         title=_augmentation_title(config), columns=columns)


def _augmentation_title(config: RunConfig) -> str:
  a = config.train.augmentation
  parts = (["flip"] if a.flip else []) + [
      f"{name} {value:g}" for name, value in (
          ("rotation", a.rotation), ("zoom", a.zoom),
          ("shift", a.translation), ("contrast", a.contrast),
          ("crop area >=", a.crop_area)) if value]
  return (f"Augmented training samples ({', '.join(parts) or 'none'}; "
          f"seed {config.train.seed}, {config.data.image_size} px)")


def plot_image_grid(images: np.ndarray, titles: Sequence[str], path: str, title: str,
                    columns: int = 6) -> str:
  """uint8 images in a grid, each with its title."""
  n = len(images)
  rows = max(1, math.ceil(n / columns))
  with _style():
    fig = _figure(2.2 * columns, 2.4 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for ax in axes:
      ax.axis("off")
    for ax, image, text in zip(axes, images, titles):
      ax.imshow(image, interpolation="nearest" if image.shape[0] < 96 else "antialiased")
      ax.set_title(_short(text, 26), fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
