"""The settings of a run: one small dataclass per concern, validated on creation.

    RunConfig
      data:    DataConfig     where the images come from, the split, the pipeline
      train:   TrainConfig    the model and its two training stages
      search:  SearchConfig   what `--mode=tune` searches, and how
      export:  ExportConfig   the TFLite conversion and its accuracy budget
      predict: PredictConfig  what `--mode=predict`/`evaluate` read
      plots:   bool           plots and summary.md after a run

`flowers_main` builds one `RunConfig` from its flags and hands it to the mode;
library code builds the same objects directly. Each flag is a field here, with
the field's name, default and (from the `Attributes:` docstring) help text, so
defaults live in one place. Every dataclass checks itself in `__post_init__`:
a bad value raises the same one-line `UserError` whether it came from the
command line or from code. Choices are enums, declared once below.

This module needs no TensorFlow: flags are checked before it loads.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import typing
from typing import Any, Sequence

from flowers import artifacts
from flowers import backbone as backbone_lib
from flowers import split as split_lib
from flowers.errors import UserError


class Choice(str, enum.Enum):
  """A closed set of string values for a setting (a flag takes the value)."""

  def __str__(self) -> str:
    return self.value

  @classmethod
  def parse(cls, value: Any, flag: str) -> "Choice":
    """`value` as a member; a `UserError` naming `flag` and the choices otherwise."""
    try:
      return cls(str(value).lower())
    except ValueError:
      raise UserError(f"--{flag}={value} is not one of "
                      f"{', '.join(m.value for m in cls)}.") from None


class PixelCache(Choice):
  MEMORY = "memory"
  DISK = "disk"
  NONE = "none"


class Optimizer(Choice):
  RMSPROP = "rmsprop"
  ADAM = "adam"
  ADAMW = "adamw"
  SGD = "sgd"


class LrSchedule(Choice):
  CONSTANT = "constant"
  COSINE = "cosine"


class FeatureCache(Choice):
  AUTO = "auto"
  ON = "on"
  OFF = "off"


class Strategy(Choice):
  DEFAULT = "default"
  MIRRORED = "mirrored"
  MULTI_WORKER = "multi_worker"


class Tuner(Choice):
  BAYESIAN = "bayesian"
  HYPERBAND = "hyperband"
  RANDOM = "random"


class FirstTrial(Choice):
  CONFIGURED = "configured"
  DRAWN = "drawn"


class Quantization(Choice):
  INT8 = "int8"
  FLOAT16 = "float16"
  DYNAMIC = "dynamic"
  NONE = "none"


class IoDtype(Choice):
  UINT8 = "uint8"
  INT8 = "int8"


class ClassWeight(Choice):
  NONE = "none"
  BALANCED = "balanced"


class OutputFormat(Choice):
  TABLE = "table"
  JSON = "json"


def _set(obj: Any, name: str, value: Any) -> None:
  object.__setattr__(obj, name, value)  # Normalizing a frozen dataclass.


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UserError(message)


def _choices(obj: Any) -> None:
  """Turns every `Choice` field given as a string into its member, or fails."""
  for name, kind in typing.get_type_hints(type(obj)).items():
    if isinstance(kind, type) and issubclass(kind, Choice):
      _set(obj, name, kind.parse(getattr(obj, name), name))


DEFAULT_SPLIT_SEED = 42
"""The split seed of a `DataConfig` made alone without one (in a `RunConfig`: `--seed`)."""


class UnsetSplitSeed(int):
  """A `DataConfig`'s split seed when none was given: DEFAULT_SPLIT_SEED to every
  reader (an int), and its type tells `RunConfig` to set `TrainConfig.seed` there
  instead, as `--seed` seeds the split unless `--split_seed` is given.
  """

  def __repr__(self) -> str:
    return int.__repr__(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the images come from and how they are split and streamed.

  Attributes:
    image_dir: a folder of class subfolders to use instead of TFDS.
    tfds_name: the TFDS dataset (needs image, label and file_name features).
    tfds_data_dir: the TFDS data folder (offline: ../shared/tensorflow_datasets); unset
      means TFDS's default, downloading if needed.
    download: let TFDS download and prepare a missing dataset.
    strict: fail on an unreadable image instead of skipping it.
    split: train,val,test percentages (stratified, seeded), or 'official'.
    split_seed: seed of the stratified split; unset: --seed (a RunConfig fills it in
      with its training seed; a DataConfig alone uses 42), so --split_seed=S holds a
      split while --seed varies.
    holdout_classes: the open-set protocol: this many classes (a seeded choice, by
      split_seed) are left out of training, and their val and test images are scored
      as unknowns (report.json's "open_set"). 0: train on every class.
    image_size: the square model input side, pixels.
    batch_size: images per training step.
    pixel_cache: where decoded, resized images are kept between epochs: memory, disk
      (in WORKDIR/cache) or none.
  """

  image_dir: str | None = None
  tfds_name: str = "oxford_flowers102"
  tfds_data_dir: str | None = None
  download: bool = True
  strict: bool = False
  split: str = "64,16,20"
  split_seed: int | None = None
  holdout_classes: int = 0
  image_size: int = 224
  batch_size: int = 32
  pixel_cache: PixelCache = PixelCache.MEMORY

  def __post_init__(self):
    _choices(self)
    if self.split_seed is None:
      _set(self, "split_seed", UnsetSplitSeed(DEFAULT_SPLIT_SEED))
    split_lib.parse_split(self.split, self.split_seed)
    _require(self.batch_size >= 1, f"--batch_size={self.batch_size} must be >= 1.")
    _require(self.holdout_classes >= 0,
             f"--holdout_classes={self.holdout_classes} must be >= 0.")


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Training-time augmentation, drawn by Keras layers inside the model.

  The defaults were chosen on val (docs/experiments.md): a random resized crop
  of at least 30% of the image, flips, rotation and contrast, no zoom or shift.
  The reference's generator (flags/reference.cfg) shifts 0.2 and zooms 0.2
  instead of cropping; its shear 0.1 has no Keras layer, random contrast stands in.

  Attributes:
    flip: random horizontal flips.
    rotation: largest random rotation, degrees.
    zoom: largest random zoom, as a fraction of the side.
    translation: largest random shift, as a fraction of the side.
    contrast: random contrast factor.
    crop_area: smallest area of an Inception-style random resized crop, as a
      fraction of the image (aspect ratio 3/4 to 4/3), drawn before the other
      transforms; 0 crops nothing.
  """

  flip: bool = True
  rotation: float = 20.0
  zoom: float = 0.0
  translation: float = 0.0
  contrast: float = 0.1
  crop_area: float = 0.3

  def __post_init__(self):
    for name in ("rotation", "zoom", "translation", "contrast", "crop_area"):
      value = getattr(self, name)
      _require(math.isfinite(value) and value >= 0, f"--{name}={value} must be >= 0.")
    _require(self.zoom < 1 and self.contrast < 1 and self.translation < 1,
             "--zoom, --translation and --contrast must be below 1.")
    _require(self.crop_area <= 1, f"--crop_area={self.crop_area} must be at most 1 "
             "(a fraction of the image's area; 0 crops nothing).")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The model and its two training stages (see `flowers.train`).

  The defaults are the recipe chosen on val for CPUs (docs/experiments.md,
  "cpu.cfg: settings chosen on val"); flags/reference.cfg spells out the blog's.

  Attributes:
    seed: seed of initialization, augmentation, shuffling and the search (and of
      the split unless --split_seed is given).
    backbone: the pretrained base the classifier stands on (flowers.backbone):
      mobilenet_v2.
    weights: the backbone's weights: imagenet (downloaded by Keras), none (random),
      or the path of its ..._no_top.h5 file.
    alpha: the backbone's width multiplier.
    dropout: dropout rate before the classifier.
    augment: put the augmentation layers in the model.
    augmentation: which augmentations, and how strong.
    unfreeze_ratio: top fraction of the base the fine-tune stage trains (whole
      blocks; BatchNorm stays frozen).
    optimizer: the optimizer of both stages.
    learning_rate: learning rate of the first stage (frozen base).
    fine_tune_learning_rate: learning rate of the fine-tune stage (None, from code:
      learning_rate / 10).
    epochs: epochs of the first stage (frozen base).
    fine_tune_epochs: epochs of the fine-tune stage (top of the base unfrozen).
    fine_tune_ema_momentum: the fine-tune stage scores, keeps and ends on an
      exponential moving average of its weights, this the old average's share
      at each step (0.99: about the last 100 steps); 0: the trained weights.
    label_smoothing: label smoothing of the cross-entropy loss.
    class_weight: weight of each class's training images in the loss of both
      stages: none (all 1), or balanced (train images / (classes x the class's
      train images), so every class weighs the same in total).
    lr_schedule: learning rate over each stage: constant, or cosine decay to 0.
    weight_decay: decoupled weight decay of adamw (the other optimizers ignore it).
    early_stopping_patience: epochs without a val gain before a stage stops and
      keeps its best weights (0: off).
    fine_tune_early_stopping_patience: the same for the fine-tune stage alone;
      unset: --early_stopping_patience. Successive halving sets it for its trials
      (to --fine_tune_epochs: stage 2 never stops early, yet ends on its best val
      epoch) and in best_hparams.json.
    feature_cache: run the frozen prefix of the base once per cached view instead
      of every step, keeping its activations in WORKDIR/cache (auto: on without a GPU).
    feature_cache_cut_ratio: the unfreeze ratio the feature cache is cut for (at
      least --unfreeze_ratio; the layers between the two cuts run frozen); unset:
      --unfreeze_ratio. A search sets it for its trials and in best_hparams.json.
    feature_cache_views: cached views of each training image (1 plain + augmented
      ones).
    int8_grid_weights: round the trained conv kernels to the int8 export's grid,
      so the int8 model answers like the float one.
    calibrate: fit a temperature on val (NLL) after training and the int8-grid
      rounding and fold it into the classifier when it lowers val NLL, so the
      scores of the model and its exports are calibrated (top-1 unchanged).
    true_accept_rate: the share of known-class val images the "unknown" threshold
      keeps: predict says "unknown" for an image whose top score is below it,
      and the export's metadata holds it for MediaPipe Tasks; 0 chooses none.
    distribution_strategy: tf.distribute strategy the stages train under.
    verbose: Keras verbosity: 0 silent, 1 progress bars, 2 a line per epoch.
  """

  seed: int = 42
  backbone: str = backbone_lib.DEFAULT
  weights: str | None = "imagenet"
  alpha: float = 1.0
  dropout: float = 0.2
  augment: bool = True
  augmentation: Augmentation = Augmentation()
  unfreeze_ratio: float = 0.3
  optimizer: Optimizer = Optimizer.ADAM
  learning_rate: float = 1e-3
  fine_tune_learning_rate: float | None = 2e-4
  epochs: int = 30
  fine_tune_epochs: int = 12
  fine_tune_ema_momentum: float = 0.99
  label_smoothing: float = 0.1
  class_weight: ClassWeight = ClassWeight.NONE
  lr_schedule: LrSchedule = LrSchedule.CONSTANT
  weight_decay: float = 1e-4
  early_stopping_patience: int = 4
  fine_tune_early_stopping_patience: int | None = None
  feature_cache: FeatureCache = FeatureCache.AUTO
  feature_cache_cut_ratio: float | None = None
  feature_cache_views: int = 6
  int8_grid_weights: bool = True
  calibrate: bool = True
  true_accept_rate: float = 0.95
  distribution_strategy: Strategy = Strategy.DEFAULT
  verbose: int = 1

  def __post_init__(self):
    _choices(self)
    if isinstance(self.weights, str) and self.weights.lower() == "none":
      _set(self, "weights", None)
    backbone_lib.get(self.backbone)
    _require(0.0 <= self.dropout < 1.0, f"--dropout={self.dropout} must be in [0, 1).")
    _require(0.0 <= self.unfreeze_ratio <= 1.0,
             f"--unfreeze_ratio={self.unfreeze_ratio} must be in [0, 1].")
    _require(self.alpha > 0, f"--alpha={self.alpha} must be > 0.")
    _require(self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be > 0.")
    if self.fine_tune_learning_rate is None:  # Resolved, so run.json and flags.cfg hold it.
      _set(self, "fine_tune_learning_rate", self.learning_rate / 10.0)
    _require(self.fine_tune_learning_rate > 0,
             f"--fine_tune_learning_rate={self.fine_tune_learning_rate} must be > 0.")
    _require(self.epochs >= 0, f"--epochs={self.epochs} must be >= 0.")
    _require(self.fine_tune_epochs >= 0,
             f"--fine_tune_epochs={self.fine_tune_epochs} must be >= 0.")
    _require(0.0 <= self.fine_tune_ema_momentum < 1.0,
             f"--fine_tune_ema_momentum={self.fine_tune_ema_momentum} must be in [0, 1) "
             "(0: no average).")
    _require(0.0 <= self.label_smoothing < 1.0,
             f"--label_smoothing={self.label_smoothing} must be in [0, 1).")
    _require(self.weight_decay >= 0, f"--weight_decay={self.weight_decay} must be >= 0.")
    _require(self.early_stopping_patience >= 0,
             f"--early_stopping_patience={self.early_stopping_patience} must be >= 0.")
    _require(self.fine_tune_early_stopping_patience is None
             or self.fine_tune_early_stopping_patience >= 0,
             f"--fine_tune_early_stopping_patience={self.fine_tune_early_stopping_patience} "
             "must be >= 0 (0: off; unset: --early_stopping_patience).")
    _require(self.feature_cache_cut_ratio is None
             or self.unfreeze_ratio <= self.feature_cache_cut_ratio <= 1.0,
             f"--feature_cache_cut_ratio={self.feature_cache_cut_ratio} must be in "
             f"[--unfreeze_ratio, 1] (here [{self.unfreeze_ratio:g}, 1]): the cache is cut "
             "at or below the layers that train; leave it unset to cut at --unfreeze_ratio.")
    _require(self.feature_cache_views >= 1,
             f"--feature_cache_views={self.feature_cache_views} must be >= 1.")
    _require(0.0 <= self.true_accept_rate <= 1.0,
             f"--true_accept_rate={self.true_accept_rate} must be in [0, 1] (0 chooses no "
             "threshold).")
    _require(self.verbose in (0, 1, 2), f"--verbose={self.verbose} must be 0, 1 or 2.")

  @property
  def fine_tune_rate(self) -> float:
    """The fine-tune stage's learning rate (None was resolved on creation)."""
    return self.fine_tune_learning_rate

  @property
  def fine_tune_patience(self) -> int:
    """The fine-tune stage's early-stopping patience, resolved (0: off)."""
    return (self.early_stopping_patience if self.fine_tune_early_stopping_patience is None
            else self.fine_tune_early_stopping_patience)

  @property
  def feature_cache_cut(self) -> float:
    """The unfreeze ratio the feature cache is cut for, resolved."""
    return (self.unfreeze_ratio if self.feature_cache_cut_ratio is None
            else self.feature_cache_cut_ratio)

  @property
  def fine_tunes(self) -> bool:
    """Whether the fine-tune stage runs at all."""
    return self.fine_tune_epochs > 0 and self.unfreeze_ratio > 0


HPARAMS = ("dropout", "unfreeze_ratio", "fine_tune_learning_rate")
"""The TrainConfig fields `--mode=tune` searches; `SearchConfig` has a range for each."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """What `--mode=tune` searches: a (min, max) range per hyperparameter.

  A trial is the train job run with `dataclasses.replace(train_config, **values)`.
  The defaults are the search chosen on val for CPUs (docs/experiments.md): 6
  trials, the first at the configured values, by successive halving (2,4; factor 2).
  `--mode=train` ignores these settings; `check_search` checks them against the
  training settings where a search starts.

  Attributes:
    tuner: the KerasTuner search algorithm.
    max_trials: trials to run (a trial is one training run, scored and shipped as is).
    dropout_range: min,max dropout (min == max fixes it).
    unfreeze_ratio_range: min,max unfreeze ratio.
    fine_tune_learning_rate_range: min,max fine-tune learning rate (log scale).
    median_stop_epoch: from this fine-tune epoch on, stop a trial whose best val
      accuracy so far is below the median of the finished trials' at the same
      epoch (the median stopping rule; needs 2 finished trials, not used by
      hyperband); 0 runs every trial in full.
    halving_rungs: successive halving: the fine-tune epochs at which trials are compared
      (e.g. 2,4). Every trial fine-tunes to the first; the best 1/halving_factor of them go
      on, from where they stopped, to the next, and so on; those left fine-tune to
      --fine_tune_epochs (above the last rung), and the best is shipped. The stage 2
      epochs spent are fixed by these settings, whatever the trials score (no median
      rule; a trial's stage 2 patience is --fine_tune_epochs: it never stops early, yet
      ends on its best val epoch). Empty (--halving_rungs=): every trial in full.
    halving_factor: successive halving keeps the best 1/this of the trials at each rung,
      rounded up from --max_trials (6 trials, factor 2: 3 go on, then 2).
    first_trial: drawn: the tuner draws every trial (KerasTuner's Bayesian tuner draws its
      first 3 per hyperparameter at random); configured: the first trial takes --dropout,
      --unfreeze_ratio and --fine_tune_learning_rate (each must lie in its range), so the
      search starts from the values --mode=train uses, and the later trials are drawn.
  """

  tuner: Tuner = Tuner.BAYESIAN
  max_trials: int = 6
  dropout_range: tuple[float, float] = (0.1, 0.4)
  unfreeze_ratio_range: tuple[float, float] = (0.2, 0.3)
  fine_tune_learning_rate_range: tuple[float, float] = (1e-4, 4e-4)
  median_stop_epoch: int = 4
  halving_rungs: tuple[int, ...] = (2, 4)
  halving_factor: int = 2
  first_trial: FirstTrial = FirstTrial.CONFIGURED

  def __post_init__(self):
    _choices(self)
    _set(self, "halving_rungs", _check_rungs(self.halving_rungs))
    _require(self.halving_factor >= 2,
             f"--halving_factor={self.halving_factor} must be >= 2.")
    _require(not (self.halving_rungs and self.tuner is Tuner.HYPERBAND),
             "--halving_rungs is successive halving over the bayesian or random tuner's "
             "trials; hyperband brackets its own: drop one of them.")
    _require(self.max_trials >= 1, f"--max_trials={self.max_trials} must be >= 1.")
    _require(self.median_stop_epoch >= 0,
             f"--median_stop_epoch={self.median_stop_epoch} must be >= 0 (0 turns the "
             "median stopping rule off).")
    for name in HPARAMS:
      _set(self, f"{name}_range", _check_range(name, getattr(self, f"{name}_range")))

  def range_of(self, hparam: str) -> tuple[float, float]:
    return getattr(self, f"{hparam}_range")


def _check_rungs(value: Sequence[Any] | str) -> tuple[int, ...]:
  """`--halving_rungs` as increasing positive epochs; a `UserError` otherwise."""
  items = [v for v in (value.split(",") if isinstance(value, str) else value)
           if str(v).strip()]
  shown = f"--halving_rungs={','.join(str(v).strip() for v in items)}"
  try:
    rungs = tuple(int(str(v).strip()) for v in items)
  except ValueError:
    raise UserError(f"{shown} must be whole fine-tune epochs, e.g. --halving_rungs=2,4.") from None
  if any(r < 1 for r in rungs) or list(rungs) != sorted(set(rungs)):
    raise UserError(f"{shown} must be increasing epochs >= 1, e.g. --halving_rungs=2,4.")
  return rungs


def _check_range(name: str, value: Sequence[Any] | str) -> tuple[float, float]:
  """One `--<name>_range` as (min, max); a `UserError` naming the flag and the fix."""
  flag = f"--{name}_range"
  default = ",".join(f"{v:g}" for v in SearchConfig.__dataclass_fields__[f"{name}_range"].default)
  items = value.split(",") if isinstance(value, str) else list(value)
  shown = f"{flag}={','.join(str(v).strip() for v in items)}"
  try:
    numbers = tuple(float(str(v).strip()) for v in items)
  except ValueError:
    raise UserError(f"{shown} must be two numbers min,max, e.g. {flag}={default}.") from None
  if len(numbers) != 2 or not all(math.isfinite(v) for v in numbers):
    raise UserError(f"{shown} must be exactly two numbers min,max, e.g. {flag}={default}.")
  low, high = numbers
  if low > high:
    raise UserError(f"{shown}: min is above max; write it as {flag}={high:g},{low:g}.")
  if name == "dropout" and not (0.0 <= low and high < 1.0):
    raise UserError(f"{shown}: dropout must be in [0, 1); e.g. {flag}=0.0,0.5.")
  if name == "unfreeze_ratio" and not (0.0 <= low and high <= 1.0):
    raise UserError(f"{shown}: the unfreeze ratio must be in [0, 1]; e.g. {flag}=0.0,0.5.")
  if name == "fine_tune_learning_rate" and low <= 0.0:
    raise UserError(f"{shown}: learning rates must be > 0 (the range is searched on a "
                    f"log scale); e.g. {flag}=1e-5,1e-3.")
  return low, high


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """How to convert to TFLite, and how much accuracy the conversion may cost.

  Attributes:
    export_best: export the search's best model after --mode=tune.
    quantization: int8 (full integer, calibrated), float16 (float16 weights), dynamic
      (int8 weights, float activations) or none.
    io_dtype: input and output type of the int8 model.
    calibration_examples: training images that calibrate the int8 ranges.
    max_accuracy_drop: the largest allowed test accuracy drop, points.
  """

  export_best: bool = True
  quantization: Quantization = Quantization.INT8
  io_dtype: IoDtype = IoDtype.UINT8
  calibration_examples: int = 300
  max_accuracy_drop: float = 1.0

  def __post_init__(self):
    _choices(self)
    _require(self.calibration_examples >= 1,
             f"--calibration_examples={self.calibration_examples}: int8 export needs at "
             "least 1 calibration image (300 is typical).")
    _require(self.max_accuracy_drop >= 0,
             f"--max_accuracy_drop={self.max_accuracy_drop} must be >= 0.")

  @property
  def file_name(self) -> str:
    """The `.tflite` file name for this quantization."""
    return artifacts.TFLITE_NAMES[self.quantization.value]

  @property
  def is_int8(self) -> bool:
    return self.quantization is Quantization.INT8


@dataclasses.dataclass(frozen=True)
class PredictConfig:
  """What `--mode=predict` and `--mode=evaluate` read.

  Attributes:
    model: a .keras or .tflite model; unset means WORKDIR/model.keras.
    images: image files or folders to classify (predict).
    top_k: labels shown per image (predict).
    output: how predictions are printed.
  """

  model: str | None = None
  images: tuple[str, ...] = ()
  top_k: int = 5
  output: OutputFormat = OutputFormat.TABLE

  def __post_init__(self):
    _choices(self)
    _set(self, "images", tuple(self.images))
    _require(self.top_k >= 1, f"--top_k={self.top_k} must be >= 1.")

  def model_path(self, workdir: str) -> str:
    """The model a mode reads: `model`, else the workdir's model.keras."""
    return self.model or os.path.join(workdir, artifacts.MODEL)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a run, one part per concern.

  An unset `data.split_seed` becomes `train.seed` here, so the training seed seeds
  the split unless a split seed is given (as `--seed` does on the command line).

  Attributes:
    data: where the images come from, the split and the pipeline.
    train: the model and its two training stages.
    search: what --mode=tune searches.
    export: the TFLite conversion.
    predict: what --mode=predict and --mode=evaluate read.
    overwrite: start afresh: delete what an earlier train or tune run in the workdir
      left to resume from (its settings may differ).
    plots: write plots and summary.md after a run.
  """

  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  search: SearchConfig = SearchConfig()
  export: ExportConfig = ExportConfig()
  predict: PredictConfig = PredictConfig()
  overwrite: bool = False
  plots: bool = True

  def __post_init__(self):
    spec = backbone_lib.get(self.train.backbone)
    _require(self.data.image_size >= spec.min_image_size,
             f"--image_size={self.data.image_size} is too small; {spec.title} needs "
             f">= {spec.min_image_size}.")
    if isinstance(self.data.split_seed, UnsetSplitSeed):  # The training seed seeds the split.
      _set(self, "data", dataclasses.replace(self.data, split_seed=self.train.seed))

  def check_search(self) -> None:
    """The search settings against the training ones: a `UserError` where `--mode=tune`
    could not run them (`--mode=train` ignores the search; the search checks first)."""
    rungs = self.search.halving_rungs
    _require(not rungs or rungs[-1] < self.train.fine_tune_epochs,
             f"--halving_rungs={','.join(map(str, rungs))} must stay below "
             f"--fine_tune_epochs={self.train.fine_tune_epochs} (the last rung's trials "
             "fine-tune to it); lower the rungs, or pass --halving_rungs= for every trial "
             "in full.")

  def to_json(self) -> dict[str, Any]:
    """Plain JSON values (enums as their strings), for reports and fingerprints."""
    return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, enum.Enum):
    return value.value
  return value


RENAMED = {
    "cache": "pixel_cache",
    "cache_views": "feature_cache_views",
    "cache_cut_ratio": "feature_cache_cut_ratio",
    "export": "export_best",
}
"""Settings under their older names -> their names now (flagfiles and run.json may hold
the old ones; `flowers.cli` and `flowers.runs` read them). The old `seed` set the
split too; it is now `DataConfig.split_seed` and `TrainConfig.seed` (the split
seed follows the training seed unless given)."""


def field_paths(cls: type = RunConfig, path: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
  """Every settings field's name -> its path in `cls` (e.g. "dropout" -> ("train",
  "dropout")); names are unique across the parts, so each is one flag."""
  hints = typing.get_type_hints(cls)
  found: dict[str, tuple[str, ...]] = {}
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[field.name]):
      found.update(field_paths(hints[field.name], path + (field.name,)))
    else:
      found[field.name] = path + (field.name,)
  return found
