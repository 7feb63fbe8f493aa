"""A search in TensorBoard's HParams dashboard: `WORKDIR/logs/hparams`.

Open it with `tensorboard --logdir WORKDIR/logs/hparams`. Written by the chief
when a search ends, from the trials' records only (trials.csv's rows): the
experiment (each searched hyperparameter with its range, and the metrics) at
the top, and one run folder per trial, `trial_<id>`, holding its values, its
val accuracy, stage 2 epochs and seconds as scalars, and its status. A rerun
or extended search writes the whole folder afresh and swaps it in
(`artifacts.atomic_folder`), so no session is ever listed twice.

Like the stages' TensorBoard logs, the folder is for people, not for flowers:
no mode reads it, so lineage.json does not list it; `--overwrite` deletes it
with the rest of `logs/`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import summary as hp_summary
import tensorflow as tf

from flowers import artifacts
from flowers.config import HPARAMS
from flowers.config import SearchConfig

# trials.csv's columns shown as the dashboard's metrics: (name, what it is).
METRICS = (
    ("val_accuracy", "the trial's score: val accuracy of its model as saved (under successive "
     "halving: at the stage 2 epoch it reached)"),
    ("fine_tune_epochs", "stage 2 epochs the trial trained (under successive halving: the "
     "epoch it reached)"),
    ("seconds", "the trial's training and scoring time"),
)
_DESCRIPTIONS = {
    "dropout": "the head's dropout rate",
    "unfreeze_ratio": "the share of the base's layers stage 2 trains",
    "fine_tune_learning_rate": "stage 2's learning rate (drawn log-uniform)",
}
# KerasTuner's trial status -> the dashboard's.
_STATUS = {"COMPLETED": api_pb2.STATUS_SUCCESS, "FAILED": api_pb2.STATUS_FAILURE,
           "INVALID": api_pb2.STATUS_FAILURE, "RUNNING": api_pb2.STATUS_RUNNING}


def experiment(search: SearchConfig) -> tuple[list[hp.HParam], list[hp.Metric]]:
  """The searched hyperparameters, each with its range, and the trials' metrics."""
  hparams = []
  for name in HPARAMS:
    low, high = (float(v) for v in search.range_of(name))
    hparams.append(hp.HParam(name, hp.RealInterval(low, high),
                             description=f"{_DESCRIPTIONS[name]}; searched in [{low:g}, "
                             f"{high:g}]"))
  metrics = [hp.Metric(name, description=text) for name, text in METRICS]
  return hparams, metrics


def write(workdir: str, rows: Sequence[Mapping[str, Any]], search: SearchConfig) -> str:
  """Writes the dashboard of the trials `rows` (trials.csv's) afresh; returns its folder."""
  hparams, metrics = experiment(search)
  path = os.path.join(workdir, artifacts.HPARAMS_LOGS)
  with artifacts.atomic_folder(path) as folder:
    _write_events(folder, lambda: hp.hparams_config(hparams=hparams, metrics=metrics))
    for row in rows:
      _write_events(os.path.join(folder, f"trial_{row['trial_id']}"),
                    lambda row=row: _trial_summaries(row))
  return path


def _write_events(folder: str, summaries: Callable[[], Any]) -> None:
  """Runs `summaries` (tf.summary calls) into one events file in `folder`."""
  writer = tf.summary.create_file_writer(folder)
  with writer.as_default():
    summaries()
  writer.close()


def _trial_summaries(row: Mapping[str, Any]) -> None:
  """A trial's session: its values, its metrics (those it has) and its status."""
  values = {name: float(row[name]) for name in HPARAMS if _number(row.get(name))}
  hp.hparams(values, trial_id=str(row["trial_id"]))
  epochs = row.get("fine_tune_epochs")
  step = int(epochs) if _number(epochs) else 0
  for name, _ in METRICS:
    if _number(row.get(name)):
      tf.summary.scalar(name, float(row[name]), step=step)
  end = hp_summary.session_end_pb(
      _STATUS.get(str(row.get("status")), api_pb2.STATUS_UNKNOWN))
  tf.summary.experimental.write_raw_pb(end.SerializeToString(), step=step)


def _number(value: Any) -> bool:
  """A finite number (trials.csv's blank cells are None or "")."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
