"""A killed run, run again, ends as the run left alone ends; the frozen-prefix cache's key.

Kills are simulated in-process: a callback raises `KeyboardInterrupt` at a
chosen point of a stage (before or after the epoch's state is saved, or
inside an epoch), or the saving of the run raises once. Each kill is followed
by the same call again, as a user reruns the same command.
"""

import dataclasses
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import pytest

import fake_data
import run_configs
from flowers import artifacts
from flowers import inputs
from flowers import runs
from flowers import train

COUNTS = fake_data.uniform_counts(4, train=8, val=3, test=4)
FINE_TUNE_EPOCHS = 4


def config(feature_cache: str, **train_settings):
  """Early stopping (patience 2) in both stages: its progress must survive a kill."""
  settings = dict(feature_cache=feature_cache, epochs=2, fine_tune_epochs=FINE_TUNE_EPOCHS,
                  early_stopping_patience=2, alpha=0.35)
  settings.update(train_settings)
  return run_configs.tiny(**settings)


class Kill(keras.callbacks.Callback):
  """Stops the process (raises `KeyboardInterrupt`) at one point of a stage.

  `hook` is "epoch_begin", "epoch_end" (after the CSV row, before the stage's
  state is saved), "batch" (after batch `batch` of `epoch`) or "train_end".
  """

  def __init__(self, hook: str, epoch: int | None = None, batch: int | None = None):
    super().__init__()
    self.hook, self.epoch, self.batch = hook, epoch, batch
    self.current = None

  def _kill(self, hook: str, epoch: int | None = None, batch: int | None = None) -> None:
    if (hook, epoch, batch) == (self.hook, self.epoch, self.batch):
      raise KeyboardInterrupt

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch
    self._kill("epoch_begin", epoch)

  def on_epoch_end(self, epoch, logs=None):
    self._kill("epoch_end", epoch)

  def on_train_batch_end(self, batch, logs=None):
    self._kill("batch", self.current, batch)

  def on_train_end(self, logs=None):
    self._kill("train_end")


def killed_in(stage: str, kill: Kill):
  """Patches the stages' callbacks so that `kill` runs in `stage`."""
  original = train.stage_callbacks

  def with_kill(run_dir, name, config_, validate):
    callbacks = original(run_dir, name, config_, validate)
    return callbacks + [kill] if name == stage else callbacks

  return mock.patch.object(train, "stage_callbacks", with_kill)


def results(workdir: str) -> dict:
  """What a run computed: its report (times and the model file's digest, which
  holds the save time, left out), its history and its model's weights."""
  report = artifacts.read_json(os.path.join(workdir, artifacts.REPORT))
  model = keras.models.load_model(os.path.join(workdir, artifacts.MODEL))
  return {
      "report": {k: v for k, v in report.items()
                 if not k.endswith("_seconds") and k != "model_sha256"},
      "history": artifacts.read_json(os.path.join(workdir, artifacts.HISTORY)),
      "weights": model.get_weights(),
  }


def csv_rows(workdir: str, stage: str) -> int:
  path = os.path.join(workdir, artifacts.stage_history(stage))
  with open(path) as f:
    return len(f.readlines()) - 1


@pytest.mark.slow
class KillAndResumeTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(fake_data.mock_flowers(COUNTS))
    from flowers import data  # pylint: disable=g-import-not-at-top
    cls.source = data.load_tfds()
    cls.left_alone = {}

  def run_left_alone(self, feature_cache: str) -> dict:
    """The uninterrupted run's results (once per input path)."""
    if feature_cache not in self.left_alone:
      workdir = self.create_tempdir().full_path
      train.train_and_evaluate(config(feature_cache), workdir, self.source)
      self.left_alone[feature_cache] = results(workdir)
    return self.left_alone[feature_cache]

  def assertSameRun(self, got: dict, want: dict) -> None:
    self.assertEqual(got["report"], want["report"])
    self.assertEqual(got["history"], want["history"])
    self.assertLen(got["weights"], len(want["weights"]))
    for a, b in zip(got["weights"], want["weights"]):
      np.testing.assert_array_equal(a, b)

  @parameterized.named_parameters(("cached", "on"), ("plain", "off"))
  def test_a_run_killed_anywhere_ends_as_the_run_left_alone(self, feature_cache):
    want = self.run_left_alone(feature_cache)
    fine_tune = want["history"]["fine_tune"]["val_accuracy"]
    # Early stopping ended stage 2 at its third epoch, the best being an earlier
    # one: a kill before epoch 3 lands between the best epoch and the stop.
    self.assertLen(fine_tune, 3)
    self.assertLess(int(np.argmax(fine_tune)), 2)

    workdir = self.create_tempdir().full_path
    run_config = config(feature_cache)
    kills = [
        ("frozen", Kill("batch", epoch=1, batch=1)),  # Inside an epoch.
        ("fine_tune", Kill("epoch_end", epoch=0)),  # Its CSV row written, its state not saved.
        ("fine_tune", Kill("epoch_begin", epoch=2)),  # Early stopping has waited 1 epoch of 2.
        ("fine_tune", Kill("train_end")),  # Stopped; its final weights not yet kept.
    ]
    for stage, kill in kills:
      with killed_in(stage, kill), self.assertRaises(KeyboardInterrupt):
        train.train_and_evaluate(run_config, workdir, self.source)
    self.assertFalse(os.path.exists(os.path.join(workdir, artifacts.MODEL)))
    # Killed after stage 2 finished, before the model is saved.
    save_run = train.save_run
    with mock.patch.object(train, "save_run", side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        train.train_and_evaluate(run_config, workdir, self.source)
    rows = csv_rows(workdir, "fine_tune")
    with mock.patch.object(train, "save_run", side_effect=save_run) as saving:
      train.train_and_evaluate(run_config, workdir, self.source)
    saving.assert_called_once()
    self.assertEqual(csv_rows(workdir, "fine_tune"), rows)  # Stage 2 not trained again.
    self.assertSameRun(results(workdir), want)

  def test_a_finished_run_is_not_trained_again(self):
    workdir = self.create_tempdir().full_path
    run_config = config("on", epochs=1, fine_tune_epochs=1, early_stopping_patience=0)

    def model_and_inputs():
      model = train.new_model(run_config, len(self.source.class_names))
      splits = train.load_splits_seeded(run_config, self.source, workdir)
      return model, inputs.make_inputs(model, splits, run_config, workdir,
                                      run_config.train.unfreeze_ratio)

    trained, stage_inputs = model_and_inputs()
    train.fit_stages(trained, stage_inputs, run_config.train, workdir,
                     seed=run_config.train.seed)
    again, stage_inputs = model_and_inputs()
    with mock.patch.object(keras.Model, "fit") as fit:
      train.fit_stages(again, stage_inputs, run_config.train, workdir,
                       seed=run_config.train.seed)
    fit.assert_not_called()  # Both stages' final weights are loaded instead.
    for a, b in zip(again.get_weights(), trained.get_weights()):
      np.testing.assert_array_equal(a, b)

  def test_overwrite_trains_both_stages_again(self):
    """A finished stage 2's weights never outlive the run that made them."""
    workdir = self.create_tempdir().full_path
    run_config = config("on", epochs=1, fine_tune_epochs=1, early_stopping_patience=0)
    train.train_and_evaluate(run_config, workdir, self.source)
    changed = run_configs.with_train(run_config, dropout=0.4)
    with mock.patch.object(train, "_fit", wraps=train._fit) as fit:
      train.train_and_evaluate(dataclasses.replace(changed, overwrite=True), workdir,
                               self.source)
    self.assertEqual([c.args[4] for c in fit.call_args_list], ["frozen", "fine_tune"])

  def test_no_val_split_trains_on_the_feature_cache(self):
    workdir = self.create_tempdir().full_path
    report = train.train_and_evaluate(
        config("on", data={"split": "80,0,20"}), workdir, self.source)
    self.assertNotIn("val_accuracy", report)
    self.assertIn("test_accuracy", report)
    history = artifacts.read_json(os.path.join(workdir, artifacts.HISTORY))
    # No val: no early stopping, every epoch runs.
    self.assertLen(history["fine_tune"]["accuracy"], FINE_TUNE_EPOCHS)
    self.assertNotIn("val_accuracy", history["fine_tune"])


@pytest.mark.slow
class WeightAverageResumeTest(absltest.TestCase):
  """Its own class, so that pytest-xdist can run it beside `KillAndResumeTest`."""

  def test_a_run_with_a_weight_average_killed_in_stage_2_ends_as_the_run_left_alone(self):
    run_config = config("on", fine_tune_ema_momentum=0.5)
    with fake_data.mock_flowers(COUNTS):
      from flowers import data  # pylint: disable=g-import-not-at-top
      source = data.load_tfds()
      left_alone = self.create_tempdir().full_path
      train.train_and_evaluate(run_config, left_alone, source)
      want = results(left_alone)
      workdir = self.create_tempdir().full_path
      kills = [
          Kill("batch", epoch=1, batch=0),  # Mid-epoch: the trained weights in the model.
          Kill("epoch_begin", epoch=2),  # Swapped back to the trained weights, then killed.
          Kill("train_end"),  # Stopped; the average in the model, not yet kept.
      ]
      for kill in kills:
        with killed_in("fine_tune", kill), self.assertRaises(KeyboardInterrupt):
          train.train_and_evaluate(run_config, workdir, source)
      train.train_and_evaluate(run_config, workdir, source)
    got = results(workdir)
    self.assertEqual(got["history"], want["history"])
    self.assertEqual(got["report"], want["report"])
    for a, b in zip(got["weights"], want["weights"], strict=True):
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
class PrefixCacheKeyTest(parameterized.TestCase):
  """The cache is reused only when everything that made its bytes is the same."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(fake_data.mock_flowers(COUNTS))
    from flowers import data  # pylint: disable=g-import-not-at-top
    cls.data = data
    cls.source = data.load_tfds()
    cls.config = config("on")

  def cache_files(self, workdir: str) -> dict[str, float]:
    """The frozen-prefix cache's files: name -> modification time."""
    folder = os.path.join(workdir, artifacts.CACHE_DIR)
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns
            for n in os.listdir(folder) if n.startswith("prefix_")}

  def make_inputs(self, workdir: str):
    model = train.new_model(self.config, len(self.source.class_names))
    splits = train.load_splits_seeded(self.config, self.source, workdir)
    return inputs.make_inputs(model, splits, self.config, workdir,
                             self.config.train.unfreeze_ratio)

  @parameterized.named_parameters(
      ("preprocessing", "PREPROCESSING", "squashed another way"),
      ("versions", "versions", lambda: {"flowers": "0", "tensorflow": "1.0"}),
  )
  def test_a_changed_key_part_rebuilds_the_cache_and_drops_the_old_one(self, name, value):
    workdir = self.create_tempdir().full_path
    self.make_inputs(workdir)
    built = self.cache_files(workdir)
    ids = {n.split("_")[1].split(".")[0] for n in built}
    self.assertLen(ids, 1)
    self.make_inputs(workdir)  # Nothing changed: reused, not rewritten.
    self.assertEqual(self.cache_files(workdir), built)

    owner = self.data if name == "PREPROCESSING" else runs
    with mock.patch.object(owner, name, value):
      self.make_inputs(workdir)
    rebuilt = self.cache_files(workdir)
    new_ids = {n.split("_")[1].split(".")[0] for n in rebuilt}
    self.assertLen(new_ids, 1)
    self.assertNotEqual(new_ids, ids)  # A new cache, and the old one's files gone.
    self.assertLen(rebuilt, len(built))
    # What made it is recorded beside it.
    (new_id,) = new_ids
    recorded = artifacts.read_json(os.path.join(workdir, artifacts.CACHE_DIR,
                                                f"prefix_{new_id}.json"))
    with mock.patch.object(owner, name, value):
      self.assertEqual(recorded["key"]["recipe"], runs.recipe())
      self.assertEqual(recorded["key"]["versions"], runs.versions())


if __name__ == "__main__":
  absltest.main()
