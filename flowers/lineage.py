"""Lineage: which run and which model every file of a workdir was made from.

`WORKDIR/lineage.json` holds one record per file a mode writes:

    "report.json": {"mode": "train", "run": "<run id>", "model": "<sha256 of model.keras>",
                    "sha256": "<sha256 of report.json itself>"}

The run id is a digest of the run's `run.json` (its settings, data, split,
weights, recipe and versions: `flowers.runs`); the model is the sha256 of the
model file the artifact describes (the model itself for `model.keras`). A
reader uses a file only when its record matches what the workdir holds now
(`check`), and says why when it drops one, so a report of an older model or
run is never shown as the current one. The manifest also names the run the
workdir belongs to (`owner`): a workdir made for evaluating or exporting
another folder's model belongs to that model's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any

from flowers import artifacts
from flowers import schemas


def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def fingerprint_id(fingerprint: Any) -> str:
  """A short digest of a run fingerprint (a run.json, less where its data lives)."""
  kept = {k: v for k, v in fingerprint.items() if k != "location"}
  text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(folder: str) -> str | None:
  """The id of the run in `folder` (from its run.json), or None when it has none."""
  path = os.path.join(folder, artifacts.RUN)
  if not os.path.exists(path):
    return None
  return fingerprint_id(artifacts.read_json(path, fix="add --overwrite to start afresh"))


def model_sha256(path: str) -> str | None:
  """A digest of what a model is, or None when there is no file.

  For a `.keras` file that is its architecture and weights (the zip's members
  but metadata.json, which holds the time it was saved), so saving the same
  model twice gives the same digest; for any other file, its bytes.
  """
  if not os.path.isfile(path):
    return None
  if path.endswith(".keras") and zipfile.is_zipfile(path):
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as archive:
      for name in sorted(archive.namelist()):
        if name != "metadata.json":
          digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()
  return file_sha256(path)


def workdir_model(workdir: str) -> str | None:
  """The sha256 of the model a workdir's results describe: its model.keras."""
  return model_sha256(os.path.join(workdir, artifacts.MODEL))


def read(workdir: str) -> schemas.Lineage:
  """The workdir's manifest: {"owner": run id or None, "files": {name: record}}."""
  path = os.path.join(workdir, artifacts.LINEAGE)
  if not os.path.exists(path):
    return {"owner": None, "files": {}}
  manifest = artifacts.read_json(path, fix="delete it; the files it lists are then "
                                 "treated as unrecorded and rebuilt")
  manifest.setdefault("files", {})
  manifest.setdefault("owner", None)
  return manifest


def owner(workdir: str) -> str | None:
  """The run a workdir belongs to: its run.json's, else the one its manifest names."""
  return run_id(workdir) or read(workdir)["owner"]


def record(workdir: str, names: list[str] | str, *, mode: str, model: str | None,
           run: str | None = None) -> None:
  """Records that `names` (paths relative to `workdir`) were just written by `mode`.

  Args:
    workdir: the run's folder.
    names: the files written.
    mode: the mode that wrote them.
    model: the sha256 of the model they describe (None: they describe no model,
      e.g. the search's trial table).
    run: the run they come from; default: the workdir's own (its run.json).
  """
  names = [names] if isinstance(names, str) else list(names)
  run = run or owner(workdir)
  manifest = read(workdir)
  manifest["owner"] = manifest["owner"] or run
  for name in names:
    manifest["files"][name] = {"mode": mode, "run": run, "model": model,
                               "sha256": file_sha256(os.path.join(workdir, name))}
  artifacts.write_json(os.path.join(workdir, artifacts.LINEAGE), manifest)


def check(workdir: str, name: str, *, model: str | None = None,
          run: str | None = None) -> str | None:
  """Why `name` is not a result of the workdir's current run and model; None if it is.

  Args:
    workdir: the run's folder.
    name: the file, relative to `workdir`.
    model: the sha256 of the model it must describe; None skips that check.
    run: the run it must come from; default: the workdir's own.
  """
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return "missing"
  entry = read(workdir)["files"].get(name)
  if entry is None:
    return "it has no lineage record (made by an older flowers, or copied in)"
  if entry["sha256"] != file_sha256(path):
    return "it changed after it was written"
  run = run or owner(workdir)
  if entry["run"] != run:
    return "it was made by another run in this folder"
  if model is not None and entry["model"] not in (None, model):
    return "it describes another model than the one here"
  return None


def forget(workdir: str, names: list[str]) -> None:
  """Drops the records of `names` (after they were deleted)."""
  manifest = read(workdir)
  if any(n in manifest["files"] for n in names):
    for name in names:
      manifest["files"].pop(name, None)
    artifacts.write_json(os.path.join(workdir, artifacts.LINEAGE), manifest)


def recorded(workdir: str) -> list[str]:
  """Every file the manifest lists."""
  return sorted(read(workdir)["files"])
