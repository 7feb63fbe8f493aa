"""Metrics and predictions, for Keras (.keras) and TFLite (.tflite) models alike.

Both kinds of model are wrapped as a `Predictor`: a function from a uint8 image
batch to class probabilities. Metrics are computed from (probabilities, labels)
only, so float and int8 models are measured by exactly the same code.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Sequence
import weakref

import numpy as np

from flowers import artifacts
from flowers.errors import UserError

Predictor = Callable[[np.ndarray], np.ndarray]


def predict_dataset(predict: Predictor, dataset: Iterable) -> tuple[np.ndarray, np.ndarray]:
  """Runs `predict` over a dataset of (images, labels) batches.

  Returns (probabilities [N, C], labels [N]).
  """
  probs, labels = [], []
  for images, batch_labels in dataset:
    probs.append(np.asarray(predict(np.asarray(images))))
    labels.append(np.asarray(batch_labels).reshape(-1))
  if not probs:
    raise UserError("The evaluation split is empty; check --split.")
  return np.concatenate(probs), np.concatenate(labels).astype(np.int64)


def count_skipped(split: str, expected: int, evaluated: int, strict: bool = False) -> int:
  """Images of `split` that could not be decoded; says so in one line, or fails.

  The input pipeline drops an image it cannot decode (and names it); metrics
  are then over fewer images than the split holds, which must not pass
  unnoticed. Under `strict` it is a `UserError`.
  """
  skipped = expected - evaluated
  if skipped:
    message = (f"{skipped} of the {expected} {split} images could not be decoded and were "
               f"skipped; its metrics are over the other {evaluated}.")
    if strict:
      raise UserError(message + " --strict refuses that: remove or fix those files.")
    print(f"flowers_main: warning: {message}", file=sys.stderr)
  return skipped


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """`m[i, j]` counts images of class i predicted as class j."""
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (labels, predicted), 1)
  return m


def metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            prefix: str = "test") -> dict:
  """Accuracy, top-5 accuracy, macro F1, per-class accuracy, confusion matrix.

  Keys are prefixed (`test_accuracy`, ...) so reports read unambiguously.
  Per-class accuracy is keyed by class name; classes absent from the split
  are left out of it and of the macro F1.
  """
  num_classes = len(class_names)
  predicted = probs.argmax(axis=1)
  k = min(5, probs.shape[1])
  top_k = np.argsort(-probs, axis=1)[:, :k]
  cm = confusion_matrix(labels, predicted, num_classes)
  support = cm.sum(axis=1)
  predicted_count = cm.sum(axis=0)
  tp = np.diag(cm)
  present = support > 0
  with np.errstate(divide="ignore", invalid="ignore"):
    recall = np.where(present, tp / np.maximum(support, 1), 0.0)
    precision = np.where(predicted_count > 0, tp / np.maximum(predicted_count, 1), 0.0)
    f1 = np.where(precision + recall > 0,
                  2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  return {
      f"{prefix}_accuracy": float((predicted == labels).mean()),
      f"{prefix}_top5_accuracy": float((top_k == labels[:, None]).any(axis=1).mean()),
      f"{prefix}_macro_f1": float(f1[present].mean()) if present.any() else 0.0,
      f"num_{prefix}_examples": int(len(labels)),
      "per_class_accuracy": {class_names[i]: float(recall[i])
                             for i in range(num_classes) if present[i]},
      "confusion_matrix": cm.tolist(),
      "class_names": list(class_names),
  }


# One traced function per live model: a run evaluates the same model on several
# splits and after changing its weights in place (int8-grid rounding, the
# temperature), and each new trace of MobileNetV2 costs about a second.
_TRACED: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def keras_predictor(model) -> Predictor:
  """Wraps a Keras model (uint8 images in, probabilities out).

  The same model gets the same traced function back; it reads the model's
  variables, so weights assigned since are used.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if model not in _TRACED:
    model_ref = weakref.ref(model)  # The cache must not keep the model alive.

    @tf.function(reduce_retracing=True)
    def infer(images):
      return model_ref()(images, training=False)

    _TRACED[model] = infer
  return _KerasPredictor(model, _TRACED[model])


class _KerasPredictor:
  """A `Predictor` that holds its model (its traced function only refers to it)."""

  def __init__(self, model, infer: Callable):
    self.model = model
    self._infer = infer

  def __call__(self, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return self._infer(tf.convert_to_tensor(images)).numpy()


def tflite_predictor(path: str, num_threads: int | None = None) -> Predictor:
  """Wraps a .tflite model, quantizing inputs and dequantizing outputs as needed.

  The interpreter runs one image at a time (batch 1, as on a phone); the
  returned function accepts any batch size.
  """
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

  try:
    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    interpreter.allocate_tensors()
  except (ValueError, RuntimeError) as e:
    raise UserError(f"--model={path} is not a TFLite model LiteRT can load "
                    f"({str(e).splitlines()[0][:120]}); export it again.") from e
  inp = interpreter.get_input_details()[0]
  out = interpreter.get_output_details()[0]

  def to_input(image: np.ndarray) -> np.ndarray:
    dtype = inp["dtype"]
    if dtype in (np.uint8,):
      return image.astype(np.uint8)[None]
    scale, zero = inp["quantization"]
    if dtype == np.int8 and scale:
      # Model input is int8 for raw pixels: real = scale * (q - zero).
      q = np.round(image.astype(np.float32) / scale + zero)
      return np.clip(q, -128, 127).astype(np.int8)[None]
    return image.astype(dtype)[None]

  def from_output(raw: np.ndarray) -> np.ndarray:
    scale, zero = out["quantization"]
    if out["dtype"] in (np.uint8, np.int8) and scale:
      return (raw.astype(np.float32) - zero) * scale
    return raw.astype(np.float32)

  def predict(images: np.ndarray) -> np.ndarray:
    results = []
    for image in images:
      interpreter.set_tensor(inp["index"], to_input(image))
      interpreter.invoke()
      results.append(from_output(interpreter.get_tensor(out["index"]))[0])
    return np.stack(results)

  predict.input_size = int(inp["shape"][1])  # type: ignore[attr-defined]
  predict.num_outputs = int(out["shape"][-1])  # type: ignore[attr-defined]
  return predict


def load_predictor(path: str) -> tuple[Predictor, int]:
  """A predictor and its square input size, from a `.keras` or `.tflite` file."""
  if not os.path.isfile(path):
    raise UserError(f"--model={path} does not exist; train or export a model first.")
  if path.endswith(".tflite"):
    predictor = tflite_predictor(path)
    return predictor, predictor.input_size  # type: ignore[attr-defined]
  if path.endswith(".keras"):
    import keras  # pylint: disable=g-import-not-at-top

    from flowers import augment  # noqa: F401  (registers its layer)  pylint: disable=unused-import

    try:
      model = keras.models.load_model(path)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"--model={path} could not be loaded ({type(e).__name__}); "
                      "is it a model saved by flowers?") from e
    predictor = keras_predictor(model)
    predictor.num_outputs = int(model.output.shape[-1])  # type: ignore[attr-defined]
    return predictor, int(model.input.shape[1])
  raise UserError(f"--model={path}: expected a .keras or .tflite file.")


def check_labels(path: str, class_names: Sequence[str], num_outputs: int) -> None:
  """Refuses class names that cannot be the model's: one name per output, in order.

  A labels.txt with a name too few or too many would shift every name after
  it (or fail on an index); a labels.txt written for another model (its
  lineage record says so) is refused too.
  """
  if len(class_names) != num_outputs:
    raise UserError(f"{path} has {num_outputs} outputs but its labels name "
                    f"{len(class_names)} classes; put the model's own {artifacts.LABELS} "
                    "beside it (or export it again, which embeds the names).")
  folder = os.path.dirname(os.path.abspath(path))
  from flowers import lineage  # pylint: disable=g-import-not-at-top

  if path.endswith(".keras") and os.path.exists(os.path.join(folder, artifacts.LINEAGE)):
    why = lineage.check(folder, artifacts.LABELS, model=lineage.model_sha256(path),
                        run=lineage.owner(folder))
    if why not in (None, "missing"):
      raise UserError(f"{artifacts.labels_beside(path)} does not belong to {path} ({why}); "
                      "put the model's own labels.txt beside it.")


def model_class_names(path: str) -> list[str]:
  """A model's class names, in output order: what the model itself carries.

  A `.tflite` with TFLite metadata names its classes inside (written by
  --mode=export); otherwise the `labels.txt` beside the model. If a
  `labels.txt` beside a `.tflite` disagrees with its metadata, the metadata
  wins (it cannot belong to another model) and a warning says so. A model
  with neither is a `UserError`.
  """
  beside = artifacts.labels_beside(path)
  embedded = None
  if path.endswith(".tflite") and os.path.isfile(path):
    from flowers import tflite_metadata  # pylint: disable=g-import-not-at-top

    try:
      embedded = tflite_metadata.read_class_names(path)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"--model={path} is not a readable .tflite ({type(e).__name__}); "
                      "export it again with --mode=export.") from e
  if embedded:
    if os.path.exists(beside) and artifacts.read_labels(beside) != embedded:
      print(f"flowers_main: warning: {beside} differs from the class names inside "
            f"{path}; using the model's own.", file=sys.stderr)
    return embedded
  if os.path.exists(beside):
    return artifacts.read_labels(beside)
  kind = "no TFLite metadata and " if path.endswith(".tflite") else ""
  raise UserError(f"{path} has {kind}no {artifacts.LABELS} beside it, so its classes "
                  "have no names; put its labels.txt beside it, or re-export it with "
                  "--mode=export (which embeds them).")


def top_k(probs: np.ndarray, class_names: Sequence[str],
          k: int = 5) -> list[list[tuple[str, float]]]:
  """The k most likely (class name, probability) pairs per row."""
  k = min(k, probs.shape[1])
  order = np.argsort(-probs, axis=1)[:, :k]
  return [[(class_names[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]
