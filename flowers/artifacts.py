"""The workdir's files: their names, and atomic writes.

Every file a mode leaves in the workdir is named here and written through
here, so an interrupted run never leaves a half-written `model.keras`,
`report.json` or `.tflite`, and no module spells a file name of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from typing import Any, Iterator

# What a run writes to WORKDIR.
SPLITS = "splits.csv"  # file_name,label,split: the split the run was made with.
FLAGS = "flags.cfg"  # The resolved flags, reusable as a --flagfile.
RUN = "run.json"  # What the run was made from; a resume must match it.
LINEAGE = "lineage.json"  # Which run and model each file was made from (flowers.lineage).
MODEL = "model.keras"
LABELS = "labels.txt"  # One class name a line, beside every model.
HISTORY = "history.json"  # Per-epoch metrics of both stages.
REPORT = "report.json"  # Test (and val) metrics of the model.
EXPORT_REPORT = "export_report.json"
TFLITE_NAMES = {"int8": "model_int8.tflite", "float16": "model_float16.tflite",
                "dynamic": "model_dynamic.tflite", "none": "model_float32.tflite"}
TRIALS = "trials.csv"  # One row per tuning trial, best first.
# trials.csv columns after trial_id and the hyperparameters (flowers.tune writes them).
TRIAL_RESULTS = ("val_accuracy", "seconds", "status", "tuner_id", "median_stop",
                 "fine_tune_epochs")
BEST_HPARAMS = "best_hparams.json"
SUMMARY = "summary.md"
PLOTS_DIR = "plots"
HISTORY_PNG = "history.png"
DISTRIBUTION_PNG = "class_distribution.png"
AUGMENTED_PNG = "augmented_samples.png"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_PNG = "per_class_accuracy.png"
TUNING_PNG = "tuning.png"
RELIABILITY_PNG = "reliability.png"

# Training state, per run folder (WORKDIR, or a tuning trial's folder).
FROZEN_WEIGHTS = "frozen.weights.h5"  # Marks a finished stage 1.
BACKUP_DIR = "backup"  # Per stage: its saved state (RESUME_STATE), to resume from.
FINE_TUNE_WEIGHTS = "fine_tune.weights.h5"  # Marks a finished stage 2: its final weights.
RESUME_STATE = "state.npz"  # In BACKUP_DIR/<stage>: all the next epoch depends on.
LOGS_DIR = "logs"  # TensorBoard, per stage.
# TensorBoard's HParams dashboard of a search (flowers.hparams_board), under LOGS_DIR.
HPARAMS_LOGS = os.path.join(LOGS_DIR, "hparams")
CACHE_DIR = "cache"  # Frozen-prefix activations; the disk pipeline cache.

# The search, under WORKDIR/tuner (KerasTuner's project).
TUNER_DIR = "tuner"
TRIAL_RESULT = "result.json"  # Per trial, beside KerasTuner's trial.json.
TRIAL_WEIGHTS = "checkpoint.weights.h5"  # KerasTuner's name for a trial's weights.


def evaluation_report(model_path: str) -> str:
  """`--mode=evaluate`'s own report for a model: `evaluation_<model file stem>.json`.

  Evaluating never replaces the training report.json (which holds what only
  training knows: val metrics, train time, the search's figures).
  """
  stem = os.path.splitext(os.path.basename(model_path))[0]
  return f"evaluation_{stem}.json"


# The stage names an older flowers wrote files and history.json keys under.
LEGACY_STAGES = {"stage1": "frozen", "stage2": "fine_tune"}


def upgrade_history(history: dict[str, Any]) -> dict[str, Any]:
  """history.json with its stages under their current names (older files named them
  stage1 and stage2)."""
  return {LEGACY_STAGES.get(key, key): value for key, value in history.items()}


def rename_legacy_stage_files(folder: str) -> list[str]:
  """Renames the training state an older flowers left under the old stage names.

  An interrupted run of an older flowers then resumes from it rather than
  training its stages again. Returns the paths renamed.
  """
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if d != CACHE_DIR]
    for name in dirs + files:
      for old, new in LEGACY_STAGES.items():
        for before, after in ((f"{old}.weights.h5", f"{new}.weights.h5"),
                              (f"history_{old}.csv", f"history_{new}.csv"), (old, new)):
          if name == before and (before != old
                                 or os.path.basename(root) in (BACKUP_DIR, LOGS_DIR)):
            found.append((os.path.join(root, before), os.path.join(root, after)))
  for before, after in sorted(found, key=lambda pair: -len(pair[0])):
    if not os.path.exists(after):
      os.replace(before, after)
  return [before for before, _ in found]


def stage_history(stage: str) -> str:
  """The CSV log of one stage's epochs ("frozen" or "fine_tune")."""
  return f"history_{stage}.csv"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` on success.

  The temporary name ends with the final name (Keras checks `.keras` and
  `.weights.h5`), and lives in
  the same folder so the rename is atomic. On an exception it is removed.
  """
  folder = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(), suffix="-" + os.path.basename(path),
                             dir=folder)
  os.close(fd)
  os.remove(tmp)  # Writers (Keras, TFLite) want to create the file themselves.
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
  """Yields a fresh temporary folder beside `path`; on success it replaces `path` whole.

  A rewrite never leaves the old folder's files beside the new ones; on an
  exception the temporary is removed and `path` stays as it was. (Between the
  two renames `path` is briefly missing: a folder cannot be renamed onto a full one.)
  """
  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  suffix = "-" + os.path.basename(path)
  tmp = tempfile.mkdtemp(prefix=_temporary_prefix(), suffix=suffix, dir=parent)
  try:
    yield tmp
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=_temporary_prefix(), suffix=suffix + "-old", dir=parent)
      os.replace(path, old)  # Onto the empty folder just made.
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


_TMP = ".tmp-"


def _temporary_prefix() -> str:
  """`.tmp-<host>-<pid>-`: whose temporary a file is, so a later run can tell it is orphaned."""
  host = socket.gethostname().replace("-", "_") or "host"
  return f"{_TMP}{host}-{os.getpid()}-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_orphaned_temporaries(folder: str) -> int:
  """Deletes the temporaries that killed processes of this host left under `folder`.

  A run killed while writing (a 1 GB frozen-prefix cache, say) leaves its
  `.tmp-*` file (or `atomic_folder`'s folder) behind; the process that wrote
  it is named in it, so only those of dead processes on this host are removed
  (a distributed worker on another host sharing the folder keeps its own).
  Returns how many.
  """
  removed = 0
  for root, dirs, files in os.walk(folder):
    for name in [d for d in dirs if _orphaned(d, unnamed=False)]:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
      dirs.remove(name)
      removed += 1
    for name in files:
      if _orphaned(name):
        os.remove(os.path.join(root, name))
        removed += 1
  return removed


def _orphaned(name: str, unnamed: bool = True) -> bool:
  """Whether `name` is a temporary of a dead process of this host; `unnamed`: or one
  that names no process (an older flowers' file)."""
  if not name.startswith(_TMP):
    return False
  parts = name[len(_TMP):].split("-", 2)
  if len(parts) == 3 and parts[1].isdigit():
    host = socket.gethostname().replace("-", "_") or "host"
    return parts[0] == host and not _alive(int(parts[1]))
  return unnamed


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON to `path` atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str, made_by: str | None = None, fix: str | None = None) -> Any:
  """Reads a JSON artifact; a missing or damaged file is a one-line `UserError`.

  `made_by` names the mode that writes it; `fix` says what to do when it is
  damaged (default: delete it and run that mode again).
  """
  from flowers.errors import UserError  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    hint = f" (run --mode={made_by} first)" if made_by else ""
    raise UserError(f"{path} not found{hint}.")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError.
    what = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
    fix = fix or ("delete it and run " + (f"--mode={made_by}" if made_by else "the mode that "
                                          "wrote it") + " again")
    raise UserError(f"{path} is damaged ({what}); {fix}.") from e


def labels_beside(model_path: str) -> str:
  """The `labels.txt` that belongs to a model: the one in the model's folder."""
  return os.path.join(os.path.dirname(os.path.abspath(model_path)), LABELS)


def model_labels(model_path: str, fallback: list[str] | None = None) -> list[str]:
  """A model's class names: its `labels.txt`, else `fallback` (else a `UserError`)."""
  path = labels_beside(model_path)
  if fallback is not None and not os.path.exists(path):
    return list(fallback)
  return read_labels(path)


def write_labels(path: str, class_names: list[str]) -> None:
  """`labels.txt`: one class name a line, in class-index order."""
  write_text(path, "".join(f"{name}\n" for name in class_names))


def read_labels(path: str) -> list[str]:
  """The class names of a `labels.txt`; a missing file is a `UserError`."""
  from flowers.errors import UserError  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise UserError(f"{path} not found: it is written beside the model by "
                    "--mode=train, --mode=tune and --mode=export.")
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]
