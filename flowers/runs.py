"""What made a run: `WORKDIR/run.json`, written when it starts, checked on resume.

A run's results depend on its settings, its images, its split, the weights it
started from and the software. `run.json` records all of them. Running in a
workdir that already holds a run (a resume) must match it field by field, or
it is refused in one line naming what differs: a resume with other settings
would otherwise mix a stage 1 trained one way with a stage 2 trained another,
under a `flags.cfg` and `report.json` claiming the new settings.

Once the check passes, `flags.cfg` is written from the settings (never from
one-shot actions such as --overwrite), so as a `--flagfile` it resumes the run
in the folder. Also here: whether a run already finished there (`finished`),
what --overwrite deletes (`start_afresh`: only what a run of flowers made),
and which data settings a later mode uses for a model (`model_data`: those of
the run that made it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

from flowers import artifacts
from flowers import backbone as backbone_lib
from flowers import cli
from flowers import config as config_lib
from flowers import lineage
from flowers import schemas
from flowers.errors import UserError

# Settings that do not change what a run computes, left out of its fingerprint.
_NOT_RESULTS = {
    # Where the data lives, whether to fetch it, how a bad image is handled (a --strict
    # run that passes computes what a lenient one does), how the pipeline caches.
    "data": ("image_dir", "tfds_data_dir", "download", "strict", "pixel_cache", "split"),
    "train": ("verbose",),
    "search": ("max_trials",),  # A search may be extended.
}
# Where a run's data lives: recorded in run.json for the modes that come after (evaluate,
# export), never compared (a moved image folder or TFDS copy is the same data).
_LOCATION = ("image_dir", "tfds_data_dir", "download")
# ... and how its split was spelled (the fingerprint holds the fractions it means).
# What a train or tune run leaves in its folder to resume from, beside the files lineage.json
# lists: --overwrite deletes these only in a folder that holds a run (`start_afresh`).
_STAGES = ("frozen", "fine_tune", *artifacts.LEGACY_STAGES)
_RUN_STATE = (artifacts.BACKUP_DIR, artifacts.LOGS_DIR, artifacts.TUNER_DIR, artifacts.SPLITS,
              artifacts.RUN, artifacts.FLAGS, artifacts.LINEAGE,
              *(f"{stage}.weights.h5" for stage in _STAGES),
              *(artifacts.stage_history(stage) for stage in _STAGES))
# What a train or tune run writes and records in lineage.json; an older flowers recorded
# none of it, so --overwrite deletes these too in a folder with its run.json but no lineage.
_RUN_OUTPUTS = (artifacts.MODEL, artifacts.REPORT, artifacts.HISTORY, artifacts.LABELS,
                artifacts.TRIALS, artifacts.BEST_HPARAMS, artifacts.EXPORT_REPORT,
                artifacts.SUMMARY, artifacts.PLOTS_DIR, *artifacts.TFLITE_NAMES.values())


file_sha256 = lineage.file_sha256


def weights_identity(weights: str | None, *, backbone: str = backbone_lib.DEFAULT,
                     image_size: int = 224, alpha: float = 1.0) -> str:
  """"random", or the sha256 of the weights file, however it is named.

  "imagenet" is the file Keras loads for it at this backbone, input size and
  width (`Backbone.imagenet_weights`: cached in $KERAS_HOME/models, downloaded
  there first when missing), so --weights=imagenet and --weights=PATH to that
  file are one run; a path is never recorded (paths differ by machine).
  """
  if weights is None:
    return "random"
  if weights == "imagenet":
    weights = backbone_lib.get(backbone).imagenet_weights(alpha, image_size)
  elif not os.path.isfile(weights):
    raise UserError(f"--weights={weights} is not a file; give the path of the backbone's "
                    "no-top .h5, or 'imagenet' to download.")
  return "sha256:" + _weights_sha256(weights)


def run_weights_identity(config: config_lib.RunConfig) -> str:
  """`weights_identity` of a run's --weights, for its backbone, input size and width."""
  train = config.train
  return weights_identity(train.weights, backbone=train.backbone,
                          image_size=config.data.image_size, alpha=train.alpha)


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256.


def _weights_sha256(path: str) -> str:
  """`file_sha256` of a weights file, hashed once per process while it is unchanged."""
  stat = os.stat(path)
  key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
  if key not in _DIGESTS:
    _DIGESTS[key] = file_sha256(path)
  return _DIGESTS[key]


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


def split_identity(split: str, seed: int) -> Any:
  """How a --split is spelled does not matter, only the fractions it means."""
  from flowers import split as split_lib  # pylint: disable=g-import-not-at-top

  spec = split_lib.parse_split(split, seed)
  return "official" if spec.is_official else [round(f, 9) for f in spec.fractions]


def source_identity(source: Any) -> schemas.SourceIdentity:
  """What a source's images are, not where they live (a moved folder is the same data)."""
  name = source.name if source.name.startswith("tfds:") else "image_dir"
  content = getattr(source, "content_sha256", None)
  return {"name": name, "listing_sha256": listing_sha256(source.keys, source.labels),
          "content_sha256": content() if callable(content) else None}


def fingerprint(config: config_lib.RunConfig, mode: str, *, source: Any,
                splits_sha256: str, feature_cache: bool,
                methods: dict[str, str] | None = None) -> schemas.Fingerprint:
  """Everything a run's results depend on, as JSON.

  `methods` names how the code makes what no setting names (`recipe()`): how
  pixels are decoded and resized, how augmentation resamples, how kernels are
  put on the int8 grid; so a run is not resumed on another recipe.

  A search (`mode="tune"`) leaves out the training values it searches, but
  keeps them under --first_trial=configured, where they are its first trial;
  a training run leaves out the search. Settings that change the model only
  through another path are resolved: the shuffle buffer of the plain input path
  (set by `--cache`), the calibration images of the int8-grid rounding.
  """
  settings = config.to_json()
  kept = {part: {k: v for k, v in settings[part].items()
                 if k not in _NOT_RESULTS.get(part, ())}
          for part in ("data", "train") + (("search",) if mode == "tune" else ())}
  if mode == "tune" and config.search.first_trial is not config_lib.FirstTrial.CONFIGURED:
    kept["train"] = {k: v for k, v in kept["train"].items() if k not in config_lib.HPARAMS}
  kept["data"]["split"] = split_identity(config.data.split, config.data.split_seed)
  if not feature_cache:  # The cached path reads its own sampler, not the shuffled pipeline.
    kept["data"]["shuffle_buffer"] = ("whole split" if config.data.pixel_cache.value == "memory"
                                      else "bounded")
    # Each stage's own stream (`inputs.PlainInputs`); older runs shared one across stages
    # and trials, so their state would resume on another order: refused, not resumed.
    kept["data"]["shuffle"] = "per stage, seeded"
  kept["train"]["feature_cache"] = "on" if feature_cache else "off"  # auto, resolved.
  kept["train"]["weights"] = run_weights_identity(config)
  if config.train.int8_grid_weights:  # The rounding's bias correction uses these images.
    kept["export"] = {"calibration_examples": config.export.calibration_examples}
  return {"mode": mode, **kept, "source": source_identity(source),
          **(methods or {}), "splits_sha256": splits_sha256, "versions": versions()}


def location(config: config_lib.RunConfig) -> schemas.Location:
  """Where the run's data lives (absolute paths), for the modes that come after."""
  found: dict[str, Any] = {"split": config.data.split}
  for name in _LOCATION:
    value = getattr(config.data, name)
    found[name] = os.path.abspath(value) if isinstance(value, str) else value
  return found


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
      if not prefix and key == "location":
        continue  # Where the data lives is not what it is.
      found += differences(old.get(key), new.get(key), f"{prefix}{key}.")
    return found
  return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


def run_fingerprint(config: config_lib.RunConfig, workdir: str, mode: str, source: Any,
                    feature_cache: bool) -> schemas.Fingerprint:
  """`fingerprint` of a run in `workdir`, whose splits.csv is already written."""
  return fingerprint(config, mode, source=source,
                     splits_sha256=file_sha256(os.path.join(workdir, artifacts.SPLITS)),
                     feature_cache=feature_cache, methods=recipe())


def shown_differences(changed: list[str], most: int = 4) -> str:
  """`differences`' fields for a one-line message: the first `most`, and how many more."""
  return "; ".join(changed[:most]) + (f"; and {len(changed) - most} more"
                                      if len(changed) > most else "")


def _refuse_other_settings(workdir: str, old: dict[str, Any], new: dict[str, Any]) -> None:
  changed = differences(old, new)
  if changed:
    shown = shown_differences(changed)
    raise UserError(f"{workdir} holds a run made with other settings ({shown}); rerun "
                    "with the same flags to resume it, add --overwrite to start afresh, "
                    "or use a new --workdir.")


def read_run(workdir: str) -> schemas.RunJson | None:
  """The workdir's run.json (settings under their current names), or None; a damaged
  one is a one-line error."""
  raw = _read_raw(workdir)
  return None if raw is None else upgrade(raw)


def _read_raw(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, artifacts.RUN)
  if not os.path.exists(path):
    return None
  return artifacts.read_json(path, fix="add --overwrite to start afresh")


def upgrade(run: dict[str, Any]) -> dict[str, Any]:
  """A run.json of an older flowers with its settings under their current names.

  Renamed settings (`config.RENAMED`) move to their new name and part; the
  one seed that set the split and the training becomes `data.split_seed` and
  `train.seed`. A run recorded before a setting existed had its default.
  """
  run = json.loads(json.dumps(run))  # A copy.
  paths = config_lib.field_paths()
  for part in [p for p in ("data", "train", "search", "export") if isinstance(run.get(p), dict)]:
    for old in [k for k in run[part] if k in config_lib.RENAMED]:
      new_part, new_name = paths[config_lib.RENAMED[old]]
      run.setdefault(new_part, {})[new_name] = run[part].pop(old)
  data, train = run.get("data"), run.get("train")
  if isinstance(data, dict) and "seed" in data:
    seed = data.pop("seed")
    data.setdefault("split_seed", seed)
    if isinstance(train, dict):
      train.setdefault("seed", seed)
  if isinstance(data, dict):
    data.setdefault("holdout_classes", 0)  # Older runs trained on every class.
  if isinstance(run.get("search"), dict):  # Older searches trained every trial in full.
    run["search"].setdefault("halving_rungs", [])
    run["search"].setdefault("halving_factor", 3)
    run["search"].setdefault("first_trial", "drawn")  # ... and drew their first trial.
  if isinstance(train, dict):
    train.setdefault("backbone", "mobilenet_v2")  # The only one there was.
    train.setdefault("calibrate", False)  # Older runs shipped their scores uncalibrated.
    train.setdefault("true_accept_rate", 0.0)  # ... and chose no "unknown" threshold.
    train.setdefault("fine_tune_early_stopping_patience", None)  # Both stages had one.
    if "fine_tune_learning_rate" in train and train["fine_tune_learning_rate"] is None:
      train["fine_tune_learning_rate"] = train["learning_rate"] / 10.0  # Unset, as now resolved.
    train.setdefault("class_weight", "none")  # Older runs weighed every image the same.
    train.setdefault("fine_tune_ema_momentum", 0.0)  # ... and kept the trained weights.
  return run


def begin(config: config_lib.RunConfig, workdir: str, mode: str, source: Any, *,
          feature_cache: bool, chief: bool = True) -> schemas.Fingerprint:
  """Checks a run against the workdir's `run.json` and records it; returns it.

  `source` is the run's `data.Source` (what its images are is fingerprinted).
  Call `start_afresh` first for `--overwrite`. A distributed worker
  (`chief=False`) only compares: the chief writes. Files already as they
  should be are not rewritten, so a rerun of a finished run changes nothing.
  """
  new = run_fingerprint(config, workdir, mode, source, feature_cache)
  old = _comparable(read_run(workdir))
  recorded = new
  if old is not None:
    _refuse_other_settings(workdir, old, new)
    # The same run: its record stays as written (an older flowers' names too), so the
    # run id every lineage record names stays the same.
    recorded = {k: v for k, v in _read_raw(workdir).items() if k != "location"}
  if chief:
    artifacts.remove_orphaned_temporaries(workdir)
    if old is not None:
      artifacts.rename_legacy_stage_files(workdir)
    _write_if_changed(os.path.join(workdir, artifacts.RUN),
                      json.dumps({**recorded, "location": location(config)}, indent=2,
                                 sort_keys=True) + "\n")
    _write_if_changed(os.path.join(workdir, artifacts.FLAGS),
                      "\n".join([f"--mode={mode}", f"--workdir={workdir}"]
                                 + cli.as_flags(config)) + "\n")
  return new


def _comparable(run: schemas.RunJson | None) -> schemas.RunJson | None:
  """`run` with weights recorded as "imagenet" (by an older flowers) as the file they are.

  An older flowers recorded the name; the run loaded the file Keras caches
  for it, which is compared by its sha256 as a run now records it. When that
  file cannot be had, the name stays, so the run differs and is not resumed.
  """
  train = (run or {}).get("train")
  if not isinstance(train, dict) or train.get("weights") != "imagenet":
    return run
  try:
    identity = weights_identity("imagenet", backbone=train.get("backbone", backbone_lib.DEFAULT),
                                image_size=run.get("data", {}).get("image_size", 224),
                                alpha=train.get("alpha", 1.0))
  except UserError:
    return run
  return {**run, "train": {**train, "weights": identity}}


def _write_if_changed(path: str, text: str) -> None:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
  artifacts.write_text(path, text)


def finished(config: config_lib.RunConfig, workdir: str, mode: str, source: Any, *,
             feature_cache: bool) -> schemas.Report | None:
  """The report of this very run when it already finished in `workdir`, else None.

  Finished means: run.json records these settings and data, and report.json
  is this run's and describes the model.keras beside it (`flowers.lineage`).
  A search is finished for at most the trials it ran (a larger --max_trials
  extends it) and, with its export on, once the export of that model is there.
  """
  old = read_run(workdir)
  if old is None or config.overwrite or not os.path.exists(
      os.path.join(workdir, artifacts.SPLITS)):
    return None
  old = _comparable(old)
  if differences(old, run_fingerprint(config, workdir, mode, source, feature_cache)):
    return None
  model = lineage.workdir_model(workdir)
  if model is None or lineage.check(workdir, artifacts.REPORT, model=model) is not None:
    return None
  report = artifacts.read_json(os.path.join(workdir, artifacts.REPORT))
  if mode == "tune":
    if report.get("max_trials", 0) < config.search.max_trials:
      return None
    if config.export.export_best and lineage.check(workdir, config.export.file_name,
                                              model=model) is not None:
      return None
  return report


def model_data(model_path: str, workdir: str,
               data: config_lib.DataConfig) -> config_lib.DataConfig:
  """The data settings to evaluate or export a model with: those of the run that made it.

  A model is scored only on its own test split, with the data its run used:
  the split, seed and dataset come from the run.json beside the model, and
  so does where the data lives unless the command line names a place
  (`--tfds_data_dir`, `--image_dir`: the data may have moved). When the model
  comes from another folder, that run's `splits.csv` is copied into
  `workdir`, which must be fresh or already that run's (`refuse_foreign`).
  """
  model_dir = os.path.dirname(os.path.abspath(model_path))
  run = read_run(model_dir)
  if run is not None:
    data = data_of_run(run, data)
  if same_folder(model_dir, workdir):
    return data
  refuse_foreign(model_path, workdir)
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
  if not os.path.exists(here):
    shutil.copyfile(manifest, here)
  return data


def data_of_run(run: schemas.RunJson, data: config_lib.DataConfig) -> config_lib.DataConfig:
  """`data` with the dataset, split, seed and held-out classes a run recorded, and
  where its data lived unless `data` names a place itself."""
  made = run.get("data", {})
  where = run.get("location", {})
  kept = {name: value for name, value in where.items()
          if name in _LOCATION and getattr(data, name) in (None, True)}
  if data.image_dir or data.tfds_data_dir:  # The command line says where the data is now.
    kept = {}
  if "tfds_name" in made:
    kept["tfds_name"] = made["tfds_name"]
  return dataclasses.replace(data, split=where.get("split", data.split),
                             split_seed=made.get("split_seed", data.split_seed),
                             holdout_classes=made.get("holdout_classes", 0), **kept)


def same_folder(a: str, b: str) -> bool:
  """Whether two paths name one folder (symlinks and spellings resolved)."""
  return os.path.realpath(a) == os.path.realpath(b)


def refuse_foreign(model_path: str, workdir: str) -> None:
  """Refuses to write results of `model_path` into a workdir that holds another run.

  A workdir belongs to one run (its run.json, or the model first evaluated or
  exported into a fresh one); another run's results there would be mixed
  with its own.
  """
  model_dir = os.path.dirname(os.path.abspath(model_path))
  if not os.path.isdir(workdir):
    return
  if os.path.isfile(os.path.join(workdir, artifacts.MODEL)) or read_run(workdir) is not None:
    theirs = lineage.owner(workdir)
    if theirs is None or theirs != lineage.owner(model_dir):
      raise UserError(f"--workdir={workdir} holds another run; write the results of "
                      f"{model_path} into its own folder (--workdir={model_dir}) or a fresh "
                      "--workdir.")
    return
  theirs = lineage.read(workdir)["owner"]
  ours = lineage.owner(model_dir) or lineage.model_sha256(model_path)
  if theirs is not None and theirs != ours:
    raise UserError(f"--workdir={workdir} holds the results of another model; write those "
                    f"of {model_path} into a fresh --workdir.")


def start_afresh(workdir: str) -> None:
  """`--overwrite`: deletes what an earlier run of flowers made in `workdir`, nothing else.

  In a folder that holds a run (its lineage.json or run.json): every file
  lineage.json lists, and the training state a run leaves there (`_RUN_STATE`:
  the split, run.json, flags.cfg, the stages' weights, histories, backup/,
  logs/ and the search's tuner/); in a folder of an older flowers, whose run
  recorded no lineage, what a train or tune writes too (`_RUN_OUTPUTS`). A
  folder without a run is left alone when it holds nothing else than caches,
  hidden files and a split of `--mode=prepare` (deleted), and refused in one
  line otherwise: --overwrite pointed at someone's project folder would
  delete their logs/, plots/ or summary.md. Caches stay: they are named by a
  digest of everything that decides their bytes, so a new run reuses one only
  when it would compute the same, and the other ones are pruned when the new
  run sets up its own.
  """
  if not os.path.isdir(workdir):
    return
  manifest = _flowers_json(os.path.join(workdir, artifacts.LINEAGE), "files")
  run = _flowers_json(os.path.join(workdir, artifacts.RUN), "mode")
  prepared = _is_split_manifest(os.path.join(workdir, artifacts.SPLITS))
  if run is None and manifest is None and not (
      prepared and os.path.exists(os.path.join(workdir, artifacts.RUN))):  # A damaged run.json.
    _refuse_a_folder_without_a_run(workdir, prepared)
    names = [artifacts.SPLITS] if prepared else []
  elif manifest is not None:
    names = [*manifest["files"], *_RUN_STATE]
  else:  # Its run.json but no lineage: an older flowers, or a run stopped before its records.
    names = [*_RUN_STATE, *_RUN_OUTPUTS,
             *(n for n in os.listdir(workdir) if n.startswith("evaluation_"))]
  root = os.path.realpath(workdir)
  for name in sorted(set(names), key=len, reverse=True):
    path = os.path.join(workdir, name)
    where = os.path.realpath(path)
    if where == root or os.path.commonpath([root, where]) != root:
      continue  # A record naming the folder or a file outside it is not the run's to delete.
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
      _remove_empty_parents(os.path.dirname(path), workdir)
  artifacts.remove_orphaned_temporaries(workdir)


def _flowers_json(path: str, key: str) -> dict[str, Any] | None:
  """The JSON object at `path` when it holds `key` as flowers writes it, else None."""
  try:
    with open(path, encoding="utf-8") as f:
      found = json.load(f)
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  if not isinstance(found, dict) or key not in found:
    return None
  if key == "files" and not isinstance(found["files"], dict):
    return None
  return found


def _is_split_manifest(path: str) -> bool:
  """Whether `path` is a splits.csv that flowers wrote (its header)."""
  from flowers import split as split_lib  # pylint: disable=g-import-not-at-top

  try:
    with open(path, encoding="utf-8") as f:
      return f.readline().strip() == ",".join(split_lib.MANIFEST_HEADER)
  except (OSError, UnicodeDecodeError):
    return False


def _refuse_a_folder_without_a_run(workdir: str, prepared: bool) -> None:
  """Refuses --overwrite in a folder that holds no run but files flowers did not make."""
  own = {artifacts.CACHE_DIR} | ({artifacts.SPLITS} if prepared else set())
  others = sorted(n for n in os.listdir(workdir) if n not in own and not n.startswith("."))
  if others:
    shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    raise UserError(f"--overwrite deletes only what a flowers run made, and {workdir} holds "
                    f"no run (no {artifacts.RUN} or {artifacts.LINEAGE}) but {shown}; point "
                    "--workdir at the run's folder, or at a new one.")


def _remove_empty_parents(folder: str, workdir: str) -> None:
  """Removes `folder` and its parents up to `workdir` while they are empty."""
  root = os.path.realpath(workdir)
  while os.path.realpath(folder) != root and os.path.isdir(folder) and not os.listdir(folder):
    os.rmdir(folder)
    folder = os.path.dirname(folder)
