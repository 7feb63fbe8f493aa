"""TFLite export: the trained model as a (by default int8) `.tflite`, verified.

    model.keras -> inference model (no augmentation layers) -> tf.function with a
      fixed [1, S, S, 3] signature -> frozen graph -> TFLiteConverter

The frozen-graph path is used because the converter's SavedModel path leaves
Keras 3 variables as READ_VARIABLE ops that int8 calibration cannot run.

Every model takes raw pixels 0..255, like the Keras model. With uint8 I/O the
input is the graph's own uint8 tensor, not a quantized one (its quantization is
(0, 0)): pixels go in unchanged and are cast inside the model. With int8 I/O
the input is an int8 tensor quantized from calibration, normally scale 1 and
zero point -128, i.e. `pixel - 128`. Outputs of int8 models are quantized
probabilities (scale 1/256); the other models output float32.

`export_from_workdir` embeds TFLite metadata (class names, input and output
description; see `tflite_metadata.py`) so that client libraries such as
MediaPipe Tasks name the classes, and writes the file only after it has run
the whole test split through both the `.tflite` and the Keras model and the
accuracy drop is within bounds; the comparison goes to `export_report.json`
either way. The "unknown" threshold in the metadata is the exported model's
own: chosen on its val scores by the run's rule, never above what its output
can reach (`_unknown_threshold`; the float model's, from report.json, would
call every photo unknown where the int8 output saturates at 255/256 below
it). Its steps: resolve the model and its run's data (`_resolve_model`,
`_load_test_data`), convert (`_convert_with_metadata`), verify (`_verify`:
the interface, `_score` against the Keras model, `_within_budget`), choose
the threshold and write it into the metadata (`_unknown_threshold`), write
(`_write_report`, then `_refuse_over_budget` or `_write_labels`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from typing import Iterable, NoReturn

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import backbone as backbone_lib
from flowers import calibrate as calibrate_lib
from flowers import data as data_lib
from flowers import evaluate as evaluate_lib
from flowers import lineage
from flowers import model as model_lib
from flowers import open_set
from flowers import runs
from flowers import schemas
from flowers import tflite_metadata
from flowers.config import DataConfig
from flowers.config import ExportConfig
from flowers.config import IoDtype
from flowers.config import Quantization
from flowers.config import RunConfig
from flowers.errors import UserError

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
METADATA_AUTHOR = "flowers: {title} transfer learning on TensorFlow"  # The backbone's title.


def _image_batches(images: Iterable[np.ndarray]) -> list[np.ndarray]:
  """Single [1, S, S, 3] uint8 images from images or batches of them."""
  singles = []
  for item in images:
    array = np.asarray(item)
    if array.ndim == 3:
      array = array[None]
    singles.extend(array[i:i + 1].astype(np.uint8) for i in range(len(array)))
  return singles


def convert(model: keras.Model, options: ExportConfig,
            representative_images: Iterable[np.ndarray] | None = None) -> bytes:
  """Converts a `build_model` model to TFLite bytes.

  Args:
    model: the Keras model (uint8 [None, S, S, 3] in, probabilities out).
    options: the quantization and I/O type.
    representative_images: un-augmented uint8 images ([S, S, 3] each, or
      batches of them) for int8 calibration; required for int8 only.

  Returns:
    The `.tflite` flatbuffer, input [1, S, S, 3] of raw pixels.
  """
  calibration = _image_batches(representative_images or []) if options.is_int8 else []
  if options.is_int8 and not calibration:
    raise UserError("int8 export needs representative images for calibration, and "
                    "none were given; is the train split empty?")
  inference = model_lib.inference_model(model)
  # int8 I/O needs a float input for the converter to quantize; pixels are
  # whole numbers, so the cast back to uint8 inside the graph is exact.
  float_input = options.is_int8 and options.io_dtype is IoDtype.INT8
  converter = _frozen_graph_converter(inference, float_input)
  _set_quantization(converter, options, calibration,
                    np.float32 if float_input else np.uint8)
  return _run_quietly(converter)


def _frozen_graph_converter(inference: keras.Model,
                            float_input: bool) -> tf.lite.TFLiteConverter:
  """A converter for `inference` behind a fixed [1, S, S, 3] signature.

  The input is uint8 pixels, or float32 ones (`float_input`) cast to uint8
  inside the graph. The converter freezes the graph instead of lowering to a
  SavedModel, which keeps Keras 3 variables as resource reads that int8
  calibration cannot run; the frozen graph has them as constants.
  """
  size = int(inference.input.shape[1])
  input_dtype = tf.float32 if float_input else tf.uint8

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], input_dtype,
                                              name=INPUT_NAME)])
  def serve(image):
    pixels = tf.cast(image, tf.uint8) if float_input else image
    return {OUTPUT_NAME: inference(pixels, training=False)}

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [serve.get_concrete_function()], inference)
  converter.experimental_lower_to_saved_model = False
  return converter


def _set_quantization(converter: tf.lite.TFLiteConverter, options: ExportConfig,
                      calibration: list[np.ndarray], input_dtype: type) -> None:
  """Sets the converter's optimizations for `options.quantization`.

  int8 calibrates on `calibration` (fed as `input_dtype`, the graph's input)
  and allows int8 kernels only, so an op that cannot be quantized fails the
  conversion instead of staying float; its input and output are
  `options.io_dtype`. float16 and dynamic quantize the weights only; none
  leaves the model float32.
  """
  if options.is_int8:

    def representative_dataset():
      for image in calibration:
        yield [image.astype(input_dtype)]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    io_type = tf.int8 if options.io_dtype is IoDtype.INT8 else tf.uint8
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type
  elif options.quantization is Quantization.FLOAT16:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif options.quantization is Quantization.DYNAMIC:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _run_quietly(converter: tf.lite.TFLiteConverter) -> bytes:
  """Runs the converter without the warnings that do not apply to flowers' models.

  Freezing warns about tf.data lookup tables it does not need to serialize;
  int8 with uint8 input warns "Statistics for quantized inputs were expected",
  but that input is not quantized at all, it is cast.
  """
  logger = tf.get_logger()
  level = logger.level
  try:
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
      return converter.convert()
  finally:
    logger.setLevel(level)


def metadata_info(options: ExportConfig, source_name: str, num_classes: int,
                  image_size: int, backbone: str = backbone_lib.DEFAULT
                  ) -> tflite_metadata.ModelInfo:
  """What the `.tflite`'s metadata says about the model, for client apps."""
  from flowers import __version__  # pylint: disable=g-import-not-at-top

  # "tfds:oxford_flowers102" -> "oxford_flowers102"; an image folder -> its name.
  data = os.path.basename(source_name.split(":", 1)[-1].rstrip("/\\")) or source_name
  title = backbone_lib.get(backbone).title
  return tflite_metadata.ModelInfo(
      name=f"flowers {data} classifier",
      description=(
          f"{title} fine-tuned by flowers on {data}: {num_classes} classes, "
          f"{options.quantization.value} TFLite. Input: the whole photo resized "
          f"(squashed, not cropped) to {image_size}x{image_size} RGB, pixels 0..255. "
          "Output: the probability of each class."),
      version=__version__,
      author=METADATA_AUTHOR.format(title=title))


def check_model_path(path: str) -> None:
  """Refuses a path that is no `.keras` file, in one line."""
  if not path.endswith(".keras"):
    raise UserError(f"--model={path}: export converts a .keras model (from "
                    "--mode=train or --mode=tune).")
  if not os.path.isfile(path):
    raise UserError(f"--model={path} does not exist; train a model first "
                    "(--mode=train or --mode=tune).")


def load_keras_model(path: str) -> keras.Model:
  """Loads a `.keras` model saved by flowers; a bad path is a `UserError`."""
  check_model_path(path)
  try:
    model = keras.models.load_model(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--model={path} could not be loaded ({type(e).__name__}); "
                    "is it a model saved by flowers?") from e
  names = {layer.name for layer in model.layers}
  missing = [n for n in (model_lib.BASE_NAME, model_lib.CLASSIFIER_NAME) if n not in names]
  if missing or len(model.inputs) != 1 or len(model.outputs) != 1:
    raise UserError(f"--model={path} is a Keras model but not one flowers made (no "
                    f"{' or '.join(repr(n) for n in missing) or 'single input and output'});"
                    " export a model.keras from --mode=train or --mode=tune.")
  return model


def _details(interpreter) -> tuple[dict, dict]:
  """The details of the interpreter's one input and one output; more is a `UserError`."""
  inputs = interpreter.get_input_details()
  outputs = interpreter.get_output_details()
  if len(inputs) != 1 or len(outputs) != 1:
    raise UserError(f"The exported model has {len(inputs)} inputs and "
                    f"{len(outputs)} outputs; expected one of each.")
  return inputs[0], outputs[0]


def check_interface(path: str, image_size: int, num_classes: int,
                    options: ExportConfig) -> schemas.TfliteInterface:
  """Loads `path` with LiteRT and checks its input and output; returns them.

  Raises `UserError` if the dtypes or shapes are not the ones `options` asks
  for: uint8 or int8 [1, S, S, 3] in, [1, C] out.
  """
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

  interpreter = Interpreter(model_path=path)
  interpreter.allocate_tensors()
  inp, out = _details(interpreter)
  in_dtype = np.dtype(inp["dtype"]).name
  out_dtype = np.dtype(out["dtype"]).name
  io = options.io_dtype.value if options.is_int8 else None
  want_in = io or "uint8"
  want_out = io or "float32"
  problems = []
  if in_dtype != want_in:
    problems.append(f"input dtype {in_dtype}, expected {want_in}")
  if list(inp["shape"]) != [1, image_size, image_size, 3]:
    problems.append(f"input shape {list(inp['shape'])}, expected "
                    f"[1, {image_size}, {image_size}, 3]")
  if out_dtype != want_out:
    problems.append(f"output dtype {out_dtype}, expected {want_out}")
  if list(out["shape"]) != [1, num_classes]:
    problems.append(f"output shape {list(out['shape'])}, expected [1, {num_classes}]")
  if problems:
    raise UserError(f"The exported model is not as expected: {'; '.join(problems)}.")
  return {
      "input_dtype": in_dtype,
      "input_shape": [int(d) for d in inp["shape"]],
      "input_quantization": [float(inp["quantization"][0]), int(inp["quantization"][1])],
      "output_dtype": out_dtype,
      "output_shape": [int(d) for d in out["shape"]],
      "output_quantization": [float(out["quantization"][0]),
                              int(out["quantization"][1])],
  }


def compare(float_probs: np.ndarray, tflite_probs: np.ndarray,
            labels: np.ndarray) -> schemas.ExportComparison:
  """Accuracies of both models, their top-1 agreement and probability gap, and how
  calibrated each is (NLL and ECE)."""
  float_acc = float((float_probs.argmax(1) == labels).mean())
  tflite_acc = float((tflite_probs.argmax(1) == labels).mean())
  gap = np.abs(float_probs - tflite_probs)
  return {
      "float_test_accuracy": float_acc,
      "tflite_test_accuracy": tflite_acc,
      "accuracy_drop_points": round(100.0 * (float_acc - tflite_acc), 4),
      "top1_agreement": float((float_probs.argmax(1) == tflite_probs.argmax(1)).mean()),
      "max_abs_probability_diff": float(gap.max()),
      "mean_abs_probability_diff": float(gap.mean()),
      "float_test_nll": calibrate_lib.nll(float_probs, labels),
      "tflite_test_nll": calibrate_lib.nll(tflite_probs, labels),
      "float_test_ece": calibrate_lib.expected_calibration_error(float_probs, labels),
      "tflite_test_ece": calibrate_lib.expected_calibration_error(tflite_probs, labels),
      "num_test_examples": int(len(labels)),
  }


def _class_names(model_path: str, splits: data_lib.Splits, num_outputs: int) -> list[str]:
  """Class names beside the model (its labels.txt), else the source's."""
  names = artifacts.model_labels(model_path, splits.class_names)
  if len(names) != num_outputs or len(names) != len(splits.class_names):
    raise UserError(f"{model_path} has {num_outputs} outputs and {len(names)} labels, "
                    f"but the data has {len(splits.class_names)} classes; export "
                    "with the data the model was trained on.")
  return names


def _remove_stale_exports(workdir: str, file_name: str, model_sha: str | None,
                          model_run: str) -> None:
  """Deletes an earlier export in `workdir` made from another model or run.

  An export of this very model is kept until the new one replaces it (a
  failed conversion then leaves a valid one, not a missing one); an export of
  another model would pass for this one's, so it goes first.
  """
  if not os.path.exists(os.path.join(workdir, artifacts.LINEAGE)):
    return
  stale = [n for n in (file_name, artifacts.EXPORT_REPORT)
           if lineage.check(workdir, n, model=model_sha, run=model_run) not in (None, "missing")]
  for name in stale:
    os.remove(os.path.join(workdir, name))
    print(f"flowers_main: removed {os.path.join(workdir, name)}: it was made from another "
          "model.", file=sys.stderr)
  lineage.forget(workdir, stale)


@dataclasses.dataclass(frozen=True)
class _Subject:
  """The model to export, the run it belongs to and that run's data settings."""
  path: str
  model: keras.Model
  sha: str | None  # lineage.model_sha256: what the export's records describe.
  run: str  # The run whose lineage the export joins.
  data: DataConfig  # The run's data settings, at the model's image size.

  @property
  def image_size(self) -> int:
    return int(self.model.input.shape[1])

  @property
  def num_outputs(self) -> int:
    return int(self.model.output.shape[-1])


@dataclasses.dataclass(frozen=True)
class _TestData:
  """The subject's source, its split and the class names the export carries."""
  source: data_lib.Source
  splits: data_lib.Splits
  class_names: list[str]


@dataclasses.dataclass(frozen=True)
class _Converted:
  """The `.tflite` bytes, metadata included, how many images calibrated them, what
  the metadata says, and the score threshold it holds (None: none)."""
  tflite: bytes
  calibration_examples: int
  info: tflite_metadata.ModelInfo
  class_names: list[str]
  score_threshold: float | None = None

  def with_score_threshold(self, threshold: float) -> "_Converted":
    """The same model with `threshold` as its metadata's score threshold."""
    tflite = tflite_metadata.add_metadata(self.tflite, self.info, self.class_names,
                                          score_threshold=threshold)
    return dataclasses.replace(self, tflite=tflite, score_threshold=threshold)


@dataclasses.dataclass(frozen=True)
class _Scored:
  """The probabilities `_score` computed: the Keras model and the `.tflite` on test,
  the `.tflite` on val (None without val images), and their labels."""
  float_test: np.ndarray
  tflite_test: np.ndarray
  test_labels: np.ndarray
  tflite_val: np.ndarray | None = None
  val_labels: np.ndarray | None = None


def export_from_workdir(config: RunConfig, workdir: str, model_path: str,
                        source: data_lib.Source | None = None) -> schemas.ExportReport:
  """Converts `model_path`, verifies it on the test split, and writes it.

  The `.tflite` (name per `config.export.quantization`), `labels.txt` and
  `export_report.json` go to `workdir`; a model from another folder is
  verified on its own test split (`runs.model_data`). The `.tflite`
  reaches its final path only if it loads, has the expected interface and
  loses at most `config.export.max_accuracy_drop` points of test accuracy;
  otherwise the report is written with `"passed": false` and a `UserError` is
  raised.

  Returns:
    The report.
  """
  options = config.export
  start = time.time()
  subject = _resolve_model(model_path, workdir, config.data)
  _remove_stale_exports(workdir, options.file_name, subject.sha, subject.run)
  test = _load_test_data(subject, workdir, source)
  converted = _convert_with_metadata(subject, test, options)
  final_path = os.path.join(workdir, options.file_name)
  with artifacts.atomic_path(final_path) as tmp:
    with open(tmp, "wb") as f:
      f.write(converted.tflite)
    report, metadata_labels, scored = _verify(tmp, subject, test, options)
    threshold, figures = _unknown_threshold(subject, scored, report, options)
    if threshold is not None:
      # Only the metadata changes: the model verified above is the one written.
      converted = converted.with_score_threshold(threshold)
      with open(tmp, "wb") as f:
        f.write(converted.tflite)
    report.update(figures)
    report.update(_describe(final_path, subject, test, converted, metadata_labels, options))
    report["export_seconds"] = round(time.time() - start, 1)
    _write_report(workdir, report, subject)
    if not report["passed"]:
      _refuse_over_budget(workdir, report, options)
  _write_labels(workdir, subject, test, options)
  _print_result(report, options)
  return report


def _resolve_model(model_path: str, workdir: str, data: DataConfig) -> _Subject:
  """The model at `model_path`, loaded, with its digest, run and data settings.

  The data settings are those of the run.json beside the model
  (`runs.model_data`), so a model is verified on its own test split. A bad
  path is refused before anything is read. A model whose folder belongs to
  no run (one copied in) is its own run, named by its digest.
  """
  check_model_path(model_path)
  data = runs.model_data(model_path, workdir, data)
  model = load_keras_model(model_path)
  sha = lineage.model_sha256(model_path)
  run = lineage.owner(os.path.dirname(os.path.abspath(model_path))) or f"model:{sha}"
  data = dataclasses.replace(data, image_size=int(model.input.shape[1]))
  return _Subject(model_path, model, sha, run, data)


def _load_test_data(subject: _Subject, workdir: str,
                    source: data_lib.Source | None) -> _TestData:
  """The subject's split and class names; refuses a test split with nothing to verify on."""
  source = source or data_lib.load_source(subject.data)
  splits = data_lib.load_splits(subject.data, source=source, workdir=workdir)
  class_names = _class_names(subject.path, splits, subject.num_outputs)
  if not splits.keys("test"):
    raise UserError("The test split is empty, so the export cannot be verified; "
                    "check --split.")
  return _TestData(source, splits, class_names)


def _convert_with_metadata(subject: _Subject, test: _TestData,
                           options: ExportConfig) -> _Converted:
  """The converted model with its metadata (class names, description) inside; the
  "unknown" threshold is added once the model's own val scores are known.

  int8 calibrates on a seeded choice of un-augmented train images
  (`data.calibration_images`), so a rerun calibrates on the same images.
  """
  calibration = (data_lib.calibration_images(test.splits, options.calibration_examples,
                                             subject.data.split_seed, subject.image_size)
                 if options.is_int8 else None)
  info = metadata_info(options, test.source.name, len(test.class_names), subject.image_size,
                       model_lib.backbone_of(subject.model).name)
  tflite_model = tflite_metadata.add_metadata(convert(subject.model, options, calibration),
                                              info, test.class_names)
  return _Converted(tflite_model, int(sum(len(b) for b in calibration or [])), info,
                    list(test.class_names))


def _verify(path: str, subject: _Subject, test: _TestData,
            options: ExportConfig) -> tuple[dict, list[str], _Scored]:
  """Checks the `.tflite` at `path` and scores it against the Keras model.

  Raises if its interface is not the one `options` asks for, or if its
  metadata does not read back the class names written. Returns the report's
  figures (`_score`'s, for int8 also as `int8_*`, the interface, whether the
  drop is within budget), the class names the metadata holds and the
  probabilities scored.
  """
  interface = check_interface(path, subject.image_size, subject.num_outputs, options)
  metadata_labels = tflite_metadata.read_class_names(path)
  if metadata_labels != test.class_names:
    raise RuntimeError(f"The metadata of {options.file_name} reads back "
                       f"{len(metadata_labels or [])} labels, not the "
                       f"{len(test.class_names)} written: a bug in flowers.tflite_metadata.")
  report, scored = _score(path, subject, test)
  if options.is_int8:
    report["int8_test_accuracy"] = report["tflite_test_accuracy"]
    if "tflite_val_accuracy" in report:
      report["int8_val_accuracy"] = report["tflite_val_accuracy"]
  report.update(interface)
  report["passed"] = _within_budget(report["accuracy_drop_points"], options)
  return report, metadata_labels, scored


def _score(path: str, subject: _Subject, test: _TestData) -> tuple[dict, _Scored]:
  """The Keras model and the `.tflite` at `path` on the test split (`compare`).

  Also the test images skipped as unreadable, and the `.tflite`'s val
  accuracy where there is a val split; with the probabilities. Both passes
  must see the same labels: otherwise the comparison would be of two
  different test sets.
  """
  splits = test.splits
  float_probs, labels = evaluate_lib.predict_dataset(
      evaluate_lib.keras_predictor(subject.model), splits.test)
  tflite = evaluate_lib.tflite_predictor(path)
  tflite_probs, tflite_labels = evaluate_lib.predict_dataset(tflite, splits.test)
  if not np.array_equal(labels, tflite_labels):
    raise UserError("The test split changed between the two passes; is the "
                    "data folder being written to?")
  report = compare(float_probs, tflite_probs, labels)
  report["num_skipped_images"] = {"test": evaluate_lib.count_skipped(
      "test", len(splits.keys("test")), len(labels), subject.data.strict)}
  scored = _Scored(float_probs, tflite_probs, labels)
  if splits.keys("val"):
    val_probs, val_labels = evaluate_lib.predict_dataset(tflite, splits.val)
    report["tflite_val_accuracy"] = float(np.mean(np.argmax(val_probs, -1) == val_labels))
    scored = dataclasses.replace(scored, tflite_val=val_probs, val_labels=val_labels)
  return report, scored


def _unknown_threshold(subject: _Subject, scored: _Scored, report: dict,
                       options: ExportConfig) -> tuple[float | None, dict]:
  """The "unknown" threshold for the `.tflite`'s metadata, and the report's figures on it.

  The model's run chose its threshold on the float model's val scores
  (report.json); the `.tflite` gives other scores, and an int8 output tops
  out at 255/256. So the threshold written is chosen by the same rule on the
  `.tflite`'s own val scores, at most what its output can reach
  (`open_set.exported_threshold`). Where the run's threshold would have
  accepted fewer than the run's true-accept rate of known val images on the
  `.tflite`, one line says so and what was written instead. Without val
  images to choose on, no threshold is written (one line). Returns (None, {})
  when the run chose none.
  """
  run = open_set.run_threshold(subject.path)
  if run is None:
    return None, {}
  rate, float_threshold = float(run["true_accept_rate"]), float(run["score"])
  max_score = open_set.max_output_score(report["output_dtype"], report["output_quantization"])
  figures = {
      "true_accept_rate": rate,
      "max_output_score": max_score,
      "float_unknown_threshold": float_threshold,
      "float_val_accepted": float(run["val_accepted"]),
      "float_test_accepted": open_set.accepted(open_set.max_probability(scored.float_test),
                                               float_threshold),
  }
  chosen = None if scored.tflite_val is None else open_set.exported_threshold(
      open_set.max_probability(scored.tflite_val), rate, max_score, float_threshold)
  if chosen is None:
    print(f"flowers_main: {options.file_name}: no val images to choose its unknown "
          f"threshold on; none written into its metadata (the run's was {float_threshold:.6g}).",
          file=sys.stderr)
    return None, figures
  figures.update({
      "tflite_val_accepted": chosen["val_accepted"],
      "tflite_test_accepted": open_set.accepted(open_set.max_probability(scored.tflite_test),
                                                chosen["score"]),
      "tflite_val_accepted_at_float_threshold": chosen["run_val_accepted"],
      "unknown_threshold_lowered": chosen["lowered"],
  })
  if chosen["lowered"]:
    print(f"flowers_main: {options.file_name}: the run's unknown threshold "
          f"{float_threshold:.6g} would accept {chosen['run_val_accepted']:.1%} of known val "
          f"images on this model (under --true_accept_rate={rate:g}; its top score can reach "
          f"{max_score:.6g}); lowered to {chosen['score']:.6g}, which accepts "
          f"{chosen['val_accepted']:.1%}.", file=sys.stderr)
  return chosen["score"], figures


def _within_budget(accuracy_drop_points: float, options: ExportConfig) -> bool:
  """Whether the test accuracy lost is at most `--max_accuracy_drop` points.

  The slack keeps a drop equal to the budget, rounded by `compare`, within it.
  """
  return accuracy_drop_points <= options.max_accuracy_drop + 1e-9


def _describe(final_path: str, subject: _Subject, test: _TestData, converted: _Converted,
              metadata_labels: list[str], options: ExportConfig) -> dict:
  """What the report says about the export besides its figures: what, from what, how."""
  return {
      "path": final_path,
      "model": os.path.abspath(subject.path),
      "quantization": options.quantization.value,
      "io_dtype": options.io_dtype.value if options.is_int8 else "float32",
      "size_bytes": len(converted.tflite),
      "keras_size_bytes": os.path.getsize(subject.path),
      "max_accuracy_drop": options.max_accuracy_drop,
      "calibration_examples": converted.calibration_examples,
      # Off-grid conv kernels (a model trained with --noint8_grid_weights, or
      # elsewhere) are the usual cause of a low top1_agreement.
      "conv_kernels_off_int8_grid": len(model_lib.kernels_off_int8_grid(subject.model)),
      "class_names": test.class_names,
      # TFLite metadata (name, input, output, labels) inside the .tflite.
      "metadata_written": True,
      "metadata_labels": len(metadata_labels),
      **_threshold_written(final_path, converted),
      "source": test.source.name,
      "split": subject.data.split,
      "split_seed": subject.data.split_seed,
  }


def _threshold_written(final_path: str, converted: _Converted) -> dict[str, float]:
  """export_report.json's "unknown_threshold": the score threshold in the metadata, read
  back from the bytes written (none when none was chosen)."""
  threshold = tflite_metadata.score_threshold(converted.tflite)
  if threshold is None and converted.score_threshold is None:
    return {}
  if threshold is None or abs(threshold - converted.score_threshold) > 1e-6:
    raise RuntimeError(f"The metadata of {os.path.basename(final_path)} reads back the score "
                       f"threshold {threshold}, not {converted.score_threshold}: a bug in "
                       "flowers.tflite_metadata.")
  return {"unknown_threshold": threshold}


def _write_report(workdir: str, report: schemas.ExportReport, subject: _Subject) -> None:
  """`export_report.json` and its record: written passed or not, so a refusal can be read."""
  artifacts.write_json(os.path.join(workdir, artifacts.EXPORT_REPORT), report)
  lineage.record(workdir, artifacts.EXPORT_REPORT, mode="export", model=subject.sha,
                 run=subject.run)


def _refuse_over_budget(workdir: str, report: dict, options: ExportConfig) -> NoReturn:
  """Raises the one-line refusal of an export that loses too much accuracy.

  An older export of the same name would now pass for this model's: it is
  removed, and the message says so.
  """
  final_path = os.path.join(workdir, options.file_name)
  stale = os.path.exists(final_path)
  if stale:
    os.remove(final_path)
    lineage.forget(workdir, [options.file_name])
  raise UserError(
      f"{options.file_name} loses {report['accuracy_drop_points']:.2f} points of "
      f"test accuracy ({report['float_test_accuracy']:.4f} -> "
      f"{report['tflite_test_accuracy']:.4f}), more than --max_accuracy_drop="
      f"{options.max_accuracy_drop:g}; not written"
      + (", and the older one there removed" if stale else "")
      + f" (see {os.path.join(workdir, artifacts.EXPORT_REPORT)}).")


def _write_labels(workdir: str, subject: _Subject, test: _TestData,
                  options: ExportConfig) -> None:
  """`labels.txt` beside the export, and the records of the three files it wrote.

  Runs after the `.tflite` reached its final path, so the records describe
  files that are there.
  """
  artifacts.write_labels(os.path.join(workdir, artifacts.LABELS), test.class_names)
  lineage.record(workdir, [options.file_name, artifacts.LABELS, artifacts.EXPORT_REPORT],
                 mode="export", model=subject.sha, run=subject.run)


def _print_result(report: dict, options: ExportConfig) -> None:
  """The one-line summary of a written export."""
  unknown = ""
  if "unknown_threshold" in report:
    unknown = (f", unknown below {report['unknown_threshold']:.6g}: accepts "
               f"{report['tflite_val_accepted']:.1%} of val, "
               f"{report['tflite_test_accepted']:.1%} of test")
  print(f"{options.file_name}: {report['size_bytes'] / 1e6:.2f} MB, test_accuracy="
        f"{report['tflite_test_accuracy']:.4f} (float {report['float_test_accuracy']:.4f}, "
        f"drop {report['accuracy_drop_points']:.2f} points, top-1 agreement "
        f"{report['top1_agreement']:.4f}, {report['num_test_examples']} images, "
        f"metadata with {report['metadata_labels']} labels{unknown}) -> {report['path']}")
