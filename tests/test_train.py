"""Two-stage training end to end on tiny mock data; resume; evaluate; predict."""

import dataclasses
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import pytest
import tensorflow as tf

import fake_data
import run_configs
import shared_data
from flowers import artifacts
from flowers import config as config_lib
from flowers import model as model_lib
from flowers import modes
from flowers import train
from flowers.errors import UserError

COUNTS = fake_data.uniform_counts(4, train=8, val=3, test=4)
tiny_config = run_configs.tiny


class Interrupt(keras.callbacks.Callback):
  """Stops a run like a kill would, after a given epoch of a given stage."""

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.epoch:
      raise KeyboardInterrupt


@pytest.mark.slow
class TrainTest(parameterized.TestCase):

  @parameterized.named_parameters(("cached", "on"), ("plain", "off"))
  def test_train_writes_every_artifact(self, feature_cache):
    workdir = self.create_tempdir().full_path
    with fake_data.mock_flowers(COUNTS):
      from flowers import data  # pylint: disable=g-import-not-at-top
      source = data.load_tfds()
      report = train.train_and_evaluate(
          tiny_config(feature_cache=feature_cache), workdir, source)
    for name in ("model.keras", "labels.txt", "history.json", "report.json", "splits.csv"):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    self.assertEqual(report["feature_cache"], feature_cache == "on")
    self.assertEqual(report["config"]["train"]["feature_cache"], feature_cache)
    for key in ("test_accuracy", "test_top5_accuracy", "num_test_examples",
                "per_class_accuracy", "confusion_matrix", "test_macro_f1"):
      self.assertIn(key, report)
    self.assertEqual(report["num_test_examples"], len(
        [1 for line in open(os.path.join(workdir, "splits.csv")) if line.endswith(",test\n")]))
    with open(os.path.join(workdir, "history.json")) as f:
      history = json.load(f)
    self.assertLen(history["frozen"]["accuracy"], 2)
    self.assertLen(history["fine_tune"]["val_accuracy"], 2)
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    self.assertEqual(tuple(model.output.shape), (None, 102))
    # Conv kernels already on the int8 export's grid.
    self.assertEqual(model_lib.round_kernels_to_int8_grid(model), 0)
    # No temporary files left behind.
    self.assertEmpty([f for f in os.listdir(workdir) if f.startswith(".tmp")])

  @pytest.mark.real_data
  def test_cached_training_learns(self):
    workdir = self.create_tempdir().full_path
    with fake_data.mock_flowers(fake_data.uniform_counts(3, 10, 3, 5), size=64):
      from flowers import data  # pylint: disable=g-import-not-at-top
      report = train.train_and_evaluate(
          tiny_config(data={"image_size": 64}, epochs=8, fine_tune_epochs=1,
                      learning_rate=1e-2, fine_tune_learning_rate=1e-5,
                      weights=shared_data.WEIGHTS),
          workdir, data.load_tfds())
    # Colour-coded classes: ImageNet features + a trained head beat chance (1/3).
    history = train.read_history(workdir, "frozen")
    self.assertGreater(max(history["val_accuracy"]), 0.6, history)
    self.assertGreater(report["val_accuracy"], 0.6)

  def test_resume_after_interruption(self):
    workdir = self.create_tempdir().full_path
    original = train.stage_callbacks

    def interrupting(run_dir, stage, config, validate):
      callbacks = original(run_dir, stage, config, validate)
      return callbacks + [Interrupt(1)] if stage == "fine_tune" else callbacks

    config = tiny_config(fine_tune_epochs=4)
    with fake_data.mock_flowers(COUNTS):
      from flowers import data  # pylint: disable=g-import-not-at-top
      source = data.load_tfds()
      with mock.patch.object(train, "stage_callbacks", interrupting):
        with self.assertRaises(KeyboardInterrupt):
          train.train_and_evaluate(config, workdir, source)
      self.assertTrue(os.path.exists(os.path.join(workdir, artifacts.FROZEN_WEIGHTS)))
      self.assertFalse(os.path.exists(os.path.join(workdir, "model.keras")))
      self.assertLen(train.read_history(workdir, "fine_tune")["accuracy"], 2)
      frozen_rows = len(train.read_history(workdir, "frozen")["accuracy"])
      report = train.train_and_evaluate(config, workdir, source)
    history = train.read_history(workdir, "fine_tune")
    # Epochs 0-1 from the first run, 2-3 from the resumed one; stage 1 not redone.
    self.assertLen(history["accuracy"], 4)
    self.assertLen(train.read_history(workdir, "frozen")["accuracy"], frozen_rows)
    self.assertIn("test_accuracy", report)
    with open(os.path.join(workdir, "history_fine_tune.csv")) as f:
      epochs = [int(line.split(",")[0]) for line in f.readlines()[1:]]
    self.assertEqual(sorted(set(epochs)), [0, 1, 2, 3])


class SmallHolesTest(parameterized.TestCase):

  def test_a_torn_last_history_row_is_skipped(self):
    run_dir = self.create_tempdir().full_path
    with open(os.path.join(run_dir, artifacts.stage_history("fine_tune")), "w") as f:
      f.write("epoch,accuracy,loss\n0,0.5,1.2\n1,0.6,1.0\n2,0.7")  # Killed mid-row.
    self.assertEqual(train.read_history(run_dir, "fine_tune"),
                     {"accuracy": [0.5, 0.6], "loss": [1.2, 1.0]})

  @parameterized.parameters("on", "off")
  @pytest.mark.slow
  def test_corrupt_images_in_tfds_records_are_counted_per_split(self, feature_cache):
    corrupt = [f"image_{i:05d}.jpg" for i in (1, 9, 17, 33, 41, 45)]
    workdir = self.create_tempdir().full_path
    with fake_data.mock_flowers(COUNTS, corrupt=corrupt):
      from flowers import data  # pylint: disable=g-import-not-at-top
      config = tiny_config(epochs=1, fine_tune_epochs=1, feature_cache=feature_cache)
      report = train.train_and_evaluate(config, workdir, data.load_tfds())
      from flowers import split as split_lib  # pylint: disable=g-import-not-at-top
      assignment, _ = split_lib.read_manifest(os.path.join(workdir, artifacts.SPLITS))
      expected = {s: sum(assignment[k] == s for k in corrupt) for s in split_lib.SPLITS}
      self.assertEqual(report["num_skipped_images"], expected)
      self.assertEqual(report["num_test_examples"],
                       len(split_lib.keys_of(assignment, "test")) - expected["test"])
      strict = dataclasses.replace(config, data=dataclasses.replace(config.data, strict=True))
      # --strict checks every image before training and names the bad ones.
      with self.assertRaisesRegex(UserError, "could not be decoded: image_00001.jpg, "
                                  "image_00009.jpg, image_00017.jpg and 3 more.*--strict"):
        train.train_and_evaluate(dataclasses.replace(strict, overwrite=True), workdir,
                                 data.load_tfds())

  def test_a_split_without_test_images_is_refused_before_training(self):
    with fake_data.mock_flowers(COUNTS):
      from flowers import data  # pylint: disable=g-import-not-at-top
      with self.assertRaisesRegex(UserError, "--split=80,20,0 leaves no test images"):
        train.train_and_evaluate(tiny_config(data={"split": "80,20,0"}),
                                 self.create_tempdir().full_path, data.load_tfds())

  def test_predict_with_no_readable_image_is_an_error(self):
    folder = self.create_tempdir().full_path
    for name in ("a.jpg", "b.png"):
      with open(os.path.join(folder, name), "wb") as f:
        f.write(b"not an image")
    model_path = os.path.join(folder, "model.keras")
    model_lib.build_model(3, image_size=32, weights=None).save(model_path)
    artifacts.write_labels(artifacts.labels_beside(model_path), ["a", "b", "c"])
    config = config_lib.RunConfig(predict=config_lib.PredictConfig(
        model=model_path, images=[folder]))
    # The folder's four files (the model and its labels too) are read; none is an image.
    with self.assertRaisesRegex(UserError, "None of the 4 file"):
      modes.predict(config, folder)

  def test_a_corrupt_tflite_is_a_user_error(self):
    path = os.path.join(self.create_tempdir().full_path, "model_int8.tflite")
    with open(path, "wb") as f:
      f.write(b"\0" * 64)
    from flowers import evaluate  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(UserError, "not a TFLite model LiteRT can load"):
      evaluate.load_predictor(path)


@pytest.mark.slow
class RunIdentityTest(parameterized.TestCase):
  """A rerun in a workdir must be the same run; else it is refused in one line."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(fake_data.mock_flowers(COUNTS))
    from flowers import data  # pylint: disable=g-import-not-at-top
    cls.source = data.load_tfds()
    cls.config = tiny_config(epochs=1, fine_tune_epochs=0, feature_cache="off")
    cls.trained = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.trained, ignore_errors=True)
    train.train_and_evaluate(cls.config, cls.trained, cls.source)

  def trained_workdir(self):
    """A copy of a finished run's workdir (training once for the whole class)."""
    workdir = os.path.join(self.create_tempdir().full_path, "run")
    shutil.copytree(self.trained, workdir)
    return workdir

  @parameterized.named_parameters(
      ("dropout", {"dropout": 0.4}, "train.dropout: 0.2 -> 0.4"),
      ("learning_rate", {"learning_rate": 0.05}, "train.learning_rate: 0.01 -> 0.05"),
      ("alpha", {"alpha": 0.5}, "train.alpha: 1.0 -> 0.5"),
      ("feature_cache", {"feature_cache": "on"}, "train.feature_cache: off -> on"),
      ("schedule", {"lr_schedule": "cosine"}, "train.lr_schedule: constant -> cosine"),
      ("calibrate", {"calibrate": False}, "train.calibrate: True -> False"),
      ("image_size", {"data": {"image_size": 48}}, "data.image_size: 32 -> 48"),
  )
  def test_a_rerun_with_other_settings_is_refused(self, change, names):
    workdir = self.trained_workdir()
    with open(os.path.join(workdir, artifacts.FLAGS)) as f:
      flagfile = f.read()
    data_change = change.pop("data", {})
    changed = dataclasses.replace(
        run_configs.with_train(self.config, **change),
        data=dataclasses.replace(self.config.data, **data_change))
    with self.assertRaisesRegex(UserError, "other settings") as error:
      train.train_and_evaluate(changed, workdir, self.source)
    message = str(error.exception)
    self.assertIn(names, message)
    self.assertIn("--overwrite", message)
    self.assertNotIn("\n", message)
    with open(os.path.join(workdir, artifacts.FLAGS)) as f:
      self.assertEqual(f.read(), flagfile)  # Still the run that is there.

  def test_a_run_made_with_other_preprocessing_is_refused(self):
    """A workdir whose images were decoded or resized another way (an older
    flowers, say) is not resumed on the new pixels."""
    workdir = self.trained_workdir()
    from flowers import data  # pylint: disable=g-import-not-at-top
    with mock.patch.object(data, "PREPROCESSING", "antialiased resize"):
      with self.assertRaisesRegex(UserError, "preprocessing: .*-> antialiased resize"):
        train.train_and_evaluate(self.config, workdir, self.source)

  def test_overwrite_starts_afresh_and_the_new_run_then_resumes(self):
    workdir = self.trained_workdir()
    changed = run_configs.with_train(self.config, dropout=0.4)
    report = train.train_and_evaluate(dataclasses.replace(changed, overwrite=True),
                                      workdir, self.source)
    self.assertEqual(report["config"]["train"]["dropout"], 0.4)
    train.train_and_evaluate(changed, workdir, self.source)  # Now the run that is there.

  def test_other_weights_or_a_gpu_resolving_auto_are_refused(self):
    workdir = self.trained_workdir()
    weights = os.path.join(self.create_tempdir().full_path, "w.h5")
    with open(weights, "wb") as f:
      f.write(b"other weights")
    with self.assertRaisesRegex(UserError, "train.weights: random -> sha256:"):
      train.train_and_evaluate(run_configs.with_train(self.config, weights=weights),
                               workdir, self.source)
    auto = run_configs.with_train(self.config, feature_cache="auto")
    overwritten = self.create_tempdir().full_path
    train.train_and_evaluate(auto, overwritten, self.source)  # No GPU: auto is on.
    with mock.patch.object(tf.config, "list_physical_devices", return_value=["GPU"]):
      with self.assertRaisesRegex(UserError, "train.feature_cache: on -> off"):
        train.train_and_evaluate(auto, overwritten, self.source)

  def test_another_seed_is_another_split(self):
    workdir = self.trained_workdir()
    with self.assertRaisesRegex(UserError, "another --split, --split_seed"):
      train.train_and_evaluate(dataclasses.replace(
          self.config, data=dataclasses.replace(self.config.data, split_seed=7)),
          workdir, self.source)


@pytest.mark.slow
class EvaluatePredictTest(absltest.TestCase):

  def test_evaluate_and_predict_from_a_trained_workdir(self):
    workdir = self.create_tempdir().full_path
    with fake_data.mock_flowers(COUNTS) as examples:
      from flowers import data  # pylint: disable=g-import-not-at-top
      source = data.load_tfds()
      config = tiny_config()
      trained = train.train_and_evaluate(config, workdir, source)
      evaluated = modes.evaluate(config, workdir)
    self.assertAlmostEqual(evaluated["test_accuracy"], trained["test_accuracy"], places=6)
    # Its own report; the training one (val metrics, times) stays as it was.
    self.assertTrue(os.path.exists(os.path.join(workdir, "evaluation_model.json")))
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f)["val_accuracy"], trained["val_accuracy"])

    image_dir = self.create_tempdir().full_path
    for i, (name, _, jpeg) in enumerate(examples["test"][:3]):
      with open(os.path.join(image_dir, f"{i}_{name}"), "wb") as f:
        f.write(jpeg)
    with open(os.path.join(image_dir, "not_an_image.jpg"), "wb") as f:
      f.write(b"nope")
    config = dataclasses.replace(config, predict=config_lib.PredictConfig(
        images=[image_dir], top_k=3, output="json"))
    results = modes.predict(config, workdir)
    self.assertLen(results, 3)
    for r in results:
      self.assertLen(r["top_k"], 3)
      probs = [e["probability"] for e in r["top_k"]]
      self.assertEqual(probs, sorted(probs, reverse=True))

  def test_a_model_from_another_workdir_is_scored_on_its_own_test_split(self):
    trained_in = self.create_tempdir().full_path
    elsewhere = self.create_tempdir().full_path
    with fake_data.mock_flowers(COUNTS):
      from flowers import data  # pylint: disable=g-import-not-at-top
      config = tiny_config(epochs=1, fine_tune_epochs=0)
      trained = train.train_and_evaluate(config, trained_in, data.load_tfds())
      # Asked with another seed, whose split would put the model's own training
      # images in the test split: the model's split is used instead.
      other = dataclasses.replace(
          config, data=dataclasses.replace(config.data, split_seed=7),
          predict=config_lib.PredictConfig(model=os.path.join(trained_in, artifacts.MODEL)))
      evaluated = modes.evaluate(other, elsewhere)
      with open(os.path.join(trained_in, artifacts.SPLITS)) as a, open(
          os.path.join(elsewhere, artifacts.SPLITS)) as b:
        self.assertEqual(a.read(), b.read())
      self.assertEqual(evaluated["confusion_matrix"], trained["confusion_matrix"])
      # A workdir that holds another split is refused.
      modes.prepare(dataclasses.replace(other, predict=config_lib.PredictConfig()),
                    another := self.create_tempdir().full_path)
      with self.assertRaisesRegex(UserError, "another split than the one"):
        modes.evaluate(other, another)

  def test_predict_missing_inputs(self):
    config = config_lib.RunConfig(predict=config_lib.PredictConfig(
        model="/no/model.keras", images=["x.jpg"]))
    with self.assertRaisesRegex(UserError, "does not exist"):
      modes.predict(config, "/no/workdir")


if __name__ == "__main__":
  absltest.main()
