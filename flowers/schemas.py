"""The JSON files a run leaves in its workdir, typed once.

One `TypedDict` per file: its docstring names the file, the function that
writes it and the ones that read it; each key says what it holds. Accuracies
and F1 scores are fractions in [0, 1]; a `*_points` key or `max_accuracy_drop`
is in percentage points (100 times a fraction); times are seconds. A key marked
`NotRequired` is written only in the case its comment names.

`problems` checks a loaded JSON value against one of these types (or any
annotation made of JSON types), so tests, and readers of the files, can tell a
file flowers wrote from one it did not. No TensorFlow here.
"""

import collections.abc
import types
import typing
from typing import Any, Literal, NotRequired, TypedDict, Union

# Sections shared by several files.


class SkippedImages(TypedDict):
  """Images left out of a split's figures because they could not be decoded.

  Part of report.json, evaluation_<model>.json and export_report.json.
  """

  test: int  # Test images skipped; the test metrics are over the others.
  val: NotRequired[int]  # report.json, when the split has val images.
  train: NotRequired[int]  # report.json, when the training images were counted.
  listing: NotRequired[int]  # Files of an image folder that are no readable image.


class TestMetrics(TypedDict):
  """`evaluate.metrics` on the test split (prefix "test")."""

  test_accuracy: float  # Top-1, a fraction.
  test_top5_accuracy: float  # A fraction (top-k for k = min(5, classes)).
  test_macro_f1: float  # Mean F1 over the classes present in the split.
  num_test_examples: int  # Images scored (the split's, less the skipped ones).
  per_class_accuracy: dict[str, float]  # Class name -> recall; absent classes left out.
  confusion_matrix: list[list[int]]  # [true][predicted] image counts, class-index order.
  class_names: list[str]  # In class-index (model output) order.


class ValMetrics(TypedDict, total=False):
  """`evaluate.metrics` on the val split as report.json keeps it (no per-class
  parts): all four when the split has val images, else none."""

  val_accuracy: float  # Top-1, a fraction.
  val_top5_accuracy: float  # A fraction.
  val_macro_f1: float
  num_val_examples: int


class Hyperparameters(TypedDict):
  """The searched values of one trial (`config.HPARAMS`)."""

  dropout: float  # Dropout before the classifier, a fraction.
  unfreeze_ratio: float  # Top fraction of the base's layers trained in stage 2.
  fine_tune_learning_rate: float  # Stage 2's learning rate.


class BestHparams(Hyperparameters):
  """`best_hparams.json`: every training setting the search gave the best trial beyond
  the run's own (`tune.trial_settings`), so `--mode=train` with the run's settings and
  these repeats the trial exactly.

  Written by `tune._finish`; read by `summary.write_report`, and kept under
  "best_hparams" in the search's report.json.
  """

  feature_cache_cut_ratio: float  # The unfreeze ratio every trial's feature cache was cut for.
  # Stage 2's patience under successive halving (--fine_tune_epochs with early stopping on,
  # else 0): the schedule, not val, ends stage 2.
  fine_tune_early_stopping_patience: NotRequired[int]


# report.json


class Reliability(TypedDict):
  """`calibrate.reliability`: the test split in equal-width bins of top-1 confidence."""

  bins: int  # How many bins split [0, 1] (15).
  count: list[int]  # Images per bin, lowest confidence first.
  confidence: list[float | None]  # Mean top-1 probability per bin; None when empty.
  accuracy: list[float | None]  # Top-1 accuracy per bin, a fraction; None when empty.


class Calibration(TypedDict):
  """The temperature fitted on val and folded into the classifier (`train._calibrate`).

  NLL is in nats per image (probabilities clipped at 1e-7); ECE, a fraction, is
  over 15 equal-width bins of top-1 confidence. "after" is the shipped
  model's; "before", the model's before the fold (the same when none was).
  """

  applied: bool  # Whether the temperature was folded in (only when it lowers val NLL).
  reason: str  # Why it was or was not: "it lowers val NLL", "no val split ...", ...
  temperature: NotRequired[float]  # The fitted T (logits / T); absent without val.
  val_nll_before: NotRequired[float]  # With a val split, as the val figures below.
  val_nll_after: NotRequired[float]
  val_ece_before: NotRequired[float]
  val_ece_after: NotRequired[float]
  test_nll_before: float  # Measured on test; never used to choose.
  test_nll_after: float
  test_ece_before: float
  test_ece_after: float
  test_reliability_before: Reliability
  test_reliability_after: Reliability


class UnknownThreshold(TypedDict):
  """The top-probability threshold below which an image is "unknown" (`train._unknown_threshold`).

  Chosen on val (known classes only) as the largest threshold that accepts at
  least `true_accept_rate` of its images; the export writes it into the
  .tflite's metadata (ScoreThresholdingOptions), and predict applies it.
  """

  score: float  # Accept an image when its top probability is >= this.
  true_accept_rate: float  # --true_accept_rate, a fraction.
  val_accepted: float  # Share of val images accepted (>= true_accept_rate).
  test_accepted: float  # Share of test images accepted; measured, never used to choose.


class OpenSetScore(TypedDict):
  """One score's open-set figures (`open_set._score_report`); shares are fractions."""

  threshold: float  # Chosen on known val images for the true-accept rate.
  val_auroc: float  # Known against held-out val images.
  val_false_accept: float  # Held-out val images at or above the threshold.
  test_auroc: float
  test_false_accept: float
  test_true_accept: float  # Known test images at or above the threshold.


class OpenSet(TypedDict):
  """Under --holdout_classes: how well each score tells held-out classes from known ones.

  `open_set.open_set_report`; the protocol is in docs/design.md.
  """

  held_out_classes: list[str]  # Left out of training; their images are the unknowns.
  true_accept_rate: float  # The run's --true_accept_rate (0.95 when it is 0).
  num_val_unknown: int
  num_test_unknown: int
  scores: dict[str, OpenSetScore]  # Score name (open_set.SCORES) -> its figures.
  chosen_score: str  # The lowest val false-accept rate (then the highest val AUROC).


class _RunReport(TestMetrics, ValMetrics):
  """What every report.json holds: `train.save_run`'s part (see TrainReport)."""

  # Val accuracy of the model as trained, before its kernels were rounded to the
  # int8 grid; only when the rounding moved kernels and the split has val images.
  val_accuracy_before_int8_grid: NotRequired[float]
  calibration: NotRequired[Calibration]  # Under --calibrate (the default).
  unknown_threshold: NotRequired[UnknownThreshold]  # With val images and a rate above 0.
  open_set: NotRequired[OpenSet]  # Under --holdout_classes, with val and test unknowns.
  source: str  # The source's name: "tfds:<dataset>", or the image folder's path.
  split: str  # --split as given ("64,16,20", "official").
  split_seed: int  # The seed of the run's split.
  seed: int  # The run's training seed (initialization, augmentation, shuffling, search).
  num_train_examples: int  # Training images the stages saw (less the skipped ones).
  num_skipped_images: SkippedImages
  feature_cache: bool  # Whether the stages trained on the frozen-prefix cache.
  # Under --class_weight=balanced: class name -> the weight of its training images in
  # both stages' loss (train images / (classes x the class's)); a class with none is left out.
  class_weights: NotRequired[dict[str, float]]
  config: dict[str, Any]  # `RunConfig.to_json()`: one object per settings part.


class TrainReport(_RunReport):
  """`report.json` of `--mode=train`: the model's test and val metrics and what the run was.

  Written by `train.save_run` (for `train.train_and_evaluate`); read by
  `runs.finished` (a rerun returns it), `summary.write_report`, and
  `modes.train` (the printed line).
  """

  train_seconds: float  # Wall time of the whole train mode, to 0.1 s.


class SearchWork(TypedDict):
  """What a search did (`tune.search_work`), over every finished trial of the search.

  Work counts are the same on every machine; seconds are this machine's.
  """

  trials: int  # Finished trials.
  frozen_epochs: int  # Stage 1 epochs, all trials together.
  fine_tune_epochs: int  # Stage 2 epochs trained, all trials and rungs together.
  fine_tune_seconds: float  # Their seconds (Keras's epochs, validation included).
  # Stage 1's seconds, and the full-model passes over val that scored trials (none
  # under successive halving: Keras's val of the epochs scores); absent in older searches.
  frozen_seconds: NotRequired[float]
  val_passes: NotRequired[int]
  trial_seconds: float  # The trials' whole time: build, stage 1, stage 2, scoring.
  inputs_seconds: float  # This process's time to make (or read) the stages' inputs.
  cache_images: int | None  # Images the frozen-prefix cache holds; None without one.
  # Successive halving: (trials, stage 2 epoch) per rung, and the epochs that spends.
  halving_schedule: NotRequired[list[list[int]]]
  fine_tune_epoch_budget: NotRequired[int]


class TuneReport(_RunReport):
  """`report.json` of `--mode=tune`: the best trial's model, as a train run reports it,
  plus the search.

  Written by `train.save_run` (for `tune._finish`); read by `runs.finished`
  (`max_trials`: a larger one extends the search), `summary.write_report` and
  `modes.tune`.
  """

  best_trial_id: str  # KerasTuner's id of the best trial ("0", "1", ...).
  best_trial_val_accuracy: float  # Its objective: val accuracy of the model as shipped.
  best_hparams: BestHparams
  num_trials: int  # Trials that finished.
  search_seconds: float  # Wall time of this search call, to 0.1 s.
  tuner: str  # "bayesian", "random" or "hyperband".
  max_trials: int  # --max_trials the search ran to.
  distribution_strategy: str  # --distribution_strategy.
  distributed: bool  # Whether trials ran on KerasTuner workers.
  search_work: NotRequired[SearchWork]  # What the search trained, beside its seconds.



Report = TrainReport | TuneReport
"""`report.json`: either kind (`problems` accepts a file matching one of them)."""


# evaluation_<model>.json


class EvaluationReport(TestMetrics):
  """`evaluation_<model stem>.json`: `--mode=evaluate`'s test metrics of one model.

  Written by `modes.evaluate`; read by `summary.write_report` when no usable
  report.json is there.
  """

  num_skipped_images: SkippedImages  # "test", and "listing" for an image folder.
  # Test NLL (nats per image) and top-1 ECE (15 bins), as in report.json's "calibration";
  # absent in evaluations written by older flowers.
  test_nll: NotRequired[float]
  test_ece: NotRequired[float]
  # The model's "unknown" threshold (open_set.model_threshold: a .tflite's metadata, a
  # .keras's report.json) and the share of test images scoring >= it; absent without one.
  unknown_threshold: NotRequired[float]
  test_accepted: NotRequired[float]
  model: str  # Absolute path of the evaluated .keras or .tflite.
  source: str  # The source's name: "tfds:<dataset>", or the image folder's path.
  split: str  # --split of the model's run.
  split_seed: int  # The split seed of the model's run.


# export_report.json


class ExportComparison(TypedDict):
  """`export.compare`: the TFLite model against the Keras model on the test split."""

  float_test_accuracy: float  # The Keras model's, a fraction.
  tflite_test_accuracy: float  # The TFLite model's, a fraction.
  accuracy_drop_points: float  # 100 * (float - tflite), in points, to 4 decimals.
  top1_agreement: float  # Fraction of images both models give the same top-1 class.
  max_abs_probability_diff: float  # Largest gap between their probabilities.
  mean_abs_probability_diff: float
  float_test_nll: float  # The Keras model's test NLL (nats per image; `calibrate.nll`).
  tflite_test_nll: float  # The TFLite model's.
  float_test_ece: float  # The Keras model's test ECE, a fraction (15 bins).
  tflite_test_ece: float  # The TFLite model's.
  num_test_examples: int


class TfliteInterface(TypedDict):
  """`export.check_interface`: the exported model's input and output, as LiteRT sees them."""

  input_dtype: str  # int8 exports: --io_dtype ("uint8" or "int8"); others "uint8".
  input_shape: list[int]  # [1, size, size, 3].
  input_quantization: list[float]  # [scale, zero point]; [0.0, 0] when not quantized.
  output_dtype: str  # The int8 io dtype, else "float32".
  output_shape: list[int]  # [1, classes].
  output_quantization: list[float]  # [scale, zero point].


class ExportReport(ExportComparison, TfliteInterface):
  """`export_report.json`: the export's verification, written whether it passed or not.

  Written by `export.export_from_workdir`; read by `summary.write_report`.
  """

  num_skipped_images: SkippedImages  # "test" only.
  tflite_val_accuracy: NotRequired[float]  # When the split has val images.
  int8_test_accuracy: NotRequired[float]  # int8 exports: tflite_test_accuracy again.
  int8_val_accuracy: NotRequired[float]  # int8 exports with val images.
  passed: bool  # The drop was within max_accuracy_drop: the .tflite was written.
  path: str  # Where the .tflite is (or would have been).
  model: str  # Absolute path of the exported .keras.
  quantization: str  # "int8", "float16", "dynamic" or "none".
  io_dtype: str  # int8 exports: --io_dtype; others "float32".
  size_bytes: int  # Of the .tflite, metadata included.
  keras_size_bytes: int  # Of the .keras.
  max_accuracy_drop: float  # --max_accuracy_drop, in points.
  calibration_examples: int  # Images the int8 conversion calibrated on (0 for others).
  conv_kernels_off_int8_grid: int  # Conv kernels of the model not on the int8 grid.
  class_names: list[str]  # The labels, in output order.
  metadata_written: bool  # Always true: TFLite metadata is inside the .tflite.
  metadata_labels: int  # Labels read back from that metadata.
  # The "unknown" threshold, present when the model's run chose one (report.json's
  # "unknown_threshold"). Shares are fractions of known-class images whose top score is
  # >= the threshold (what MediaPipe Tasks accept).
  # The score threshold in that metadata, read back (float32): chosen on the .tflite's own
  # val scores by the run's rule, <= max_output_score. Absent when none was written: the
  # run chose none, or (with float_unknown_threshold present) no val images to choose on.
  unknown_threshold: NotRequired[float]
  true_accept_rate: NotRequired[float]  # The run's --true_accept_rate: both thresholds' floor.
  # The highest score the .tflite's output can give: 1.0 for a float output, else
  # scale * (q_max - zero_point) (255/256 for flowers' int8 exports).
  max_output_score: NotRequired[float]
  float_unknown_threshold: NotRequired[float]  # The run's, chosen on the Keras model's val.
  float_val_accepted: NotRequired[float]  # Keras model at its own threshold (report.json's).
  float_test_accepted: NotRequired[float]  # Keras model at its own threshold.
  tflite_val_accepted: NotRequired[float]  # .tflite at unknown_threshold (>= true_accept_rate).
  tflite_test_accepted: NotRequired[float]  # .tflite at unknown_threshold; measured only.
  # .tflite's val share at float_unknown_threshold: what shipping the run's would give.
  tflite_val_accepted_at_float_threshold: NotRequired[float]
  # The run's threshold would have accepted under true_accept_rate of val on the .tflite,
  # so the one written is lower (said in one line when exporting).
  unknown_threshold_lowered: NotRequired[bool]
  source: str  # The source's name: "tfds:<dataset>", or the image folder's path.
  split: str  # --split of the model's run.
  split_seed: int  # The split seed of the model's run.
  export_seconds: float  # Wall time of the export, to 0.1 s.


# tuner/trial_<id>/result.json


class MedianStop(TypedDict):
  """Where the median stopping rule stopped a trial (`tune.MedianStopping.stopped`)."""

  epoch: int  # 1-based stage 2 epoch it stopped after.
  best_val_accuracy: float  # The trial's best so far, a fraction.
  median: float  # The finished trials' median best at that epoch, which it trailed.


class TrialResult(TypedDict):
  """`tuner/trial_<id>/result.json`: one finished trial; marks it finished.

  Written by `tune.TwoStageHyperModel.fit`; read by `tune.trial_rows`
  (trials.csv's tuner_id and median_stop) and, for being there,
  `tune.finished_fine_tune_curves`.
  """

  trial_id: str  # KerasTuner's trial id.
  tuner_id: str  # KERASTUNER_TUNER_ID of the process that ran it ("tuner0" alone).
  hyperparameters: Hyperparameters
  feature_cache_cut_ratio: float  # The unfreeze ratio the search's frozen-prefix cache was cut for.
  # The objective: val accuracy after the int8-grid rounding (successive halving: the
  # val accuracy of its last rung's epoch, before any rounding).
  val_accuracy: float
  seconds: float  # Wall time of the trial's stages and scoring, to 0.01 s (all rungs).
  # [first epoch, epochs]: Hyperband's budget or the last rung reached, else [0, fine_tune].
  fine_tune_until: list[int]
  continues_trial: str | None  # The Hyperband trial it continued, else None.
  median_stop: MedianStop | None  # None when it ran in full.
  fine_tune_epochs_run: NotRequired[int]  # Stage 2 epochs it trained (all its rungs).
  fine_tune_seconds: NotRequired[float]  # Their seconds.
  rungs: NotRequired[dict[str, float]]  # Successive halving: epoch reached -> val accuracy.


# history.json

StageHistory = dict[str, list[float]]
"""One stage's metrics per epoch ("loss", "accuracy", "val_loss", ...), from its CSV log."""


class History(TypedDict):
  """`history.json`: per-epoch metrics of both stages (`train.STAGES`).

  Written by `train.save_run` from the run folder's CSV logs; read by
  `summary.write_report` for `plots.plot_history`. A stage that did not run
  is {}.
  """

  frozen: StageHistory  # The frozen base: only the head trains.
  fine_tune: StageHistory  # Fine-tuning: the top of the base unfrozen.


# run.json


class SourceIdentity(TypedDict):
  """What a source's images are (`runs.source_identity`), not where they live."""

  name: str  # "tfds:<name>", or "image_dir" for any image folder.
  listing_sha256: str  # Of the (key, label) pairs it lists.
  content_sha256: str | None  # Of the images' bytes, where the source computes it.


class CalibrationSettings(TypedDict):
  """The export setting the int8-grid bias correction depends on."""

  calibration_examples: int


class Location(TypedDict):
  """Where a run's data lived and how its split was spelled (`runs.location`)."""

  split: str  # --split as given.
  image_dir: str | None  # Absolute, or None.
  tfds_data_dir: str | None  # Absolute, or None.
  download: bool


class Fingerprint(TypedDict):
  """What a run's results depend on (`runs.fingerprint`): run.json less its location.

  Also served by a distributed chief to its workers (`tune.check_chief_run`).
  The settings parts are `RunConfig.to_json()`'s, less what does not change
  the result (`runs._NOT_RESULTS`) and, for a search, the searched values.
  """

  mode: Literal["train", "tune"]
  # The data settings; "split" as its fractions or "official", and on the plain input
  # path "shuffle_buffer" ("whole split" or "bounded") and "shuffle" ("per stage, seeded":
  # each stage's own stream; absent from older runs, whose stages shared one).
  data: dict[str, Any]
  # The training settings; "feature_cache" resolved to "on"/"off", "weights" as
  # "imagenet", "random" or "sha256:<the weights file's digest>".
  train: dict[str, Any]
  search: NotRequired[dict[str, Any]]  # A search's settings (tune only).
  export: NotRequired[CalibrationSettings]  # With int8-grid weights on.
  source: SourceIdentity
  preprocessing: str  # `runs.recipe()`: how pixels are decoded and resized,
  augmentation: str  # how augmentation resamples,
  int8_grid: str  # how kernels are put on the int8 grid.
  splits_sha256: str  # Of splits.csv.
  versions: dict[str, str]  # Package -> version ("none" when not installed).


class RunJson(Fingerprint):
  """`run.json`: what made a run; a resume must match it (all but `location`).

  Written by `runs.begin`; read by `runs.read_run` (for `runs.begin`,
  `runs.finished`, `runs.model_data`, `train.save_run`'s lineage mode) and
  `lineage.run_id` (the run id is a digest of it, less `location`).
  """

  location: Location


# lineage.json


class LineageRecord(TypedDict):
  """One file's record in lineage.json (`lineage.record`)."""

  mode: str  # The mode that wrote it ("train", "tune", "evaluate", "export", "report").
  run: str | None  # The run id it came from (`lineage.fingerprint_id`, or "model:<sha256>").
  model: str | None  # sha256 of the model it describes (`lineage.model_sha256`); None: none.
  sha256: str  # Of the file itself when written.


class Lineage(TypedDict):
  """`lineage.json`: which run and model each file of the workdir was made from.

  Written by `lineage.record` and `lineage.forget`; read by `lineage.read`
  (for `lineage.check`, `lineage.owner`, `lineage.recorded`).
  """

  owner: str | None  # The run the workdir belongs to.
  files: dict[str, LineageRecord]  # Path relative to the workdir -> its record.


# Checking a loaded file.

_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


def problems(value: Any, schema: Any) -> list[str]:
  """What keeps a loaded JSON `value` from matching `schema`; [] when it matches.

  `schema` is a TypedDict or an annotation built from JSON types: str, int,
  float (an integer passes), bool, None, Any, Literal, list[X] (or Sequence),
  dict[str, X] (or Mapping), unions (`X | None`) and nested TypedDicts. Each
  problem is one line that starts with where it is (`num_skipped_images.test`):
  a missing required key, a key the TypedDict does not name, or a value of the
  wrong JSON type.
  """
  return _problems(value, schema, "")


def _where(path: str) -> str:
  return path or "the top level"


def _json_name(value: Any) -> str:
  return _JSON_NAMES.get(type(value), type(value).__name__)


def _problems(value: Any, schema: Any, path: str) -> list[str]:
  if schema is Any or schema is object:
    return []
  if typing.is_typeddict(schema):
    return _typeddict_problems(value, schema, path)
  origin = typing.get_origin(schema)
  if origin in (Union, types.UnionType):
    return _union_problems(value, typing.get_args(schema), path)
  if origin is Literal:
    choices = typing.get_args(schema)
    matches = any(value == c and type(value) is type(c) for c in choices)
    return [] if matches else [
        f"{_where(path)}: expected one of {', '.join(map(repr, choices))}, got {value!r}"]
  if origin in (list, collections.abc.Sequence):
    if not isinstance(value, list):
      return [_wrong(value, "array", path)]
    (item,) = typing.get_args(schema) or (Any,)
    return [p for i, v in enumerate(value) for p in _problems(v, item, f"{path}[{i}]")]
  if origin in (dict, collections.abc.Mapping):
    if not isinstance(value, dict):
      return [_wrong(value, "object", path)]
    _, item = typing.get_args(schema) or (str, Any)
    return [p for k, v in value.items() for p in _problems(v, item, _key(path, k))]
  return _scalar_problems(value, schema, path)


def _key(path: str, key: Any) -> str:
  return f"{path}.{key}" if path else str(key)


def _wrong(value: Any, expected: str, path: str) -> str:
  return f"{_where(path)}: expected {expected}, got {_json_name(value)}"


def _typeddict_problems(value: Any, schema: Any, path: str) -> list[str]:
  """Missing required keys, unknown keys, then each key's value."""
  if not isinstance(value, dict):
    return [_wrong(value, f"object ({schema.__name__})", path)]
  hints = typing.get_type_hints(schema)
  found = [f"{_where(path)}: missing key {k!r} ({schema.__name__})"
           for k in sorted(schema.__required_keys__) if k not in value]
  found += [f"{_where(path)}: unknown key {k!r} ({schema.__name__} has no such key)"
            for k in sorted(value, key=str) if k not in hints]
  for key in hints:
    if key in value:
      found += _problems(value[key], hints[key], _key(path, key))
  return found


def _union_problems(value: Any, choices: tuple[Any, ...], path: str) -> list[str]:
  """None of `choices` matches: the problems of the closest one (fewest problems)."""
  found = [_problems(value, choice, path) for choice in choices]
  if any(not p for p in found):
    return []
  here = f"{_where(path)}: expected "
  if all(len(p) == 1 and p[0].startswith(here) for p in found):  # The value's own type.
    names = [p[0][len(here):].split(", got ")[0] for p in found]
    return [_wrong(value, " or ".join(names), path)]
  if type(None) in choices and len(choices) == 2:
    return found[1 - choices.index(type(None))]  # `X | None` with a wrong X: X's problems.
  return min(found, key=len)


def _scalar_problems(value: Any, schema: Any, path: str) -> list[str]:
  """JSON scalars: int is not bool, float takes an int, None is null."""
  if schema is None or schema is type(None):
    ok = value is None
  elif schema is bool:
    ok = isinstance(value, bool)
  elif schema is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif schema is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif schema is str:
    ok = isinstance(value, str)
  else:
    raise TypeError(f"problems: {schema!r} is no JSON type a schema may use.")
  return [] if ok else [_wrong(value, _JSON_NAMES[schema or type(None)], path)]
