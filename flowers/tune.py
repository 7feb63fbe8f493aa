"""Hyperparameter search (`--mode=tune`): KerasTuner over the two-stage training.

Each trial is the whole two-stage training of `train.py` (stage 1: the head on
the frozen base; stage 2: the top of the base unfrozen) for one choice of
dropout, unfreeze ratio and fine-tune learning rate, scored by its val accuracy.

What does not depend on the trial is computed once per search, not per trial:
the base weights (read once, copied into each trial's model), and on a CPU the
frozen-prefix cache (`prefix_cache`) cut for the *largest* unfreeze ratio of the
space, with the pooled base features stage 1 trains on. A trial with a smaller
ratio trains on the same cache, with the layers between the cache's cut and its
own cut kept frozen. On a GPU each trial runs the full model on tf.data.

The search lives in `WORKDIR/tuner/` (KerasTuner's project: `oracle.json` and
one `trial_<id>/` per trial, holding `trial.json`, the trained weights
`checkpoint.weights.h5`, `history_stage{1,2}.csv` and `result.json`). Running
the same command again continues it: finished trials are kept, a trial that
was killed midway is run again. Then the chief writes `trials.csv`,
`best_hparams.json`, the best trial's model as `model.keras`, `labels.txt`,
`history.json` and `report.json` (test metrics of the best model).

Distributed tuning is KerasTuner's: with `KERASTUNER_ORACLE_IP`,
`KERASTUNER_ORACLE_PORT` and `KERASTUNER_TUNER_ID` (`chief`, `tuner0`,
`tuner1`, ...) set, the chief only serves the oracle and the workers run the
trials. With a shared WORKDIR the chief reuses the best trial's weights; without
one it retrains the best hyperparameters itself.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Sequence

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import data as data_lib
from flowers import model as model_lib
from flowers import prefix_cache
from flowers import train as train_lib
from flowers.errors import UserError

PROJECT_NAME = "tuner"
TRIALS_NAME = "trials.csv"
BEST_HPARAMS_NAME = "best_hparams.json"
RESULT_NAME = "result.json"  # Per trial, beside KerasTuner's trial.json.
SETTINGS_NAME = "flowers_search.json"  # What the search in WORKDIR/tuner was made with.
OBJECTIVE = "val_accuracy"
HPARAMS = ("dropout", "unfreeze_ratio", "fine_tune_learning_rate")
TRIAL_COLUMNS = ("trial_id",) + HPARAMS + ("val_accuracy", "seconds", "status", "tuner_id")
TUNERS = ("bayesian", "hyperband", "random")
STRATEGIES = ("default", "mirrored", "multi_worker")

_FLAGS = {"dropout": "--dropout_range", "unfreeze_ratio": "--unfreeze_ratio_range",
          "fine_tune_learning_rate": "--fine_tune_learning_rate_range"}


@dataclasses.dataclass
class SearchSpace:
  """The (min, max) range of each tuned hyperparameter (min == max fixes it)."""

  dropout: tuple[float, float] = (0.0, 0.5)
  unfreeze_ratio: tuple[float, float] = (0.0, 0.5)
  fine_tune_learning_rate: tuple[float, float] = (1e-5, 1e-3)

  def __post_init__(self):
    for name in HPARAMS:
      setattr(self, name, _check_range(name, getattr(self, name)))

  @classmethod
  def from_strings(cls, dropout: Sequence[str] | str, unfreeze: Sequence[str] | str,
                   lr: Sequence[str] | str) -> "SearchSpace":
    """Parses the `--*_range` flags (lists of two strings, or "min,max")."""
    return cls(*(_parse_range(name, value)
                 for name, value in zip(HPARAMS, (dropout, unfreeze, lr))))


def _parse_range(name: str, value: Sequence[str] | str) -> tuple[float, ...]:
  items = value.split(",") if isinstance(value, str) else list(value)
  try:
    return tuple(float(str(v).strip()) for v in items)
  except ValueError:
    raise UserError(f"{_FLAGS[name]}={_show(items)} must be two numbers min,max, "
                    f"e.g. {_FLAGS[name]}={_show(SearchSpace.__dataclass_fields__[name].default)}."
                    ) from None


def _show(values: Sequence[Any]) -> str:
  return ",".join(str(v) for v in values)


def _check_range(name: str, values: Sequence[float]) -> tuple[float, float]:
  """Validates one range; raises a `UserError` that names the flag and the fix."""
  flag = f"{_FLAGS[name]}={_show(values)}"
  values = tuple(float(v) for v in values)
  if len(values) != 2 or not all(math.isfinite(v) for v in values):
    raise UserError(f"{flag} must be exactly two numbers min,max, e.g. "
                    f"{_FLAGS[name]}={_show(SearchSpace.__dataclass_fields__[name].default)}.")
  low, high = values
  if low > high:
    raise UserError(f"{flag}: min is above max; write it as {_FLAGS[name]}={high:g},{low:g}.")
  if name == "dropout" and not (0.0 <= low and high < 1.0):
    raise UserError(f"{flag}: dropout must be in [0, 1); e.g. {_FLAGS[name]}=0.0,0.5.")
  if name == "unfreeze_ratio" and not (0.0 <= low and high <= 1.0):
    raise UserError(f"{flag}: the unfreeze ratio must be in [0, 1]; e.g. "
                    f"{_FLAGS[name]}=0.0,0.5.")
  if name == "fine_tune_learning_rate" and low <= 0.0:
    raise UserError(f"{flag}: learning rates must be > 0 (the range is searched on a "
                    f"log scale); e.g. {_FLAGS[name]}=1e-5,1e-3.")
  return low, high


def declare_hyperparameters(hp: keras_tuner.HyperParameters,
                            search: SearchSpace) -> dict[str, float]:
  """Declares the three hyperparameters in `hp`; returns this trial's values."""
  def tuned(name: str, log: bool = False) -> float:
    low, high = getattr(search, name)
    if low == high:  # KerasTuner's Float cannot have an empty range.
      return hp.Fixed(name, low)
    return hp.Float(name, low, high, sampling="log" if log else "linear")

  return {"dropout": tuned("dropout"), "unfreeze_ratio": tuned("unfreeze_ratio"),
          "fine_tune_learning_rate": tuned("fine_tune_learning_rate", log=True)}


_STRATEGY_CACHE: dict[str, tf.distribute.Strategy] = {}


def make_strategy(name: str) -> tf.distribute.Strategy:
  """The tf.distribute strategy every trial trains under; one per process.

  "mirrored" mirrors over the local GPUs, or over the logical CPU devices when
  there is no GPU. "multi_worker" reads the cluster from TF_CONFIG, and must be
  made before TensorFlow runs its first op: call this early (before loading
  data) to have it.
  """
  if name not in STRATEGIES:
    raise UserError(f"--distribution_strategy={name} is not one of {', '.join(STRATEGIES)}.")
  if name == "default":
    return tf.distribute.get_strategy()
  if name not in _STRATEGY_CACHE:
    if name == "mirrored":
      gpus = tf.config.list_logical_devices("GPU")
      devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
      _STRATEGY_CACHE[name] = tf.distribute.MirroredStrategy(devices)
    else:
      try:
        _STRATEGY_CACHE[name] = tf.distribute.MultiWorkerMirroredStrategy()
      except RuntimeError as e:
        raise UserError(
            "--distribution_strategy=multi_worker must be set up before TensorFlow "
            f"starts ({e}); create it first with flowers.tune.make_strategy.") from e
  return _STRATEGY_CACHE[name]


def _distributed_role() -> tuple[bool, bool]:
  """(distributed, chief), from KerasTuner's environment variables."""
  if "KERASTUNER_ORACLE_IP" not in os.environ:
    return False, True
  missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID")
             if not os.environ.get(v)]
  if missing:
    raise UserError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} is not; set "
                    "KERASTUNER_ORACLE_PORT, and KERASTUNER_TUNER_ID=chief on the chief "
                    "and tuner0, tuner1, ... on the workers.")
  return True, "chief" in os.environ["KERASTUNER_TUNER_ID"]


class _TrialUserError(UserError, keras_tuner.errors.FatalError):
  """A `UserError` inside a trial: stops the search instead of failing the trial."""


@contextlib.contextmanager
def _user_errors_stop_the_search():
  """KerasTuner counts other exceptions as failed trials and carries on."""
  try:
    yield
  except _TrialUserError:
    raise
  except UserError as e:
    raise _TrialUserError(str(e)) from e


@dataclasses.dataclass
class _Cached:
  """The cache and the arrays derived from it, shared by every trial."""

  cache: prefix_cache.PrefixCache
  train_features: np.ndarray  # [views, N, features] pooled, for stage 1.
  val_features: np.ndarray
  val_acts: np.ndarray  # Val cut-point activations as float32, for stage 2.
  val_y: np.ndarray  # One-hot val labels.


def _fit_stage(model: keras.Model, train, val, *, epochs: int, initial_epoch: int,
               trial_dir: str, stage: str, config: train_lib.TrainConfig) -> None:
  """One stage's `fit`, logging to the trial's history_<stage>.csv."""
  if epochs <= initial_epoch:
    return
  callbacks: list[keras.callbacks.Callback] = [keras.callbacks.CSVLogger(
      os.path.join(trial_dir, f"history_{stage}.csv"), append=True)]
  if config.early_stopping_patience > 0:
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor=OBJECTIVE, patience=config.early_stopping_patience,
        restore_best_weights=True, verbose=config.verbose))
  model.fit(train, validation_data=val, epochs=epochs, initial_epoch=initial_epoch,
            verbose=config.verbose, callbacks=callbacks)


class TwoStageHyperModel(keras_tuner.HyperModel):
  """`build`: the classifier at a trial's dropout; `fit`: both training stages.

  The base weights, the cache and the pooled features are made on first need
  and kept for every later trial.
  """

  def __init__(self, config: train_lib.TrainConfig, search: SearchSpace,
               splits: data_lib.Splits, workdir: str,
               strategy: tf.distribute.Strategy | None = None):
    super().__init__(name="flowers_two_stage")
    self.config = config
    self.search = search
    self.splits = splits
    self.workdir = workdir
    self.strategy = strategy or tf.distribute.get_strategy()
    self.num_classes = len(splits.class_names)
    self.trials_run: list[str] = []  # Trial ids this process fitted, in order.
    self._template: keras.Model | None = None
    self._base_weights: list[np.ndarray] | None = None
    self._cached: _Cached | None = None
    self._executions: collections.Counter = collections.Counter()

  def _new_model(self, dropout: float, weights: str | None) -> keras.Model:
    c = self.config
    return model_lib.build_model(
        self.num_classes, image_size=c.image_size, dropout=dropout, weights=weights,
        augment=c.augment, augmentation=c.augmentation, alpha=c.alpha, seed=c.seed)

  def template(self) -> keras.Model:
    """The untrained classifier, weights read once; the cache is built from it."""
    if self._template is None:
      self._template = self._new_model(self.config.dropout, self.config.weights)
      self._base_weights = model_lib.base_of(self._template).get_weights()
    return self._template

  def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
    values = declare_hyperparameters(hp, self.search)
    with _user_errors_stop_the_search():  # A missing --weights file, say.
      self.template()
    # A random base, then the template's weights: no weight file is read per trial.
    model = self._new_model(values["dropout"], weights=None)
    model_lib.base_of(model).set_weights(self._base_weights)
    return model

  def _stage2(self, values: dict[str, float]) -> bool:
    return self.config.fine_tune_epochs > 0 and values["unfreeze_ratio"] > 0

  def _prepare_cache(self) -> _Cached:
    """The cache at the cut of the space's largest unfreeze ratio, and its features."""
    if self._cached is None:
      top_ratio = self.search.unfreeze_ratio[1] if self.config.fine_tune_epochs > 0 else 0.0
      cache = train_lib.build_prefix_cache(self.template(), self.splits, self.config,
                                           self.workdir, top_ratio)
      train_features, val_features = cache.pooled()
      self._cached = _Cached(
          cache, train_features, val_features, np.asarray(cache.val, np.float32),
          keras.utils.to_categorical(cache.val_labels, self.num_classes))
    return self._cached

  def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args,
          trial_id: str = "best", trial_dir: str | None = None,
          checkpoint: str | None = None, epochs: int | None = None,
          initial_epoch: int = 0, **kwargs) -> dict[str, float]:
    """Trains both stages; returns val_accuracy (the objective), val_loss, seconds.

    `epochs`/`initial_epoch` (from Hyperband) bound stage 2; a Hyperband trial
    that continues an earlier one (`tuner/trial_id`) starts from its weights,
    so it skips stage 1. KerasTuner's default callbacks (`kwargs["callbacks"]`)
    checkpoint `model.fit`, but the stages fit sub-models: the full model's
    weights are saved to `checkpoint` at the end instead.
    """
    del args, kwargs
    trial_dir = trial_dir or os.path.join(self.workdir, PROJECT_NAME, f"trial_{trial_id}")
    checkpoint = checkpoint or os.path.join(trial_dir, "checkpoint.weights.h5")
    values = {name: float(hp.get(name)) for name in HPARAMS}
    with _user_errors_stop_the_search():
      cached = self._prepare_cache() if self.config.use_cache() else None
      start = time.time()
      execution = self._executions[trial_id]
      self._executions[trial_id] += 1
      seed = self.config.seed + execution
      keras.utils.set_random_seed(seed)
      parent = hp.values.get("tuner/trial_id")
      _start_histories(trial_dir, os.path.join(os.path.dirname(trial_dir), f"trial_{parent}")
                       if parent else None)
      stage2_epochs = self.config.fine_tune_epochs if epochs is None else int(epochs)
      with self.strategy.scope():
        run = self._fit_cached if cached else self._fit_plain
        metrics = run(model, values, seed, stage2_epochs, int(initial_epoch or 0),
                      run_stage1=not parent, trial_dir=trial_dir)
    with artifacts.atomic_path(checkpoint) as tmp:
      model.save_weights(tmp)
    seconds = time.time() - start
    result = {"trial_id": trial_id, "tuner_id": os.environ.get("KERASTUNER_TUNER_ID", "tuner0"),
              "hyperparameters": values, "val_accuracy": float(metrics["accuracy"]),
              "val_loss": float(metrics["loss"]), "seconds": round(seconds, 2),
              "execution": execution, "stage2_epochs": [int(initial_epoch or 0), stage2_epochs],
              "continues_trial": parent}
    artifacts.write_json(os.path.join(trial_dir, RESULT_NAME), result)
    self.trials_run.append(trial_id)
    return {OBJECTIVE: result["val_accuracy"], "val_loss": result["val_loss"],
            "seconds": seconds}

  def _fit_cached(self, model, values, seed, stage2_epochs, initial_epoch, *,
                  run_stage1, trial_dir) -> dict[str, float]:
    c, config, n = self._prepare_cache(), self.config, self.num_classes
    head = train_lib.head_model(model, c.train_features.shape[-1])
    train_lib.compile_model(head, config, config.learning_rate, config.epochs *
                            train_lib.steps_per_epoch(len(c.cache.train_labels),
                                                      config.batch_size))
    if run_stage1:
      sampler = prefix_cache.ViewSampler(c.train_features, c.cache.train_labels, n,
                                         config.batch_size, seed)
      _fit_stage(head, sampler, (c.val_features, c.val_y), epochs=config.epochs,
                 initial_epoch=0, trial_dir=trial_dir, stage="stage1", config=config)
    if not self._stage2(values):
      return head.evaluate(c.val_features, c.val_y, verbose=0, return_dict=True)
    model_lib.unfreeze(model, values["unfreeze_ratio"])
    assert model_lib.cut_index(model_lib.base_of(model), values["unfreeze_ratio"]) >= c.cache.cut
    # The shared activations, read through this trial's model: the layers
    # between the cache's cut and the trial's own cut stay frozen.
    cache = prefix_cache.PrefixCache(model, c.cache.cut, c.cache.train_views,
                                     c.cache.train_labels, c.cache.val, c.cache.val_labels)
    sampler = prefix_cache.ViewSampler(c.cache.train_views, c.cache.train_labels, n,
                                       config.batch_size, seed + 1)
    top = train_lib.top_model(model, cache)
    train_lib.compile_model(top, config, values["fine_tune_learning_rate"],
                            len(sampler) * config.fine_tune_epochs)
    _fit_stage(top, sampler, (c.val_acts, c.val_y), epochs=stage2_epochs,
               initial_epoch=initial_epoch, trial_dir=trial_dir, stage="stage2", config=config)
    return top.evaluate(c.val_acts, c.val_y, verbose=0, return_dict=True)

  def _fit_plain(self, model, values, seed, stage2_epochs, initial_epoch, *,
                 run_stage1, trial_dir) -> dict[str, float]:
    del seed  # Set globally; the train dataset shuffles with config.seed.
    config = self.config
    train = self.splits.train.map(train_lib.one_hot(self.num_classes))
    val = self.splits.val.map(train_lib.one_hot(self.num_classes))
    model_lib.freeze_base(model)
    train_lib.compile_model(model, config, config.learning_rate)
    if run_stage1:
      _fit_stage(model, train, val, epochs=config.epochs, initial_epoch=0,
                 trial_dir=trial_dir, stage="stage1", config=config)
    if self._stage2(values):
      model_lib.unfreeze(model, values["unfreeze_ratio"])
      train_lib.compile_model(model, config, values["fine_tune_learning_rate"])
      _fit_stage(model, train, val, epochs=stage2_epochs, initial_epoch=initial_epoch,
                 trial_dir=trial_dir, stage="stage2", config=config)
    return model.evaluate(val, verbose=0, return_dict=True)


def _start_histories(trial_dir: str, parent_dir: str | None) -> None:
  """Clears a trial's history logs (a redone trial), or starts from its parent's."""
  os.makedirs(trial_dir, exist_ok=True)
  for stage in ("stage1", "stage2"):
    path = os.path.join(trial_dir, f"history_{stage}.csv")
    if os.path.exists(path):
      os.remove(path)
    if parent_dir and os.path.exists(os.path.join(parent_dir, f"history_{stage}.csv")):
      shutil.copyfile(os.path.join(parent_dir, f"history_{stage}.csv"), path)


class _TrialContext:
  """Gives `TwoStageHyperModel.fit` its trial's id, folder and checkpoint path."""

  def _populate_initial_space(self):
    # KerasTuner builds a model just to see the hyperparameters (AutoKeras's
    # hook); this space has no conditions, so declaring them is enough, and
    # saves a model build (and the chief of a distributed search needs none).
    hp = self.oracle.get_space()
    declare_hyperparameters(hp, self.hypermodel.search)
    self.oracle.update_space(hp)

  def run_trial(self, trial, *args, **kwargs):
    kwargs.update(trial_id=trial.trial_id, trial_dir=self.get_trial_dir(trial.trial_id),
                  checkpoint=self._get_checkpoint_fname(trial.trial_id))
    return super().run_trial(trial, *args, **kwargs)


class _BayesianTuner(_TrialContext, keras_tuner.BayesianOptimization):
  pass


class _HyperbandTuner(_TrialContext, keras_tuner.Hyperband):
  pass


class _RandomTuner(_TrialContext, keras_tuner.RandomSearch):
  pass


def make_tuner(kind: str, hypermodel: TwoStageHyperModel, workdir: str, *,
               max_trials: int, executions_per_trial: int = 1, overwrite: bool = False,
               strategy: tf.distribute.Strategy | None = None) -> keras_tuner.Tuner:
  """A KerasTuner tuner over `hypermodel`, its project in WORKDIR/tuner.

  Hyperband runs stage 2 for its own epoch budgets (up to fine_tune_epochs);
  `max_trials` caps its trial count too.
  """
  config = hypermodel.config
  common = dict(hypermodel=hypermodel, objective=keras_tuner.Objective(OBJECTIVE, "max"),
                seed=config.seed or 1,  # KerasTuner draws a random seed for 0.
                executions_per_trial=executions_per_trial, overwrite=overwrite,
                directory=workdir, project_name=PROJECT_NAME,
                distribution_strategy=strategy)
  if kind == "bayesian":
    return _BayesianTuner(max_trials=max_trials, **common)
  if kind == "random":
    return _RandomTuner(max_trials=max_trials, **common)
  if kind == "hyperband":
    tuner = _HyperbandTuner(max_epochs=max(config.fine_tune_epochs, 1), factor=3,
                            hyperband_iterations=1, **common)
    tuner.oracle.max_trials = max_trials
    return tuner
  raise UserError(f"--tuner={kind} is not one of {', '.join(TUNERS)}.")


def _settings(config: train_lib.TrainConfig, search: SearchSpace, tuner: str,
              executions_per_trial: int, source: data_lib.Source, split: str) -> dict:
  """Everything a trial's result depends on, besides its hyperparameters."""
  trained = {k: v for k, v in dataclasses.asdict(config).items()
             if k not in HPARAMS + ("verbose",)}
  return json.loads(json.dumps({
      "search_space": dataclasses.asdict(search), "tuner": tuner,
      "executions_per_trial": executions_per_trial, "source": source.name, "split": split,
      "config": trained}, default=str, sort_keys=True))


def _check_settings(path: str, settings: dict) -> None:
  """A resumed search must be the same search; else a `UserError` says what differs."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  if old == settings:
    return
  differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
  if "config" in differ:
    old_c, new_c = old.get("config", {}), settings["config"]
    differ.remove("config")
    differ += [f"config.{k}" for k in sorted(set(old_c) | set(new_c))
               if old_c.get(k) != new_c.get(k)]
  raise UserError(f"{os.path.dirname(path)} holds a search made with other settings "
                  f"({', '.join(differ)}); rerun with the same flags to resume it, or add "
                  "--overwrite to start afresh.")


def run_search(config: train_lib.TrainConfig, search: SearchSpace, workdir: str,
               source: data_lib.Source, split: str = "64,16,20", *,
               tuner: str = "bayesian", max_trials: int = 10, executions_per_trial: int = 1,
               overwrite: bool = False, distribution_strategy: str = "default",
               cache: str = "memory") -> dict[str, Any]:
  """Runs (or resumes) the search; on the chief, writes the best model and reports.

  Returns the report (also `report.json`) with "is_chief": True on the chief or
  a single process; a distributed worker returns {"is_chief": False, ...}.
  """
  start = time.time()
  if tuner not in TUNERS:
    raise UserError(f"--tuner={tuner} is not one of {', '.join(TUNERS)}.")
  if max_trials < 1:
    raise UserError(f"--max_trials={max_trials} must be at least 1.")
  if executions_per_trial < 1:
    raise UserError(f"--executions_per_trial={executions_per_trial} must be at least 1.")
  config.use_cache()  # Validates --feature_cache.
  train_lib.make_optimizer(config.optimizer, 1e-3)  # Validates --optimizer.
  distributed, chief = _distributed_role()
  strategy = make_strategy(distribution_strategy)
  os.makedirs(workdir, exist_ok=True)
  splits = data_lib.load_splits(
      source, workdir=workdir, split=split, seed=config.seed, image_size=config.image_size,
      batch_size=config.batch_size, cache=cache)
  if not splits.keys("train"):
    raise UserError("The train split is empty; check --split.")
  if not splits.keys("val"):
    raise UserError("--mode=tune scores trials on the val split, which is empty; give "
                    "--split a val share (e.g. 64,16,20).")

  hypermodel = TwoStageHyperModel(config, search, splits, workdir, strategy)
  settings = _settings(config, search, tuner, executions_per_trial, source, split)
  settings_path = os.path.join(workdir, PROJECT_NAME, SETTINGS_NAME)
  if chief and not overwrite:
    _check_settings(settings_path, settings)
  # A worker never wipes the shared project: only the chief (or a single process) may.
  tuner_obj = make_tuner(tuner, hypermodel, workdir, max_trials=max_trials,
                         executions_per_trial=executions_per_trial,
                         overwrite=overwrite and chief, strategy=strategy)
  if chief:
    artifacts.write_json(settings_path, settings)
  tuner_obj.search(verbose=config.verbose)
  if not chief:
    print(f"{tuner_obj.tuner_id}: ran trial(s) {', '.join(hypermodel.trials_run) or 'none'}; "
          "the chief writes the results.")
    return {"is_chief": False, "tuner_id": tuner_obj.tuner_id,
            "trials_run": hypermodel.trials_run, "seconds": round(time.time() - start, 1)}
  report = _finish(tuner_obj, hypermodel, workdir, source, split, start)
  report.update(tuner=tuner, max_trials=max_trials, executions_per_trial=executions_per_trial,
                distribution_strategy=distribution_strategy, distributed=distributed)
  artifacts.write_json(os.path.join(workdir, train_lib.REPORT_NAME), report)
  report["is_chief"] = True
  return report


def trial_rows(tuner: keras_tuner.Tuner) -> list[dict[str, Any]]:
  """One row per finished trial (TRIAL_COLUMNS), best val accuracy first."""
  rows = []
  for trial in tuner.oracle.trials.values():
    values = trial.hyperparameters.values
    side = os.path.join(tuner.project_dir, f"trial_{trial.trial_id}", RESULT_NAME)
    result = artifacts.read_json(side) if os.path.exists(side) else {}
    done = trial.status == "COMPLETED"
    seconds = (trial.metrics.get_last_value("seconds")
               if trial.metrics.exists("seconds") else None)
    rows.append({
        "trial_id": trial.trial_id,
        **{name: values.get(name) for name in HPARAMS},
        "val_accuracy": float(trial.score) if done and trial.score is not None else None,
        "seconds": round(float(seconds), 1) if seconds is not None else None,
        "status": trial.status,
        "tuner_id": result.get("tuner_id") if done else None,
    })
  # Ties go to the earlier trial, whatever order KerasTuner reloaded them in.
  return sorted(rows, key=lambda r: (r["val_accuracy"] is None, -(r["val_accuracy"] or 0.0),
                                     _trial_order(r["trial_id"])))


def _trial_order(trial_id: str) -> tuple[int, str]:
  return (int(trial_id), "") if trial_id.isdigit() else (1 << 62, trial_id)


def write_trials(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """`trials.csv`: TRIAL_COLUMNS, one row per trial, atomically."""
  out = io.StringIO()
  writer = csv.DictWriter(out, TRIAL_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else row[k] for k in TRIAL_COLUMNS})
  artifacts.write_text(path, out.getvalue())


def format_trials(rows: Sequence[dict[str, Any]]) -> str:
  """The trials table as aligned text, for the terminal."""
  def cell(key: str, value: Any) -> str:
    if value is None:
      return "-"
    if key == "fine_tune_learning_rate":
      return f"{value:.2e}"
    if key in ("dropout", "unfreeze_ratio"):
      return f"{value:.3f}"
    if key == "val_accuracy":
      return f"{value:.4f}"
    if key == "seconds":
      return f"{value:.0f}"
    return str(value)

  table = [list(TRIAL_COLUMNS)] + [[cell(k, r.get(k)) for k in TRIAL_COLUMNS] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(TRIAL_COLUMNS))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)


def _best_model(tuner: keras_tuner.Tuner, hypermodel: TwoStageHyperModel,
                trial) -> tuple[keras.Model, str]:
  """The best trial's trained model and its folder (retrained when not on this disk)."""
  model = hypermodel.build(trial.hyperparameters)
  trial_dir = tuner.get_trial_dir(trial.trial_id)
  checkpoint = tuner._get_checkpoint_fname(trial.trial_id)  # pylint: disable=protected-access
  if not os.path.exists(checkpoint):
    # A distributed search whose workers do not share this WORKDIR.
    logging.info("Trial %s's weights are not under %s; retraining its hyperparameters.",
                 trial.trial_id, trial_dir)
    trial_dir = os.path.join(tuner.project_dir, "best_retrained")
    checkpoint = os.path.join(trial_dir, "checkpoint.weights.h5")
    hp = trial.hyperparameters.copy()
    for key in [k for k in hp.values if k.startswith("tuner/")]:
      hp.values.pop(key)  # Hyperband's budget: retrain the full schedule instead.
    hypermodel.fit(hp, model, trial_id="best_retrained", trial_dir=trial_dir,
                   checkpoint=checkpoint)
  model.load_weights(checkpoint)
  return model, trial_dir


def _finish(tuner: keras_tuner.Tuner, hypermodel: TwoStageHyperModel, workdir: str,
            source: data_lib.Source, split: str, start: float) -> dict[str, Any]:
  """trials.csv, best_hparams.json, model.keras, labels, history and the test report."""
  rows = trial_rows(tuner)
  write_trials(os.path.join(workdir, TRIALS_NAME), rows)
  print(format_trials(rows))
  completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
  if not completed:
    messages = [t.message for t in tuner.oracle.trials.values() if t.message]
    raise RuntimeError("No trial of the search finished"
                       + (f"; the last error:\n{messages[-1]}" if messages else "."))
  best = tuner.oracle.get_trial(rows[0]["trial_id"])  # The table's first: same tie-break.
  best_hparams = {name: float(best.hyperparameters.get(name)) for name in HPARAMS}
  artifacts.write_json(os.path.join(workdir, BEST_HPARAMS_NAME), best_hparams)

  model, trial_dir = _best_model(tuner, hypermodel, best)
  splits, config = hypermodel.splits, hypermodel.config
  train_lib.round_for_int8(model, config)
  train_lib.save_model(model, os.path.join(workdir, train_lib.MODEL_NAME))
  train_lib.write_labels(os.path.join(workdir, train_lib.LABELS_NAME), splits.class_names)
  history = {stage: train_lib.read_history(trial_dir, stage) for stage in ("stage1", "stage2")}
  artifacts.write_json(os.path.join(workdir, train_lib.HISTORY_NAME), history)

  best_config = dataclasses.replace(config, **best_hparams)
  report = train_lib.evaluation_report(model, splits, best_config, split)
  report.update({
      "best_trial_id": best.trial_id,
      "best_trial_val_accuracy": float(best.score),
      "best_hparams": best_hparams,
      "num_trials": len(completed),
      "search_seconds": round(time.time() - start, 1),
  })
  print(f"Best trial {best.trial_id} of {len(completed)}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in best_hparams.items())
        + f"; val_accuracy={report['val_accuracy']:.4f} "
        f"test_accuracy={report['test_accuracy']:.4f}")
  return report
