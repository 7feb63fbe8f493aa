"""Two-stage transfer learning: the one training loop of `flowers`.

    stage 1: the base frozen, the head (dropout + classifier) trains
    stage 2: the top `unfreeze_ratio` of the base trains too, BatchNorm frozen

`fit_stages` is that loop. `--mode=train` (`train_and_evaluate`) runs it once;
each `--mode=tune` trial runs it with the trial's hyperparameters
(`dataclasses.replace(config.train, dropout=..., ...)`), so both get the same
callbacks (resume, CSV history, TensorBoard, early stopping), schedules and
seeds. Each stage resumes after an interruption (`BackupAndRestore`), and a
finished stage 1 is never run again: its weights are kept in the run folder.

The stages read their inputs from one of two sources with the same interface
(`Inputs.stage`), the model's weights being the same either way:
  * `PlainInputs`: the full model, augmentation included, on the tf.data
    pipeline every step. Right on an accelerator.
  * `CachedInputs`: the frozen prefix of the base ran once per augmented view
    of each training image (`prefix_cache`); stage 1 trains the head on pooled
    features, stage 2 the unfrozen top on the cut-point activations. Right on a
    CPU, where the frozen layers would otherwise dominate every step.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Protocol, Sequence

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import data as data_lib
from flowers import distribute
from flowers import evaluate as evaluate_lib
from flowers import model as model_lib
from flowers import prefix_cache
from flowers import runs
from flowers.config import FeatureCache
from flowers.config import LrSchedule
from flowers.config import Optimizer
from flowers.config import RunConfig
from flowers.config import TrainConfig
from flowers.errors import UserError

STAGES = ("stage1", "stage2")


def make_optimizer(name: Optimizer, learning_rate, weight_decay: float = 0.0):
  """RMSprop (the reference's), Adam, AdamW (with `weight_decay`) or SGD."""
  if name is Optimizer.RMSPROP:
    return keras.optimizers.RMSprop(learning_rate)
  if name is Optimizer.ADAM:
    return keras.optimizers.Adam(learning_rate)
  if name is Optimizer.ADAMW:
    return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
  return keras.optimizers.SGD(learning_rate, momentum=0.9)


def learning_rate_schedule(config: TrainConfig, learning_rate: float, decay_steps: int):
  """A constant rate, or cosine decay to 0 over `decay_steps` (one stage)."""
  if config.lr_schedule is LrSchedule.CONSTANT or decay_steps <= 0:
    return learning_rate
  return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=decay_steps)


def compile_model(model: keras.Model, config: TrainConfig, learning_rate: float,
                  decay_steps: int) -> None:
  """Compiles with one-hot labels (for label smoothing), accuracy and top-5.

  `decay_steps` (epochs x steps per epoch of the stage) is the length of the
  cosine schedule when `config.lr_schedule` asks for one.
  """
  model.compile(
      optimizer=make_optimizer(config.optimizer,
                               learning_rate_schedule(config, learning_rate, decay_steps),
                               config.weight_decay),
      loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
               keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy")])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return max(1, math.ceil(num_examples / batch_size))


def stage_callbacks(run_dir: str, stage: str, config: TrainConfig,
                    validate: bool) -> list[keras.callbacks.Callback]:
  """Resume, CSV history, TensorBoard and (with val data) early stopping."""
  callbacks: list[keras.callbacks.Callback] = [
      keras.callbacks.BackupAndRestore(os.path.join(run_dir, artifacts.BACKUP_DIR, stage)),
      keras.callbacks.CSVLogger(os.path.join(run_dir, artifacts.stage_history(stage)),
                                append=True),
      keras.callbacks.TensorBoard(os.path.join(run_dir, artifacts.LOGS_DIR, stage),
                                  write_graph=False, profile_batch=0),
  ]
  if validate and config.early_stopping_patience > 0:
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=config.early_stopping_patience,
        restore_best_weights=True, verbose=config.verbose))
  return callbacks


def read_history(run_dir: str, stage: str) -> dict[str, list[float]]:
  """One stage's per-epoch metrics from its CSV log (the last row per epoch wins)."""
  path = os.path.join(run_dir, artifacts.stage_history(stage))
  if not os.path.exists(path):
    return {}
  rows: dict[int, dict[str, str]] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      try:  # A row torn by a kill mid-write is skipped; its epoch is redone.
        values = {k: float(v) for k, v in row.items()}
      except (TypeError, ValueError):
        continue
      rows[int(values.pop("epoch"))] = values
  history: dict[str, list[float]] = {}
  for epoch in sorted(rows):
    for key, value in rows[epoch].items():
      history.setdefault(key, []).append(value)
  return history


def one_hot(num_classes: int):
  return lambda images, labels: (images, tf.one_hot(labels, num_classes))


@dataclasses.dataclass
class Stage:
  """What one stage fits: a model sharing the full model's layers, and its data.

  Attributes:
    model: the full model (plain inputs) or a sub-model of it (cached inputs).
    train: training batches of (inputs, one-hot labels).
    val: val batches, an (inputs, one-hot labels) pair, or None without a val split.
    steps: training steps per epoch.
  """

  model: keras.Model
  train: Any
  val: Any
  steps: int


class Inputs(Protocol):
  """Where a stage's data comes from: `stage(model, 1 or 2, seed)` -> `Stage`."""

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    ...

  def num_train_images(self) -> int:
    """How many training images the stages see (undecodable ones are dropped)."""
    ...


class PlainInputs:
  """The full model on the tf.data pipeline: augmentation runs every step."""

  def __init__(self, splits: data_lib.Splits, batch_size: int):
    num_classes = len(splits.class_names)
    self.train = splits.train.map(one_hot(num_classes))
    self.val = splits.val.map(one_hot(num_classes)) if splits.keys("val") else None
    self.steps = steps_per_epoch(len(splits.keys("train")), batch_size)

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    del stage, seed  # The train dataset shuffles with the data seed.
    return Stage(model, self.train, self.val, self.steps)

  def num_train_images(self) -> int:
    # After training this reads the pipeline's cache, not the image files.
    return sum(int(labels.shape[0]) for _, labels in self.train)


class CachedInputs:
  """The frozen-prefix cache: stage 1 on pooled features, stage 2 on activations.

  One cache serves any model whose unfrozen top starts at or after its cut
  (tune cuts it for the largest unfreeze ratio of the search): the layers
  between the cache's cut and the model's own cut run frozen in stage 2.
  """

  def __init__(self, cache: prefix_cache.PrefixCache, num_classes: int, batch_size: int):
    self.cache = cache
    self.num_classes = num_classes
    self.batch_size = batch_size
    has_val = len(cache.val_labels) > 0
    self.val_y = keras.utils.to_categorical(cache.val_labels, num_classes) if has_val else None

  @functools.cached_property
  def _pooled(self) -> tuple[np.ndarray, np.ndarray]:
    return self.cache.pooled()

  @functools.cached_property
  def _val_activations(self) -> np.ndarray:
    return np.asarray(self.cache.val, np.float32)

  def num_train_images(self) -> int:
    return len(self.cache.train_labels)

  def _sampler(self, views: np.ndarray, seed: int) -> prefix_cache.ViewSampler:
    return prefix_cache.ViewSampler(views, self.cache.train_labels, self.num_classes,
                                    self.batch_size, seed)

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    if stage == 1:
      train_features, val_features = self._pooled
      sampler = self._sampler(train_features, seed)
      val = (val_features, self.val_y) if self.val_y is not None else None
      return Stage(head_model(model, train_features.shape[-1]), sampler, val, len(sampler))
    base = model_lib.base_of(model)
    below = [l.name for l in base.layers[:self.cache.cut + 1] if l.trainable and l.weights]
    if base.trainable and below:
      raise ValueError(f"{below[0]} trains but lies below the cache's cut; build the "
                       "cache for a larger unfreeze ratio.")
    sampler = self._sampler(self.cache.train_views, seed + 1)
    val = (self._val_activations, self.val_y) if self.val_y is not None else None
    return Stage(top_model(model, self.cache.cut), sampler, val, len(sampler))


def head_model(model: keras.Model, feature_dim: int) -> keras.Model:
  """Pooled features -> dropout -> classifier, sharing the full model's head."""
  inputs = keras.Input((feature_dim,), name="features")
  x = model.get_layer(model_lib.DROPOUT_NAME)(inputs)
  outputs = model.get_layer(model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="head")


def top_model(model: keras.Model, cut: int) -> keras.Model:
  """Cut-point activations -> the base from `cut` on -> head, sharing the layers."""
  suffix = prefix_cache.suffix_model(model, cut)
  inputs = keras.Input(suffix.input.shape[1:], name="activations")
  x = suffix(inputs)
  x = model.get_layer(model_lib.POOL_NAME)(x)
  x = model.get_layer(model_lib.DROPOUT_NAME)(x)
  outputs = model.get_layer(model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="top")


def uses_feature_cache(config: TrainConfig) -> bool:
  """Whether the stages train on the frozen-prefix cache (auto: without a GPU)."""
  if config.feature_cache is FeatureCache.AUTO:
    return not tf.config.list_physical_devices("GPU")
  return config.feature_cache is FeatureCache.ON


def make_inputs(model: keras.Model, splits: data_lib.Splits, config: RunConfig,
                workdir: str, largest_unfreeze_ratio: float) -> Inputs:
  """The stages' inputs for `config`: plain, or a cache cut for the largest ratio.

  The cache (kept in WORKDIR/cache, reused by a resumed run) is computed with
  `model`, which must still hold its initial weights.
  """
  if not uses_feature_cache(config.train):
    return PlainInputs(splits, config.data.batch_size)
  ratio = largest_unfreeze_ratio if config.train.fine_tune_epochs > 0 else 0.0
  cut = model_lib.cut_index(model_lib.base_of(model), ratio)
  ordered = {name: data_lib.make_dataset(
      splits.source, splits.keys(name), image_size=config.data.image_size,
      batch_size=64, shuffle=False, cache="none") for name in ("train", "val")}
  cache = prefix_cache.PrefixCache.build(
      model, cut, ordered["train"], ordered["val"], views=config.train.cache_views,
      seed=config.data.seed, cache_dir=os.path.join(workdir, artifacts.CACHE_DIR),
      split_keys={n: splits.keys(n) for n in ("train", "val")},
      verbose=config.train.verbose)
  return CachedInputs(cache, len(splits.class_names), config.data.batch_size)


def fit_stages(model: keras.Model, inputs: Inputs, config: TrainConfig, run_dir: str, *,
               seed: int, run_stage1: bool = True, stage2_epochs: int | None = None,
               initial_epoch: int = 0,
               stage2_callbacks: Sequence[keras.callbacks.Callback] = ()) -> Stage:
  """Trains `model` in place: stage 1 (frozen base), then stage 2 (top unfrozen).

  Args:
    model: a `build_model` model; trained in place.
    inputs: where each stage's data comes from (plain or cached).
    config: the training settings (a tune trial's hyperparameters included).
    run_dir: this run's folder: stage 1's weights, backups, CSV history, logs.
    seed: seeds Python, NumPy, TensorFlow and the cached-view sampling.
    run_stage1: False to start stage 2 from the weights `model` holds (a
      Hyperband trial continuing an earlier one).
    stage2_epochs: train stage 2 up to this epoch (Hyperband's budget); its
      schedule still spans `config.fine_tune_epochs`.
    initial_epoch: the stage 2 epoch to start from (Hyperband).
    stage2_callbacks: more callbacks for stage 2 (a tune trial's median
      stopping rule), after the usual ones.

  Returns:
    The last stage fitted.
  """
  keras.utils.set_random_seed(seed)
  os.makedirs(run_dir, exist_ok=True)
  model_lib.freeze_base(model)
  stage = inputs.stage(model, 1, seed)
  compile_model(stage.model, config, config.learning_rate, stage.steps * config.epochs)
  done_path = os.path.join(run_dir, artifacts.STAGE1_WEIGHTS)
  if run_stage1 and os.path.exists(done_path):
    model.load_weights(done_path)
    logging.info("Stage 1 already finished; loaded %s.", done_path)
  elif run_stage1:
    _fit(stage, config.epochs, 0, run_dir, "stage1", config)
    with artifacts.atomic_path(done_path) as tmp:
      model.save_weights(tmp)

  if not config.fine_tunes:
    return stage
  model_lib.unfreeze(model, config.unfreeze_ratio)
  stage = inputs.stage(model, 2, seed)
  compile_model(stage.model, config, config.stage2_learning_rate,
                stage.steps * config.fine_tune_epochs)
  epochs = config.fine_tune_epochs if stage2_epochs is None else stage2_epochs
  _fit(stage, epochs, initial_epoch, run_dir, "stage2", config, stage2_callbacks)
  return stage


def _fit(stage: Stage, epochs: int, initial_epoch: int, run_dir: str, name: str,
         config: TrainConfig, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> None:
  if epochs <= initial_epoch:
    return
  callbacks = stage_callbacks(run_dir, name, config, stage.val is not None)
  stage.model.fit(stage.train, validation_data=stage.val, epochs=epochs,
                  initial_epoch=initial_epoch, verbose=config.verbose,
                  callbacks=callbacks + list(extra_callbacks))


def new_model(config: RunConfig, num_classes: int, *, random_base: bool = False) -> keras.Model:
  """`build_model` for a run, seeded before the build so every build is the same.

  `random_base` skips reading `config.train.weights` (tune copies the weights
  it read once into each trial's model).
  """
  t = config.train
  keras.utils.set_random_seed(config.data.seed)
  return model_lib.build_model(
      num_classes, image_size=config.data.image_size, dropout=t.dropout,
      weights=None if random_base else t.weights, augment=t.augment,
      augmentation=t.augmentation, alpha=t.alpha, seed=config.data.seed)


def round_for_int8(model: keras.Model, config: RunConfig,
                   calibration: Sequence[np.ndarray]) -> None:
  """Puts the trained conv kernels on the int8 export's grid, bias-corrected on
  `calibration` (uint8 batches; see `model.round_kernels_to_int8_grid`), unless
  `config.train.int8_grid_weights` is off."""
  if not config.train.int8_grid_weights:
    return
  changed = model_lib.round_kernels_to_int8_grid(model, calibration)
  logging.info("Rounded %d conv kernels to their per-channel int8 grid (bias corrected on "
               "%d training images).", changed, sum(len(b) for b in calibration))


def calibration_images(config: RunConfig, splits: data_lib.Splits) -> list[np.ndarray]:
  """The training images the int8 rounding and export calibrate on (none when the
  rounding is off)."""
  if not config.train.int8_grid_weights:
    return []
  return data_lib.calibration_images(splits, config.export.calibration_examples,
                                     config.data.seed, config.data.image_size)


def save_model(model: keras.Model, path: str) -> None:
  """Saves a `.keras` file atomically."""
  with artifacts.atomic_path(path) as tmp:
    model.save(tmp)


def evaluate_split(model: keras.Model, splits: data_lib.Splits, split: str = "test") -> dict:
  """Metrics of `model` on one split, through the real input pipeline."""
  dataset = splits.test if split == "test" else splits.val
  probs, labels = evaluate_lib.predict_dataset(evaluate_lib.keras_predictor(model), dataset)
  return evaluate_lib.metrics(probs, labels, splits.class_names, prefix=split)


def save_run(model: keras.Model, splits: data_lib.Splits, config: RunConfig, workdir: str,
             run_dir: str, num_train_images: int | None = None,
             **extra: Any) -> dict[str, Any]:
  """Rounds, saves and evaluates a trained model; writes every artifact of a run.

  `model.keras`, `labels.txt`, `history.json` (from `run_dir`'s CSV logs) and
  `report.json` (test and val metrics, the images skipped in each split, what
  the run was, `extra`) go to `workdir`. `num_train_images`: how many training
  images the stages saw, when known. Returns the report.
  """
  as_trained = None  # Val accuracy before the rounding, to show what it costs.
  if config.train.int8_grid_weights and model_lib.kernels_off_int8_grid(model):
    if splits.keys("val"):  # (A tuned model comes here rounded already.)
      as_trained = evaluate_split(model, splits, "val")["val_accuracy"]
    round_for_int8(model, config, calibration_images(config, splits))
  save_model(model, os.path.join(workdir, artifacts.MODEL))
  artifacts.write_labels(os.path.join(workdir, artifacts.LABELS), splits.class_names)
  artifacts.write_json(os.path.join(workdir, artifacts.HISTORY),
                       {stage: read_history(run_dir, stage) for stage in STAGES})
  strict = config.data.strict
  report = evaluate_split(model, splits, "test")
  skipped = {"test": evaluate_lib.count_skipped(
      "test", len(splits.keys("test")), report["num_test_examples"], strict)}
  if splits.keys("val"):
    val = evaluate_split(model, splits, "val")
    report.update({k: v for k, v in val.items() if k.startswith(("val_", "num_val"))})
    skipped["val"] = evaluate_lib.count_skipped(
        "val", len(splits.keys("val")), val["num_val_examples"], strict)
  if num_train_images is not None:
    skipped["train"] = evaluate_lib.count_skipped(
        "train", len(splits.keys("train")), num_train_images, strict)
  report.update({
      "source": splits.source.name,
      "split": config.data.split,
      "seed": config.data.seed,
      "num_train_examples": len(splits.keys("train")) - skipped.get("train", 0),
      "num_skipped_images": skipped,
      "feature_cache": uses_feature_cache(config.train),
      "config": config.to_json(),
  })
  if as_trained is not None:
    report["val_accuracy_before_int8_grid"] = as_trained
  report.update(extra)
  artifacts.write_json(os.path.join(workdir, artifacts.REPORT), report)
  return report


def load_splits_seeded(config: RunConfig, source: data_lib.Source,
                       workdir: str) -> data_lib.Splits:
  """`data.load_splits` with every seed set first, so the training shuffle order
  is the same whatever ran before in this process (tf.data combines its own
  seed with TensorFlow's global one)."""
  keras.utils.set_random_seed(config.data.seed)
  return data_lib.load_splits(config.data, source=source, workdir=workdir)


def train_and_evaluate(config: RunConfig, workdir: str,
                       source: data_lib.Source | None = None) -> dict[str, Any]:
  """The whole `--mode=train` job: split, both stages, test evaluation, artifacts.

  Args:
    config: the run's settings (`config.data` and `config.train` are used).
    workdir: where every artifact goes; a rerun in it resumes.
    source: the images; default: the one `config.data` names.

  Returns:
    The report (also written to `report.json`).
  """
  start = time.time()
  strategy = distribute.make_strategy(config.train.distribution_strategy)
  source = source or data_lib.load_source(config.data)
  splits = load_splits_seeded(config, source, workdir)
  if not splits.keys("train"):
    raise UserError("The train split is empty; check --split.")
  if not splits.keys("test"):
    raise UserError(f"--split={config.data.split} leaves no test images to report on; give "
                    "test a share, e.g. --split=64,16,20.")
  runs.begin(config, workdir, "train", source, feature_cache=uses_feature_cache(config.train),
             chief=distribute.is_chief(strategy))
  num_classes = len(splits.class_names)
  with strategy.scope():
    model = new_model(config, num_classes)
    inputs = make_inputs(model, splits, config, workdir, config.train.unfreeze_ratio)
    fit_stages(model, inputs, config.train, workdir, seed=config.data.seed)
  if not distribute.is_chief(strategy):
    return {"is_chief": False}
  return save_run(model, splits, config, workdir, workdir,
                  num_train_images=inputs.num_train_images(),
                  train_seconds=round(time.time() - start, 1))
