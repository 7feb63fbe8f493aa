"""Calibrated scores: how far a model's probabilities are from its hit rate, and the fix.

A model is calibrated when, of the images it gives a top score of 0.9, about
90% are right. `expected_calibration_error` and `reliability` measure that on
(probabilities, labels); `nll` is the negative log-likelihood. Temperature
scaling mends it with one number: `fit_temperature` finds the T whose
softmax(log p / T) has the lowest NLL on held-out images, and
`fold_temperature` divides the classifier's kernel and bias by T, so the saved
model and every export give the calibrated probabilities with no new op. A
positive T scales every logit alike, so the top-1 class never changes.

numpy only (no TensorFlow at import); `fold_temperature` takes a Keras model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BINS = 15  # Equal-width confidence bins of the ECE and the reliability diagram.
# The NLL clips probabilities here before their log (float32's epsilon, as
# scikit-learn's log_loss does): an int8 model's output of 0 for the true class
# would otherwise make it infinite.
EPSILON = 1e-7
# Fitting and scaling clip only at float32's smallest normal number, so the
# log-probabilities are the model's logits up to a shift (which softmax ignores).
_LOG_FLOOR = float(np.finfo(np.float32).tiny)
# The temperatures `fit_temperature` searches (log-uniformly bounded).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
_GRID = 41  # Coarse grid points on log T before the golden-section refinement.
_REFINE_STEPS = 60


def _log_probs(probs: np.ndarray, floor: float = _LOG_FLOOR) -> np.ndarray:
  return np.log(np.clip(np.asarray(probs, np.float64), floor, 1.0))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
  """Mean negative log-likelihood of the true labels (probabilities clipped at EPSILON)."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  log_p = _log_probs(probs, EPSILON)
  return float(-log_p[np.arange(len(labels)), labels].mean())


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
  """Bin i holds confidences in [i / bins, (i + 1) / bins); 1.0 goes to the last."""
  return np.clip(np.floor(confidence * bins).astype(np.int64), 0, bins - 1)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, Any]:
  """Per equal-width confidence bin: images, mean top-1 confidence, top-1 accuracy.

  Returns {"bins", "count", "confidence", "accuracy"} as JSON values; an empty
  bin's confidence and accuracy are None.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels, np.int64).reshape(-1)
  confidence = probs.max(axis=1)
  correct = (probs.argmax(axis=1) == labels).astype(np.float64)
  index = _bin_index(confidence, bins)
  count = np.bincount(index, minlength=bins)
  conf_sum = np.bincount(index, weights=confidence, minlength=bins)
  correct_sum = np.bincount(index, weights=correct, minlength=bins)
  return {
      "bins": int(bins),
      "count": [int(c) for c in count],
      "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
      "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, count)],
  }


def ece_of_reliability(table: dict[str, Any]) -> float:
  """The expected calibration error a `reliability` table gives."""
  total = sum(table["count"])
  if not total:
    return 0.0
  return float(sum(n / total * abs(a - c) for n, a, c in zip(
      table["count"], table["accuracy"], table["confidence"]) if n))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = BINS) -> float:
  """Top-1 ECE: the image-weighted mean |accuracy - confidence| over equal-width bins."""
  return ece_of_reliability(reliability(probs, labels, bins))


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(log(probs) / temperature): what folding `temperature` into the model gives."""
  z = _log_probs(probs) / temperature
  z -= z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def _nll_at(log_probs: np.ndarray, labels: np.ndarray, log_t: float) -> float:
  z = log_probs / math.exp(log_t)
  top = z.max(axis=1, keepdims=True)
  log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
  return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
  """The temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE] of lowest NLL on (probs, labels).

  The NLL of softmax(z / T) is convex in 1 / T, so it has one minimum on log T:
  a coarse grid brackets it and a golden-section search refines it. No
  randomness: the same inputs give the same T.
  """
  log_probs = _log_probs(probs)
  labels = np.asarray(labels, np.int64).reshape(-1)
  grid = np.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), _GRID)
  losses = [_nll_at(log_probs, labels, g) for g in grid]
  best = int(np.argmin(losses))
  low, high = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
  ratio = (math.sqrt(5.0) - 1.0) / 2.0
  for _ in range(_REFINE_STEPS):
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    if _nll_at(log_probs, labels, a) <= _nll_at(log_probs, labels, b):
      high = b
    else:
      low = a
  return float(math.exp((low + high) / 2.0))


def fold_temperature(model: Any, temperature: float) -> None:
  """Divides the classifier Dense layer's kernel and bias by `temperature`, in place.

  Its softmax then gives softmax(logits / temperature): the saved model and
  every export carry the calibration with no new op.
  """
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top

  if temperature <= 0:
    raise ValueError(f"A temperature must be > 0, got {temperature}.")
  layer = model.get_layer(model_lib.CLASSIFIER_NAME)
  for variable in (layer.kernel, layer.bias):
    if variable is not None:
      value = variable.numpy()
      variable.assign((value.astype(np.float64) / temperature).astype(value.dtype))
