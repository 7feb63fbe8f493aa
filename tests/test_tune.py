"""The KerasTuner search in this process: its space, trials and resumption.

Strategies and distributed workers, which need processes of their own, are in
test_tune_workers.py.

Searches run on mock TFDS data (4 classes, 32 px, random weights, one epoch per
stage), so trials take seconds and the accuracies mean nothing.
"""

import csv
import dataclasses
import json
import os
import pathlib
import shutil
import types
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import keras
import keras_tuner
import numpy as np
import pytest

import fake_data
import run_configs
import shared_data
import tune_worker
from workdir_files import hparams_board
from flowers import artifacts
from flowers import cli
from flowers import config as config_lib
from flowers import data
from flowers import model as model_lib
from flowers import runs
from flowers import summary
from flowers import train
from flowers import tune
from flowers.errors import UserError

# Real ranges: the trials draw different values, and on the cached path their
# own cuts lie above the cache's (cut for the range's top, 0.6).
RANGES = {"dropout_range": (0.1, 0.4), "unfreeze_ratio_range": (0.2, 0.6)}

def search(workdir, config=None, overwrite=False, **search_settings):
  """A search on the mock data, in this process; `search_settings` override SearchConfig."""
  config = dataclasses.replace(config or tune_worker.small_config(), overwrite=overwrite)
  if search_settings:
    config = dataclasses.replace(
        config, search=dataclasses.replace(config.search, **search_settings))
  with fake_data.mock_flowers(tune_worker.COUNTS, size=tune_worker.IMAGE_SIZE):
    source = data.load_tfds()
    return tune.run_search(config, str(workdir), source)


def read_trials(workdir):
  with open(os.path.join(workdir, artifacts.TRIALS), newline="") as f:
    return list(csv.DictReader(f))


def read_json(*path):
  with open(os.path.join(*path)) as f:
    return json.load(f)


def trial_file(workdir, trial_id, name):
  return os.path.join(workdir, artifacts.TUNER_DIR, f"trial_{trial_id}", name)


def write_stage2_history(run_dir, val_accuracies):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, artifacts.stage_history("fine_tune")), "w") as f:
    f.write("epoch,val_accuracy\n")
    f.writelines(f"{e},{v}\n" for e, v in enumerate(val_accuracies))


def median_stopper(finished, start_epoch, run_dir):
  stopper = tune.MedianStopping(finished, start_epoch, str(run_dir))
  stopper.set_model(types.SimpleNamespace(stop_training=False))
  return stopper


def read_rows(workdir, columns=("trial_id", "status", "median_stop") + config_lib.HPARAMS
              + ("val_accuracy",)):
  return sorted(({k: r[k] for k in columns} for r in read_trials(workdir)),
                key=lambda r: r["trial_id"])


class TuneTestCase(parameterized.TestCase):
  """A fresh scratch folder per test, as a `pathlib.Path`."""

  def setUp(self):
    super().setUp()
    self.tmp = pathlib.Path(self.create_tempdir().full_path)

  def assertApprox(self, actual, expected):
    """`actual` within a millionth of `expected`."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-12)


class HyperparametersTest(TuneTestCase):

  def test_declared_hyperparameters_fix_empty_ranges_and_log_scale_the_rate(self):
    hp = keras_tuner.HyperParameters()
    values = tune.declare_hyperparameters(
        hp, config_lib.SearchConfig(dropout_range=(0.2, 0.2), unfreeze_ratio_range=(0.0, 0.5)))
    self.assertEqual(values["dropout"], 0.2)
    kinds = {p.name: p for p in hp.space}
    self.assertEqual(type(kinds["dropout"]).__name__, "Fixed")
    self.assertEqual(kinds["fine_tune_learning_rate"].sampling, "log")
    self.assertEqual(kinds["unfreeze_ratio"].sampling, "linear")

  def test_the_first_trial_is_the_configured_values_inside_the_ranges(self):
    config = tune_worker.small_config(dropout=0.3, learning_rate=2e-3,
                                      search={"first_trial": "configured"})
    self.assertEqual(tune.first_trial_values(config),
                     {"dropout": 0.3, "unfreeze_ratio": 0.1, "fine_tune_learning_rate": 2e-4})
    drawn = run_configs.with_search(config, first_trial="drawn")
    self.assertIsNone(tune.first_trial_values(drawn))
    outside = run_configs.with_search(config, unfreeze_ratio_range=(0.2, 0.6))
    with self.assertRaisesRegex(UserError, r"^--unfreeze_ratio=0\.1 lies outside "
                                           r"--unfreeze_ratio_range=0\.2,0\.6, .* pass "
                                           r"--first_trial=drawn\.$"):
      tune.first_trial_values(outside)
    # Searches recorded before the setting existed drew their first trial.
    self.assertEqual(runs.upgrade({"search": {}})["search"]["first_trial"], "drawn")

  def test_a_trial_run_takes_its_values_and_hyperbands_parent_and_budget(self):
    hp = keras_tuner.HyperParameters()
    tune.declare_hyperparameters(hp, config_lib.SearchConfig(dropout_range=(0.3, 0.3)))
    place = tune.TrialRun("4", str(self.tmp / "trial_4"), str(self.tmp / "weights"))
    fresh = place.given(hp, None, None)
    self.assertEqual(set(fresh.values), set(config_lib.HPARAMS))
    self.assertEqual(fresh.values["dropout"], 0.3)
    self.assertEqual((fresh.parent, fresh.fine_tune_until, fresh.initial_epoch), (None, None, 0))
    self.assertEqual((fresh.trial_id, fresh.checkpoint), ("4", place.checkpoint))
    hp.values["tuner/trial_id"] = "1"  # As Hyperband sets it for a trial it continues.
    continued = place.given(hp, 3, 1)
    self.assertEqual((continued.parent, continued.fine_tune_until, continued.initial_epoch),
                     ("1", 3, 1))


class MedianStoppingTest(TuneTestCase):
  """The median stopping rule."""

  def test_median_stopping_compares_best_so_far_with_the_finished_trials_median(self):
    tmp_path = self.tmp
    # Best so far per epoch of three finished trials; the third stopped after 2 epochs.
    finished = [[0.5, 0.7, 0.8], [0.6, 0.6, 0.9], [0.4, 0.65]]
    stopper = median_stopper(finished, start_epoch=2, run_dir=tmp_path)
    stopper.on_epoch_end(0, {"val_accuracy": 0.1})  # Before epoch 2: never stops.
    self.assertFalse(stopper.model.stop_training)
    write_stage2_history(tmp_path, [0.1])
    stopper.on_epoch_end(1, {"val_accuracy": 0.65})  # Median of 0.7, 0.6, 0.65: not below.
    self.assertFalse(stopper.model.stop_training)
    self.assertIsNone(stopper.stopped)
    write_stage2_history(tmp_path, [0.1, 0.65])
    # Epoch 3: median of 0.8, 0.9 and 0.65 (the short trial's last) is 0.8; the best
    # so far is 0.65 (epoch 2, read from the history), above this epoch's 0.3.
    stopper.on_epoch_end(2, {"val_accuracy": 0.3})
    self.assertTrue(stopper.model.stop_training)
    self.assertEqual(stopper.stopped, {"epoch": 3, "best_val_accuracy": 0.65, "median": 0.8})

  @parameterized.parameters(([],), ([[0.9, 0.9]],))
  def test_median_stopping_waits_for_two_finished_trials(self, finished):
    stopper = median_stopper(finished, start_epoch=1, run_dir=self.tmp)
    stopper.on_epoch_end(1, {"val_accuracy": 0.1})
    self.assertFalse(stopper.model.stop_training)

  def test_replay_stops_trials_that_trail_and_later_trials_meet_the_truncated_curve(self):
    curves = [[0.5, 0.7, 0.8],
              [0.6, 0.6, 0.9],
              [0.4, 0.5, 0.95],  # Epoch 2: 0.5 < median(0.7, 0.6) = 0.65: stops.
              [0.6, 0.62, 0.7]]  # Epoch 2: median(0.7, 0.6, 0.5) = 0.6: goes on; epoch 3:
    #                                0.7 < median(0.8, 0.9, 0.5) = 0.8: stops.
    self.assertEqual(tune.replay_median_stopping(curves, start_epoch=2), [None, None, 2, 3])
    self.assertEqual(tune.replay_median_stopping(curves, start_epoch=4), [None] * 4)

  def test_finished_curves_are_best_so_far_of_trials_with_a_result(self):
    tmp_path = self.tmp
    write_stage2_history(tmp_path / "trial_0", [0.5, 0.4, 0.6])
    write_stage2_history(tmp_path / "trial_1", [0.7])  # Still running: no result.json.
    write_stage2_history(tmp_path / "trial_2", [0.2, 0.3])  # This trial.
    for name in ("trial_0", "trial_2"):
      artifacts.write_json(str(tmp_path / name / artifacts.TRIAL_RESULT), {})
    self.assertEqual(tune.finished_fine_tune_curves(str(tmp_path), exclude="trial_2"),
                     [[0.5, 0.5, 0.6]])

  @parameterized.parameters((1, 1, 1), (0, 2, None))
  @pytest.mark.slow
  def test_a_trial_below_the_median_stops_its_stage_2(self, median_stop_epoch, fine_tune_until,
                                                       stopped):
    tmp_path = self.tmp
    # Two finished trials that reached val accuracy 1.0 at once: any real trial trails them.
    for name in ("trial_done_a", "trial_done_b"):
      write_stage2_history(tmp_path / artifacts.TUNER_DIR / name, [1.0, 1.0])
      artifacts.write_json(
          str(tmp_path / artifacts.TUNER_DIR / name / artifacts.TRIAL_RESULT), {})
    config = tune_worker.small_config(fine_tune_epochs=2)
    search(tmp_path, config=config, max_trials=1, median_stop_epoch=median_stop_epoch)
    history = train.read_history(os.path.dirname(trial_file(tmp_path, "0", "x")), "fine_tune")
    self.assertLen(history["val_accuracy"], fine_tune_until)
    result = read_json(trial_file(tmp_path, "0", artifacts.TRIAL_RESULT))
    self.assertEqual((result["median_stop"] or {}).get("epoch"), stopped)
    [row] = read_trials(tmp_path)
    self.assertEqual(row["median_stop"], "" if stopped is None else str(stopped))
    self.assertEqual(row["status"], "COMPLETED")
    self.assertGreaterEqual(float(row["val_accuracy"]), 0)


class SearchTest(TuneTestCase):
  """Searches on the mock data."""

  def test_a_user_error_in_a_trial_stops_the_search(self):
    # KerasTuner would count it as a failed trial and go on to the next.
    config = tune_worker.small_config(weights=str(self.tmp / "missing.h5"))
    with self.assertRaisesRegex(UserError, "missing.h5 is not a file"):
      search(self.tmp, config=config, max_trials=3)

  @pytest.mark.slow
  def test_search_writes_artifacts_and_resumes(self):
    """One trial; then two (the second killed midway); then the same command again."""
    workdir = str(self.tmp)
    fits = []  # (trial folder, stage) of every stage that started.
    kill = {"trial": None}
    fit = train._fit

    def spy(stage, epochs, initial_epoch, run_dir, name, config, *extra):
      fits.append((os.path.basename(run_dir), name))
      if name == "fine_tune" and os.path.basename(run_dir) == kill["trial"]:
        raise KeyboardInterrupt  # As if the process were stopped in stage 2.
      return fit(stage, epochs, initial_epoch, run_dir, name, config, *extra)

    self.enter_context(mock.patch.object(train, "_fit", spy))

    start = "configured"  # The first trial takes the configured values; the second is drawn.
    report = search(workdir, tuner="bayesian", max_trials=1, first_trial=start)
    self.assertEqual(fits, [("trial_0", "frozen"), ("trial_0", "fine_tune")])
    configured = tune.first_trial_values(
        tune_worker.small_config(search={"first_trial": start}))
    self.assertEqual(read_json(trial_file(workdir, "0", "trial.json"))
                     ["hyperparameters"]["values"], configured)
    self.assertTrue(report["is_chief"])
    self.assertEqual(report["num_trials"], 1)
    first = read_json(trial_file(workdir, "0", artifacts.TRIAL_RESULT))
    board = os.path.join(workdir, artifacts.HPARAMS_LOGS)
    self.assertEqual(list(hparams_board(board)["sessions"]), ["trial_0"])

    fits.clear()
    kill["trial"] = "trial_1"
    with self.assertRaises(KeyboardInterrupt):
      search(workdir, tuner="bayesian", max_trials=2, first_trial=start)
    self.assertEqual(fits, [("trial_1", "frozen"), ("trial_1", "fine_tune")])
    killed = read_json(trial_file(workdir, "1", "trial.json"))
    self.assertEqual(killed["status"], "RUNNING")
    # The chief (here the one process) serves its run's fingerprint with the space.
    oracle = read_json(workdir, artifacts.TUNER_DIR, "oracle.json")
    served = json.loads(oracle["hyperparameters"]["values"][tune.CHIEF_RUN_KEY])
    self.assertEqual(served, {k: v for k, v in read_json(workdir, artifacts.RUN).items()
                              if k != "location"})

    fits.clear()
    kill["trial"] = None
    report = search(workdir, tuner="bayesian", max_trials=2, first_trial=start)
    # Only the killed trial ran again, with the same hyperparameters, from its
    # finished stage 1 (the same loop as --mode=train: it resumes).
    self.assertEqual(fits, [("trial_1", "fine_tune")])
    self.assertEqual(read_json(trial_file(workdir, "0", artifacts.TRIAL_RESULT)), first)
    redone = read_json(trial_file(workdir, "1", "trial.json"))
    self.assertEqual(redone["status"], "COMPLETED")
    self.assertEqual(redone["hyperparameters"]["values"], killed["hyperparameters"]["values"])
    # The extended search drew its second trial.
    self.assertNotEqual(redone["hyperparameters"]["values"]["dropout"], configured["dropout"])

    rows = read_trials(workdir)
    self.assertIn([r["trial_id"] for r in rows], (["0", "1"], ["1", "0"]))
    self.assertEqual(list(rows[0]), list(tune.TRIAL_COLUMNS))
    accuracies = [float(r["val_accuracy"]) for r in rows]
    self.assertEqual(accuracies, sorted(accuracies, reverse=True))
    by_id = {r["trial_id"]: r for r in rows}
    self.assertApprox(float(by_id["0"]["val_accuracy"]), first["val_accuracy"])
    for r in rows:
      self.assertGreater(float(r["seconds"]), 0)
      self.assertEqual(r["status"], "COMPLETED")
    self.assertEqual(report["search_work"]["val_passes"], 2)  # One a trial, to score it.
    # The HParams board of the extended search: written afresh, one events file a run.
    self.assertEqual(hparams_board(board)["files"], {
        run: [mock.ANY] for run in (".", "trial_0", "trial_1")})

    best = read_json(workdir, artifacts.BEST_HPARAMS)
    self.assertEqual(set(best), set(config_lib.HPARAMS) | {"feature_cache_cut_ratio"})
    self.assertEqual(best["feature_cache_cut_ratio"],
                     tune_worker.small_config().search.unfreeze_ratio_range[1])
    self.assertApprox(best["dropout"], float(rows[0]["dropout"]))
    saved = read_json(workdir, "report.json")
    for key in ("test_accuracy", "test_top5_accuracy", "num_test_examples", "val_accuracy",
                "per_class_accuracy", "confusion_matrix", "class_names", "source", "split",
                "split_seed", "seed", "search_seconds"):
      self.assertIn(key, saved)
    self.assertEqual(saved["num_trials"], 2)
    self.assertEqual(saved["best_hparams"], best)
    # The trial was scored on the model as shipped (kernels on the int8 grid).
    self.assertAlmostEqual(saved["best_trial_val_accuracy"], saved["val_accuracy"],
                           delta=5e-5)
    self.assertEqual(saved["best_trial_id"], rows[0]["trial_id"])
    self.assertEqual(saved["config"]["train"]["unfreeze_ratio"], best["unfreeze_ratio"])
    history = read_json(workdir, "history.json")
    self.assertLen(history["frozen"]["val_accuracy"], 1)
    self.assertLen(history["fine_tune"]["val_accuracy"], 1)
    with open(os.path.join(workdir, artifacts.LABELS)) as f:
      self.assertLen(f.read().splitlines(), len(saved["class_names"]))
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    self.assertApprox(model.get_layer("head_dropout").rate, best["dropout"])

    # Resuming with another search space is refused, naming what changed.
    with self.assertRaisesRegex(UserError, r"search\.dropout_range: \[0\.0, 0\.5\] -> "
                                           r"\[0\.1, 0\.2\].*--overwrite"):
      search(workdir, tuner="bayesian", max_trials=2, dropout_range=(0.1, 0.2))

  @pytest.mark.slow
  def test_a_chief_without_the_best_trials_weights_refuses_and_ships_them_once_copied(self):
    tmp_path = self.tmp
    workdir = tmp_path / "chief"
    config = tune_worker.small_config(feature_cache="off")
    first = search(workdir, config=config)
    # As on a chief whose worker trained trial 0 on its own disk: the chief's
    # oracle wrote trial.json there, the worker everything else.
    trial_dir = os.path.dirname(trial_file(workdir, "0", "x"))
    worker_copy = tmp_path / "worker_trial_0"
    shutil.copytree(trial_dir, worker_copy)
    for name in os.listdir(trial_dir):
      if name != "trial.json":
        path = os.path.join(trial_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name in (artifacts.MODEL, artifacts.REPORT, artifacts.BEST_HPARAMS):
      os.remove(workdir / name)
    with self.assertRaisesRegex(UserError, r"trial_0.*not on this disk.*shared disk.*copy "
                                           r"that worker's tuner/trial_0 folder into "
                                           r".*chief/tuner/"):
      search(workdir, config=config)
    for name in (artifacts.MODEL, artifacts.REPORT, artifacts.BEST_HPARAMS):
      self.assertFalse(os.path.exists(workdir / name), name)  # Nothing shipped.
    shutil.copytree(worker_copy, trial_dir, dirs_exist_ok=True)
    again = search(workdir, config=config)
    self.assertEqual(again["num_trials"], 1)
    for key in ("best_hparams", "val_accuracy", "test_accuracy"):
      self.assertEqual(again[key], first[key], key)

  def test_a_cache_cut_below_the_searched_ratios_is_refused(self):
    config = tune_worker.small_config(unfreeze_ratio=0.1, feature_cache_cut_ratio=0.3,
                                      search={"unfreeze_ratio_range": (0.2, 0.6)})
    with self.assertRaisesRegex(UserError, r"--feature_cache_cut_ratio=0.3 is below the largest "
                                           r"--unfreeze_ratio_range \(0.6\)"):
      search(self.tmp, config=config)
    self.assertEmpty(os.listdir(self.tmp))  # Refused before any work.

  def test_the_chief_serves_its_run_with_the_space_and_the_draws_stay_put(self):
    """The chief's fingerprint rides in the oracle's values, outside its space."""
    config = tune_worker.small_config(data={"split_seed": 42}, search={**RANGES, "max_trials": 3},
                                      seed=42)
    classes = types.SimpleNamespace(class_names=list("abcd"))
    drawn = {}
    for announce in (False, True):
      hypermodel = tune.TwoStageHyperModel(config, classes, str(self.tmp / str(announce)))
      tuner = tune.make_tuner(hypermodel, hypermodel.workdir, overwrite=True)
      if announce:
        tuner.oracle.hyperparameters.values[tune.CHIEF_RUN_KEY] = json.dumps({"mode": "tune"})
      drawn[announce] = [tuner.oracle.create_trial(f"tuner{i}").hyperparameters.values
                         for i in range(3)]
    # KerasTuner draws one seed step per hp in the space.
    self.assertEqual(drawn[True], drawn[False])
    self.assertLen({v["dropout"] for v in drawn[True]}, 3)
    # What a worker reads: the space through KerasTuner's gRPC message, and after a reload.
    served = keras_tuner.HyperParameters.from_proto(tuner.oracle.get_space().to_proto())
    self.assertEqual(json.loads(served.values[tune.CHIEF_RUN_KEY]), {"mode": "tune"})
    tuner.save()
    reloaded = tune.make_tuner(hypermodel, hypermodel.workdir, overwrite=False)
    self.assertEqual(reloaded.oracle.get_space().values[tune.CHIEF_RUN_KEY],
                     '{"mode": "tune"}')

  @parameterized.parameters(("constant", 1.0), ("cosine", 0.0))
  @pytest.mark.slow
  def test_learning_rate_schedule_spans_each_stage_of_a_plain_trial(self, schedule, factor):
    rates = {}

    class RecordRate(keras.callbacks.Callback):

      def __init__(self, stage):
        super().__init__()
        self.stage = stage

      def on_train_end(self, logs=None):
        rates[self.stage] = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))

    original = train.stage_callbacks
    self.enter_context(mock.patch.object(
        train, "stage_callbacks", lambda run_dir, stage, config, validate: (
            original(run_dir, stage, config, validate) + [RecordRate(stage)])))
    config = tune_worker.small_config(
        feature_cache="off", lr_schedule=schedule, learning_rate=0.1, epochs=2,
        fine_tune_epochs=2, search={"fine_tune_learning_rate_range": (0.01, 0.01)})
    search(self.tmp, config=config)
    # After the last step, cosine has decayed to 0; a constant rate stays put.
    self.assertApprox(rates["frozen"], 0.1 * factor)
    self.assertApprox(rates["fine_tune"], 0.01 * factor)


@pytest.mark.slow
class SlowSearchTest(TuneTestCase):
  """Searches that train several trials for several epochs, or twice."""

  @parameterized.parameters("on", "off")
  def test_a_search_killed_in_a_trial_and_resumed_scores_what_one_left_alone_does(
      self, feature_cache):
    tmp_path = self.tmp
    # small_config's ranges: real, with small unfrozen tops (quick to trace). On the
    # plain path the killed trial's stage 2 resumes on its own shuffle stream.
    config = tune_worker.small_config(feature_cache=feature_cache, fine_tune_epochs=2,
                                      search={"max_trials": 2})
    alone = search(tmp_path / "alone", config=config)

    class Kill(keras.callbacks.Callback):
      """Stops the process after the first epoch of trial 1's stage 2."""

      def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt

    original = train.stage_callbacks
    kill = {"on": True}

    def with_kill(run_dir, stage, train_config, validate):
      callbacks = original(run_dir, stage, train_config, validate)
      if kill["on"] and stage == "fine_tune" and os.path.basename(run_dir) == "trial_1":
        callbacks.append(Kill())
      return callbacks

    self.enter_context(mock.patch.object(train, "stage_callbacks", with_kill))
    killed = tmp_path / "killed"
    with self.assertRaises(KeyboardInterrupt):
      search(killed, config=config)
    fine_tune = train.read_history(os.path.dirname(trial_file(killed, "1", "x")), "fine_tune")
    self.assertLen(fine_tune["val_accuracy"], 1)  # Killed midway through stage 2.
    kill["on"] = False
    resumed = search(killed, config=config)
    self.assertEqual(read_rows(killed), read_rows(tmp_path / "alone"))
    for key in ("best_trial_id", "val_accuracy", "test_accuracy", "best_hparams"):
      self.assertEqual(resumed[key], alone[key], key)

  # On the feature cache (on real weights, where its float16 cut shows); SuccessiveHalvingTest
  # repeats a winner promoted midway.
  @pytest.mark.real_data
  def test_train_with_best_hparams_repeats_the_best_trial_on_real_weights(self):
    # Trained weights do not saturate as random ones do: the float16 cache's cut
    # shows in every number.
    self.check_train_with_best_hparams_repeats_the_best_trial("on", shared_data.WEIGHTS)

  def test_train_with_best_hparams_repeats_the_best_trial_on_the_plain_path(self):
    # No cut here, so random weights do. What a trial after the first could get wrong
    # is its shuffle order: each stage's own stream, drawn from the seed, not the one
    # the trials before it moved on. Random weights score every trial alike (ties go
    # to the first), so the first trial scores nothing here: the second one wins.
    score = tune.TwoStageHyperModel._score

    def first_scores_nothing(hypermodel, model, config, trial):
      val_accuracy, val_passes = score(hypermodel, model, config, trial)
      return (0.0 if trial.trial_id == "0" else val_accuracy), val_passes

    self.enter_context(mock.patch.object(tune.TwoStageHyperModel, "_score",
                                         first_scores_nothing))
    tuned = self.check_train_with_best_hparams_repeats_the_best_trial("off", None)
    self.assertEqual(tuned["best_trial_id"], "1")

  def check_train_with_best_hparams_repeats_the_best_trial(self, feature_cache, weights):
    """Searches, trains with best_hparams.json, checks both are one run; returns the search's
    report."""
    tmp_path = self.tmp
    # The plain path has no cut: small_config's ranges (small unfrozen tops) do.
    ranges = RANGES if feature_cache == "on" else {}
    config = tune_worker.small_config(
        feature_cache=feature_cache, lr_schedule="cosine", epochs=2, fine_tune_epochs=2,
        early_stopping_patience=1, weights=weights,
        search={**ranges, "max_trials": 2})
    with fake_data.mock_flowers(tune_worker.COUNTS, size=tune_worker.IMAGE_SIZE):
      source = data.load_tfds()
      tuned = tune.run_search(config, str(tmp_path / "tune"), source)
      best = read_json(tmp_path / "tune", artifacts.BEST_HPARAMS)
      # The values of best_hparams.json, given as --mode=train flags.
      trained = train.train_and_evaluate(run_configs.with_train(config, **best),
                                         str(tmp_path / "train"), source)
    self.assertLen(read_trials(tmp_path / "tune"), 2)
    self.assertNotEqual(best["dropout"], config.search.dropout_range[0])  # Drawn, not pinned.
    models = [keras.models.load_model(tmp_path / folder / artifacts.MODEL)
              for folder in ("train", "tune")]
    self.assertEqual(read_json(tmp_path / "tune", artifacts.HISTORY),
                     read_json(tmp_path / "train", artifacts.HISTORY))
    for key in ("val_accuracy", "test_accuracy", "confusion_matrix"):
      self.assertEqual(tuned[key], trained[key], key)
    for a, b in zip(*(m.get_weights() for m in models)):
      np.testing.assert_array_equal(a, b)
    if feature_cache == "on":
      # The trial's own cut lies above the cache's: the layers between ran frozen
      # on the cache's float16 activations, and the train run did the same (its
      # cache is named by a digest of its cut, views, seed and images). On random
      # weights most activations saturate, so the weights alone might not tell.
      base = model_lib.base_of(models[1])
      self.assertNotEqual(model_lib.cut_index(base, best["unfreeze_ratio"]),
                          model_lib.cut_index(base, RANGES["unfreeze_ratio_range"][1]))
      caches = [sorted(n for n in os.listdir(tmp_path / folder / artifacts.CACHE_DIR)
                       if n.startswith("prefix_")) for folder in ("train", "tune")]
      self.assertEqual(caches[0], caches[1])
      self.assertNotEmpty(caches[0])
    else:  # The plain path trains the full model: no cache, no stage-1 file at the top.
      self.assertIs(tuned["feature_cache"], False)
      self.assertFalse(os.path.exists(tmp_path / "tune" / "cache"))
      self.assertFalse(os.path.exists(tmp_path / "tune" / artifacts.FROZEN_WEIGHTS))
    return tuned

  def test_hyperband_continues_the_best_trial_from_its_weights(self):
    tmp_path = self.tmp
    # max_epochs 3, factor 3: three 1-epoch trials, then the best one for 3 epochs.
    config = tune_worker.small_config(fine_tune_epochs=3)
    report = search(tmp_path, config=config, tuner="hyperband", max_trials=4, overwrite=True)
    self.assertEqual(report["num_trials"], 4)
    results = [read_json(trial_file(tmp_path, i, artifacts.TRIAL_RESULT)) for i in "0123"]
    self.assertEqual([r["fine_tune_until"] for r in results],
                     [[0, 1], [0, 1], [0, 1], [1, 3]])
    parent = results[3]["continues_trial"]
    self.assertIn(parent, ("0", "1", "2"))
    self.assertEqual(results[3]["hyperparameters"], results[int(parent)]["hyperparameters"])
    with open(trial_file(tmp_path, "3", "history_fine_tune.csv")) as f:
      self.assertEqual([row["epoch"] for row in csv.DictReader(f)], ["0", "1", "2"])
    with open(trial_file(tmp_path, "3", "history_frozen.csv")) as f:
      self.assertLen(list(csv.DictReader(f)), 1)  # Copied from the parent, not rerun.


class SuccessiveHalvingTest(TuneTestCase):
  """--halving_rungs: a fixed stage 2 budget, the best trials going on where they stopped."""

  def test_the_schedule_and_the_epochs_it_spends(self):
    self.assertEqual(tune.halving_schedule(8, (2, 4), 3, 12), [(8, 2), (3, 4), (1, 12)])
    self.assertEqual(tune.halving_budget([(8, 2), (3, 4), (1, 12)]), 8 * 2 + 3 * 2 + 1 * 8)
    self.assertEqual(tune.halving_schedule(6, (2, 4), 3, 12), [(6, 2), (2, 4), (1, 12)])
    self.assertEqual(tune.halving_schedule(2, (1, 2), 3, 4), [(2, 1), (1, 2), (1, 4)])
    with self.assertRaisesRegex(UserError, "--halving_rungs=2,2 must be increasing"):
      config_lib.SearchConfig(halving_rungs="2,2")

  def test_rungs_past_the_fine_tune_epochs_refuse_the_search_before_any_work(self):
    config = tune_worker.small_config(fine_tune_epochs=4, search={"halving_rungs": (2, 4)})
    with self.assertRaisesRegex(UserError, "must stay below --fine_tune_epochs=4"):
      search(self.tmp, config=config)
    self.assertEmpty(os.listdir(self.tmp))

  def test_train_with_best_hparams_is_the_trial_on_the_default_schedule(self):
    # cpu.cfg's recipe, the defaults: halving at 2,4 of 12 epochs, early stopping patience 4.
    config = config_lib.RunConfig()
    hypermodel = tune.TwoStageHyperModel(config, types.SimpleNamespace(class_names=list("abcd")),
                                         str(self.tmp))
    values = {"dropout": 0.35, "unfreeze_ratio": 0.22, "fine_tune_learning_rate": 3e-4}
    best = tune.trial_settings(config, values)  # What best_hparams.json holds for it.
    self.assertEqual(set(best), set(config_lib.HPARAMS) | {
        "feature_cache_cut_ratio", "fine_tune_early_stopping_patience"})
    # What the trial trains: fit_stages' arguments.
    seen = {}
    self.enter_context(mock.patch.object(
        train, "fit_stages", lambda model, inputs, train_config, run_dir, **kwargs:
        seen.update(config=train_config, **kwargs)))
    trial = tune.TrialRun("0", str(self.tmp / "trial_0"), str(self.tmp / "weights"), values)
    hypermodel._run_stages(None, None, trial, hypermodel.trial_config(values))
    # --mode=train with the run's settings and best_hparams.json's, replaced or as flags,
    # trains the same stages: fit_stages gets that config and no setting of its own.
    self.assertEqual(seen["config"], dataclasses.replace(config.train, **best))
    self.assertEqual(seen["config"], hypermodel.trial_config(values).train)
    self.assertEqual(set(seen) - {"config", "seed"},
                     {"run_frozen_stage", "fine_tune_until", "initial_epoch",
                      "fine_tune_callbacks", "frozen_callbacks"})
    as_flags = cli.as_flags(config) + [f"--{name}={value}" for name, value in best.items()]
    with flagsaver.flagsaver():
      cli.define_flags()
      flags.FLAGS.unparse_flags()
      flags.FLAGS(["flowers_main", *as_flags])
      self.assertEqual(cli.run_config().train, seen["config"])
    # Stage 2 never stops early (the schedule ends it) yet keeps its best epoch; stage 1
    # keeps the run's early stopping.
    patience = {stage: [c.patience for c in train.stage_callbacks(
        str(self.tmp), stage, seen["config"], validate=True)
                        if isinstance(c, keras.callbacks.EarlyStopping)]
                for stage in ("frozen", "fine_tune")}
    self.assertEqual(patience, {"frozen": [4], "fine_tune": [12]})

  # On the cache, early stopping on: under halving stage 2 never stops, yet ends on its
  # best epoch. On the plain path, off: the promoted trial ends on its last epoch, trained
  # after the other trial read the data, on the shuffle stream of its own stage 2. (On
  # random weights every epoch scores alike, so a best epoch would be the first.)
  @parameterized.parameters(("on", 1), ("off", 0))
  @pytest.mark.slow
  def test_the_best_go_on_from_where_they_stopped_as_one_run_left_alone(self, feature_cache,
                                                                         patience):
    config = tune_worker.small_config(
        feature_cache=feature_cache, fine_tune_epochs=2, early_stopping_patience=patience,
        search={"max_trials": 2, "halving_rungs": (1,), "halving_factor": 2})
    workdir = self.tmp / "tune"
    report = search(workdir, config=config)
    results = {i: read_json(trial_file(workdir, i, artifacts.TRIAL_RESULT)) for i in "01"}
    first = {i: tune.fine_tune_val_accuracy(os.path.dirname(trial_file(workdir, i, "x")), 1)
             for i in "01"}
    promoted = min("01", key=lambda i: (-first[i], int(i)))
    for i, result in results.items():
      self.assertEqual(result["fine_tune_until"], [0, 2 if i == promoted else 1], i)
      self.assertEqual(result["fine_tune_epochs_run"], 2 if i == promoted else 1, i)
    self.assertEqual(list(results[promoted]["rungs"]), ["1", "2"])
    history = train.read_history(os.path.dirname(trial_file(workdir, promoted, "x")),
                                 "fine_tune")
    self.assertLen(history["val_accuracy"], 2)  # Epoch 1 not trained twice.
    work = report["search_work"]
    self.assertEqual(work["fine_tune_epochs"], 2 * 1 + 1 * 1)
    self.assertEqual(work["fine_tune_epoch_budget"], work["fine_tune_epochs"])
    self.assertEqual(work["halving_schedule"], [[2, 1], [1, 2]])
    self.assertEqual(work["val_passes"], 0)  # Scored by the epochs' own val accuracy.
    self.assertGreater(work["frozen_seconds"], 0)
    self.assertRegex(summary.search_work_line(work),
                     r"2 trials, 2 stage 1 epochs in \d+ s, 3 stage 2 epochs \(fixed by the "
                     r"schedule: 3\) in \d+ s, 0 full-model val passes")
    self.assertEqual(report["best_trial_id"], promoted)
    self.assertEqual(read_trials(workdir)[0]["fine_tune_epochs"], "2")
    # TensorBoard's HParams board: the space, and each trial's row as its session.
    board = hparams_board(os.path.join(workdir, artifacts.HPARAMS_LOGS))
    self.assertEqual(board["experiment"], {name: config.search.range_of(name)
                                           for name in config_lib.HPARAMS})
    for row in read_trials(workdir):
      session = board["sessions"].pop(f"trial_{row['trial_id']}")
      self.assertEqual(session["hparams"], {n: float(row[n]) for n in config_lib.HPARAMS})
      epochs = int(row["fine_tune_epochs"])  # The rung it reached: 2 for the promoted one.
      self.assertEqual(session["metrics"]["fine_tune_epochs"], (epochs, epochs))
      self.assertEqual(session["metrics"]["val_accuracy"][0], epochs)
      self.assertAlmostEqual(session["metrics"]["val_accuracy"][1], float(row["val_accuracy"]),
                             places=6)
      self.assertEqual((session["group"], session["status"]),
                       (row["trial_id"], "STATUS_SUCCESS"))
    self.assertEmpty(board["sessions"])  # One session per trial.
    self.assertEqual(results[promoted]["val_accuracy"],
                     max(history["val_accuracy"]) if patience else history["val_accuracy"][-1])
    # The winner, promoted midway, is what one --mode=train run trains with the run's
    # settings and best_hparams.json's (stage 2's patience among them: all its epochs).
    best = read_json(workdir, artifacts.BEST_HPARAMS)
    self.assertEqual(best["fine_tune_early_stopping_patience"], 2 if patience else 0)
    with fake_data.mock_flowers(tune_worker.COUNTS, size=tune_worker.IMAGE_SIZE):
      trained = train.train_and_evaluate(
          run_configs.with_train(config, **best), str(self.tmp / "train"), data.load_tfds())
    for key in ("val_accuracy", "test_accuracy", "confusion_matrix"):
      self.assertEqual(report[key], trained[key], key)
    models = [keras.models.load_model(self.tmp / folder / artifacts.MODEL)
              for folder in ("train", "tune")]
    for a, b in zip(*(m.get_weights() for m in models)):
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
