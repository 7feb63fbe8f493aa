"""'None of these': the score threshold below which an image is "unknown".

A classifier of C flowers answers one of them for any photo. An app needs a
way to say "unknown": reject an image whose top probability is below a
threshold. The threshold is chosen on val, from known-class images only, to
keep a stated share of them (the true-accept rate, default 95%):
`choose_threshold` gives the largest threshold that accepts at least that
share. `train.save_run` records it in report.json; the export writes it into
the .tflite's metadata as the output's score threshold, which MediaPipe Tasks
and the TFLite Task Library apply themselves (they return no class scoring
below it); `--mode=predict` reads it back (`model_threshold`) and says
"unknown" where they would return nothing.

numpy only (no TensorFlow at import).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from flowers import artifacts
from flowers import lineage


def max_probability(probs: np.ndarray) -> np.ndarray:
  """The top-1 probability per image (the score clients threshold)."""
  return np.asarray(probs, np.float64).max(axis=1)


def choose_threshold(scores: np.ndarray, true_accept_rate: float) -> float | None:
  """The largest threshold t with at least `true_accept_rate` of `scores` >= t.

  That is the (1 - rate) quantile of the known images' scores, taken as one of
  them (no interpolation), so "accept when score >= t" keeps the rate on these
  images. None for a rate of 0 (no threshold) or no scores.
  """
  scores = np.sort(np.asarray(scores, np.float64).reshape(-1))
  keep = math.ceil(true_accept_rate * len(scores) - 1e-9)
  if keep <= 0 or not len(scores):
    return None
  return float(scores[len(scores) - keep])


def accepted(scores: np.ndarray, threshold: float) -> float:
  """The share of `scores` at or above `threshold` (what a client accepts)."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  return float((scores >= threshold).mean()) if len(scores) else 0.0


def threshold_report(val_probs: np.ndarray, test_probs: np.ndarray,
                     true_accept_rate: float) -> dict[str, Any] | None:
  """report.json's "unknown_threshold": the max-probability threshold chosen on val.

  With the share of val and test (known-class) images it accepts. None when
  no threshold is chosen (rate 0, or no val images).
  """
  threshold = choose_threshold(max_probability(val_probs), true_accept_rate)
  if threshold is None:
    return None
  return {"score": threshold, "true_accept_rate": true_accept_rate,
          "val_accepted": accepted(max_probability(val_probs), threshold),
          "test_accepted": accepted(max_probability(test_probs), threshold)}


def model_threshold(path: str) -> float | None:
  """The "unknown" threshold that belongs to the model at `path`; None without one.

  A `.tflite` carries it in its metadata (ScoreThresholdingOptions, what
  MediaPipe Tasks apply); a `.keras` has it in the report.json of its run,
  beside it, when that report describes this very model (its lineage record).
  """
  if path.endswith(".tflite"):
    from flowers import tflite_metadata  # pylint: disable=g-import-not-at-top

    return tflite_metadata.read_score_threshold(path)
  folder = os.path.dirname(os.path.abspath(path))
  if lineage.check(folder, artifacts.REPORT, model=lineage.model_sha256(path)) is not None:
    return None
  report = artifacts.read_json(os.path.join(folder, artifacts.REPORT))
  chosen = report.get("unknown_threshold") if isinstance(report, dict) else None
  return float(chosen["score"]) if isinstance(chosen, dict) and "score" in chosen else None
