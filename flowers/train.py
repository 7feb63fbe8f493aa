"""Two-stage transfer learning: the one training loop of `flowers`.

    stage 1: the base frozen, the head (dropout + classifier) trains
    stage 2: the top `unfreeze_ratio` of the base trains too, BatchNorm frozen

`fit_stages` is that loop. `--mode=train` (`train_and_evaluate`) runs it once;
each `--mode=tune` trial runs it with the trial's hyperparameters
(`dataclasses.replace(config.train, dropout=..., ...)`), so both get the same
callbacks (resume, CSV history, TensorBoard, early stopping, stage 2's weight
average), schedules and seeds. Each stage resumes after an interruption, at the
epoch after the last finished one, as if never stopped: `StageState` keeps all
the next epoch depends on (weights, optimizer, random seeds, early stopping,
the weight average, the data's position). A finished stage is never run
again: its final weights are kept in the run folder (`frozen.weights.h5`,
`fine_tune.weights.h5`).

The stages read their data from `flowers.inputs` (`Inputs.stage`): the plain
tf.data pipeline or the frozen-prefix cache, the model's weights being the
same either way; each stage draws its data from a stream seeded by `seed`, so
a run's order never depends on what read the data before it. After the
stages, `save_run` rounds the kernels to the int8 grid, calibrates the scores
(a temperature fitted on val, folded into the classifier), evaluates and
writes the run's files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np

from flowers import artifacts
from flowers import calibrate as calibrate_lib
from flowers import data as data_lib
from flowers import distribute
from flowers import evaluate as evaluate_lib
from flowers import inputs as inputs_lib
from flowers import lineage
from flowers import model as model_lib
from flowers import open_set
from flowers import prefix_cache
from flowers import runs
from flowers import schemas
from flowers import weight_average
from flowers.config import LrSchedule
from flowers.config import Optimizer
from flowers.config import RunConfig
from flowers.config import TrainConfig
from flowers.errors import UserError

STAGES = ("frozen", "fine_tune")



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


def stage_callbacks(run_dir: str, stage: str, config: TrainConfig,
                    validate: bool) -> list[keras.callbacks.Callback]:
  """CSV history, TensorBoard and (with val data) early stopping, with the stage's
  patience (`fine_tune_patience` for the fine-tune stage).

  `_fit` adds the stage's `StageState` after these (and after its extra
  callbacks), so what it saves at an epoch's end includes their updates.
  """
  callbacks: list[keras.callbacks.Callback] = [
      keras.callbacks.CSVLogger(os.path.join(run_dir, artifacts.stage_history(stage)),
                                append=True),
      keras.callbacks.TensorBoard(os.path.join(run_dir, artifacts.LOGS_DIR, stage),
                                  write_graph=False, profile_batch=0),
  ]
  patience = (config.fine_tune_patience if stage == "fine_tune"
              else config.early_stopping_patience)
  if validate and patience > 0:
    callbacks.append(ResumableEarlyStopping(
        monitor="val_accuracy", patience=patience,
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


def read_history(run_dir: str, stage: str) -> schemas.StageHistory:
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


def fit_stages(model: keras.Model, inputs: inputs_lib.Inputs, config: TrainConfig,
               run_dir: str, *, seed: int, run_frozen_stage: bool = True,
               fine_tune_until: int | None = None, initial_epoch: int = 0,
               fine_tune_callbacks: Sequence[keras.callbacks.Callback] = (),
               frozen_callbacks: Sequence[keras.callbacks.Callback] = ()) -> inputs_lib.Stage:
  """Trains `model` in place: stage 1 (frozen base), then stage 2 (top unfrozen).

  Resumable: a stage interrupted in `run_dir` goes on from its last finished
  epoch as if never stopped, and a finished stage is not trained again (its
  final weights are loaded).

  Args:
    model: a `build_model` model; trained in place.
    inputs: where each stage's data comes from (plain or cached).
    config: the training settings (a tune trial's hyperparameters included).
    run_dir: this run's folder: the stages' weights and states, CSV history, logs.
    seed: seeds Python, NumPy, TensorFlow and each stage's data stream (the
      plain pipeline's shuffle, the cached-view sampling).
    run_frozen_stage: False to start stage 2 from the weights `model` holds (a
      Hyperband trial continuing an earlier one).
    fine_tune_until: train stage 2 up to this epoch (Hyperband's budget); its
      schedule still spans `config.fine_tune_epochs`.
    initial_epoch: the stage 2 epoch to start from (Hyperband).
    fine_tune_callbacks: more callbacks for stage 2 (a tune trial's median
      stopping rule), after the usual ones.
    frozen_callbacks: more callbacks for stage 1 (a tune trial's clock).

  Returns:
    The last stage fitted (or loaded).
  """
  keras.utils.set_random_seed(seed)
  os.makedirs(run_dir, exist_ok=True)
  model_lib.freeze_base(model)
  run = _StageRun(model, inputs, config, run_dir, seed)
  stage, frozen_loaded = None, False
  if not _fine_tune_finished(run, run_frozen_stage):
    stage, frozen_loaded = _frozen_stage(run, run_frozen_stage, frozen_callbacks)
  if not config.fine_tunes:
    return stage
  epochs = config.fine_tune_epochs if fine_tune_until is None else fine_tune_until
  return _fine_tune_stage(run, epochs, initial_epoch, fine_tune_callbacks, carry_on=frozen_loaded)


@dataclasses.dataclass(frozen=True)
class _StageRun:
  """What both stages of one `fit_stages` call share."""

  model: keras.Model
  inputs: inputs_lib.Inputs
  config: TrainConfig
  run_dir: str
  seed: int

  def stage(self, number: int) -> inputs_lib.Stage:
    """Stage `number`'s model and data, from the inputs."""
    return self.inputs.stage(self.model, number, self.seed)

  def done(self, name: str) -> str:
    """The stage's final weights: their file marks the stage finished."""
    return _done_path(self.run_dir, name)


def _fine_tune_finished(run: _StageRun, run_frozen_stage: bool) -> bool:
  """Whether an earlier process finished stage 2 on this run's stage 1.

  A stage 2 finished on a stage 1 that is gone is no finished stage 2.
  """
  return run.config.fine_tunes and os.path.exists(run.done("fine_tune")) and (
      not run_frozen_stage or os.path.exists(run.done("frozen")))


def _frozen_stage(run: _StageRun, train: bool,
                  callbacks: Sequence[keras.callbacks.Callback] = ()
                  ) -> tuple[inputs_lib.Stage | None, bool]:
  """Stage 1: loaded when an earlier process finished it, else compiled and
  (when `train`) fitted and marked finished.

  Returns the stage (None when loaded for a stage 2 to follow) and whether it
  was loaded.
  """
  config, done = run.config, run.done("frozen")
  if train and os.path.exists(done):
    run.model.load_weights(done)
    logging.info("Stage 1 already finished; loaded %s.", done)
    stage = None
    if not config.fine_tunes:
      stage = run.stage(1)
      _restore_finished(run.run_dir, "frozen", stage)
    return stage, True
  stage = run.stage(1)
  compile_model(stage.model, config, config.learning_rate, stage.steps * config.epochs)
  if train:
    _fit(stage, config.epochs, 0, run.run_dir, "frozen", config, callbacks)
    _finish(run.run_dir, "frozen", run.model)
    _forget(run.run_dir, "fine_tune")  # Whatever is there was not made on this stage 1.
  return stage, False


def _fine_tune_stage(run: _StageRun, epochs: int, initial_epoch: int,
            callbacks: Sequence[keras.callbacks.Callback], carry_on: bool) -> inputs_lib.Stage:
  """Stage 2 up to `epochs`: loaded when an earlier process finished it, else fitted.

  `carry_on`: stage 1 was loaded, so stage 2 starts from the random states it
  left (its data is a stream of its own, `Inputs.stage`). A budget short of
  `fine_tune_epochs` (Hyperband's) does not mark the stage finished.
  """
  model, config, done = run.model, run.config, run.done("fine_tune")
  model_lib.unfreeze(model, config.unfreeze_ratio)
  stage = run.stage(2)
  if os.path.exists(done):
    model.load_weights(done)
    logging.info("Stage 2 already finished; loaded %s.", done)
    _restore_finished(run.run_dir, "fine_tune", stage)
    return stage
  if carry_on:  # Stage 1's random states; stage 2 reads a data stream of its own.
    _restore_finished(run.run_dir, "frozen", stage, data_position=False)
  compile_model(stage.model, config, config.fine_tune_rate,
                stage.steps * config.fine_tune_epochs)
  average = (weight_average.WeightAverage(stage.model, config.fine_tune_ema_momentum)
             if config.fine_tune_ema_momentum > 0 else None)
  _fit(stage, epochs, initial_epoch, run.run_dir, "fine_tune", config, callbacks, average)
  if epochs >= config.fine_tune_epochs:
    _finish(run.run_dir, "fine_tune", model)
  return stage


def _done_path(run_dir: str, name: str) -> str:
  return os.path.join(run_dir, artifacts.FROZEN_WEIGHTS if name == "frozen"
                      else artifacts.FINE_TUNE_WEIGHTS)


def _state_path(run_dir: str, name: str) -> str:
  return os.path.join(run_dir, artifacts.BACKUP_DIR, name, artifacts.RESUME_STATE)


def _finish(run_dir: str, name: str, model: keras.Model) -> None:
  """Marks a stage finished: its final weights, then its state slimmed to what
  the next stage carries on with (random states)."""
  with artifacts.atomic_path(_done_path(run_dir, name)) as tmp:
    model.save_weights(tmp)
  saved = _read_state(_state_path(run_dir, name))
  if saved is not None and not saved[0].get("finished"):
    meta, arrays = saved
    _write_state(_state_path(run_dir, name), {**meta, "finished": True},
                 {k: v for k, v in arrays.items() if k.startswith(_CARRIED)})


def _forget(run_dir: str, name: str) -> None:
  """Deletes a stage's final weights and saved state."""
  for path in (_done_path(run_dir, name), os.path.dirname(_state_path(run_dir, name))):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
      logging.warning("Removed %s: it was not trained on this run's stage 1.", path)


def _restore_finished(run_dir: str, name: str, stage: inputs_lib.Stage,
                      data_position: bool = True) -> None:
  """After loading a finished stage's weights: its random states and (for the same
  stage's data) its data position."""
  saved = _read_state(_state_path(run_dir, name))
  if saved is not None:
    _restore_carried(*saved, stage, data_position=data_position)


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


def _carried_state(stage: inputs_lib.Stage) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
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
  if isinstance(stage.train, inputs_lib.CountedDataset):
    meta["dataset_iterators"] = stage.train.iterators
  return meta, arrays


def _restore_carried(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                     stage: inputs_lib.Stage, data_position: bool = True) -> None:
  version, internal, gauss = meta["python_random"]
  random.setstate((version, tuple(internal), gauss))
  name, pos, has_gauss, cached = meta["numpy_random"]
  np.random.set_state((name, arrays["numpy_keys"], pos, has_gauss, cached))
  if stage.full_model is not None:
    states, values = seed_states(stage.full_model), _unpack(arrays, "seeds")
    if _fits(states, values):
      for v, x in zip(states, values):
        v.assign(x)
  if (data_position and isinstance(stage.train, inputs_lib.CountedDataset)
      and "dataset_iterators" in meta):
    stage.train.skip_to(meta["dataset_iterators"])


class StageState(keras.callbacks.Callback):
  """Saves, at each epoch's end, all a stage's next epoch depends on; restores it.

  One file (`BACKUP_DIR/<stage>/state.npz`, replaced atomically) holds the
  stage model's variables (its weights and its layers' random seed states,
  which `save_weights` leaves out), the optimizer's variables, the weight
  average's values, the early stopping's progress and best weights, where the
  data stands (the view sampler's epoch, or the tf.data shuffle's draw), the
  Python and NumPy random states (Keras shuffles a `PyDataset`'s batches with
  Python's) and the full model's seed states. Restored when training begins,
  after Keras has set up the data, a fit from the next epoch runs as the
  uninterrupted one would.

  Put it after every other callback: it saves what they updated at the epoch's end.
  """

  def __init__(self, path: str, stage: inputs_lib.Stage,
               early_stopping: ResumableEarlyStopping | None = None,
               average: weight_average.WeightAverage | None = None):
    super().__init__()
    self.path = path
    self.stage = stage
    self.early_stopping = early_stopping
    self.average_values = average.values if average is not None else []
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
            and _fits(model.optimizer.variables, _unpack(saved[1], "optimizer"))
            and _fits(self.average_values, _unpack(saved[1], "average"))):
      logging.warning("The training state %s does not fit this model; training the stage "
                      "from its start.", self.path)
      return None
    return saved

  def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Puts the stage back where `meta`/`arrays` (from `load`) left it."""
    model = self.stage.model
    for group, variables in (("variables", model.variables),
                             ("optimizer", model.optimizer.variables),
                             ("average", self.average_values)):
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
    arrays.update(_pack("average", [v.numpy() for v in self.average_values]))
    if self.early_stopping is not None:
      meta["early_stopping"] = self.early_stopping.get_state()
      arrays.update(_pack("best", self.early_stopping.best_weights or []))
    _write_state(self.path, meta, arrays)


def _fit(stage: inputs_lib.Stage, epochs: int, initial_epoch: int, run_dir: str, name: str,
         config: TrainConfig, extra_callbacks: Sequence[keras.callbacks.Callback] = (),
         average: weight_average.WeightAverage | None = None) -> None:
  """Fits one stage up to `epochs`, resuming from its saved state when there is one.

  `average`: the weight average the stage scores, keeps and ends on (saved
  with its state), if any.
  """
  if epochs <= initial_epoch:
    return
  callbacks = stage_callbacks(run_dir, name, config, stage.val is not None)
  early = next((c for c in callbacks if isinstance(c, ResumableEarlyStopping)), None)
  if average is not None:
    callbacks.insert(0, average)  # First: the others see the average at an epoch's end.
  state = StageState(_state_path(run_dir, name), stage, early, average)
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
                  class_weight=stage.class_weight,
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
      augmentation=t.augmentation, alpha=t.alpha, seed=config.train.seed,
      backbone=t.backbone)


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


_Scored = tuple[np.ndarray, np.ndarray]  # (probabilities [N, C], labels [N]) of a split.


def _split_probs(model: keras.Model, splits: data_lib.Splits, split: str) -> _Scored:
  """`model`'s probabilities on one split, through the real input pipeline, and its labels."""
  dataset = splits.test if split == "test" else splits.val
  return evaluate_lib.predict_dataset(evaluate_lib.keras_predictor(model), dataset)


def evaluate_split(model: keras.Model, splits: data_lib.Splits, split: str = "test") -> dict:
  """Metrics of `model` on one split, through the real input pipeline."""
  probs, labels = _split_probs(model, splits, split)
  return evaluate_lib.metrics(probs, labels, splits.class_names, prefix=split)


def save_run(model: keras.Model, splits: data_lib.Splits, config: RunConfig, workdir: str,
             run_dir: str, num_train_images: int | None = None,
             **extra: Any) -> schemas.Report:
  """Rounds, saves and evaluates a trained model; writes every artifact of a run.

  `model.keras`, `labels.txt`, `history.json` (from `run_dir`'s CSV logs) and
  `report.json` (test and val metrics, the images skipped in each split, the
  calibration, what the run was, `extra`) go to `workdir`. `num_train_images`:
  how many training images the stages saw, when known. Returns the report.
  """
  as_trained = _round_to_int8_grid(model, splits, config)
  chosen = _calibrate(model, splits, config)
  model_sha = _write_model_files(model, splits, workdir, run_dir)
  # Val's probabilities of the model as it ships, when the calibration already has them.
  val = chosen.val_before if chosen is not None and not chosen.applied else None
  report, skipped, scored = _evaluate_splits(model, splits, config.data.strict, val)
  skipped.update(_skipped_before_evaluation(splits, num_train_images, config.data.strict))
  report.update(_run_facts(splits, config, skipped))
  if as_trained is not None:
    report["val_accuracy_before_int8_grid"] = as_trained
  if chosen is not None:
    report["calibration"] = _calibration_report(chosen, scored)
  report.update(_unknown_threshold(scored, config))
  report.update(_open_set(model, splits, config))
  report.update(extra)
  _write_report(workdir, report, model_sha)
  return report


def _unknown_threshold(scored: dict[str, _Scored], config: RunConfig) -> dict[str, Any]:
  """report.json's "unknown_threshold": the top-probability threshold chosen on val
  for `--true_accept_rate` (none without a val split or with a rate of 0)."""
  if "val" not in scored:
    return {}
  chosen = open_set.threshold_report(scored["val"][0], scored["test"][0],
                                     config.train.true_accept_rate)
  return {} if chosen is None else {"unknown_threshold": chosen}


def _open_set(model: keras.Model, splits: data_lib.Splits,
              config: RunConfig) -> dict[str, Any]:
  """report.json's "open_set" under --holdout_classes: the known val and test images
  against the held-out classes' (`open_set.open_set_report`)."""
  if splits.held_out is None:
    return {}
  parts = {"val_known": (splits.source, splits.keys("val")),
           "val_unknown": (splits.held_out, splits.held_out_keys("val")),
           "test_known": (splits.source, splits.keys("test")),
           "test_unknown": (splits.held_out, splits.held_out_keys("test"))}
  empty = [name for name, (_, keys) in parts.items() if not keys]
  if empty:
    logging.warning("No open-set figures: no %s images in --split=%s.", ", ".join(empty),
                    config.data.split)
    return {}
  to_logits = logits_predictor(model)
  logits = {name: to_logits(data_lib.make_dataset(
      source, keys, image_size=config.data.image_size, batch_size=config.data.batch_size,
      cache="none")) for name, (source, keys) in parts.items()}
  return {"open_set": open_set.open_set_report(logits, splits.held_out.class_names,
                                                config.train.true_accept_rate)}


def logits_predictor(model: keras.Model) -> Callable[[Any], np.ndarray]:
  """dataset -> the classifier's logits (before its softmax) for each of its images."""
  classifier = model.get_layer(model_lib.CLASSIFIER_NAME)
  predict = evaluate_lib.keras_predictor(keras.Model(model.inputs, classifier.input))
  kernel, bias = (np.asarray(w, np.float64) for w in classifier.get_weights())

  def logits(dataset: Any) -> np.ndarray:
    pooled, _ = evaluate_lib.predict_dataset(predict, dataset)
    return pooled @ kernel + bias

  return logits


def _round_to_int8_grid(model: keras.Model, splits: data_lib.Splits,
                        config: RunConfig) -> float | None:
  """Puts the kernels on the int8 grid when they are off it (a tuned model comes
  rounded already); returns the val accuracy before, to show what it costs."""
  if not (config.train.int8_grid_weights and model_lib.kernels_off_int8_grid(model)):
    return None
  as_trained = None
  if splits.keys("val"):
    as_trained = evaluate_split(model, splits, "val")["val_accuracy"]
  round_for_int8(model, config, calibration_images(config, splits))
  return as_trained


@dataclasses.dataclass(frozen=True)
class _Temperature:
  """What `_calibrate` chose, with the probabilities it saw before folding."""
  applied: bool
  reason: str
  temperature: float | None  # None: no val split to fit one on.
  val_before: _Scored | None
  test_before: _Scored | None  # None: the model was left as it was.


def _calibrate(model: keras.Model, splits: data_lib.Splits,
               config: RunConfig) -> _Temperature | None:
  """Fits a temperature on val (NLL) and folds it into the classifier when it lowers it.

  Val decides alone; test is predicted before the fold only to report what
  the fold changed. None under --nocalibrate.
  """
  if not config.train.calibrate:
    return None
  if not splits.keys("val"):
    logging.info("No val split to fit a temperature on: the scores are left uncalibrated.")
    return _Temperature(False, "no val split to fit a temperature on", None, None, None)
  val = _split_probs(model, splits, "val")
  temperature = calibrate_lib.fit_temperature(*val)
  scaled = calibrate_lib.scale(val[0], temperature)
  if not calibrate_lib.nll(scaled, val[1]) < calibrate_lib.nll(*val):
    return _Temperature(False, "it does not lower val NLL", temperature, val, None)
  test = _split_probs(model, splits, "test")
  calibrate_lib.fold_temperature(model, temperature)
  logging.info("Folded temperature %.4f (fitted on val NLL) into the classifier.", temperature)
  return _Temperature(True, "it lowers val NLL", temperature, val, test)


def _calibration_report(chosen: _Temperature,
                        scored: dict[str, _Scored]) -> schemas.Calibration:
  """report.json's "calibration": the choice, and NLL and ECE before and after it.

  "after" is measured on the shipped model; "before" on the model before the
  fold (the same model when nothing was folded).
  """
  report: dict[str, Any] = {"applied": chosen.applied, "reason": chosen.reason}
  if chosen.temperature is not None:
    report["temperature"] = chosen.temperature
  if chosen.val_before is not None and "val" in scored:
    report.update(_before_after("val", chosen.val_before, scored["val"]))
  test_before = chosen.test_before or scored["test"]
  report.update(_before_after("test", test_before, scored["test"]))
  report["test_reliability_before"] = calibrate_lib.reliability(*test_before)
  report["test_reliability_after"] = calibrate_lib.reliability(*scored["test"])
  return report


def _before_after(split: str, before: _Scored, after: _Scored) -> dict[str, float]:
  """`split`'s NLL and ECE before and after calibration."""
  return {f"{split}_nll_before": calibrate_lib.nll(*before),
          f"{split}_nll_after": calibrate_lib.nll(*after),
          f"{split}_ece_before": calibrate_lib.expected_calibration_error(*before),
          f"{split}_ece_after": calibrate_lib.expected_calibration_error(*after)}


def _write_model_files(model: keras.Model, splits: data_lib.Splits, workdir: str,
                       run_dir: str) -> str:
  """`model.keras`, `labels.txt` and `history.json`; returns the model's sha256."""
  model_path = os.path.join(workdir, artifacts.MODEL)
  save_model(model, model_path)
  model_sha = lineage.model_sha256(model_path)
  artifacts.write_labels(os.path.join(workdir, artifacts.LABELS), splits.class_names)
  artifacts.write_json(os.path.join(workdir, artifacts.HISTORY),
                       {stage: read_history(run_dir, stage) for stage in STAGES})
  return model_sha


def _evaluate_splits(model: keras.Model, splits: data_lib.Splits, strict: bool,
                     val: _Scored | None = None
                     ) -> tuple[dict[str, Any], dict[str, int], dict[str, _Scored]]:
  """Test metrics, and val's when there is a val split; the images each skipped;
  each split's probabilities and labels. `val`: val's, already predicted with this
  very model (not predicted again)."""
  scored = {"test": _split_probs(model, splits, "test")}
  report = evaluate_lib.metrics(*scored["test"], splits.class_names, prefix="test")
  skipped = {"test": evaluate_lib.count_skipped(
      "test", len(splits.keys("test")), report["num_test_examples"], strict)}
  if splits.keys("val"):
    scored["val"] = val if val is not None else _split_probs(model, splits, "val")
    val = evaluate_lib.metrics(*scored["val"], splits.class_names, prefix="val")
    report.update({k: v for k, v in val.items() if k.startswith(("val_", "num_val"))})
    skipped["val"] = evaluate_lib.count_skipped(
        "val", len(splits.keys("val")), val["num_val_examples"], strict)
  return report, skipped, scored


def _skipped_before_evaluation(splits: data_lib.Splits, num_train_images: int | None,
                               strict: bool) -> dict[str, int]:
  """Training images the stages dropped (when known) and, for an image folder,
  files that are no readable image (named in the log)."""
  skipped = {}
  if num_train_images is not None:
    skipped["train"] = evaluate_lib.count_skipped(
        "train", len(splits.keys("train")), num_train_images, strict)
  listed = getattr(splits.source, "skipped", None)
  if listed:
    skipped["listing"] = len(listed)
  return skipped


def _run_facts(splits: data_lib.Splits, config: RunConfig,
               skipped: dict[str, int]) -> dict[str, Any]:
  """What the run was: its data, split, seed, image counts, inputs and settings."""
  return {
      "source": splits.source.name,
      "split": config.data.split,
      "split_seed": config.data.split_seed,
      "seed": config.train.seed,
      "num_train_examples": len(splits.keys("train")) - skipped.get("train", 0),
      "num_skipped_images": skipped,
      "feature_cache": inputs_lib.uses_feature_cache(config.train),
      "config": config.to_json(),
      **_class_weights(splits, config),
  }


def _class_weights(splits: data_lib.Splits, config: RunConfig) -> dict[str, Any]:
  """report.json's "class_weights" (class name -> weight) when the loss weighs classes."""
  weights = inputs_lib.class_weights(splits, config.train.class_weight)
  if weights is None:
    return {}
  return {"class_weights": {splits.class_names[c]: w for c, w in sorted(weights.items())}}


def _write_report(workdir: str, report: schemas.Report, model_sha: str) -> None:
  """`report.json`, then the lineage records of the run's files.

  report.json's record goes last: it is what marks the run finished
  (`runs.finished`).
  """
  artifacts.write_json(os.path.join(workdir, artifacts.REPORT), report)
  run = runs.read_run(workdir)
  lineage.record(workdir, [artifacts.MODEL, artifacts.LABELS, artifacts.HISTORY,
                           artifacts.REPORT], mode=(run or {}).get("mode", "train"),
                 model=model_sha)


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
  _refuse_unusable_split(splits, config)
  feature_cache = inputs_lib.uses_feature_cache(config.train)
  done = runs.finished(config, workdir, "train", source, feature_cache=feature_cache)
  if done is not None:  # Done is done: rerunning a finished run changes nothing.
    return {**done, "already_finished": True}
  runs.begin(config, workdir, "train", source, feature_cache=feature_cache, chief=chief)
  num_classes = len(splits.class_names)
  with strategy.scope():
    model = new_model(config, num_classes)
    inputs = inputs_lib.make_inputs(model, splits, config, workdir, config.train.feature_cache_cut)
    fit_stages(model, inputs, config.train, workdir, seed=config.train.seed)
  if not chief:
    return {"is_chief": False}
  return save_run(model, splits, config, workdir, workdir,
                  num_train_images=inputs.num_train_images(),
                  train_seconds=round(time.time() - start, 1))


def _refuse_unusable_split(splits: data_lib.Splits, config: RunConfig) -> None:
  """A split with no training or no test images is refused before any training."""
  if not splits.keys("train"):
    raise UserError("The train split is empty; check --split.")
  if not splits.keys("test"):
    raise UserError(f"--split={config.data.split} leaves no test images to report on; give "
                    "test a share, e.g. --split=64,16,20.")
