"""TFLite export on tiny mock data: interface, labels, report, drop check, fidelity.

`ExportTest` uses a MobileNetV2 with random weights (weights=None, 32 px): its
features vanish, so its accuracy means nothing and only the mechanics are
tested. `FidelityTest` uses the ImageNet weights from ../shared (skipped where
absent) on 64 px images, where the int8 model can be held to the float one.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import pytest

import fake_data
import run_configs
import shared_data
from flowers import artifacts
from flowers import calibrate
from flowers import data
from flowers import evaluate
from flowers import export
from flowers import lineage
from flowers import inputs
from flowers import model as model_lib
from flowers import modes
from flowers import runs
from flowers import schemas
from flowers import tflite_metadata
from flowers import train
from flowers.config import DataConfig
from flowers.config import ExportConfig
from flowers.config import PredictConfig
from flowers.config import RunConfig
from flowers.errors import UserError

COUNTS = fake_data.uniform_counts(4, train=10, val=3, test=5)
SPLIT = "64,16,20"
SEED = 42
# The random-weight model's accuracy is meaningless; only the drop test trips.
ANY_DROP = 100.0
REPORT_KEYS = (
    "float_test_accuracy", "tflite_test_accuracy", "int8_test_accuracy", "top1_agreement",
    "tflite_val_accuracy", "int8_val_accuracy",
    "size_bytes", "quantization", "io_dtype", "input_dtype", "input_shape", "output_dtype",
    "output_shape", "num_test_examples", "accuracy_drop_points", "path", "passed",
    "float_test_nll", "tflite_test_nll", "float_test_ece", "tflite_test_ece")


def interface(path):
  """(input details, output details) of a .tflite file, through LiteRT."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

  interpreter = Interpreter(model_path=path)
  interpreter.allocate_tensors()
  return interpreter.get_input_details()[0], interpreter.get_output_details()[0]


def losing(points):
  """`export.compare`, but the .tflite loses `points` of test accuracy."""
  compare = export.compare

  def compare_with_drop(*args):
    return {**compare(*args), "accuracy_drop_points": points}

  return compare_with_drop


def split_arrays(splits):
  """The test split as (uint8 images, labels) arrays."""
  batches = list(splits.test.as_numpy_iterator())
  return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


class WorkdirTestCase(parameterized.TestCase):
  """A workdir with splits.csv, labels.txt and model.keras, made once per class."""

  image_size = 32
  weights = None

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The same pipeline order and weights whatever ran before in this process (tf.data
    # combines its op seeds with TensorFlow's global one).
    keras.utils.set_random_seed(SEED)
    cls.enterClassContext(fake_data.mock_flowers(COUNTS))
    cls.root = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    cls.workdir = os.path.join(cls.root, "workdir")
    cls.source = data.load_tfds()
    cls.splits = data.load_splits(
        DataConfig(split=SPLIT, split_seed=SEED, image_size=cls.image_size, batch_size=8),
        source=cls.source, workdir=cls.workdir, shuffle_seed=SEED)
    cls.model = model_lib.build_model(len(cls.splits.class_names),
                                      image_size=cls.image_size, weights=cls.weights,
                                      seed=SEED)
    cls.prepare_model()
    cls.model_path = os.path.join(cls.workdir, artifacts.MODEL)
    train.save_model(cls.model, cls.model_path)
    artifacts.write_labels(os.path.join(cls.workdir, artifacts.LABELS), cls.splits.class_names)

  @classmethod
  def prepare_model(cls):
    """Trains the model, where a subclass needs it to have learnt something."""

  def copy_workdir(self, labels: bool = True) -> str:
    """A fresh workdir with the same model, split and (optionally) labels."""
    workdir = self.create_tempdir().full_path
    names = ["model.keras", "splits.csv"] + (["labels.txt"] if labels else [])
    for name in names:
      shutil.copy(os.path.join(self.workdir, name), workdir)
    return workdir

  @classmethod
  def run_export(cls, workdir=None, model_path=None, **options):
    workdir = workdir or cls.workdir
    config = RunConfig(data=DataConfig(split=SPLIT, split_seed=SEED),
                       export=ExportConfig(**options))
    return export.export_from_workdir(
        config, workdir, model_path or os.path.join(workdir, artifacts.MODEL), cls.source)

  def export(self, workdir=None, **options):
    return self.run_export(workdir, **options)


class ExportTest(WorkdirTestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.report = cls.run_export(max_accuracy_drop=ANY_DROP)
    cls.int8_path = os.path.join(cls.workdir, "model_int8.tflite")

  def test_int8_takes_raw_uint8_pixels_and_gives_uint8(self):
    inp, out = interface(self.int8_path)
    self.assertEqual(inp["dtype"], np.uint8)
    self.assertEqual(list(inp["shape"]), [1, 32, 32, 3])
    # Not quantized at all: the pixels go in as they are and are cast inside.
    self.assertIn(tuple(inp["quantization"]), [(0.0, 0), (1.0, 0)])
    self.assertEqual(out["dtype"], np.uint8)
    self.assertEqual(list(out["shape"]), [1, len(self.splits.class_names)])
    self.assertGreater(out["quantization"][0], 0)

  def test_report_has_every_key_and_matches_the_file(self):
    with open(os.path.join(self.workdir, artifacts.EXPORT_REPORT)) as f:
      report = json.load(f)
    for key in REPORT_KEYS:
      self.assertIn(key, report)
    self.assertTrue(report["passed"])
    self.assertEqual(report["path"], self.int8_path)
    self.assertEqual(report["size_bytes"], os.path.getsize(self.int8_path))
    self.assertEqual((report["quantization"], report["io_dtype"]), ("int8", "uint8"))
    self.assertEqual(report["input_shape"], [1, 32, 32, 3])
    self.assertEqual(report["int8_test_accuracy"], report["tflite_test_accuracy"])
    self.assertEqual(report["int8_val_accuracy"], report["tflite_val_accuracy"])
    self.assertBetween(report["int8_val_accuracy"], 0.0, 1.0)
    self.assertAlmostEqual(report["accuracy_drop_points"], 100 * (
        report["float_test_accuracy"] - report["tflite_test_accuracy"]), places=3)
    self.assertEqual(report["num_test_examples"], len(self.splits.keys("test")))
    self.assertEqual(report["calibration_examples"], len(self.splits.keys("train")))
    self.assertEqual(report, json.loads(json.dumps(self.report)))

  def test_report_has_nll_and_ece_of_both_models_on_test(self):
    images, labels = split_arrays(self.splits)
    keras_probs = self.model.predict(images, verbose=0)
    tflite = evaluate.tflite_predictor(self.int8_path)
    tflite_probs = np.concatenate([tflite(images[i:i + 1]) for i in range(len(images))])
    for model, probs in (("float", keras_probs), ("tflite", tflite_probs)):
      self.assertAlmostEqual(self.report[f"{model}_test_nll"],
                             calibrate.nll(probs, labels), places=4, msg=model)
      self.assertAlmostEqual(self.report[f"{model}_test_ece"],
                             calibrate.expected_calibration_error(probs, labels), places=4,
                             msg=model)

  def test_labels_beside_the_tflite_are_in_class_index_order(self):
    labels = artifacts.read_labels(os.path.join(self.workdir, artifacts.LABELS))
    self.assertEqual(labels, self.source.class_names)

  def test_int8_io_dtype_gives_int8_input_and_output(self):
    options = ExportConfig(io_dtype="int8")
    path = os.path.join(self.create_tempdir().full_path, "model.tflite")
    calibration = data.calibration_images(self.splits, 300, SEED, self.image_size)
    with open(path, "wb") as f:
      f.write(export.convert(self.model, options, calibration))
    details = export.check_interface(path, 32, len(self.splits.class_names), options)
    self.assertEqual((details["input_dtype"], details["output_dtype"]), ("int8", "int8"))
    self.assertGreater(details["input_quantization"][0], 0)

  def test_accuracy_drop_over_the_limit_writes_no_model(self):
    workdir = self.copy_workdir()
    compare = export.compare

    def five_points_lost(*args):
      return {**compare(*args), "accuracy_drop_points": 5.0}

    old = os.path.join(workdir, "model_dynamic.tflite")
    with open(old, "wb") as f:
      f.write(b"an earlier export")
    with mock.patch.object(export, "compare", five_points_lost):
      with self.assertRaisesRegex(UserError, "max_accuracy_drop=1; not written, and the older"):
        self.export(workdir, quantization="dynamic", max_accuracy_drop=1.0)
    self.assertFalse(os.path.exists(old))
    self.assertEqual([n for n in os.listdir(workdir) if n.startswith(".tmp")], [])
    with open(os.path.join(workdir, artifacts.EXPORT_REPORT)) as f:
      report = json.load(f)
    self.assertFalse(report["passed"])
    self.assertEqual(report["quantization"], "dynamic")

  def test_accuracy_drop_equal_to_the_limit_is_written(self):
    workdir = self.copy_workdir()
    with mock.patch.object(export, "compare", losing(1.0)):
      report = self.export(workdir, quantization="dynamic", max_accuracy_drop=1.0)
    self.assertTrue(report["passed"])
    self.assertTrue(os.path.exists(os.path.join(workdir, "model_dynamic.tflite")))

  def test_a_refused_export_writes_and_records_only_its_report(self):
    workdir = self.copy_workdir(labels=False)
    with mock.patch.object(export, "compare", losing(1.5)):
      with self.assertRaisesRegex(UserError, r"max_accuracy_drop=1; not written \(see "):
        self.export(workdir, quantization="dynamic", max_accuracy_drop=1.0)
    self.assertEqual(sorted(os.listdir(workdir)), [
        artifacts.EXPORT_REPORT, artifacts.LINEAGE, artifacts.MODEL, artifacts.SPLITS])
    self.assertEqual(lineage.recorded(workdir), [artifacts.EXPORT_REPORT])

  def test_float16_export_is_loadable_and_writes_missing_labels(self):
    workdir = self.copy_workdir(labels=False)
    report = self.export(workdir, quantization="float16", max_accuracy_drop=ANY_DROP)
    path = os.path.join(workdir, "model_float16.tflite")
    inp, out = interface(path)
    self.assertEqual((inp["dtype"], out["dtype"]), (np.uint8, np.float32))
    self.assertEqual(report["io_dtype"], "float32")
    self.assertNotIn("int8_test_accuracy", report)
    self.assertLess(report["max_abs_probability_diff"], 1e-3)
    self.assertEqual(artifacts.read_labels(os.path.join(workdir, artifacts.LABELS)),
                     self.source.class_names)

  def test_dynamic_conversion_is_loadable(self):
    options = ExportConfig(quantization="dynamic")
    path = os.path.join(self.create_tempdir().full_path, "model_dynamic.tflite")
    with open(path, "wb") as f:
      f.write(export.convert(self.model, options))
    details = export.check_interface(path, 32, len(self.splits.class_names), options)
    self.assertEqual((details["input_dtype"], details["output_dtype"]), ("uint8", "float32"))

  @parameterized.named_parameters(
      ("missing", "nowhere/model.keras", "does not exist"),
      ("not_keras", "model_int8.tflite", "export converts a .keras model"),
      ("corrupt", "corrupt.keras", "could not be loaded"))
  def test_bad_model_path_is_a_user_error(self, name, message):
    path = os.path.join(self.workdir, name)
    if name == "corrupt.keras":
      with open(path, "wb") as f:
        f.write(b"not a zip file")
    with self.assertRaisesRegex(UserError, message):
      self.run_export(model_path=path)

  @parameterized.named_parameters(
      ("quantization", {"quantization": "int4"}, "--quantization=int4 is not one of"),
      ("io_dtype", {"io_dtype": "float32"}, "--io_dtype=float32 is not one of"),
      ("calibration", {"calibration_examples": 0}, "--calibration_examples=0"))
  def test_bad_options_are_user_errors(self, options, message):
    with self.assertRaisesRegex(UserError, message):
      ExportConfig(**options)

  def test_int8_needs_representative_images(self):
    with self.assertRaisesRegex(UserError, "representative images"):
      export.convert(self.model, ExportConfig(), [])


THRESHOLD_COUNTS = fake_data.uniform_counts(4, train=6, val=10, test=6)
IO_DTYPES = (("uint8_io", "uint8"), ("int8_io", "int8"))


class UnknownThresholdTest(parameterized.TestCase):
  """A run whose float val scores saturate at 1, exported to int8 (uint8 and int8 I/O).

  A nearest-colour model sure of every mock image (as a temperature fitted to its
  floor makes a model that gets val all right) puts its known images' top scores
  at 1 in float, its run's threshold with them, and at 255/256, the most an int8
  output can say, in int8: the run's threshold would call every photo unknown.
  """

  @classmethod
  def setUpClass(cls):
    # test_tflite_metadata imports this module: its model is imported once both are loaded.
    from test_tflite_metadata import colour_model  # pylint: disable=g-import-not-at-top

    super().setUpClass()
    keras.utils.set_random_seed(SEED)
    cls.enterClassContext(fake_data.mock_flowers(THRESHOLD_COUNTS))
    cls.root = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    run_dir = os.path.join(cls.root, "run")
    cls.config = run_configs.tiny(calibrate=False, int8_grid_weights=False)
    cls.source = data.load_tfds()
    cls.splits = train.load_splits_seeded(cls.config, cls.source, run_dir)
    runs.begin(cls.config, run_dir, "train", cls.source, feature_cache=False)
    cls.model = colour_model(4, 32, num_outputs=len(cls.splits.class_names),
                             temperature=0.002)
    cls.run_report = train.save_run(cls.model, cls.splits, cls.config, run_dir, run_dir,
                                    train_seconds=0.0)
    cls.workdirs, cls.reports, cls.messages = {}, {}, {}
    for _, io_dtype in IO_DTYPES:
      workdir = os.path.join(cls.root, io_dtype)
      shutil.copytree(run_dir, workdir)
      config = RunConfig(data=cls.config.data, export=ExportConfig(
          io_dtype=io_dtype, max_accuracy_drop=ANY_DROP))
      stderr = io.StringIO()
      with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        cls.reports[io_dtype] = export.export_from_workdir(
            config, workdir, os.path.join(workdir, artifacts.MODEL), cls.source)
      cls.workdirs[io_dtype] = workdir
      cls.messages[io_dtype] = stderr.getvalue()

  def scores(self, io_dtype, split):
    """The exported model's top score per known image of `split`, as LiteRT gives it."""
    path = os.path.join(self.workdirs[io_dtype], "model_int8.tflite")
    probs, _ = evaluate.predict_dataset(evaluate.tflite_predictor(path),
                                        getattr(self.splits, split))
    return probs.max(axis=1)

  @parameterized.named_parameters(*IO_DTYPES)
  def test_the_metadata_threshold_is_reachable_and_keeps_val(self, io_dtype):
    path = os.path.join(self.workdirs[io_dtype], "model_int8.tflite")
    threshold = tflite_metadata.read_score_threshold(path)
    _, out = interface(path)
    scale, zero_point = out["quantization"]
    highest = (np.iinfo(out["dtype"]).max - zero_point) * scale
    self.assertGreater(self.run_report["unknown_threshold"]["score"], highest)
    self.assertLessEqual(threshold, highest)
    val = self.scores(io_dtype, "val")
    self.assertGreaterEqual(np.mean(val >= threshold), 0.95)
    self.assertEqual(np.mean(val >= highest), 1.0)  # Saturated: every val image at the top.

  @parameterized.named_parameters(*IO_DTYPES)
  def test_the_report_gives_both_models_acceptance_at_their_thresholds(self, io_dtype):
    report = self.reports[io_dtype]
    with open(os.path.join(self.workdirs[io_dtype], artifacts.EXPORT_REPORT)) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(report)))
    self.assertEqual(schemas.problems(report, schemas.ExportReport), [])
    path = os.path.join(self.workdirs[io_dtype], "model_int8.tflite")
    run = self.run_report["unknown_threshold"]
    threshold = report["unknown_threshold"]
    self.assertEqual(threshold, tflite_metadata.read_score_threshold(path))
    self.assertEqual(report["max_output_score"], 255 / 256)
    self.assertLessEqual(threshold, report["max_output_score"])
    self.assertEqual(report["true_accept_rate"], 0.95)
    self.assertEqual(report["float_unknown_threshold"], run["score"])
    self.assertEqual(report["float_val_accepted"], run["val_accepted"])
    self.assertEqual(report["float_test_accepted"], run["test_accepted"])
    for split in ("val", "test"):
      self.assertEqual(report[f"tflite_{split}_accepted"],
                       np.mean(self.scores(io_dtype, split) >= threshold), split)
    self.assertGreaterEqual(report["tflite_val_accepted"], report["true_accept_rate"])
    # The run's threshold was lowered, and one line said so.
    self.assertEqual(report["tflite_val_accepted_at_float_threshold"], 0.0)
    self.assertTrue(report["unknown_threshold_lowered"])
    self.assertLess(threshold, run["score"])
    self.assertLen(self.messages[io_dtype].splitlines(), 1)
    self.assertIn(f"lowered to {threshold:.6g}, which accepts 100.0%",
                  self.messages[io_dtype])

  def test_evaluate_and_predict_apply_the_metadata_threshold(self):
    workdir = self.workdirs["uint8"]
    path = os.path.join(workdir, "model_int8.tflite")
    config = RunConfig(data=self.config.data, predict=PredictConfig(model=path))
    with contextlib.redirect_stdout(io.StringIO()):
      evaluation = modes.evaluate(config, workdir)
    report = self.reports["uint8"]
    self.assertEqual(evaluation["unknown_threshold"], report["unknown_threshold"])
    self.assertEqual(evaluation["test_accepted"], report["tflite_test_accepted"])
    self.assertEqual(schemas.problems(evaluation, schemas.EvaluationReport), [])
    images = self.create_tempdir().full_path
    photo = os.path.join(images, "known.png")
    with open(photo, "wb") as f:
      f.write(fake_data.encode(fake_data.class_image(0, 0, size=32), "PNG"))
    config = RunConfig(predict=PredictConfig(model=path, images=(photo,), output="json"))
    with contextlib.redirect_stdout(io.StringIO()):
      (result,) = modes.predict(config, workdir)
    self.assertFalse(result["unknown"])
    self.assertEqual(result["score_threshold"], round(report["unknown_threshold"], 6))


@pytest.mark.slow
@pytest.mark.real_data
class FidelityTest(WorkdirTestCase):
  """int8 against float on a model that has learnt the mock classes."""

  image_size = 64
  weights = shared_data.WEIGHTS

  @classmethod
  def prepare_model(cls):
    # The head alone, on pooled features computed once: seconds, not minutes.
    features = keras.Model(cls.model.input, cls.model.get_layer(model_lib.POOL_NAME).output)
    images, labels = [], []
    for batch_images, batch_labels in cls.splits.train.as_numpy_iterator():
      images.append(batch_images)
      labels.append(batch_labels)
    x = features.predict(np.concatenate(images), verbose=0)
    y = keras.utils.to_categorical(np.concatenate(labels), len(cls.splits.class_names))
    head = inputs.head_model(cls.model, x.shape[1])
    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    keras.utils.set_random_seed(SEED)
    head.fit(x, y, batch_size=len(x), epochs=40, verbose=0)

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One image in the ~20-image test split is 5 points: allow two.
    cls.report = cls.run_export(max_accuracy_drop=10.0)
    cls.int8_path = os.path.join(cls.workdir, "model_int8.tflite")
    cls.images, cls.labels = split_arrays(cls.splits)
    cls.float_probs = evaluate.keras_predictor(cls.model)(cls.images)

  def test_float_model_has_learnt(self):
    self.assertGreaterEqual((self.float_probs.argmax(1) == self.labels).mean(), 0.8)

  def assert_close_to_float(self, int8_probs):
    agree = (int8_probs.argmax(1) == self.float_probs.argmax(1)).mean()
    self.assertGreaterEqual(agree, 0.9)
    # Measured on 16 images: per-image max |p_int8 - p_float| median 0.004,
    # largest 0.04 (uint8 I/O), 0.07 (int8 I/O).
    gap = np.abs(int8_probs - self.float_probs).max(axis=1)
    self.assertLess(np.median(gap), 0.02)
    self.assertLess(gap.max(), 0.2)

  def test_int8_export_agrees_with_float(self):
    self.assertTrue(self.report["passed"])
    self.assertGreaterEqual(self.report["top1_agreement"], 0.9)
    self.assertGreaterEqual(self.report["int8_test_accuracy"], 0.8)
    self.assert_close_to_float(evaluate.tflite_predictor(self.int8_path)(self.images))

  def test_int8_io_agrees_with_float(self):
    options = ExportConfig(io_dtype="int8")
    path = os.path.join(self.create_tempdir().full_path, "model_int8.tflite")
    with open(path, "wb") as f:
      f.write(export.convert(self.model, options, data.calibration_images(
          self.splits, 300, SEED, self.image_size)))
    inp, _ = interface(path)
    self.assertEqual(inp["dtype"], np.int8)
    # Raw pixels 0..255 as int8: normally pixel - 128.
    self.assertAlmostEqual(inp["quantization"][0], 1.0, delta=0.05)
    self.assert_close_to_float(evaluate.tflite_predictor(path)(self.images))

  def test_float32_tflite_matches_keras(self):
    options = ExportConfig(quantization="none")
    path = os.path.join(self.create_tempdir().full_path, "model_float32.tflite")
    with open(path, "wb") as f:
      f.write(export.convert(self.model, options))
    probs = evaluate.tflite_predictor(path)(self.images)
    np.testing.assert_allclose(probs, self.float_probs, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
