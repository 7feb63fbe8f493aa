"""What made a run: `WORKDIR/run.json`, written when it starts, checked on resume.

A run's results depend on its settings, its images, its split, the weights it
started from and the software. `run.json` records all of them. Running in a
workdir that already holds a run (a resume) must match it field by field, or
it is refused in one line naming what differs: a resume with other settings
would otherwise mix a stage 1 trained one way with a stage 2 trained another,
under a `flags.cfg` and `report.json` claiming the new settings.

Once the check passes, `flags.cfg` is (re)written from the settings, so it
always reproduces the run in the folder as a `--flagfile`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from typing import Any

from flowers import artifacts
from flowers import config as config_lib
from flowers.errors import UserError

# Settings that do not change what a run computes, left out of its fingerprint.
_NOT_RESULTS = {
    "data": ("image_dir", "tfds_data_dir", "download", "cache"),  # Where, not what.
    "train": ("verbose",),
    "search": ("max_trials", "export"),  # A search may be extended.
}
_TRAINING_STATE = (artifacts.STAGE1_WEIGHTS, artifacts.BACKUP_DIR, artifacts.LOGS_DIR,
                   artifacts.stage_history("stage1"), artifacts.stage_history("stage2"),
                   artifacts.MODEL, artifacts.REPORT, artifacts.HISTORY)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def weights_identity(weights: str | None) -> str:
  """"imagenet", "random", or the sha256 of a weights file (paths differ by machine)."""
  if weights is None:
    return "random"
  if weights == "imagenet":
    return weights
  if not os.path.isfile(weights):
    raise UserError(f"--weights={weights} is not a file; give the path of a MobileNetV2 "
                    "no-top .h5, or 'imagenet' to download.")
  return "sha256:" + file_sha256(weights)


def listing_sha256(keys: list[str], labels: list[int]) -> str:
  """A digest of which images a source holds and their labels, in any order."""
  lines = sorted(f"{k}\t{l}" for k, l in zip(keys, labels))
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def versions() -> dict[str, str]:
  """The versions of the packages that compute a run's numbers."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  found = {}
  for package in ("flowers", "tensorflow", "keras", "numpy"):
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      found[package] = "none"
  return found


def fingerprint(config: config_lib.RunConfig, mode: str, *, source_name: str,
                listing: str, splits_sha256: str, feature_cache: bool,
                methods: dict[str, str] | None = None) -> dict[str, Any]:
  """Everything a run's results depend on, as JSON.

  `methods` names how the code makes what no setting names (`recipe()`): how
  pixels are decoded and resized, how augmentation resamples, how kernels are
  put on the int8 grid; so a run is not resumed on another recipe.

  A search (`mode="tune"`) leaves out the training values it searches; a
  training run leaves out the search.
  """
  settings = config.to_json()
  kept = {part: {k: v for k, v in settings[part].items()
                 if k not in _NOT_RESULTS.get(part, ())}
          for part in ("data", "train") + (("search",) if mode == "tune" else ())}
  if mode == "tune":
    kept["train"] = {k: v for k, v in kept["train"].items() if k not in config_lib.HPARAMS}
  kept["train"]["feature_cache"] = "on" if feature_cache else "off"  # auto, resolved.
  kept["train"]["weights"] = weights_identity(config.train.weights)
  return {"mode": mode, **kept,
          "source": {"name": source_name, "listing_sha256": listing},
          **(methods or {}), "splits_sha256": splits_sha256, "versions": versions()}


def recipe() -> dict[str, str]:
  """The code's fixed methods, by name: see `fingerprint`."""
  from flowers import augment  # pylint: disable=g-import-not-at-top
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top

  return {"preprocessing": data_lib.PREPROCESSING, "augmentation": augment.METHOD,
          "int8_grid": model_lib.INT8_GRID_METHOD}


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ, with both values ("a.b: 1 -> 2")."""
  if isinstance(old, dict) and isinstance(new, dict):
    found = []
    for key in sorted(set(old) | set(new)):
      found += differences(old.get(key), new.get(key), f"{prefix}{key}.")
    return found
  return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


def begin(config: config_lib.RunConfig, workdir: str, mode: str, source: Any, *,
          feature_cache: bool, chief: bool = True) -> dict[str, Any]:
  """Checks a run against the workdir's `run.json` and records it; returns it.

  `source` is the run's `data.Source` (its name and listing are fingerprinted).

  With `config.overwrite`, an earlier run's training state is deleted first.
  A distributed worker (`chief=False`) only compares: the chief writes.
  """
  path = os.path.join(workdir, artifacts.RUN)
  splits_path = os.path.join(workdir, artifacts.SPLITS)
  new = fingerprint(config, mode, source_name=source.name,
                    listing=listing_sha256(source.keys, source.labels),
                    splits_sha256=file_sha256(splits_path), feature_cache=feature_cache,
                    methods=recipe())
  if os.path.exists(path) and not (config.overwrite and chief):
    changed = differences(artifacts.read_json(path), new)
    if changed:
      shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4
                                         else "")
      raise UserError(f"{workdir} holds a run made with other settings ({shown}); rerun "
                      "with the same flags to resume it, add --overwrite to start afresh, "
                      "or use a new --workdir.")
  if chief:
    if config.overwrite:
      clear_training_state(workdir)
    artifacts.write_json(path, new)
    artifacts.write_text(os.path.join(workdir, artifacts.FLAGS),
                         "\n".join([f"--mode={mode}", f"--workdir={workdir}"]
                                   + as_flags(config)) + "\n")
  return new


def model_data(model_path: str, workdir: str,
               data: config_lib.DataConfig) -> config_lib.DataConfig:
  """The data settings to evaluate a model with: those of the run that made it.

  A model is scored only on its own test split. When it comes from another
  folder, that run's `splits.csv` is copied into `workdir` (which must not
  hold another split), and its split and seed replace the ones given, so the
  images it trained on are never scored as test images.
  """
  model_dir = os.path.dirname(os.path.abspath(model_path))
  if model_dir == os.path.abspath(workdir):
    return data
  manifest = os.path.join(model_dir, artifacts.SPLITS)
  if not os.path.exists(manifest):
    raise UserError(f"{model_path} has no {artifacts.SPLITS} beside it, so which images it "
                    "trained on is unknown; evaluate or export it with --workdir set to the "
                    "folder it was trained in.")
  here = os.path.join(workdir, artifacts.SPLITS)
  if os.path.exists(here) and file_sha256(here) != file_sha256(manifest):
    raise UserError(f"{here} is another split than the one {model_path} was trained on; "
                    "use a fresh --workdir (its split is copied there) or the model's own.")
  os.makedirs(workdir, exist_ok=True)
  shutil.copyfile(manifest, here)
  run = os.path.join(model_dir, artifacts.RUN)
  if os.path.exists(run):
    made = artifacts.read_json(run).get("data", {})
    data = dataclasses.replace(data, split=made.get("split", data.split),
                               seed=made.get("seed", data.seed))
  return data


def clear_training_state(workdir: str) -> None:
  """Deletes what an earlier run left to resume from (the split and caches stay)."""
  for name in _TRAINING_STATE:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def as_flags(config: Any) -> list[str]:
  """`config` as `flowers_main` flags, one per settings field (unset ones left out)."""
  lines = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      lines += as_flags(value)
    elif isinstance(value, bool):
      lines.append(f"--{'' if value else 'no'}{field.name}")
    elif isinstance(value, tuple):
      lines.append(f"--{field.name}={','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)}")
    elif value is None:
      if field.name == "weights":
        lines.append("--weights=none")
    else:
      lines.append(f"--{field.name}={value}")
  return lines
