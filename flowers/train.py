"""Two-stage transfer learning: the one training loop of `flowers`.

    stage 1: the base frozen, the head (dropout + classifier) trains
    stage 2: the top `unfreeze_ratio` of the base trains too, BatchNorm frozen

`fit_stages` is that loop. `--mode=train` (`train_and_evaluate`) runs it once;
each `--mode=tune` trial runs it with the trial's hyperparameters
(`dataclasses.replace(config.train, dropout=..., ...)`), so both get the same
callbacks (resume, CSV history, TensorBoard, early stopping), schedules and
seeds. Each stage resumes after an interruption, at the epoch after the last
finished one, as if never stopped: `StageState` keeps all the next epoch
depends on (weights, optimizer, random seeds, early stopping, the data's
position). A finished stage is never run again: its final weights are kept in
the run folder (`stage1.weights.h5`, `stage2.weights.h5`).

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
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Any, Protocol, Sequence

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import compat
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
  """CSV history, TensorBoard and (with val data) early stopping.

  `_fit` adds the stage's `StageState` after these (and after its extra
  callbacks), so what it saves at an epoch's end includes their updates.
  """
  callbacks: list[keras.callbacks.Callback] = [
      keras.callbacks.CSVLogger(os.path.join(run_dir, artifacts.stage_history(stage)),
                                append=True),
      keras.callbacks.TensorBoard(os.path.join(run_dir, artifacts.LOGS_DIR, stage),
                                  write_graph=False, profile_batch=0),
  ]
  if validate and config.early_stopping_patience > 0:
    callbacks.append(ResumableEarlyStopping(
        monitor="val_accuracy", patience=config.early_stopping_patience,
        restore_best_weights=True, verbose=config.verbose))
  return callbacks


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
  """Keras `EarlyStopping` whose progress can be saved and restored.

  A resumed stage must stop where the whole run would have stopped, and
  restore the same best weights, so the best value, the epochs waited and the
  best weights travel in the stage's saved state. Training behaves exactly as
  `EarlyStopping`'s.
  """

  def get_state(self) -> dict[str, Any]:
    """The progress, as JSON (the best weights apart: `best_weights`)."""
    return {"wait": int(self.wait), "stopped_epoch": int(self.stopped_epoch),
            "best": None if self.best is None else float(self.best),
            "best_epoch": int(self.best_epoch)}

  def set_state(self, state: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
    """Restores `get_state()`'s progress and the best weights (after `on_train_begin`)."""
    self.wait = state["wait"]
    self.stopped_epoch = state["stopped_epoch"]
    self.best = state["best"]
    self.best_epoch = state["best_epoch"]
    self.best_weights = best_weights


def seed_states(model: keras.Model) -> list[Any]:
  """The random-seed variables of `model`'s layers (dropout's, augmentation's).

  They advance with every training step but are not weights, so neither
  `save_weights` nor a `.keras` file keeps them.
  """
  weights = {id(w) for w in model.weights}
  return [v for v in model.variables if id(v) not in weights]


class CountedDataset(compat.DatasetView):
  """`dataset` itself, counting the iterators made of it.

  A dataset shuffled with `reshuffle_each_iteration` draws a new order for
  each iterator, from a sequence that restarts in a new process. Counting
  the iterators (Keras makes one or more per epoch) lets a resumed process
  skip to the draw the interrupted one had reached (`skip_to`).
  """

  def __init__(self, dataset: tf.data.Dataset):
    self.iterators = 0
    super().__init__(dataset)

  def __iter__(self):
    self.iterators += 1
    return super().__iter__()

  def skip_to(self, iterators: int) -> None:
    """Makes (and drops) iterators until `iterators` were made; none is read."""
    while self.iterators < iterators:
      iter(self)


def read_history(run_dir: str, stage: str) -> dict[str, list[float]]:
  """One stage's per-epoch metrics from its CSV log (the last row per epoch wins)."""
  path = os.path.join(run_dir, artifacts.stage_history(stage))
  if not os.path.exists(path):
    return {}
  rows: dict[int, dict[str, str]] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      try:  # A row torn by a kill mid-write is skipped; its epoch is redone.
        # Without val data Keras writes its val_ columns as "NA".
        values = {k: float(v) for k, v in row.items() if v != "NA"}
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
    full_model: the full model `model` shares its layers with (its random seed
      states are saved with the stage's state).
  """

  model: keras.Model
  train: Any
  val: Any
  steps: int
  full_model: keras.Model | None = None


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
    self.train = CountedDataset(splits.train.map(one_hot(num_classes)))
    self.val = splits.val.map(one_hot(num_classes)) if splits.keys("val") else None
    self.steps = steps_per_epoch(len(splits.keys("train")), batch_size)

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    del stage, seed  # The train dataset shuffles with the data seed.
    return Stage(model, self.train, self.val, self.steps, full_model=model)

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
      return Stage(head_model(model, train_features.shape[-1]), sampler, val, len(sampler),
                   full_model=model)
    base = model_lib.base_of(model)
    below = [l.name for l in base.layers[:self.cache.cut + 1] if l.trainable and l.weights]
    if base.trainable and below:
      raise ValueError(f"{below[0]} trains but lies below the cache's cut; build the "
                       "cache for a larger unfreeze ratio.")
    sampler = self._sampler(self.cache.train_views, seed + 1)
    val = (self._val_activations, self.val_y) if self.val_y is not None else None
    return Stage(top_model(model, self.cache.cut), sampler, val, len(sampler),
                 full_model=model)


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


def cache_key(splits: data_lib.Splits, config: RunConfig) -> dict[str, Any]:
  """What decides the frozen-prefix cache's bytes beyond the model and the split.

  The code's methods (decoding, resizing, augmentation), the package versions,
  the weights file and the images' content: a cache made by an older recipe or
  from other images is then never reused.
  """
  source = splits.source
  content = getattr(source, "content_sha256", None)
  return {"recipe": runs.recipe(), "versions": runs.versions(),
          "weights": runs.weights_identity(config.train.weights),
          "images": content() if content else runs.listing_sha256(source.keys, source.labels)}


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
      model, cut, ordered["train"], ordered["val"], views=config.train.feature_cache_views,
      seed=config.train.seed, cache_dir=os.path.join(workdir, artifacts.CACHE_DIR),
      split_keys={n: splits.keys(n) for n in ("train", "val")},
      key=cache_key(splits, config), verbose=config.train.verbose)
  return CachedInputs(cache, len(splits.class_names), config.data.batch_size)


def fit_stages(model: keras.Model, inputs: Inputs, config: TrainConfig, run_dir: str, *,
               seed: int, run_stage1: bool = True, stage2_epochs: int | None = None,
               initial_epoch: int = 0,
               stage2_callbacks: Sequence[keras.callbacks.Callback] = ()) -> Stage:
  """Trains `model` in place: stage 1 (frozen base), then stage 2 (top unfrozen).

  Resumable: a stage interrupted in `run_dir` goes on from its last finished
  epoch as if never stopped, and a finished stage is not trained again (its
  final weights are loaded).

  Args:
    model: a `build_model` model; trained in place.
    inputs: where each stage's data comes from (plain or cached).
    config: the training settings (a tune trial's hyperparameters included).
    run_dir: this run's folder: the stages' weights and states, CSV history, logs.
    seed: seeds Python, NumPy, TensorFlow and the cached-view sampling.
    run_stage1: False to start stage 2 from the weights `model` holds (a
      Hyperband trial continuing an earlier one).
    stage2_epochs: train stage 2 up to this epoch (Hyperband's budget); its
      schedule still spans `config.fine_tune_epochs`.
    initial_epoch: the stage 2 epoch to start from (Hyperband).
    stage2_callbacks: more callbacks for stage 2 (a tune trial's median
      stopping rule), after the usual ones.

  Returns:
    The last stage fitted (or loaded).
  """
  keras.utils.set_random_seed(seed)
  os.makedirs(run_dir, exist_ok=True)
  model_lib.freeze_base(model)
  stage1_done = os.path.join(run_dir, artifacts.STAGE1_WEIGHTS)
  stage2_done = os.path.join(run_dir, artifacts.STAGE2_WEIGHTS)
  stage = None
  stage1_loaded = False  # Finished by an earlier process.
  # (A stage 2 finished on a stage 1 that is gone is no finished stage 2.)
  stage2_finished = config.fine_tunes and os.path.exists(stage2_done) and (
      not run_stage1 or os.path.exists(stage1_done))
  if not stage2_finished:
    if run_stage1 and os.path.exists(stage1_done):
      model.load_weights(stage1_done)
      stage1_loaded = True
      logging.info("Stage 1 already finished; loaded %s.", stage1_done)
      if not config.fine_tunes:
        stage = inputs.stage(model, 1, seed)
        _restore_finished(run_dir, "stage1", stage)
    else:
      stage = inputs.stage(model, 1, seed)
      compile_model(stage.model, config, config.learning_rate, stage.steps * config.epochs)
      if run_stage1:
        _fit(stage, config.epochs, 0, run_dir, "stage1", config)
        _finish(run_dir, "stage1", model, stage1_done)
        _forget(run_dir, "stage2")  # Whatever is there was not made on this stage 1.

  if not config.fine_tunes:
    return stage
  model_lib.unfreeze(model, config.unfreeze_ratio)
  stage = inputs.stage(model, 2, seed)
  if os.path.exists(stage2_done):
    model.load_weights(stage2_done)
    logging.info("Stage 2 already finished; loaded %s.", stage2_done)
    _restore_finished(run_dir, "stage2", stage)
    return stage
  if stage1_loaded:  # Carry on from where stage 1 left the random states and data.
    _restore_finished(run_dir, "stage1", stage)
  compile_model(stage.model, config, config.fine_tune_rate,
                stage.steps * config.fine_tune_epochs)
  epochs = config.fine_tune_epochs if stage2_epochs is None else stage2_epochs
  _fit(stage, epochs, initial_epoch, run_dir, "stage2", config, stage2_callbacks)
  if epochs >= config.fine_tune_epochs:  # (A Hyperband budget short of it is no end.)
    _finish(run_dir, "stage2", model, stage2_done)
  return stage


def _state_path(run_dir: str, name: str) -> str:
  return os.path.join(run_dir, artifacts.BACKUP_DIR, name, artifacts.RESUME_STATE)


def _finish(run_dir: str, name: str, model: keras.Model, done_path: str) -> None:
  """Marks a stage finished: its final weights, then its state slimmed to what
  the next stage carries on with (random states, the data's position)."""
  with artifacts.atomic_path(done_path) as tmp:
    model.save_weights(tmp)
  saved = _read_state(_state_path(run_dir, name))
  if saved is not None and not saved[0].get("finished"):
    meta, arrays = saved
    _write_state(_state_path(run_dir, name), {**meta, "finished": True},
                 {k: v for k, v in arrays.items() if k.startswith(_CARRIED)})


def _forget(run_dir: str, name: str) -> None:
  """Deletes a stage's final weights and saved state."""
  done = artifacts.STAGE1_WEIGHTS if name == "stage1" else artifacts.STAGE2_WEIGHTS
  for path in (os.path.join(run_dir, done), os.path.dirname(_state_path(run_dir, name))):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
      logging.warning("Removed %s: it was not trained on this run's stage 1.", path)


def _restore_finished(run_dir: str, name: str, stage: Stage) -> None:
  """After loading a finished stage's weights: its random states and data position."""
  saved = _read_state(_state_path(run_dir, name))
  if saved is not None:
    _restore_carried(*saved, stage)


# Saved-state arrays that a finished stage keeps for the next one.
_CARRIED = ("numpy_keys", "seeds_")


def _read_state(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
  """A stage's saved state: (JSON part, arrays), or None when there is none."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
  except (OSError, ValueError, KeyError) as e:  # Damaged: start the stage over.
    logging.warning("Ignoring the unreadable training state %s (%s).", path, e)
    return None
  return meta, arrays


def _write_state(path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
  with artifacts.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def _pack(group: str, values: Sequence[Any]) -> dict[str, np.ndarray]:
  return {f"{group}_{i}": np.asarray(v) for i, v in enumerate(values)}


def _unpack(arrays: dict[str, np.ndarray], group: str) -> list[np.ndarray]:
  found = []
  while f"{group}_{len(found)}" in arrays:
    found.append(arrays[f"{group}_{len(found)}"])
  return found


def _fits(variables: Sequence[Any], values: Sequence[np.ndarray]) -> bool:
  return len(variables) == len(values) and all(
      tuple(v.shape) == x.shape for v, x in zip(variables, values))


def _carried_state(stage: Stage) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """What runs on from one epoch (or stage) to the next outside the stage model:
  Python's and NumPy's random states, the full model's seed states, and how
  many shuffles a tf.data pipeline drew."""
  version, internal, gauss = random.getstate()
  name, keys, pos, has_gauss, cached = np.random.get_state()
  meta = {"python_random": [version, list(internal), gauss],
          "numpy_random": [name, int(pos), int(has_gauss), float(cached)]}
  arrays = {"numpy_keys": np.asarray(keys)}
  if stage.full_model is not None:
    arrays.update(_pack("seeds", [v.numpy() for v in seed_states(stage.full_model)]))
  if isinstance(stage.train, CountedDataset):
    meta["dataset_iterators"] = stage.train.iterators
  return meta, arrays


def _restore_carried(meta: dict[str, Any], arrays: dict[str, np.ndarray], stage: Stage) -> None:
  version, internal, gauss = meta["python_random"]
  random.setstate((version, tuple(internal), gauss))
  name, pos, has_gauss, cached = meta["numpy_random"]
  np.random.set_state((name, arrays["numpy_keys"], pos, has_gauss, cached))
  if stage.full_model is not None:
    states, values = seed_states(stage.full_model), _unpack(arrays, "seeds")
    if _fits(states, values):
      for v, x in zip(states, values):
        v.assign(x)
  if isinstance(stage.train, CountedDataset) and "dataset_iterators" in meta:
    stage.train.skip_to(meta["dataset_iterators"])


class StageState(keras.callbacks.Callback):
  """Saves, at each epoch's end, all a stage's next epoch depends on; restores it.

  One file (`BACKUP_DIR/<stage>/state.npz`, replaced atomically) holds the
  stage model's variables (its weights and its layers' random seed states,
  which `save_weights` leaves out), the optimizer's variables, the early
  stopping's progress and best weights, where the data stands (the view
  sampler's epoch, or the tf.data shuffle's draw), the Python and NumPy random
  states (Keras shuffles a `PyDataset`'s batches with Python's) and the full
  model's seed states. Restored when training begins, after Keras has set up
  the data, a fit from the next epoch runs as the uninterrupted one would.

  Put it after every other callback: it saves what they updated at the epoch's end.
  """

  def __init__(self, path: str, stage: Stage,
               early_stopping: ResumableEarlyStopping | None = None):
    super().__init__()
    self.path = path
    self.stage = stage
    self.early_stopping = early_stopping
    self.pending: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None
    self._sampler_epoch: int | None = None

  def load(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The saved state, when there is one this stage's model and optimizer fit."""
    saved = _read_state(self.path)
    if saved is None or saved[0].get("finished"):
      return None
    model = self.stage.model
    if model.optimizer is not None and not model.optimizer.built:
      model.optimizer.build(model.trainable_variables)  # Its variables, to restore.
    if not (_fits(model.variables, _unpack(saved[1], "variables"))
            and _fits(model.optimizer.variables, _unpack(saved[1], "optimizer"))):
      logging.warning("The training state %s does not fit this model; training the stage "
                      "from its start.", self.path)
      return None
    return saved

  def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Puts the stage back where `meta`/`arrays` (from `load`) left it."""
    model = self.stage.model
    for group, variables in (("variables", model.variables),
                             ("optimizer", model.optimizer.variables)):
      for v, x in zip(variables, _unpack(arrays, group)):
        v.assign(x)
    if self.early_stopping is not None and meta.get("early_stopping"):
      self.early_stopping.set_state(meta["early_stopping"], _unpack(arrays, "best") or None)
    _restore_carried(meta, arrays, self.stage)
    if isinstance(self.stage.train, prefix_cache.ViewSampler) and "sampler_epoch" in meta:
      self.stage.train.set_epoch(meta["sampler_epoch"])

  def on_train_begin(self, logs=None):
    if self.pending is not None:
      self.restore(*self.pending)
      self.pending = None

  def on_epoch_begin(self, epoch, logs=None):
    if isinstance(self.stage.train, prefix_cache.ViewSampler):
      self._sampler_epoch = self.stage.train.epoch  # The draw this epoch uses.

  def on_epoch_end(self, epoch, logs=None):
    model = self.stage.model
    meta, arrays = _carried_state(self.stage)
    meta.update(epoch=epoch, stopped=bool(model.stop_training))
    if self._sampler_epoch is not None:
      meta["sampler_epoch"] = self._sampler_epoch + 1
    arrays.update(_pack("variables", [v.numpy() for v in model.variables]))
    arrays.update(_pack("optimizer", [v.numpy() for v in model.optimizer.variables]))
    if self.early_stopping is not None:
      meta["early_stopping"] = self.early_stopping.get_state()
      arrays.update(_pack("best", self.early_stopping.best_weights or []))
    _write_state(self.path, meta, arrays)


def _fit(stage: Stage, epochs: int, initial_epoch: int, run_dir: str, name: str,
         config: TrainConfig, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> None:
  """Fits one stage up to `epochs`, resuming from its saved state when there is one."""
  if epochs <= initial_epoch:
    return
  callbacks = stage_callbacks(run_dir, name, config, stage.val is not None)
  early = next((c for c in callbacks if isinstance(c, ResumableEarlyStopping)), None)
  state = StageState(_state_path(run_dir, name), stage, early)
  saved = state.load()
  if saved is not None:
    meta = saved[0]
    if meta["stopped"] or meta["epoch"] + 1 >= epochs:  # Killed after its last epoch.
      state.restore(*saved)
      if early is not None:
        early.set_model(stage.model)
        early.on_train_end()  # Its best weights, as at the end of the fit.
      return
    state.pending = saved
    initial_epoch = max(initial_epoch, meta["epoch"] + 1)
    logging.info("Resuming %s at epoch %d.", name, initial_epoch + 1)
  stage.model.fit(stage.train, validation_data=stage.val, epochs=epochs,
                  initial_epoch=initial_epoch, verbose=config.verbose,
                  callbacks=callbacks + list(extra_callbacks) + [state])


def new_model(config: RunConfig, num_classes: int, *, random_base: bool = False) -> keras.Model:
  """`build_model` for a run, seeded before the build so every build is the same.

  `random_base` skips reading `config.train.weights` (tune copies the weights
  it read once into each trial's model).
  """
  t = config.train
  keras.utils.set_random_seed(config.train.seed)
  return model_lib.build_model(
      num_classes, image_size=config.data.image_size, dropout=t.dropout,
      weights=None if random_base else t.weights, augment=t.augment,
      augmentation=t.augmentation, alpha=t.alpha, seed=config.train.seed)


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
                                     config.data.split_seed, config.data.image_size)


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
  from flowers import lineage  # pylint: disable=g-import-not-at-top

  as_trained = None  # Val accuracy before the rounding, to show what it costs.
  if config.train.int8_grid_weights and model_lib.kernels_off_int8_grid(model):
    if splits.keys("val"):  # (A tuned model comes here rounded already.)
      as_trained = evaluate_split(model, splits, "val")["val_accuracy"]
    round_for_int8(model, config, calibration_images(config, splits))
  model_path = os.path.join(workdir, artifacts.MODEL)
  save_model(model, model_path)
  model_sha = lineage.model_sha256(model_path)
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
  listed = getattr(splits.source, "skipped", None)
  if listed:  # Files of an image folder that are no readable image (named in the log).
    skipped["listing"] = len(listed)
  report.update({
      "source": splits.source.name,
      "split": config.data.split,
      "split_seed": config.data.split_seed,
      "seed": config.train.seed,
      "num_train_examples": len(splits.keys("train")) - skipped.get("train", 0),
      "num_skipped_images": skipped,
      "feature_cache": uses_feature_cache(config.train),
      "config": config.to_json(),
  })
  if as_trained is not None:
    report["val_accuracy_before_int8_grid"] = as_trained
  report.update(extra)
  artifacts.write_json(os.path.join(workdir, artifacts.REPORT), report)
  run = runs.read_run(workdir)
  # report.json last: its record is what marks the run finished (`runs.finished`).
  lineage.record(workdir, [artifacts.MODEL, artifacts.LABELS, artifacts.HISTORY,
                           artifacts.REPORT], mode=(run or {}).get("mode", "train"),
                 model=model_sha)
  return report


def load_splits_seeded(config: RunConfig, source: data_lib.Source,
                       workdir: str) -> data_lib.Splits:
  """`data.load_splits` with every seed set first, so the training shuffle order
  is the same whatever ran before in this process (tf.data combines its own
  seed with TensorFlow's global one)."""
  keras.utils.set_random_seed(config.train.seed)
  return data_lib.load_splits(config.data, source=source, workdir=workdir,
                              shuffle_seed=config.train.seed)


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
  chief = distribute.is_chief(strategy)
  if config.overwrite and chief:
    runs.start_afresh(workdir)
  source = source or data_lib.load_source(config.data)
  splits = load_splits_seeded(config, source, workdir)
  if not splits.keys("train"):
    raise UserError("The train split is empty; check --split.")
  if not splits.keys("test"):
    raise UserError(f"--split={config.data.split} leaves no test images to report on; give "
                    "test a share, e.g. --split=64,16,20.")
  feature_cache = uses_feature_cache(config.train)
  done = runs.finished(config, workdir, "train", source, feature_cache=feature_cache)
  if done is not None:  # Done is done: rerunning a finished run changes nothing.
    return {**done, "already_finished": True}
  runs.begin(config, workdir, "train", source, feature_cache=feature_cache, chief=chief)
  num_classes = len(splits.class_names)
  with strategy.scope():
    model = new_model(config, num_classes)
    inputs = make_inputs(model, splits, config, workdir, config.train.feature_cache_cut)
    fit_stages(model, inputs, config.train, workdir, seed=config.train.seed)
  if not chief:
    return {"is_chief": False}
  return save_run(model, splits, config, workdir, workdir,
                  num_train_images=inputs.num_train_images(),
                  train_seconds=round(time.time() - start, 1))
