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
either way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from typing import Iterable

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import data as data_lib
from flowers import evaluate as evaluate_lib
from flowers import lineage
from flowers import model as model_lib
from flowers import runs
from flowers import tflite_metadata
from flowers.config import ExportConfig
from flowers.config import IoDtype
from flowers.config import Quantization
from flowers.config import RunConfig
from flowers.errors import UserError

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
METADATA_AUTHOR = "flowers: MobileNetV2 transfer learning on TensorFlow"


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
  size = int(inference.input.shape[1])
  # int8 I/O needs a float input for the converter to quantize; pixels are
  # whole numbers, so the cast back to uint8 inside the graph is exact.
  float_input = options.is_int8 and options.io_dtype is IoDtype.INT8
  input_dtype = tf.float32 if float_input else tf.uint8

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], input_dtype,
                                              name=INPUT_NAME)])
  def serve(image):
    pixels = tf.cast(image, tf.uint8) if float_input else image
    return {OUTPUT_NAME: inference(pixels, training=False)}

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [serve.get_concrete_function()], inference)
  # The SavedModel lowering keeps Keras 3 variables as resource reads, which
  # int8 calibration cannot run; the frozen graph has them as constants.
  converter.experimental_lower_to_saved_model = False
  if options.is_int8:
    np_dtype = input_dtype.as_numpy_dtype

    def representative_dataset():
      for image in calibration:
        yield [image.astype(np_dtype)]

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
  logger = tf.get_logger()
  level = logger.level
  try:
    # Freezing warns about tf.data lookup tables it does not need to serialize.
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
      # "Statistics for quantized inputs were expected": the uint8 input is
      # not quantized at all, it is cast.
      warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
      return converter.convert()
  finally:
    logger.setLevel(level)


def metadata_info(options: ExportConfig, source_name: str, num_classes: int,
                  image_size: int) -> tflite_metadata.ModelInfo:
  """What the `.tflite`'s metadata says about the model, for client apps."""
  from flowers import __version__  # pylint: disable=g-import-not-at-top

  # "tfds:oxford_flowers102" -> "oxford_flowers102"; an image folder -> its name.
  data = os.path.basename(source_name.split(":", 1)[-1].rstrip("/\\")) or source_name
  return tflite_metadata.ModelInfo(
      name=f"flowers {data} classifier",
      description=(
          f"MobileNetV2 fine-tuned by flowers on {data}: {num_classes} classes, "
          f"{options.quantization.value} TFLite. Input: the whole photo resized "
          f"(squashed, not cropped) to {image_size}x{image_size} RGB, pixels 0..255. "
          "Output: the probability of each class."),
      version=__version__,
      author=METADATA_AUTHOR)


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
  inputs = interpreter.get_input_details()
  outputs = interpreter.get_output_details()
  if len(inputs) != 1 or len(outputs) != 1:
    raise UserError(f"The exported model has {len(inputs)} inputs and "
                    f"{len(outputs)} outputs; expected one of each.")
  return inputs[0], outputs[0]


def check_interface(path: str, image_size: int, num_classes: int,
                    options: ExportConfig) -> dict:
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
            labels: np.ndarray) -> dict:
  """Accuracies of both models, their top-1 agreement and probability gap."""
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


def export_from_workdir(config: RunConfig, workdir: str, model_path: str,
                        source: data_lib.Source | None = None) -> dict:
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
  check_model_path(model_path)
  data = runs.model_data(model_path, workdir, config.data)
  model = load_keras_model(model_path)
  model_sha = lineage.model_sha256(model_path)
  model_run = (lineage.owner(os.path.dirname(os.path.abspath(model_path)))
               or f"model:{model_sha}")
  _remove_stale_exports(workdir, options.file_name, model_sha, model_run)
  image_size = int(model.input.shape[1])
  num_outputs = int(model.output.shape[-1])
  data = dataclasses.replace(data, image_size=image_size)
  source = source or data_lib.load_source(data)
  splits = data_lib.load_splits(data, source=source, workdir=workdir)
  class_names = _class_names(model_path, splits, num_outputs)
  if not splits.keys("test"):
    raise UserError("The test split is empty, so the export cannot be verified; "
                    "check --split.")
  calibration = (data_lib.calibration_images(splits, options.calibration_examples, data.split_seed,
                                             image_size) if options.is_int8 else None)
  tflite_model = tflite_metadata.add_metadata(
      convert(model, options, calibration),
      metadata_info(options, source.name, len(class_names), image_size), class_names)

  final_path = os.path.join(workdir, options.file_name)
  report_path = os.path.join(workdir, artifacts.EXPORT_REPORT)
  with artifacts.atomic_path(final_path) as tmp:
    with open(tmp, "wb") as f:
      f.write(tflite_model)
    interface = check_interface(tmp, image_size, num_outputs, options)
    metadata_labels = tflite_metadata.read_class_names(tmp)
    if metadata_labels != class_names:
      raise RuntimeError(f"The metadata of {options.file_name} reads back "
                         f"{len(metadata_labels or [])} labels, not the "
                         f"{len(class_names)} written: a bug in flowers.tflite_metadata.")
    float_probs, labels = evaluate_lib.predict_dataset(
        evaluate_lib.keras_predictor(model), splits.test)
    tflite = evaluate_lib.tflite_predictor(tmp)
    tflite_probs, tflite_labels = evaluate_lib.predict_dataset(tflite, splits.test)
    if not np.array_equal(labels, tflite_labels):
      raise UserError("The test split changed between the two passes; is the "
                      "data folder being written to?")
    report = compare(float_probs, tflite_probs, labels)
    report["num_skipped_images"] = {"test": evaluate_lib.count_skipped(
        "test", len(splits.keys("test")), len(labels), data.strict)}
    if splits.keys("val"):  # Beside the test figure, the one choices are made on.
      val_probs, val_labels = evaluate_lib.predict_dataset(tflite, splits.val)
      report["tflite_val_accuracy"] = float(np.mean(np.argmax(val_probs, -1) == val_labels))
    if options.is_int8:
      report["int8_test_accuracy"] = report["tflite_test_accuracy"]
      if "tflite_val_accuracy" in report:
        report["int8_val_accuracy"] = report["tflite_val_accuracy"]
    passed = report["accuracy_drop_points"] <= options.max_accuracy_drop + 1e-9
    report.update(interface)
    report.update({
        "passed": passed,
        "path": final_path,
        "model": os.path.abspath(model_path),
        "quantization": options.quantization.value,
        "io_dtype": options.io_dtype.value if options.is_int8 else "float32",
        "size_bytes": len(tflite_model),
        "keras_size_bytes": os.path.getsize(model_path),
        "max_accuracy_drop": options.max_accuracy_drop,
        "calibration_examples": int(sum(len(b) for b in calibration or [])),
        # Off-grid conv kernels (a model trained with --noint8_grid_weights, or
        # elsewhere) are the usual cause of a low top1_agreement.
        "conv_kernels_off_int8_grid": len(model_lib.kernels_off_int8_grid(model)),
        "class_names": class_names,
        # TFLite metadata (name, input, output, labels) inside the .tflite.
        "metadata_written": True,
        "metadata_labels": len(metadata_labels),
        "source": source.name,
        "split": data.split,
        "split_seed": data.split_seed,
        "export_seconds": round(time.time() - start, 1),
    })
    artifacts.write_json(report_path, report)
    lineage.record(workdir, artifacts.EXPORT_REPORT, mode="export", model=model_sha,
                   run=model_run)
    if not passed:
      # An older export beside it would now pass for this model's: remove it.
      stale = os.path.exists(final_path)
      if stale:
        os.remove(final_path)
        lineage.forget(workdir, [options.file_name])
      raise UserError(
          f"{options.file_name} loses {report['accuracy_drop_points']:.2f} points of "
          f"test accuracy ({report['float_test_accuracy']:.4f} -> "
          f"{report['tflite_test_accuracy']:.4f}), more than --max_accuracy_drop="
          f"{options.max_accuracy_drop:g}; not written"
          + (", and the older one there removed" if stale else "") + f" (see {report_path}).")
  artifacts.write_labels(os.path.join(workdir, artifacts.LABELS), class_names)
  lineage.record(workdir, [options.file_name, artifacts.LABELS, artifacts.EXPORT_REPORT],
                 mode="export", model=model_sha, run=model_run)
  print(f"{options.file_name}: {len(tflite_model) / 1e6:.2f} MB, test_accuracy="
        f"{report['tflite_test_accuracy']:.4f} (float {report['float_test_accuracy']:.4f}, "
        f"drop {report['accuracy_drop_points']:.2f} points, top-1 agreement "
        f"{report['top1_agreement']:.4f}, {report['num_test_examples']} images, "
        f"metadata with {report['metadata_labels']} labels) -> {final_path}")
  return report
