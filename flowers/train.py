"""Two-stage transfer learning: train the head on a frozen base, then fine-tune.

`train_and_evaluate` is the whole job of `--mode=train`: split, pipeline,
model, stage 1, stage 2, test evaluation, artifacts. Each stage resumes after an
interruption (`keras.callbacks.BackupAndRestore`), and a finished stage 1 is
never run again: its weights are kept in the workdir.

Two ways to run the stages, with the same model and artifacts as a result:
  * plain: the full model, augmentation included, runs every step. Right on an
    accelerator.
  * cached (`feature_cache`): the frozen prefix of the base runs once per
    augmented view of each image (see `prefix_cache`). Right on a CPU, where the
    frozen layers would otherwise dominate every epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import data as data_lib
from flowers import evaluate as evaluate_lib
from flowers import model as model_lib
from flowers import prefix_cache
from flowers.errors import UserError

MODEL_NAME = "model.keras"
LABELS_NAME = "labels.txt"
HISTORY_NAME = "history.json"
REPORT_NAME = "report.json"
STAGE1_WEIGHTS = "stage1.weights.h5"


@dataclasses.dataclass
class TrainConfig:
  """Everything a training run depends on (besides the data)."""

  image_size: int = 224
  batch_size: int = 32
  dropout: float = 0.2
  unfreeze_ratio: float = 0.2
  optimizer: str = "rmsprop"
  learning_rate: float = 1e-3
  fine_tune_learning_rate: float | None = None  # None: learning_rate / 10.
  epochs: int = 10
  fine_tune_epochs: int = 10
  label_smoothing: float = 0.0
  weight_decay: float = 0.0
  early_stopping_patience: int = 3
  lr_schedule: str = "constant"  # constant | cosine (decays to 0 over each stage)
  feature_cache: str = "auto"  # auto | on | off
  cache_views: int = 4
  int8_grid_weights: bool = True
  augmentation: model_lib.Augmentation = dataclasses.field(
      default_factory=model_lib.Augmentation)
  augment: bool = True
  weights: str | None = "imagenet"
  alpha: float = 1.0
  seed: int = 42
  verbose: int = 1

  @property
  def stage2_learning_rate(self) -> float:
    return self.fine_tune_learning_rate or self.learning_rate / 10.0

  def use_cache(self) -> bool:
    """Whether to train on the frozen-prefix cache (auto: when there is no GPU)."""
    if self.feature_cache == "auto":
      return not tf.config.list_physical_devices("GPU")
    if self.feature_cache not in ("on", "off"):
      raise UserError(f"--feature_cache={self.feature_cache} must be auto, on or off.")
    return self.feature_cache == "on"


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0):
  """RMSprop (the reference's), Adam or AdamW, by name."""
  name = name.lower()
  if name == "rmsprop":
    return keras.optimizers.RMSprop(learning_rate)
  if name == "adam":
    return keras.optimizers.Adam(learning_rate)
  if name == "adamw":
    return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay or 1e-4)
  if name == "sgd":
    return keras.optimizers.SGD(learning_rate, momentum=0.9)
  raise UserError(f"--optimizer={name} is not one of rmsprop, adam, adamw, sgd.")


def learning_rate_schedule(config: TrainConfig, learning_rate: float,
                           decay_steps: int | None):
  """A constant rate, or cosine decay to 0 over `decay_steps` (one stage)."""
  if config.lr_schedule == "constant" or not decay_steps:
    return learning_rate
  if config.lr_schedule != "cosine":
    raise UserError(f"--lr_schedule={config.lr_schedule} must be constant or cosine.")
  return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=decay_steps)


def compile_model(model: keras.Model, config: TrainConfig, learning_rate: float,
                  decay_steps: int | None = None) -> None:
  """Compiles with one-hot labels (for label smoothing), accuracy and top-5.

  `decay_steps` (epochs x steps per epoch of the stage) enables the cosine
  schedule when `config.lr_schedule` asks for it.
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


def _callbacks(workdir: str, stage: str, config: TrainConfig,
               validate: bool) -> list[keras.callbacks.Callback]:
  callbacks: list[keras.callbacks.Callback] = [
      keras.callbacks.BackupAndRestore(os.path.join(workdir, "backup", stage)),
      keras.callbacks.CSVLogger(os.path.join(workdir, f"history_{stage}.csv"), append=True),
      keras.callbacks.TensorBoard(os.path.join(workdir, "logs", stage),
                                  write_graph=False, profile_batch=0),
  ]
  if validate and config.early_stopping_patience > 0:
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor="val_accuracy", patience=config.early_stopping_patience,
        restore_best_weights=True, verbose=config.verbose))
  return callbacks


def read_history(workdir: str, stage: str) -> dict[str, list[float]]:
  """One stage's per-epoch metrics from its CSV log (the last row per epoch wins)."""
  path = os.path.join(workdir, f"history_{stage}.csv")
  if not os.path.exists(path):
    return {}
  rows: dict[int, dict[str, str]] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      rows[int(row["epoch"])] = row
  history: dict[str, list[float]] = {}
  for epoch in sorted(rows):
    for key, value in rows[epoch].items():
      if key != "epoch":
        history.setdefault(key, []).append(float(value))
  return history


def one_hot(num_classes: int):
  return lambda images, labels: (images, tf.one_hot(labels, num_classes))


def _fit(model: keras.Model, train, val, epochs: int, workdir: str, stage: str,
         config: TrainConfig) -> None:
  if epochs <= 0:
    return
  model.fit(train, validation_data=val, epochs=epochs, verbose=config.verbose,
            callbacks=_callbacks(workdir, stage, config, validate=val is not None))


def head_model(model: keras.Model, feature_dim: int) -> keras.Model:
  """Pooled features -> dropout -> classifier, sharing the full model's head."""
  inputs = keras.Input((feature_dim,), name="features")
  x = model.get_layer(model_lib.DROPOUT_NAME)(inputs)
  outputs = model.get_layer(model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="head")


def top_model(model: keras.Model, cache: prefix_cache.PrefixCache) -> keras.Model:
  """Cut-point activations -> unfrozen top of the base -> head."""
  suffix = cache.suffix()
  inputs = keras.Input(suffix.input.shape[1:], name="activations")
  x = suffix(inputs)
  x = model.get_layer(model_lib.POOL_NAME)(x)
  x = model.get_layer(model_lib.DROPOUT_NAME)(x)
  outputs = model.get_layer(model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="top")


def _stage1_done(workdir: str, model: keras.Model) -> bool:
  path = os.path.join(workdir, STAGE1_WEIGHTS)
  if os.path.exists(path):
    model.load_weights(path)
    logging.info("Stage 1 already finished; loaded %s.", path)
    return True
  return False


def _finish_stage1(workdir: str, model: keras.Model) -> None:
  with artifacts.atomic_path(os.path.join(workdir, STAGE1_WEIGHTS)) as tmp:
    model.save_weights(tmp)


def train_stages(model: keras.Model, splits: data_lib.Splits, config: TrainConfig,
                 workdir: str) -> None:
  """Runs stage 1 (frozen base) and stage 2 (top of the base unfrozen) in place."""
  num_classes = len(splits.class_names)
  keras.utils.set_random_seed(config.seed)
  if config.use_cache():
    _train_cached(model, splits, config, workdir, num_classes)
  else:
    _train_plain(model, splits, config, workdir, num_classes)


def _train_plain(model, splits, config, workdir, num_classes) -> None:
  train = splits.train.map(one_hot(num_classes))
  val = splits.val.map(one_hot(num_classes)) if splits.keys("val") else None
  steps = steps_per_epoch(len(splits.keys("train")), config.batch_size)
  if not _stage1_done(workdir, model):
    model_lib.freeze_base(model)
    compile_model(model, config, config.learning_rate, steps * config.epochs)
    _fit(model, train, val, config.epochs, workdir, "stage1", config)
    _finish_stage1(workdir, model)
  if config.fine_tune_epochs > 0 and config.unfreeze_ratio > 0:
    model_lib.unfreeze(model, config.unfreeze_ratio)
    compile_model(model, config, config.stage2_learning_rate, steps * config.fine_tune_epochs)
    _fit(model, train, val, config.fine_tune_epochs, workdir, "stage2", config)


def build_prefix_cache(model: keras.Model, splits: data_lib.Splits, config: TrainConfig,
                       workdir: str, unfreeze_ratio: float) -> prefix_cache.PrefixCache:
  """The frozen-prefix cache of `model`, cut for `unfreeze_ratio`, kept in WORKDIR/cache."""
  cut = model_lib.cut_index(model_lib.base_of(model), unfreeze_ratio)
  ordered = {name: data_lib.make_dataset(
      splits.source, splits.keys(name), image_size=config.image_size,
      batch_size=64, shuffle=False, cache="none") for name in ("train", "val")}
  return prefix_cache.PrefixCache.build(
      model, cut, ordered["train"], ordered["val"], views=max(config.cache_views, 1),
      seed=config.seed, cache_dir=os.path.join(workdir, "cache"),
      split_keys={n: splits.keys(n) for n in ("train", "val")})


def _train_cached(model, splits, config, workdir, num_classes) -> None:
  cache = build_prefix_cache(model, splits, config, workdir,
                             config.unfreeze_ratio if config.fine_tune_epochs else 0.0)
  has_val = len(cache.val_labels) > 0
  val_y = keras.utils.to_categorical(cache.val_labels, num_classes) if has_val else None

  if not _stage1_done(workdir, model):
    train_features, val_features = cache.pooled()
    head = head_model(model, train_features.shape[-1])
    sampler = prefix_cache.ViewSampler(train_features, cache.train_labels, num_classes,
                                       config.batch_size, config.seed)
    compile_model(head, config, config.learning_rate, len(sampler) * config.epochs)
    val = (val_features, val_y) if has_val else None
    _fit(head, sampler, val, config.epochs, workdir, "stage1", config)
    _finish_stage1(workdir, model)

  if config.fine_tune_epochs > 0 and config.unfreeze_ratio > 0:
    model_lib.unfreeze(model, config.unfreeze_ratio)
    sampler = prefix_cache.ViewSampler(cache.train_views, cache.train_labels, num_classes,
                                       config.batch_size, config.seed + 1)
    val = (np.asarray(cache.val, np.float32), val_y) if has_val else None
    top = top_model(model, cache)
    compile_model(top, config, config.stage2_learning_rate,
                  len(sampler) * config.fine_tune_epochs)
    _fit(top, sampler, val, config.fine_tune_epochs, workdir, "stage2", config)


def round_for_int8(model: keras.Model, config: TrainConfig) -> None:
  """Puts the trained conv kernels on the int8 export's grid (see
  `model.round_kernels_to_int8_grid`) unless `config.int8_grid_weights` is off."""
  if not config.int8_grid_weights:
    return
  changed = model_lib.round_kernels_to_int8_grid(model)
  logging.info("Rounded %d conv kernels to their per-channel int8 grid.", changed)


def save_model(model: keras.Model, path: str) -> None:
  """Saves a `.keras` file atomically."""
  with artifacts.atomic_path(path) as tmp:
    model.save(tmp)


def write_labels(path: str, class_names: list[str]) -> None:
  """`labels.txt`: one class name a line, in class-index order."""
  artifacts.write_text(path, "".join(f"{name}\n" for name in class_names))


def read_labels(path: str) -> list[str]:
  if not os.path.exists(path):
    raise UserError(f"{path} not found: it is written beside the model by "
                    "--mode=train, --mode=tune and --mode=export.")
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def evaluate_split(model: keras.Model, splits: data_lib.Splits, split: str = "test") -> dict:
  """Metrics of `model` on one split, through the real input pipeline."""
  dataset = splits.test if split == "test" else splits.val
  probs, labels = evaluate_lib.predict_dataset(evaluate_lib.keras_predictor(model), dataset)
  return evaluate_lib.metrics(probs, labels, splits.class_names, prefix=split)


def train_and_evaluate(config: TrainConfig, workdir: str, source: data_lib.Source,
                       split: str = "64,16,20", cache: str = "memory") -> dict[str, Any]:
  """Trains both stages, evaluates on test, writes all artifacts to `workdir`.

  Returns the report (also written to `report.json`).
  """
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  splits = data_lib.load_splits(
      source, workdir=workdir, split=split, seed=config.seed,
      image_size=config.image_size, batch_size=config.batch_size, cache=cache)
  if not splits.keys("train"):
    raise UserError("The train split is empty; check --split.")
  write_labels(os.path.join(workdir, LABELS_NAME), splits.class_names)
  model = model_lib.build_model(
      len(splits.class_names), image_size=config.image_size, dropout=config.dropout,
      weights=config.weights, augment=config.augment,
      augmentation=config.augmentation, alpha=config.alpha, seed=config.seed)
  train_stages(model, splits, config, workdir)
  round_for_int8(model, config)
  save_model(model, os.path.join(workdir, MODEL_NAME))

  history = {"stage1": read_history(workdir, "stage1"),
             "stage2": read_history(workdir, "stage2")}
  artifacts.write_json(os.path.join(workdir, HISTORY_NAME), history)
  report = evaluation_report(model, splits, config, split,
                             train_seconds=round(time.time() - start, 1))
  artifacts.write_json(os.path.join(workdir, REPORT_NAME), report)
  return report


def evaluation_report(model: keras.Model, splits: data_lib.Splits, config: TrainConfig,
                      split: str, **extra: Any) -> dict[str, Any]:
  """`report.json`'s content: test (and val) metrics plus what the run was."""
  report = evaluate_split(model, splits, "test")
  if splits.keys("val"):
    val = evaluate_split(model, splits, "val")
    report.update({k: v for k, v in val.items() if k.startswith(("val_", "num_val"))})
  report.update({
      "source": splits.source.name,
      "split": split,
      "seed": config.seed,
      "num_train_examples": len(splits.keys("train")),
      "feature_cache": config.use_cache(),
      "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
  })
  report.update(extra)
  return report
