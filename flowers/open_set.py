"""'None of these': the score threshold below which an image is "unknown".

A classifier of C flowers answers one of them for any photo. An app needs a
way to say "unknown": reject an image whose top probability is below a
threshold. The threshold is chosen on val, from known-class images only, to
keep a stated share of them (the true-accept rate, default 95%):
`choose_threshold` gives the largest threshold that accepts at least that
share. `train.save_run` records it in report.json. The exported model gives
other scores (an int8 output has 256 levels and tops out at 255/256), so the
export chooses its own threshold by the same rule on its own val scores
(`exported_threshold`), never above what its output can reach
(`max_output_score`), and writes that into the .tflite's metadata as the
output's score threshold, which MediaPipe Tasks and the TFLite Task Library
apply themselves (they return no class scoring below it); `--mode=predict`
and `--mode=evaluate` read it back (`model_threshold`), so they say "unknown"
where those clients return nothing.

How well a score separates unknowns is measured by the open-set protocol
(`--holdout_classes=K`): K classes are left out of training, and their val
and test images are the unknowns. `open_set_report` gives each score's AUROC
(known against unknown) and false-accept rate (the share of unknowns accepted
at the threshold that keeps the true-accept rate of known val images), and
the score that val prefers. Scores, from the classifier's logits z:
max_probability (max softmax(z), what clients threshold), max_logit (max z)
and energy (logsumexp z, the negative free energy); higher means "known".

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


# The largest stored value of each quantized output type.
_QUANTIZED_MAX = {"uint8": 255, "int8": 127}


def max_output_score(dtype: str, quantization: tuple[float, int] | list) -> float:
  """The highest score a model's output can give, as clients read it.

  A float output: 1.0 (a probability). A quantized one (`dtype` "uint8" or
  "int8", with its (scale, zero point)): scale * (q_max - zero_point), in
  float32 as MediaPipe dequantizes; 255/256 for flowers' int8 exports (softmax
  outputs are quantized with scale 1/256), with uint8 and int8 I/O alike.
  """
  if dtype not in _QUANTIZED_MAX or not quantization[0]:
    return 1.0
  scale, zero_point = quantization
  return float((np.float32(_QUANTIZED_MAX[dtype]) - np.float32(zero_point)) * np.float32(scale))


def exported_threshold(val_scores: np.ndarray, true_accept_rate: float, max_score: float,
                       run_threshold: float | None = None) -> dict[str, Any] | None:
  """The threshold an exported model's metadata holds, chosen on its own val scores.

  `choose_threshold`'s rule (the largest threshold that accepts at least
  `true_accept_rate` of the known val images) on the exported model's top
  scores `val_scores`, capped at `max_score`, what its output can reach. The
  threshold is one of the scores, so images tied at the top level (a saturated
  int8 output gives many at 255/256) are all accepted, never all refused.

  `run_threshold` (the float model's, from report.json) is checked against
  the same floor: "lowered" says it would have accepted fewer than
  `true_accept_rate` of these val images, and the threshold returned, the
  largest reachable one that meets the rate, is lower.

  Returns {"score", "val_accepted", "run_val_accepted" (these val images'
  share at `run_threshold`; None without one), "lowered"}, or None when no
  threshold is chosen (rate 0, or no val scores).
  """
  scores = np.asarray(val_scores, np.float64).reshape(-1)
  threshold = choose_threshold(scores, true_accept_rate)
  if threshold is None:
    return None
  threshold = min(threshold, float(max_score))
  at_run = None if run_threshold is None else accepted(scores, run_threshold)
  return {"score": threshold, "val_accepted": accepted(scores, threshold),
          "run_val_accepted": at_run,
          "lowered": at_run is not None and at_run < true_accept_rate - 1e-9}


def run_threshold(path: str) -> dict[str, Any] | None:
  """The report.json "unknown_threshold" of the run of the `.keras` at `path`; None
  without one, or when that report does not describe this very model (lineage)."""
  folder = os.path.dirname(os.path.abspath(path))
  if lineage.check(folder, artifacts.REPORT, model=lineage.model_sha256(path)) is not None:
    return None
  report = artifacts.read_json(os.path.join(folder, artifacts.REPORT))
  chosen = report.get("unknown_threshold") if isinstance(report, dict) else None
  return chosen if isinstance(chosen, dict) and "score" in chosen else None


def model_threshold(path: str) -> float | None:
  """The "unknown" threshold that belongs to the model at `path`; None without one.

  A `.tflite` carries it in its metadata (ScoreThresholdingOptions, what
  MediaPipe Tasks apply: the export chose it on that model's own val scores);
  a `.keras` has it in the report.json of its run (`run_threshold`).
  """
  if path.endswith(".tflite"):
    from flowers import tflite_metadata  # pylint: disable=g-import-not-at-top

    return tflite_metadata.read_score_threshold(path)
  chosen = run_threshold(path)
  return None if chosen is None else float(chosen["score"])


SCORES = ("max_probability", "max_logit", "energy")
# The true-accept rate the protocol reports at when the run chose no threshold.
PROTOCOL_TRUE_ACCEPT_RATE = 0.95


def score(logits: np.ndarray, name: str) -> np.ndarray:
  """Score `name` of SCORES per image, from logits [N, C]; higher means known."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=1)
  log_sum_exp = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  if name == "max_probability":
    return np.exp(top - log_sum_exp)
  if name == "max_logit":
    return top
  if name == "energy":
    return log_sum_exp
  raise ValueError(f"Unknown score {name!r}; one of {SCORES}.")


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
  """The chance a known image scores above an unknown one (ties count half)."""
  known = np.asarray(known, np.float64).reshape(-1)
  unknown = np.asarray(unknown, np.float64).reshape(-1)
  values, inverse, counts = np.unique(np.concatenate([known, unknown]), return_inverse=True,
                                      return_counts=True)
  del values
  # 1-based rank of each distinct value, ties sharing their mean rank.
  mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
  rank_sum = mean_rank[inverse[:len(known)]].sum()
  return float((rank_sum - len(known) * (len(known) + 1) / 2.0) / (len(known) * len(unknown)))


def _score_report(known_val: np.ndarray, unknown_val: np.ndarray, known_test: np.ndarray,
                  unknown_test: np.ndarray, rate: float) -> dict[str, float]:
  """One score's figures: AUROC and false-accept on val and test, its threshold
  chosen on known val images, and the true-accept rate it gives on known test."""
  threshold = choose_threshold(known_val, rate)
  return {"threshold": threshold,
          "val_auroc": auroc(known_val, unknown_val),
          "val_false_accept": accepted(unknown_val, threshold),
          "test_auroc": auroc(known_test, unknown_test),
          "test_false_accept": accepted(unknown_test, threshold),
          "test_true_accept": accepted(known_test, threshold)}


def open_set_report(logits: dict[str, np.ndarray], held_out_classes: list[str],
                    true_accept_rate: float) -> dict[str, Any]:
  """report.json's "open_set": every score measured, and the one val chooses.

  `logits` holds "val_known", "val_unknown", "test_known" and "test_unknown"
  (each [N, C]). A score is chosen by its val false-accept rate, then its val
  AUROC; test is reported, never used to choose.
  """
  rate = true_accept_rate or PROTOCOL_TRUE_ACCEPT_RATE
  figures = {name: _score_report(*(score(logits[part], name) for part in
                                   ("val_known", "val_unknown", "test_known", "test_unknown")),
                                 rate)
             for name in SCORES}
  chosen = min(SCORES, key=lambda n: (figures[n]["val_false_accept"], -figures[n]["val_auroc"]))
  return {"held_out_classes": list(held_out_classes), "true_accept_rate": rate,
          "num_val_unknown": len(logits["val_unknown"]),
          "num_test_unknown": len(logits["test_unknown"]),
          "scores": figures, "chosen_score": chosen}
