"""Hyperparameter search (`--mode=tune`): KerasTuner over the two-stage training.

A trial is the `--mode=train` job run with the trial's dropout, unfreeze ratio
and fine-tune learning rate: `train.fit_stages` with
`dataclasses.replace(config.train, **values)`, the same loop, callbacks,
schedules and seeds. It is one training run, scored by its val accuracy and
shipped as it was scored.

What does not depend on the trial is made once per search and passed in: the
base weights (read once, copied into each trial's model), and on a CPU the
frozen-prefix cache cut for the *largest* unfreeze ratio of the space, with the
pooled base features stage 1 trains on (`inputs.CachedInputs`). A trial with a
smaller ratio trains on the same cache, the layers between the cache's cut and
its own cut kept frozen. That cut is part of the trial's settings
(`feature_cache_cut_ratio`, written to `best_hparams.json`), so `--mode=train` with the
best trial's values computes exactly what the trial did. On the plain path the
pixel cache is shared the same way (decoded once), while each stage of each
trial draws its shuffle stream afresh from the seed (`inputs.PlainInputs`):
a trial's order does not depend on the trials before it, so `--mode=train`
repeats it there too, and a trial taken further (successive halving, a
resumed search) goes on as if never stopped.

A trial that trails the others stops early (the median stopping rule of
Google Vizier, Golovin et al. 2017): from stage 2 epoch `--median_stop_epoch`
on, once 2 trials have finished, a trial whose best val accuracy so far is below
the median of the finished trials' best at the same epoch stops there. Half of
the finished trials were already ahead of it, and none of them ended lower, so
it is unlikely to win; its stage 2 time goes to the next trial.

With `--halving_rungs` (successive halving, Jamieson & Talwalkar 2016; the
rungs of Hyperband's brackets, Li et al. 2017) the search spends a fixed
number of stage 2 epochs instead: the tuner's trials fine-tune to the first
rung's epoch and are scored there by the val accuracy of that epoch (no int8
rounding, no extra val pass: nothing is shipped yet). Then the best
1/`--halving_factor` of them go on, each in its own folder from the state it
stopped in (no epoch trained twice: the same training as one left alone), to
the next rung, and so on (rounded up: 6 trials, factor 2 keeps 3, then 2); the
last rung's trials fine-tune to --fine_tune_epochs, and the best of them is the
search's model. `halving_schedule` gives the trials and epochs of each
rung, `halving_budget` the stage 2 epochs they spend, whatever the trials
score: stage 2 never stops early (its patience, a setting of the trial, is
--fine_tune_epochs: it still ends on its best val epoch's weights, as early
stopping would) and the median rule is off.

One rule says what `best_hparams.json` holds: every training setting the search
gave the winning trial beyond the run's own (`trial_settings`): its values, the
cache's cut and, under successive halving, stage 2's patience
(`fine_tune_early_stopping_patience`). `--mode=train` with the run's settings
and these (as flags, or `dataclasses.replace`) repeats the trial exactly.

The search lives in `WORKDIR/tuner/` (KerasTuner's project: `oracle.json` and
one `trial_<id>/` per trial, holding `trial.json`, the trained weights, the
stage histories and `result.json`). Running the same command again continues
it: finished trials are kept, and a trial that was killed midway resumes from
its last finished epoch. Then the chief writes `trials.csv`,
`best_hparams.json`, the best trial's model as `model.keras`, `labels.txt`,
`history.json` and `report.json` (test metrics of the best model), and the trials
for TensorBoard's HParams dashboard in `logs/hparams` (`flowers.hparams_board`).

Distributed tuning is KerasTuner's: with `KERASTUNER_ORACLE_IP`,
`KERASTUNER_ORACLE_PORT` and `KERASTUNER_TUNER_ID` (`chief`, `tuner0`,
`tuner1`, ...) set, the chief only serves the oracle and the workers run the
trials. The chief publishes its run fingerprint (`runs.fingerprint`) through the
oracle, and a worker whose own differs refuses before it writes anything. The
chief ships the best trial's weights from its folder, so the workers need the
chief's WORKDIR on a shared disk (or the winning trial's folder copied there).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from typing import Any, NamedTuple, Sequence

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import compat
from flowers import data as data_lib
from flowers import distribute
from flowers import hparams_board
from flowers import inputs as inputs_lib
from flowers import model as model_lib
from flowers import runs
from flowers import schemas
from flowers import split as split_lib
from flowers import summary
from flowers import train as train_lib
from flowers.config import HPARAMS
from flowers.config import FirstTrial
from flowers.config import RunConfig
from flowers.config import SearchConfig
from flowers.config import Tuner
from flowers.errors import UserError

OBJECTIVE = "val_accuracy"
TRIAL_COLUMNS = ("trial_id",) + HPARAMS + artifacts.TRIAL_RESULTS
MEDIAN_STOP_MIN_TRIALS = 2  # Finished trials the median stopping rule needs.
# The chief's run fingerprint (JSON) among the oracle's hyperparameter values:
# not in its space, so the trials' draws are unchanged, and served to workers.
CHIEF_RUN_KEY = "flowers/chief_run"


def declare_hyperparameters(hp: keras_tuner.HyperParameters,
                            search: SearchConfig) -> dict[str, float]:
  """Declares the three hyperparameters in `hp`; returns this trial's values."""
  def tuned(name: str, log: bool = False) -> float:
    low, high = search.range_of(name)
    if low == high:  # KerasTuner's Float cannot have an empty range.
      return hp.Fixed(name, low)
    return hp.Float(name, low, high, sampling="log" if log else "linear")

  return {"dropout": tuned("dropout"), "unfreeze_ratio": tuned("unfreeze_ratio"),
          "fine_tune_learning_rate": tuned("fine_tune_learning_rate", log=True)}


def first_trial_values(config: RunConfig) -> dict[str, float] | None:
  """The search's first trial under --first_trial=configured: the values --mode=train uses.

  None under --first_trial=drawn. A value outside its range is refused: the
  search would start outside the space it was told to search.
  """
  if config.search.first_trial is not FirstTrial.CONFIGURED:
    return None
  train = config.train
  values = {name: getattr(train, name) for name in HPARAMS}
  values["fine_tune_learning_rate"] = train.fine_tune_rate  # Unset means learning_rate / 10.
  for name, value in values.items():
    low, high = config.search.range_of(name)
    if not low <= value <= high:
      raise UserError(f"--{name}={value:g} lies outside --{name}_range={low:g},{high:g}, where "
                      f"--first_trial=configured starts the search: set --{name} inside the "
                      "range, or pass --first_trial=drawn.")
  return values


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


class MedianStopping(keras.callbacks.Callback):
  """Stops stage 2 when the trial's best val accuracy trails the finished trials'.

  At the end of each stage 2 epoch from `start_epoch` (1-based) on, the trial's
  best val accuracy so far (earlier epochs read from `run_dir`'s history, so a
  resumed trial counts them) is compared with the median, over `finished`, of
  each finished trial's best at the same epoch (a trial that stopped sooner
  counts with its last value). Below it, training stops; `stopped` records
  the epoch, the trial's best and the median.
  """

  def __init__(self, finished: Sequence[Sequence[float]], start_epoch: int, run_dir: str):
    super().__init__()
    self.finished = [list(c) for c in finished if len(c)]
    self.start_epoch = start_epoch
    self.run_dir = run_dir
    self.stopped: dict[str, float] | None = None

  def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
    current = (logs or {}).get("val_accuracy")
    if current is None or epoch + 1 < self.start_epoch:
      return
    earlier = train_lib.read_history(self.run_dir, "fine_tune").get("val_accuracy", [])[:epoch]
    best = max([float(current), *earlier])
    median = trailed_median(best, epoch, self.finished)
    if median is not None:
      self.stopped = {"epoch": epoch + 1, "best_val_accuracy": best, "median": median}
      self.model.stop_training = True
      logging.info("Median stopping rule: stage 2 stops at epoch %d (best val accuracy "
                   "%.4f < %.4f, the median of %d finished trials).", epoch + 1, best,
                   median, len(self.finished))


def trailed_median(best: float, epoch: int, finished: Sequence[Sequence[float]]) -> float | None:
  """The finished trials' median best at 0-based `epoch` when `best` is below it, else None.

  None too while fewer than MEDIAN_STOP_MIN_TRIALS trials have finished.
  """
  if len(finished) < MEDIAN_STOP_MIN_TRIALS:
    return None
  median = float(np.median([c[min(epoch, len(c) - 1)] for c in finished]))
  return median if best < median else None


def replay_median_stopping(val_curves: Sequence[Sequence[float]],
                           start_epoch: int) -> list[int | None]:
  """Where the rule would have stopped each trial of a search run in full, in order.

  `val_curves` are the trials' stage 2 val accuracies per epoch, in the order
  they ran; a stopped trial's truncated curve is what later trials meet, as
  in a real search. Returns the 1-based stop epoch of each, None for none.
  """
  finished: list[list[float]] = []
  stops: list[int | None] = []
  for curve in val_curves:
    best = np.maximum.accumulate(curve).tolist()
    stop = next((e + 1 for e in range(max(start_epoch, 1) - 1, len(best))
                 if trailed_median(best[e], e, finished) is not None), None)
    stops.append(stop)
    finished.append(best[:stop])
  return stops


def halving_schedule(num_trials: int, rungs: Sequence[int], factor: int,
                     last_epoch: int) -> list[tuple[int, int]]:
  """Successive halving's rungs as (trials, stage 2 epochs): all `num_trials` to
  `rungs[0]`, the best 1/`factor` of them (at least one) to the next, ...,
  then to `last_epoch`."""
  epochs = [*rungs, last_epoch]
  return [(max(1, math.ceil(num_trials / factor ** k)), e) for k, e in enumerate(epochs)]


def halving_budget(schedule: Sequence[tuple[int, int]]) -> int:
  """The stage 2 epochs a halving schedule trains, whatever the trials score."""
  spent, before = 0, 0
  for trials, epochs in schedule:
    spent += trials * (epochs - before)
    before = epochs
  return spent


def fine_tune_val_accuracy(trial_dir: str, epoch: int | None = None,
                           best: bool = False) -> float | None:
  """A trial's stage 2 val accuracy at 1-based `epoch` (default: its last), or with
  `best` its best up to there, from its history; None when it has not reached it."""
  val = train_lib.read_history(trial_dir, "fine_tune").get("val_accuracy", [])
  epoch = len(val) if epoch is None else epoch
  if not 0 < epoch <= len(val):
    return None
  return float(max(val[:epoch]) if best else val[epoch - 1])


def finished_fine_tune_curves(project_dir: str, exclude: str | None = None) -> list[list[float]]:
  """Each finished trial's best-so-far stage 2 val accuracy, per epoch."""
  curves = []
  for name in sorted(os.listdir(project_dir)) if os.path.isdir(project_dir) else []:
    trial_dir = os.path.join(project_dir, name)
    if (not name.startswith("trial_") or name == exclude
        or not os.path.exists(os.path.join(trial_dir, artifacts.TRIAL_RESULT))):
      continue
    val = train_lib.read_history(trial_dir, "fine_tune").get("val_accuracy", [])
    if val:
      curves.append(np.maximum.accumulate(val).tolist())
  return curves


@dataclasses.dataclass(frozen=True)
class TrialRun:
  """One trial as `TwoStageHyperModel.fit` runs it.

  Attributes:
    trial_id: KerasTuner's id of the trial.
    trial_dir: its folder: the stages' weights, states and histories, `result.json`.
    checkpoint: where the weights it was scored with are saved (KerasTuner's path).
    values: its hyperparameters (HPARAMS).
    parent: the trial a Hyperband trial continues (from its weights and
      histories, so it skips stage 1); None (or empty) otherwise.
    fine_tune_until: Hyperband's budget, stage 2 up to this epoch; None: all.
    initial_epoch: the stage 2 epoch it starts from (Hyperband).
  """

  trial_id: str
  trial_dir: str
  checkpoint: str
  values: dict[str, float] = dataclasses.field(default_factory=dict)
  parent: str | None = None
  fine_tune_until: int | None = None
  initial_epoch: int = 0

  def given(self, hp: keras_tuner.HyperParameters, epochs: int | None,
            initial_epoch: int | None) -> TrialRun:
    """This trial with what KerasTuner gives `fit`: its values, and Hyperband's
    parent trial and stage 2 epochs."""
    return dataclasses.replace(
        self, values={name: float(hp.get(name)) for name in HPARAMS},
        parent=hp.values.get("tuner/trial_id"), fine_tune_until=epochs,
        initial_epoch=int(initial_epoch or 0))


class TwoStageHyperModel(keras_tuner.HyperModel):
  """`build`: the classifier at a trial's dropout; `fit`: `train.fit_stages`.

  The base weights and the stages' inputs (the frozen-prefix cache on a CPU,
  else the pixel cache) are made on first need and shared by every later
  trial; each trial's stages draw their data streams from the seed afresh.
  """

  def __init__(self, config: RunConfig, splits: data_lib.Splits, workdir: str,
               strategy: tf.distribute.Strategy | None = None):
    super().__init__(name="flowers_two_stage")
    self.config = config
    self.splits = splits
    self.workdir = workdir
    self.strategy = strategy or tf.distribute.get_strategy()
    self.num_classes = len(splits.class_names)
    self.trials_run: list[str] = []  # Trial ids this process fitted, in order.
    self._base_weights: list[np.ndarray] | None = None
    self._template: keras.Model | None = None
    self._inputs: inputs_lib.Inputs | None = None
    self._calibration: list[np.ndarray] | None = None
    self.inputs_seconds = 0.0  # Making the inputs (the frozen-prefix cache), this process.

  @property
  def feature_cache_cut_ratio(self) -> float:
    """The unfreeze ratio every trial's frozen-prefix cache is cut for."""
    return search_feature_cache_cut_ratio(self.config)

  @property
  def halving(self) -> bool:
    """Whether the search is successive halving (`--halving_rungs`)."""
    return bool(self.config.search.halving_rungs)

  def schedule(self) -> list[tuple[int, int]]:
    """Successive halving's (trials, stage 2 epochs) per rung."""
    search = self.config.search
    return halving_schedule(search.max_trials, search.halving_rungs, search.halving_factor,
                            self.config.train.fine_tune_epochs)

  def trial_config(self, values: dict[str, float]) -> RunConfig:
    """The run's config with what the search sets for a trial (`trial_settings`)."""
    train = dataclasses.replace(self.config.train, **trial_settings(self.config, values))
    return dataclasses.replace(self.config, train=train)

  def template(self) -> keras.Model:
    """The untrained classifier, weights read once; the cache is built from it."""
    if self._template is None:
      self._template = train_lib.new_model(self.config, self.num_classes)
      self._base_weights = model_lib.base_of(self._template).get_weights()
    return self._template

  def cache_images(self) -> int | None:
    """The images the frozen-prefix cache holds (train views and val: what making it
    passes through the prefix); None without one (the plain path)."""
    cache = getattr(self._inputs, "cache", None)
    if cache is None:
      return None
    return int(cache.train_views.shape[0] * cache.train_views.shape[1] + len(cache.val_labels))

  def num_train_images(self) -> int | None:
    """How many training images the trials saw; None where this process ran none."""
    return self._inputs.num_train_images() if self._inputs is not None else None

  def inputs(self) -> inputs_lib.Inputs:
    """The stages' inputs, cut (when cached) for the space's largest unfreeze ratio."""
    if self._inputs is None:
      start = time.time()
      self._inputs = inputs_lib.make_inputs(
          self.template(), self.splits, self.config, self.workdir, self.feature_cache_cut_ratio)
      self.inputs_seconds = time.time() - start
    return self._inputs

  def calibration(self) -> list[np.ndarray]:
    """The training images every trial's int8 rounding is bias-corrected on, read once."""
    if self._calibration is None:
      self._calibration = train_lib.calibration_images(self.config, self.splits)
    return self._calibration

  def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
    return self.model_for(declare_hyperparameters(hp, self.config.search))

  def model_for(self, values: dict[str, float]) -> keras.Model:
    """A trial's untrained model: its values, the template's base weights."""
    with _user_errors_stop_the_search():  # A missing --weights file, say.
      self.template()
    # A random base, then the template's weights: no weight file is read per trial.
    model = train_lib.new_model(self.trial_config(values), self.num_classes,
                                random_base=True)
    model_lib.base_of(model).set_weights(self._base_weights)
    return model

  def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args,
          trial_run: TrialRun | None = None, epochs: int | None = None,
          initial_epoch: int = 0, **kwargs) -> dict[str, float]:
    """Trains both stages; returns val_accuracy (the objective) and seconds.

    The objective is measured on the model as it will be shipped: its kernels
    rounded to the int8 grid (`int8_grid_weights`), on the val images through
    the full model, as `report.json` measures it; those weights are saved to
    the trial's checkpoint.

    `trial_run`: the trial's id and where its files go (from the tuner).
    `epochs` and `initial_epoch` (from Hyperband) bound stage 2; a Hyperband
    trial that continues an earlier one (`tuner/trial_id`) starts from its
    weights, so it skips stage 1. KerasTuner's default callbacks
    (`kwargs["callbacks"]`) checkpoint `model.fit`, but the stages fit
    sub-models: the full model's weights are saved to the checkpoint at the
    end instead.
    """
    del args, kwargs
    trial = (trial_run or self._untracked_trial()).given(hp, epochs, initial_epoch)
    if self.halving:  # The first rung; `continue_trial` takes the best further.
      trial = dataclasses.replace(trial, fine_tune_until=self.schedule()[0][1])
    config = self.trial_config(trial.values)
    with _user_errors_stop_the_search():
      inputs = self.inputs()
      start = time.time()
      stopper, clock = self._run_stages(model, inputs, trial, config)
      val_accuracy, val_passes = self._score(model, config, trial)
    with artifacts.atomic_path(trial.checkpoint) as tmp:
      model.save_weights(tmp)
    seconds = time.time() - start
    self._record(trial, config, val_accuracy, val_passes, seconds, stopper, clock)
    return {OBJECTIVE: val_accuracy, "seconds": seconds}

  def continue_trial(self, trial_id: str, hp: keras_tuner.HyperParameters, trial_dir: str,
                     epochs: int) -> float:
    """Successive halving's promotion: a trial's stage 2 on to `epochs`, from the state
    it stopped in (`train.fit_stages` resumes it); returns its val accuracy there."""
    trial = TrialRun(trial_id, trial_dir,
                     os.path.join(trial_dir, artifacts.TRIAL_WEIGHTS)).given(hp, epochs, 0)
    config = self.trial_config(trial.values)
    result = artifacts.read_json(os.path.join(trial_dir, artifacts.TRIAL_RESULT))
    if result.get("fine_tune_until", [0, 0])[1] >= epochs:
      return float(result["val_accuracy"])  # Done before an interruption.
    model = self.build(hp)
    start = time.time()
    with _user_errors_stop_the_search():
      _, clock = self._run_stages(model, self.inputs(), trial, config)
    val_accuracy, val_passes = self._score(model, config, trial)
    self._record(trial, config, val_accuracy, val_passes, time.time() - start, None, clock,
                 earlier=result)
    return val_accuracy

  def _untracked_trial(self) -> TrialRun:
    """A trial outside a tuner's bookkeeping: "best", in the tuner's folder."""
    trial_dir = os.path.join(self.workdir, artifacts.TUNER_DIR, "trial_best")
    return TrialRun("best", trial_dir, os.path.join(trial_dir, artifacts.TRIAL_WEIGHTS))

  def _run_stages(self, model: keras.Model, inputs: inputs_lib.Inputs, trial: TrialRun,
                  config: RunConfig) -> tuple[MedianStopping | None, StageClocks]:
    """`train.fit_stages` with the trial's values; returns its median stopper, if
    any, and the clocks of its stage 1 and stage 2 epochs.

    A Hyperband trial continuing another first takes its parent's histories.
    """
    if trial.parent:
      _copy_histories(os.path.join(os.path.dirname(trial.trial_dir), f"trial_{trial.parent}"),
                      trial.trial_dir)
    stopper = self._median_stopper(trial)
    clock = StageClocks(EpochClock(), EpochClock())
    with self.strategy.scope():
      train_lib.fit_stages(
          model, inputs, config.train, trial.trial_dir, seed=config.train.seed,
          run_frozen_stage=not trial.parent, fine_tune_until=trial.fine_tune_until,
          initial_epoch=trial.initial_epoch,
          fine_tune_callbacks=[clock.fine_tune] + ([stopper] if stopper else []),
          frozen_callbacks=[clock.frozen])
    return stopper, clock

  def _median_stopper(self, trial: TrialRun) -> MedianStopping | None:
    """The median stopping rule against the finished trials, when the search asks
    for it (Hyperband and successive halving stop trials their own way)."""
    search = self.config.search
    if not search.median_stop_epoch or search.tuner is Tuner.HYPERBAND or self.halving:
      return None
    project_dir, name = os.path.split(trial.trial_dir)
    return MedianStopping(finished_fine_tune_curves(project_dir, name),
                          search.median_stop_epoch, trial.trial_dir)

  def _score(self, model: keras.Model, config: RunConfig,
             trial: TrialRun) -> tuple[float, int]:
    """The val accuracy of the model as shipped (kernels on the int8 grid), and
    the full-model passes over val that measured it.

    Under successive halving, the val accuracy Keras measured up to the rung's
    epoch instead (on the same val images; the model is not final yet), with
    no pass: its best, the epoch whose weights the trial would end on, with
    early stopping on; its last without.
    """
    if self.halving:
      return fine_tune_val_accuracy(trial.trial_dir, trial.fine_tune_until,
                                    best=config.train.fine_tune_patience > 0), 0
    train_lib.round_for_int8(model, config, self.calibration())
    return train_lib.evaluate_split(model, self.splits, "val")["val_accuracy"], 1

  def _record(self, trial: TrialRun, config: RunConfig, val_accuracy: float, val_passes: int,
              seconds: float, stopper: MedianStopping | None, clock: StageClocks,
              earlier: dict[str, Any] | None = None) -> None:
    """The trial's `result.json`: its values, score, time, stage 2 epochs and stop
    (`earlier`: the record a successive halving rung continues)."""
    fine_tune_end = (config.train.fine_tune_epochs if trial.fine_tune_until is None
                  else int(trial.fine_tune_until))
    earlier = earlier or {}
    result = {"trial_id": trial.trial_id,
              "tuner_id": earlier.get("tuner_id",
                                      os.environ.get("KERASTUNER_TUNER_ID", "tuner0")),
              "hyperparameters": trial.values,
              "feature_cache_cut_ratio": config.train.feature_cache_cut_ratio,
              "val_accuracy": val_accuracy,
              "seconds": round(earlier.get("seconds", 0.0) + seconds, 2),
              "fine_tune_until": [trial.initial_epoch, fine_tune_end],
              "continues_trial": trial.parent,
              "median_stop": stopper.stopped if stopper else None,
              # From its history: epochs a killed and resumed process trained count too.
              "fine_tune_epochs_run": len(train_lib.read_history(
                  trial.trial_dir, "fine_tune").get("loss", [])) - trial.initial_epoch,
              "fine_tune_seconds": round(earlier.get("fine_tune_seconds", 0.0)
                                         + clock.fine_tune.seconds, 2),
              "frozen_seconds": round(earlier.get("frozen_seconds", 0.0)
                                      + clock.frozen.seconds, 2),
              "val_passes": earlier.get("val_passes", 0) + val_passes}
    if self.halving:
      result["rungs"] = {**earlier.get("rungs", {}), str(fine_tune_end): val_accuracy}
    artifacts.write_json(os.path.join(trial.trial_dir, artifacts.TRIAL_RESULT), result)
    self.trials_run.append(trial.trial_id)


class EpochClock(keras.callbacks.Callback):
  """Adds up the seconds of the epochs a fit trains (the search's time per unit of work)."""

  def __init__(self):
    super().__init__()
    self.seconds, self._began = 0.0, 0.0

  def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
    self._began = time.time()

  def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
    self.seconds += time.time() - self._began


class StageClocks(NamedTuple):
  """The clocks of one trial's stage 1 and stage 2 epochs."""

  frozen: EpochClock
  fine_tune: EpochClock


def _copy_histories(parent_dir: str, run_dir: str) -> None:
  """A Hyperband trial continues its parent's epochs: it starts from its histories."""
  os.makedirs(run_dir, exist_ok=True)
  for stage in train_lib.STAGES:
    source = os.path.join(parent_dir, artifacts.stage_history(stage))
    target = os.path.join(run_dir, artifacts.stage_history(stage))
    if os.path.exists(source) and not os.path.exists(target):
      shutil.copyfile(source, target)


class _TrialContext(compat.DeclaredSpaceTuner):
  """Gives `TwoStageHyperModel.fit` its `TrialRun`: the trial's id, folder and
  checkpoint path."""

  def declare_space(self, hp: keras_tuner.HyperParameters) -> None:
    # The space has no conditions: declaring it is enough, no model is built.
    declare_hyperparameters(hp, self.hypermodel.config.search)

  def run_trial(self, trial, *args, **kwargs):
    kwargs["trial_run"] = TrialRun(trial.trial_id, self.get_trial_dir(trial.trial_id),
                                   compat.trial_checkpoint(self, trial.trial_id))
    return super().run_trial(trial, *args, **kwargs)


class _BayesianTuner(_TrialContext, keras_tuner.BayesianOptimization):
  pass


class _HyperbandTuner(_TrialContext, keras_tuner.Hyperband):
  pass


class _RandomTuner(_TrialContext, keras_tuner.RandomSearch):
  pass


def make_tuner(hypermodel: TwoStageHyperModel, workdir: str, *, overwrite: bool,
               strategy: tf.distribute.Strategy | None = None) -> keras_tuner.Tuner:
  """A KerasTuner tuner over `hypermodel`, its project in WORKDIR/tuner.

  Hyperband runs stage 2 for its own epoch budgets (up to fine_tune_epochs);
  `max_trials` caps its trial count too.
  """
  compat.write_search_files_atomically()  # Before the tuner reloads them.
  config = hypermodel.config
  search = config.search
  common = dict(hypermodel=hypermodel, objective=keras_tuner.Objective(OBJECTIVE, "max"),
                seed=config.train.seed or 1,  # KerasTuner draws a random seed for 0.
                overwrite=overwrite,
                directory=workdir, project_name=artifacts.TUNER_DIR,
                distribution_strategy=strategy)
  if search.tuner is Tuner.BAYESIAN:
    return _BayesianTuner(max_trials=search.max_trials, **common)
  if search.tuner is Tuner.RANDOM:
    return _RandomTuner(max_trials=search.max_trials, **common)
  tuner = _HyperbandTuner(max_epochs=max(config.train.fine_tune_epochs, 1), factor=3,
                          hyperband_iterations=1, **common)
  tuner.oracle.max_trials = search.max_trials
  return tuner


def run_search(config: RunConfig, workdir: str,
               source: data_lib.Source | None = None) -> dict[str, Any]:
  """Runs (or resumes) the search; on the chief, writes the best model and reports.

  Returns the report (also `report.json`) with "is_chief": True on the chief or
  a single process; a distributed worker returns {"is_chief": False, ...}.
  """
  start = time.time()
  config.check_search()  # Search settings a search cannot run fail before any work,
  distributed, chief = _distributed_role()
  search_feature_cache_cut_ratio(config)  # ... as does a bad --feature_cache_cut_ratio,
  first_values = first_trial_values(config)  # ... as does a first trial outside the ranges.
  strategy = distribute.make_strategy(config.train.distribution_strategy)
  feature_cache = inputs_lib.uses_feature_cache(config.train)
  # Only the chief (or a single process) may wipe or record the run: a worker
  # may share its WORKDIR.
  if config.overwrite and chief:
    runs.start_afresh(workdir)
  source = source or data_lib.load_source(config.data)
  if not chief:  # Before it writes anything into a WORKDIR it may share.
    check_chief_run(worker_fingerprint(config, source, feature_cache))
  splits = _search_splits(config, workdir, source)
  if not distributed:  # (A distributed chief serves its workers the finished oracle.)
    done = runs.finished(config, workdir, "tune", source, feature_cache=feature_cache)
    if done is not None:  # Done is done: rerunning a finished search changes nothing.
      return {**done, "is_chief": True, "already_finished": True}
  made = runs.begin(config, workdir, "tune", source, feature_cache=feature_cache) if chief else None
  hypermodel = TwoStageHyperModel(config, splits, workdir, strategy)
  # --overwrite already deleted the run's tuner/ (`runs.start_afresh`) and only the run's.
  tuner = make_tuner(hypermodel, workdir, overwrite=False, strategy=strategy)
  if chief:  # Served to the workers with the search space (`check_chief_run`).
    compat.publish_with_space(tuner.oracle, CHIEF_RUN_KEY, json.dumps(made, sort_keys=True))
    if first_values:  # The chief's oracle makes the trials.
      compat.start_search_at(tuner.oracle, first_values)
  tuner.search(verbose=config.train.verbose)
  if not chief:
    return _worker_result(tuner, hypermodel, start)
  if hypermodel.halving:
    successive_halving(tuner, hypermodel)
  report = _finish(tuner, hypermodel, workdir, start, distributed=distributed)
  report["is_chief"] = True
  return report


def _search_splits(config: RunConfig, workdir: str,
                   source: data_lib.Source) -> data_lib.Splits:
  """The run's splits; refused without train images or without val ones to score on."""
  os.makedirs(workdir, exist_ok=True)
  splits = train_lib.load_splits_seeded(config, source, workdir)
  if not splits.keys("train"):
    raise UserError("The train split is empty; check --split.")
  if not splits.keys("val"):
    raise UserError("--mode=tune scores trials on the val split, which is empty; give "
                    "--split a val share (e.g. 64,16,20).")
  return splits


def _worker_result(tuner: keras_tuner.Tuner, hypermodel: TwoStageHyperModel,
                   start: float) -> dict[str, Any]:
  """A distributed worker's end: it says which trials it ran; the chief writes the results."""
  print(f"{tuner.tuner_id}: ran trial(s) {', '.join(hypermodel.trials_run) or 'none'}; "
        "the chief writes the results.")
  return {"is_chief": False, "tuner_id": tuner.tuner_id,
          "trials_run": hypermodel.trials_run, "seconds": round(time.time() - start, 1)}


def trial_settings(config: RunConfig, values: dict[str, float]) -> dict[str, Any]:
  """Every training setting the search gives a trial beyond the run's own: its values
  (HPARAMS), the cache's cut, and under successive halving stage 2's patience.

  A trial is `dataclasses.replace(config.train, **trial_settings(...))`, and the
  winner's are best_hparams.json, so `--mode=train` with the run's settings and
  these (as flags, or replaced) repeats the trial exactly.
  """
  settings: dict[str, Any] = {**values,
                              "feature_cache_cut_ratio": search_feature_cache_cut_ratio(config)}
  if config.search.halving_rungs:
    # The schedule fixes stage 2's epochs: a patience of all of them never stops it,
    # yet it still ends on its best val epoch's weights (with early stopping on).
    train = config.train
    settings["fine_tune_early_stopping_patience"] = (
        train.fine_tune_epochs if train.fine_tune_patience > 0 else 0)
  return settings


def search_feature_cache_cut_ratio(config: RunConfig) -> float:
  """The unfreeze ratio the trials' frozen-prefix cache is cut for.

  --feature_cache_cut_ratio when set, else the largest --unfreeze_ratio_range: every
  trial's trainable layers must lie above the cut.
  """
  largest = config.search.unfreeze_ratio_range[1]
  cut = config.train.feature_cache_cut_ratio
  if cut is None:
    return largest
  if cut < largest:
    raise UserError(f"--feature_cache_cut_ratio={cut:g} is below the largest "
                    f"--unfreeze_ratio_range "
                    f"({largest:g}), so trials there would train layers below the cache's "
                    "cut; leave it unset (the search cuts at the range's top) or raise it.")
  return cut


def splits_sha256(config: RunConfig, source: data_lib.Source) -> str:
  """The sha256 of the splits.csv `config` gives for `source`, written nowhere."""
  spec = split_lib.parse_split(config.data.split, config.data.split_seed)
  assignment = split_lib.assign(source.keys, source.labels, source.source_splits, spec)
  labels = {k: int(l) for k, l in zip(source.keys, source.labels)}
  return hashlib.sha256(split_lib.manifest_text(assignment, labels).encode("utf-8")).hexdigest()


def worker_fingerprint(config: RunConfig, source: data_lib.Source,
                       feature_cache: bool) -> schemas.Fingerprint:
  """The run fingerprint `runs.begin` would record for this search, computed
  without touching a WORKDIR (a worker checks it before it writes there)."""
  return runs.fingerprint(config, "tune", source=source,
                          splits_sha256=splits_sha256(config, source),
                          feature_cache=feature_cache, methods=runs.recipe())


def check_chief_run(mine: schemas.Fingerprint) -> None:
  """Refuses, in one line, a worker whose run fingerprint differs from the chief's.

  The chief's comes with the oracle's search space (`CHIEF_RUN_KEY`); asking
  for it waits until the chief serves.
  """
  worker = os.environ["KERASTUNER_TUNER_ID"]
  chief = (f"the chief at {os.environ['KERASTUNER_ORACLE_IP']}:"
           f"{os.environ['KERASTUNER_ORACLE_PORT']}")
  logging.info("%s: checking its settings against %s's.", worker, chief)
  announced = compat.chief_published(CHIEF_RUN_KEY)
  if not isinstance(announced, str):
    raise UserError(f"{chief} does not say which search it runs (another flowers version?); "
                    f"run the chief and {worker} with the same flowers.")
  changed = runs.differences(json.loads(announced), mine)
  if changed:
    shown = runs.shown_differences(changed)
    raise UserError(f"{worker} runs another search than {chief} (chief -> {worker}: "
                    f"{shown}); start {worker} with the chief's flags, data and flowers.")


def trial_rows(tuner: keras_tuner.Tuner) -> list[dict[str, Any]]:
  """One row per finished trial (TRIAL_COLUMNS), best val accuracy first (under
  successive halving: the furthest rung first)."""
  rows: list[dict[str, Any]] = []
  reached: dict[str, int] = {}  # Successive halving: trial -> the stage 2 epoch it reached.
  for trial in tuner.oracle.trials.values():
    values = trial.hyperparameters.values
    side = os.path.join(tuner.project_dir, f"trial_{trial.trial_id}", artifacts.TRIAL_RESULT)
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
        "median_stop": (result.get("median_stop") or {}).get("epoch") if done else None,
        "fine_tune_epochs": result.get("fine_tune_epochs_run") if done else None,
    })
    if done and "rungs" in result:  # Successive halving: its last rung's score.
      rows[-1]["val_accuracy"] = float(result["val_accuracy"])
      rows[-1]["seconds"] = result["seconds"]
      reached[trial.trial_id] = result["fine_tune_until"][1]
  # Successive halving's winner is the best of the last rung; ties go to the earlier
  # trial, whatever order KerasTuner reloaded them in.
  return sorted(rows, key=lambda r: (r["val_accuracy"] is None, -reached.get(r["trial_id"], 0),
                                     -(r["val_accuracy"] or 0.0), trial_order(r["trial_id"])))


def trial_order(trial_id: str) -> tuple[int, str]:
  """Sorts trial ids as KerasTuner numbers them: 0, 1, ..., 10 (others last)."""
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


def successive_halving(tuner: keras_tuner.Tuner, hypermodel: TwoStageHyperModel) -> None:
  """The rungs after the first: at each, the best trials of the one before (by their
  val accuracy at its epoch, ties to the earlier trial) fine-tune on to its epoch.

  Decided from the trials' histories alone, so a rerun after an interruption
  promotes the same trials and goes on where it stopped.
  """
  schedule = hypermodel.schedule()
  best = hypermodel.config.train.fine_tune_patience > 0  # As `_score` ranks them.
  alive = sorted(_completed_trials(tuner), key=lambda t: trial_order(t.trial_id))
  for (_, before), (keep, epochs) in zip(schedule, schedule[1:]):
    alive = sorted(alive, key=lambda t: (
        -(fine_tune_val_accuracy(tuner.get_trial_dir(t.trial_id), before, best) or 0.0),
        trial_order(t.trial_id)))[:keep]
    for trial in alive:
      val_accuracy = hypermodel.continue_trial(trial.trial_id, trial.hyperparameters,
                                               tuner.get_trial_dir(trial.trial_id), epochs)
      logging.info("Successive halving: trial %s at stage 2 epoch %d: val accuracy %.4f.",
                   trial.trial_id, epochs, val_accuracy)


def search_work(tuner: keras_tuner.Tuner, hypermodel: TwoStageHyperModel) -> dict[str, Any]:
  """report.json's "search_work": what the search trained and passed images through,
  beside the seconds it took (per unit, this travels between machines)."""
  trial_dirs = [tuner.get_trial_dir(t.trial_id) for t in _completed_trials(tuner)]
  results = [artifacts.read_json(path) for path in (
      os.path.join(d, artifacts.TRIAL_RESULT) for d in trial_dirs) if os.path.exists(path)]
  frozen = sum(len(train_lib.read_history(d, "frozen").get("loss", [])) for d in trial_dirs)
  work: dict[str, Any] = {
      "trials": len(results), "frozen_epochs": frozen,
      "fine_tune_epochs": sum(r.get("fine_tune_epochs_run", 0) for r in results),
      "fine_tune_seconds": round(sum(r.get("fine_tune_seconds", 0.0) for r in results), 1),
      "frozen_seconds": round(sum(r.get("frozen_seconds", 0.0) for r in results), 1),
      "val_passes": sum(r.get("val_passes", 0) for r in results),
      "trial_seconds": round(sum(r.get("seconds", 0.0) for r in results), 1),
      "inputs_seconds": round(hypermodel.inputs_seconds, 1),
      "cache_images": hypermodel.cache_images()}
  if hypermodel.halving:
    work["halving_schedule"] = [list(rung) for rung in hypermodel.schedule()]
    work["fine_tune_epoch_budget"] = halving_budget(hypermodel.schedule())
  return work


def _best_checkpoint(tuner: keras_tuner.Tuner, trial) -> str:
  """The weights the best trial was scored with; refused when not on this disk.

  Retraining elsewhere would ship another model than the one scored.
  """
  checkpoint = compat.trial_checkpoint(tuner, trial.trial_id)
  if not os.path.exists(checkpoint):
    folder = os.path.basename(tuner.get_trial_dir(trial.trial_id))
    raise UserError(f"The best trial's weights {checkpoint} are not on this disk: a worker "
                    f"trained {folder} under its own --workdir. Run the workers with the "
                    "chief's --workdir on a shared disk, or copy that worker's "
                    f"{artifacts.TUNER_DIR}/{folder} folder into {tuner.project_dir}/ and "
                    "rerun the chief's command.")
  return checkpoint


def _finish(tuner: keras_tuner.Tuner, hypermodel: TwoStageHyperModel, workdir: str,
            start: float, **extra: Any) -> schemas.TuneReport:
  """trials.csv, best_hparams.json, then the best model saved like a train run's."""
  rows = _write_trials_table(tuner, workdir)
  hparams_board.write(workdir, rows, hypermodel.config.search)
  completed = _completed_trials(tuner)
  best = tuner.oracle.get_trial(rows[0]["trial_id"])  # The table's first: same tie-break.
  checkpoint = _best_checkpoint(tuner, best)
  if hypermodel.halving:  # The winner's final weights, before any int8 rounding.
    checkpoint = os.path.join(tuner.get_trial_dir(best.trial_id), artifacts.FINE_TUNE_WEIGHTS)
  values = {name: float(best.hyperparameters.get(name)) for name in HPARAMS}
  # `--mode=train` with the run's settings and these repeats the trial exactly.
  best_hparams = trial_settings(hypermodel.config, values)
  artifacts.write_json(os.path.join(workdir, artifacts.BEST_HPARAMS), best_hparams)

  model = hypermodel.build(best.hyperparameters)
  model.load_weights(checkpoint)
  search = hypermodel.config.search
  report = train_lib.save_run(
      model, hypermodel.splits, hypermodel.trial_config(values), workdir,
      tuner.get_trial_dir(best.trial_id), num_train_images=hypermodel.num_train_images(),
      best_trial_id=best.trial_id, best_trial_val_accuracy=float(rows[0]["val_accuracy"]),
      best_hparams=best_hparams, num_trials=len(completed),
      search_work=search_work(tuner, hypermodel),
      search_seconds=round(time.time() - start, 1), tuner=search.tuner.value,
      max_trials=search.max_trials,
      distribution_strategy=hypermodel.config.train.distribution_strategy.value, **extra)
  print(summary.search_work_line(report["search_work"]))
  print(f"Best trial {best.trial_id} of {len(completed)}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in best_hparams.items())
        + f"; val_accuracy={report['val_accuracy']:.4f} "
        f"test_accuracy={report['test_accuracy']:.4f}")
  return report


def _write_trials_table(tuner: keras_tuner.Tuner, workdir: str) -> list[dict[str, Any]]:
  """`trials.csv`, also printed; returns its rows, best first."""
  rows = trial_rows(tuner)
  write_trials(os.path.join(workdir, artifacts.TRIALS), rows)
  print(format_trials(rows))
  return rows


def _completed_trials(tuner: keras_tuner.Tuner) -> list[Any]:
  """The trials that finished; none is a one-line error naming the last failure."""
  completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
  if not completed:
    messages = [t.message.strip().splitlines()[-1] for t in tuner.oracle.trials.values()
                if t.message and t.message.strip()]
    raise UserError("No trial of the search finished"
                    + (f" (the last error: {messages[-1]})" if messages else "")
                    + f"; see the trials under {tuner.project_dir}.")
  return completed
