"""TFLite metadata: written by export, read back by predict/evaluate and by MediaPipe.

`ExportMetadataTest` exports, from a `test_export.WorkdirTestCase` workdir
(32 px, mock TFDS), a model that tells the mock classes apart by their mean
colour, and reads its metadata back: a class name on the wrong output shows.
`MediaPipeTest` runs MediaPipe Tasks' `ImageClassifier`, a client nobody here
wrote, on an exported model: it is skipped only where mediapipe cannot be
imported (`pip install mediapipe`).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from typing import Sequence

from absl.testing import absltest
import keras
import numpy as np

import fake_data
from flowers import artifacts
from flowers import data as data_lib
from flowers import evaluate
from flowers import export
from flowers import model as model_lib
from flowers import modes
from flowers import tflite_metadata
from flowers._vendor.tflite_metadata_schema import metadata_schema_py_generated as meta_fb
from flowers.config import DataConfig
from flowers.config import ExportConfig
from flowers.config import PredictConfig
from flowers.config import RunConfig
from flowers.errors import UserError
from test_export import ANY_DROP
from test_export import SEED
from test_export import SPLIT
from test_export import WorkdirTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = tflite_metadata.ModelInfo("test model", "what it does", "1.2.3", "tests")
# The classes with images in test_export.COUNTS.
DATA_LABELS = [0, 1, 2, 3]


def write_images(folder, labels, sizes):
  """JPEG files of the mock classes' colours, one per (label, (height, width))."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, (label, (height, width)) in enumerate(zip(labels, sizes)):
    square = fake_data.class_image(label, 1000 + i, size=max(height, width))
    path = os.path.join(folder, f"img_{i:02d}_class{label}.jpg")
    with open(path, "wb") as f:
      f.write(fake_data.encode(square[:height, :width]))
    paths.append(path)
  return paths


def predict_json(model_path, images, workdir):
  """`modes.predict` as `--output=json`; returns (results, stderr)."""
  config = RunConfig(predict=PredictConfig(model=model_path, images=tuple(images),
                                           top_k=1, output="json"))
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    results = modes.predict(config, workdir)
  return results, err.getvalue()


class AddMetadataTest(absltest.TestCase):
  """The writer and reader on a converted model, without the export around them."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    model = model_lib.build_model(3, image_size=32, weights=None, seed=SEED)
    cls.plain = export.convert(model, ExportConfig(quantization="dynamic"))
    cls.names = ["pink primrose", "globe-flower", "bird of paradise"]
    cls.with_metadata = tflite_metadata.add_metadata(cls.plain, INFO, cls.names)

  def test_score_threshold_reads_back_from_the_output_metadata(self):
    self.assertIsNone(tflite_metadata.score_threshold(self.with_metadata))
    with_threshold = tflite_metadata.add_metadata(self.plain, INFO, self.names,
                                                  score_threshold=0.4375)
    self.assertEqual(tflite_metadata.score_threshold(with_threshold), 0.4375)
    # Where clients look: a ScoreThresholdingOptions unit of the output tensor.
    output = tflite_metadata.read_metadata(with_threshold).subgraphMetadata[0]
    (unit,) = output.outputTensorMetadata[0].processUnits
    self.assertEqual(unit.optionsType, meta_fb.ProcessUnitOptions.ScoreThresholdingOptions)
    self.assertEqual(unit.options.globalScoreThreshold, 0.4375)
    self.assertEqual(tflite_metadata.class_names(with_threshold), self.names)

  def test_class_names_read_back_in_order(self):
    self.assertEqual(tflite_metadata.class_names(self.with_metadata), self.names)
    self.assertIsNone(tflite_metadata.class_names(self.plain))
    self.assertIsNone(tflite_metadata.read_metadata(self.plain))

  def test_metadata_describes_model_input_and_output(self):
    metadata = tflite_metadata.read_metadata(self.with_metadata)
    self.assertEqual((metadata.name, metadata.description, metadata.version, metadata.author),
                     (b"test model", b"what it does", b"1.2.3", b"tests"))
    self.assertEqual(metadata.minParserVersion, b"1.0.0")
    graph, = metadata.subgraphMetadata
    image, = graph.inputTensorMetadata
    self.assertEqual(image.content.contentPropertiesType,
                     meta_fb.ContentProperties.ImageProperties)
    self.assertEqual(image.content.contentProperties.colorSpace, meta_fb.ColorSpaceType.RGB)
    unit, = image.processUnits
    self.assertEqual(unit.optionsType, meta_fb.ProcessUnitOptions.NormalizationOptions)
    # flowers models take raw pixels and normalize inside: the identity.
    self.assertEqual((list(unit.options.mean), list(unit.options.std)), ([0.0], [1.0]))
    probability, = graph.outputTensorMetadata
    labels, = probability.associatedFiles
    self.assertEqual((labels.name, labels.type),
                     (b"labels.txt", meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS))
    self.assertEqual(tflite_metadata.associated_file(self.with_metadata, "labels.txt"),
                     "".join(f"{n}\n" for n in self.names).encode())

  def test_model_answers_exactly_as_before(self):
    folder = self.create_tempdir().full_path
    paths = []
    for name, data in (("plain", self.plain), ("meta", self.with_metadata)):
      paths.append(os.path.join(folder, f"{name}.tflite"))
      with open(paths[-1], "wb") as f:
        f.write(data)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    before, after = (evaluate.tflite_predictor(p)(images) for p in paths)
    np.testing.assert_array_equal(before, after)

  def test_converter_metadata_kept_and_weights_aligned(self):
    from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top

    def entries(data):
      model = schema.Model.GetRootAs(data, 0)
      return [model.Metadata(i).Name() for i in range(model.MetadataLength())]

    self.assertEqual(entries(self.with_metadata),
                     entries(self.plain) + [tflite_metadata.METADATA_NAME.encode()])
    data = bytearray(self.with_metadata)
    model = schema.Model.GetRootAs(data, 0)
    start = np.frombuffer(data, np.uint8).__array_interface__["data"][0]
    for i in range(model.BuffersLength()):
      if model.Buffers(i).DataLength():
        offset = model.Buffers(i).DataAsNumpy().__array_interface__["data"][0] - start
        self.assertEqual(offset % tflite_metadata.BUFFER_ALIGNMENT, 0, f"buffer {i}")

  def test_adding_again_replaces_and_is_repeatable(self):
    again = tflite_metadata.add_metadata(self.with_metadata, INFO, self.names)
    self.assertEqual(again, self.with_metadata)
    renamed = tflite_metadata.add_metadata(self.with_metadata, INFO, ["a", "b", "c"])
    self.assertEqual(tflite_metadata.class_names(renamed), ["a", "b", "c"])
    self.assertEqual(len(renamed), len(self.with_metadata) - len("".join(self.names)) + 3)

  def test_not_a_tflite_model(self):
    with self.assertRaisesRegex(ValueError, "TFL3"):
      tflite_metadata.add_metadata(b"\0" * 64, INFO, self.names)


class ExportMetadataTest(WorkdirTestCase):
  """--mode=export writes the metadata; predict and evaluate read it."""

  @classmethod
  def prepare_model(cls):
    # The mock data fills the first classes of the 102; each answers its own.
    cls.model = colour_model(len(DATA_LABELS), cls.image_size,
                             num_outputs=len(cls.splits.class_names))

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.report = cls.run_export(max_accuracy_drop=ANY_DROP)
    cls.int8_path = os.path.join(cls.workdir, "model_int8.tflite")
    cls.plain = export.convert(cls.model, ExportConfig(quantization="dynamic"))  # No metadata.
    cls.images = write_images(os.path.join(cls.root, "images"), DATA_LABELS,
                              [(40, 40), (30, 50), (50, 30), (36, 44)])
    cls.expected = [cls.source.class_names[l] for l in DATA_LABELS]

  def bare_model(self, data=None):
    """The int8 export (or `data`) alone in a new folder, with splits.csv."""
    folder = self.create_tempdir().full_path
    path = os.path.join(folder, "model_int8.tflite")
    if data is None:
      shutil.copy(self.int8_path, path)
    else:
      with open(path, "wb") as f:
        f.write(data)
    shutil.copy(os.path.join(self.workdir, artifacts.SPLITS), folder)
    return folder, path

  def test_export_report_records_the_metadata(self):
    with open(os.path.join(self.workdir, artifacts.EXPORT_REPORT)) as f:
      report = json.load(f)
    self.assertTrue(report["metadata_written"])
    self.assertEqual(report["metadata_labels"], len(self.source.class_names))
    # The model knows the classes, so the names below are put to the test.
    self.assertGreaterEqual(report["int8_test_accuracy"], 0.9)

  def test_exported_model_names_its_classes(self):
    self.assertEqual(tflite_metadata.read_class_names(self.int8_path), self.source.class_names)
    metadata = tflite_metadata.read_metadata(open(self.int8_path, "rb").read())
    self.assertIn(b"oxford_flowers102", metadata.name)
    self.assertIn(b"32x32", metadata.description)
    # Output i answers class i, and the metadata names it.
    pixels = np.stack([fake_data.class_image(l, 500 + l, size=32) for l in DATA_LABELS])
    top1 = evaluate.tflite_predictor(self.int8_path)(pixels).argmax(-1)
    self.assertEqual(top1.tolist(), DATA_LABELS)
    names = tflite_metadata.read_class_names(self.int8_path)
    self.assertEqual([names[i] for i in top1], self.expected)
    # labels.txt stays beside the model.
    self.assertEqual(artifacts.read_labels(os.path.join(self.workdir, artifacts.LABELS)),
                     self.source.class_names)

  def test_predict_without_labels_txt_uses_the_metadata(self):
    folder, path = self.bare_model()
    results, _ = predict_json(path, self.images, folder)
    top1 = [r["top_k"][0]["label"] for r in results]
    self.assertLen(set(top1), len(DATA_LABELS))  # Each image its own class...
    self.assertEqual(top1, self.expected)  # ...named as the data names it.

  def test_evaluate_without_labels_txt_uses_the_metadata(self):
    folder, path = self.bare_model()
    config = RunConfig(data=DataConfig(split=SPLIT, split_seed=SEED),
                       predict=PredictConfig(model=path))
    with contextlib.redirect_stdout(io.StringIO()):
      report = modes.evaluate(config, folder)
    self.assertEqual(report["class_names"], self.source.class_names)
    self.assertEqual(report["num_test_examples"], len(self.splits.keys("test")))
    # Per-class accuracy is keyed by name: each data class under its own.
    self.assertEqual(set(report["per_class_accuracy"]), set(self.expected))
    self.assertGreaterEqual(min(report["per_class_accuracy"].values()), 0.8)

  def test_metadata_wins_over_a_different_labels_txt(self):
    folder, path = self.bare_model()
    artifacts.write_labels(os.path.join(folder, artifacts.LABELS), ["w", "x", "y", "z"])
    results, err = predict_json(path, self.images[:2], folder)
    self.assertEqual([r["top_k"][0]["label"] for r in results], self.expected[:2])
    self.assertIn("differs from the class names inside", err)

  def test_labels_txt_names_a_model_without_metadata(self):
    folder, path = self.bare_model(self.plain)
    artifacts.write_labels(os.path.join(folder, artifacts.LABELS), ["w", "x", "y", "z"])
    self.assertEqual(evaluate.model_class_names(path), ["w", "x", "y", "z"])

  def test_model_with_neither_is_a_one_line_user_error(self):
    folder, path = self.bare_model(self.plain)
    with self.assertRaisesRegex(UserError, "no TFLite metadata and no labels.txt") as caught:
      predict_json(path, self.images[:1], folder)
    self.assertNotIn("\n", str(caught.exception))
    # The same from the command line: exit 2, one error line, no traceback.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "flowers.main", "--mode=predict", f"--model={path}",
         f"--images={self.images[0]}", f"--workdir={folder}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("flowers_main: error")]
    self.assertLen(errors, 1, proc.stderr[-2000:])
    self.assertIn("labels.txt", errors[0])
    self.assertNotIn("Traceback", proc.stderr)


def colour_model(num_classes: int, image_size: int, num_outputs: int | None = None,
                 temperature: float = 0.01, classes: Sequence[int] | None = None) -> keras.Model:
  """A nearest-mean-colour classifier of the mock classes: uint8 in, softmax out.

  Its answer depends on the image (unlike the random-weight MobileNetV2, whose
  features vanish), so agreement between two clients means something. Output
  i is mock class i; outputs past `num_classes` (up to `num_outputs`) never win.
  Its parts bear `build_model`'s names (a pooling "base", a "classifier"), so
  export takes it for a flowers model. `classes`: the mock classes outputs
  0.. stand for (default: 0 to num_classes - 1).
  """
  num_outputs = num_outputs or num_classes
  classes = range(num_classes) if classes is None else classes
  centroids = np.stack([fake_data.class_image(label, 0, size=image_size).reshape(-1, 3).mean(0)
                        for label in classes]) / 255.0
  inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
  x = keras.layers.Rescaling(1.0 / 255.0, dtype="float32")(inputs)
  base = keras.Sequential([keras.Input((image_size, image_size, 3)),
                           keras.layers.GlobalAveragePooling2D()], name=model_lib.BASE_NAME)
  x = base(x)
  dense = keras.layers.Dense(num_outputs, activation="softmax", name=model_lib.CLASSIFIER_NAME)
  outputs = dense(x)
  # Softmax of -|x - c|^2 / t, up to a constant: logits 2 c.x - |c|^2, over t.
  # The spare outputs sit farther than any colour in the unit cube (|x - c|^2 <= 3).
  spare = num_outputs - num_classes
  kernel = np.concatenate([2.0 * centroids.T, np.zeros((3, spare))], 1)
  bias = np.concatenate([-(centroids ** 2).sum(1), np.full(spare, -4.0)])
  dense.set_weights([kernel / temperature, bias / temperature])
  return keras.Model(inputs, outputs)


class MediaPipeTest(absltest.TestCase):
  """MediaPipe Tasks' ImageClassifier on an exported model, against --mode=predict."""

  image_size = 32

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      from mediapipe.tasks.python import vision  # noqa: F401  pylint: disable=unused-import
    except ImportError as e:
      raise unittest.SkipTest(f"mediapipe cannot be imported ({e}); `pip install mediapipe` "
                              "to run the MediaPipe Tasks client check") from e
    cls.root = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
    cls.names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells",
                 "sweet pea"]
    model = colour_model(len(cls.names), cls.image_size)
    calibration = [fake_data.class_image(l, i, size=cls.image_size)
                   for l in range(4) for i in range(5)]
    options = ExportConfig()
    cls.model_path = os.path.join(cls.root, "model", "model_int8.tflite")
    os.makedirs(os.path.dirname(cls.model_path))
    with open(cls.model_path, "wb") as f:
      f.write(tflite_metadata.add_metadata(
          export.convert(model, options, calibration),
          export.metadata_info(options, "tfds:mock", len(cls.names), cls.image_size),
          cls.names))
    cls.labels = [0, 1, 2, 3] * 3
    # Non-square and square photos, larger and smaller than the model's input.
    sizes = [(48, 64), (64, 48), (40, 40), (24, 36), (90, 50), (33, 77)] * 2
    cls.images = write_images(os.path.join(cls.root, "images"), cls.labels, sizes)

  def classifier(self, model_path):
    from mediapipe.tasks.python import vision  # pylint: disable=g-import-not-at-top
    from mediapipe.tasks.python.core import base_options  # pylint: disable=g-import-not-at-top

    options = vision.ImageClassifierOptions(
        base_options=base_options.BaseOptions(model_asset_path=model_path), max_results=-1)
    classifier = vision.ImageClassifier.create_from_options(options)
    self.addCleanup(classifier.close)
    return classifier

  def test_category_names_and_top1_match_predict(self):
    import mediapipe as mp  # pylint: disable=g-import-not-at-top

    classifier = self.classifier(self.model_path)
    top1 = []
    for path in self.images:
      categories = classifier.classify(mp.Image.create_from_file(path)).classifications[0]
      by_index = sorted(categories.categories, key=lambda c: c.index)
      self.assertEqual([c.category_name for c in by_index], self.names)
      top1.append(max(categories.categories, key=lambda c: c.score).category_name)
    # No labels.txt beside the model: predict reads the names from the metadata too.
    results, _ = predict_json(self.model_path, self.images, self.root)
    ours = [r["top_k"][0]["label"] for r in results]
    self.assertEqual(top1, ours)
    self.assertEqual(ours, [self.names[l] for l in self.labels])

  def test_no_category_below_the_metadata_threshold_as_predict_says_unknown(self):
    import mediapipe as mp  # pylint: disable=g-import-not-at-top

    path = os.path.join(self.create_tempdir().full_path, "model_int8.tflite")
    with open(self.model_path, "rb") as f:
      with_threshold = tflite_metadata.add_metadata(
          f.read(), INFO, self.names, score_threshold=0.9)
    with open(path, "wb") as f:
      f.write(with_threshold)
    # Grey lies between the classes' colours: every score is far below 0.9.
    folder = self.create_tempdir().full_path
    grey = os.path.join(folder, "grey.png")
    with open(grey, "wb") as f:
      f.write(fake_data.encode(np.full((40, 40, 3), 60, np.uint8), "PNG"))
    images = self.images[:4] + [grey]
    classifier = self.classifier(path)
    answered = [bool(classifier.classify(mp.Image.create_from_file(p)).classifications[0]
                     .categories) for p in images]
    results, _ = predict_json(path, images, os.path.dirname(path))
    self.assertEqual(answered, [True] * 4 + [False])
    self.assertEqual([r["unknown"] for r in results], [not a for a in answered])

  def test_mediapipe_squashes_with_corner_aligned_bilinear_sampling(self):
    """What MediaPipe does to a photo before the model, read off a probe model.

    The probe's "probabilities" are its input pixels / 255, so the classifier
    returns the tensor MediaPipe fed it. Found (mediapipe 1.2.3, CPU): the
    whole image is squashed to the input size, no crop, no padding, sampled
    bilinearly at x_src = x_dst * W / S (corners aligned, no half-pixel
    offset) without antialiasing. `data.resize`, which training, evaluation
    and predict share, does the same, up to rounding.
    """
    import mediapipe as mp  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    size = 8

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8)])
    def probe(image):
      return tf.reshape(tf.cast(image, tf.float32) / 255.0, [1, size * size * 3])

    path = os.path.join(self.create_tempdir().full_path, "probe.tflite")
    with open(path, "wb") as f:
      f.write(tf.lite.TFLiteConverter.from_concrete_functions(
          [probe.get_concrete_function()]).convert())
    classifier = self.classifier(path)
    height, width = 20, 44
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    seen = np.zeros(size * size * 3)
    for category in result.classifications[0].categories:
      seen[category.index] = category.score * 255.0
    seen = seen.reshape(size, size, 3)

    def bilinear(y, x):
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
      dy, dx = y - y0, x - x0
      top = image[y0, x0] * (1 - dx) + image[y0, x1] * dx
      bottom = image[y1, x0] * (1 - dx) + image[y1, x1] * dx
      return top * (1 - dy) + bottom * dy

    expected = np.array([[bilinear(y * height / size, x * width / size)
                          for x in range(size)] for y in range(size)])
    np.testing.assert_allclose(seen, expected, atol=1.01)
    ours = data_lib.resize(image, size).numpy()
    np.testing.assert_allclose(ours, seen, atol=1.01)
    antialiased = tf.image.resize(image, (size, size), antialias=True).numpy()
    self.assertGreater(np.abs(antialiased - seen).mean(), 10.0)  # What flowers did before.


if __name__ == "__main__":
  absltest.main()
