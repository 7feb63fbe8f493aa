"""MediaPipe check: the exported model in a client nobody here wrote.

Usage, from the repository root (mediapipe installed: `pip install mediapipe`):

  python benchmarks/mediapipe_check.py --model=runs/cpu/model_int8.tflite \
      --tfds_data_dir=../shared/tensorflow_datasets          # add --limit=20 to try it
  python benchmarks/mediapipe_check.py --model=runs/mine/model_int8.tflite  # an image folder run

Over the test split of the model's workdir (`splits.csv` beside the model, or
`--workdir`), each test image is classified twice:

  mediapipe   MediaPipe Tasks `vision.ImageClassifier` on the file (its own
              decoding and resize; category names from the model's metadata)
  predict     `flowers_main --mode=predict` on the same files (`modes.predict`)

For a run trained on an image folder (its run.json says where; `--image_dir`
if it has moved), the files are the folder's own, as they are. For a TFDS run,
each test image of oxford_flowers102 is written to a temporary folder as its
original JPEG. MediaPipe decodes a grayscale file to one channel, which its
classifier refuses; such images are repeated to RGB, as an app must.

It prints whether MediaPipe's category names, by index, equal `labels.txt`;
the top-1 agreement of the two (MediaPipe asked for every class, whatever the
score threshold in the metadata); both accuracies; and `export_report.json`'s
int8 test accuracy for comparison. Targets: agreement >= 0.99,
MediaPipe's accuracy within 0.5 points of the export's.

When the model's metadata holds a score threshold (the "unknown" threshold),
MediaPipe with its default options applies it and returns no category for an
image scoring below it, where `--mode=predict` says "unknown". Per image, both
verdicts are recorded (`--out`), and `unknown_agreement` is the share of
images on which they agree. `check` is the comparison without printing; its
`extra_paths` (such as images of classes the model never saw) are scored for
these verdicts only.

What MediaPipe does to a photo (mediapipe 1.2.3, CPU; read off a probe model in
tests/test_tflite_metadata.py): the whole image is squashed to the model's
input, no crop, no padding, sampled bilinearly at x_src = x * W / S (corners
aligned, no half-pixel offset), without antialiasing. flowers' `data.resize`
does the same (up to rounding), and JPEGs are decoded with the accurate
integer DCT, as Pillow and MediaPipe do. So that the choice of preprocessing
rests on figures, the same model is also scored, by LiteRT, through:

  mediapipe_presized  MediaPipe given predict's resized pixels (S x S already,
                      so its resize is the identity): the client-side recipe
  antialiased         what flowers did before: TensorFlow's fast-DCT JPEG
                      decode and an antialiased, pixel-centre-aligned resize
  center_crop         the central square, then flowers' resize
  pad                 aspect kept: black bars to a square, then flowers' resize
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FLOWERS_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
DEFAULT_DATA_DIR = os.path.join(SHARED, "tensorflow_datasets")
VARIANTS = ("mediapipe_presized", "antialiased", "center_crop", "pad")
AGREEMENT_TARGET = 0.99
ACCURACY_GAP_TARGET = 0.5  # Points.
# mediapipe sends an unset score threshold as 0, and a threshold at or below 0 means "the
# metadata's": the smallest positive float is the one that returns every class (above 0).
EVERY_SCORE = float(np.finfo(np.float32).tiny)
SHOWN_DISAGREEMENTS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="An exported .tflite (with metadata).")
  parser.add_argument("--workdir", default=None,
                      help="The run holding splits.csv (default: the model's folder).")
  parser.add_argument("--tfds_data_dir", default=DEFAULT_DATA_DIR,
                      help="TFDS data folder holding oxford_flowers102/.")
  parser.add_argument("--image_dir", default=None,
                      help="For a run trained on an image folder: where the folder is now "
                      "(default: where the run's run.json says).")
  parser.add_argument("--limit", type=int, default=0,
                      help="Use this many test images, spread over the split (0: all).")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"Other preprocessings to score, comma-separated, of {VARIANTS}; "
                      "'' for none.")
  parser.add_argument("--threads", type=int, default=None, help="LiteRT threads.")
  parser.add_argument("--out", default=None, help="Also write the figures to this JSON file.")
  return parser.parse_args(argv)


def test_examples(workdir: str, limit: int) -> tuple[list[str], np.ndarray]:
  """The test split's keys (sorted) and labels, from the workdir's splits.csv."""
  from flowers import artifacts  # pylint: disable=g-import-not-at-top
  from flowers import split as split_lib  # pylint: disable=g-import-not-at-top

  assignment, labels = split_lib.read_manifest(os.path.join(workdir, artifacts.SPLITS))
  keys = split_lib.keys_of(assignment, "test")
  if limit and limit < len(keys):
    keys = [keys[i] for i in np.linspace(0, len(keys) - 1, limit).round().astype(int)]
  return keys, np.array([labels[k] for k in keys])


def held_out_test_keys(workdir: str, data_dir: str, image_dir: str | None,
                       limit: int) -> list[str]:
  """The test images of the classes a `--holdout_classes` run left out (its
  unknowns), sorted; none for a run that held out none."""
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import runs  # pylint: disable=g-import-not-at-top
  from flowers import split as split_lib  # pylint: disable=g-import-not-at-top
  from flowers.config import DataConfig  # pylint: disable=g-import-not-at-top

  run = runs.read_run(workdir)
  if run is None:
    return []
  data = runs.data_of_run(run, DataConfig(image_dir=image_dir,
                                          tfds_data_dir=None if image_dir else data_dir))
  if not data.holdout_classes:
    return []
  _, _, assignment = data_lib.split_held_out(data_lib.load_source(data), data)
  keys = split_lib.keys_of(assignment, "test")
  if limit and limit < len(keys):
    keys = [keys[i] for i in np.linspace(0, len(keys) - 1, limit).round().astype(int)]
  return keys


def write_test_images(data_dir: str, keys: list[str], folder: str) -> list[str]:
  """The original encoded files of `keys`, written to `folder`, in `keys` order."""
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_tfds(data_dir=data_dir, download=False)
  wanted = set(keys)
  for key, encoded in source.encoded().as_numpy_iterator():
    key = key.decode()
    if key in wanted:
      with open(os.path.join(folder, key), "wb") as f:
        f.write(encoded)
  paths = [os.path.join(folder, k) for k in keys]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise SystemExit(f"{len(missing)} test images of splits.csv are not in "
                     f"{data_dir}, e.g. {missing[0]}; is it the run's data?")
  return paths


def run_image_dir(workdir: str, image_dir: str | None) -> str | None:
  """The image folder of the run in `workdir`, `image_dir` if given; None for TFDS data."""
  from flowers import runs  # pylint: disable=g-import-not-at-top
  from flowers.config import DataConfig  # pylint: disable=g-import-not-at-top

  data = DataConfig(image_dir=image_dir)
  run = runs.read_run(workdir)
  if run is not None:
    data = runs.data_of_run(run, data)
  return os.path.abspath(data.image_dir) if data.image_dir else None


def folder_images(image_dir: str, keys: list[str]) -> list[str]:
  """The files of `keys` (paths under `image_dir`, '/'-separated), in `keys` order."""
  paths = [os.path.join(image_dir, *key.split("/")) for key in keys]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise SystemExit(f"{len(missing)} test images of splits.csv are not in {image_dir}, "
                     f"e.g. {missing[0]}; if the folder has moved, give --image_dir.")
  return paths


def classifier(model: str, every_class: bool = True):
  """MediaPipe's ImageClassifier for `model`.

  With `every_class`, every class scoring above 0 is returned: a tiny score
  threshold overrides the one in the model's metadata (the "unknown"
  threshold), which would drop the classes scoring below it. Otherwise the
  default options, as an app gets them (the metadata's threshold applies).
  """
  from mediapipe.tasks.python import vision  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.core import base_options  # pylint: disable=g-import-not-at-top

  options = vision.ImageClassifierOptions(
      base_options=base_options.BaseOptions(model_asset_path=model), max_results=-1,
      score_threshold=EVERY_SCORE if every_class else None)
  return vision.ImageClassifier.create_from_options(options)


class Top1:
  """Top-1 class indices of one way of classifying the images.

  Attributes:
    first: the class the client lists first (what an app shows).
    lowest: the lowest index among the classes tied for the top score. int8
      models output probabilities in steps of 1/256, so exact ties happen on
      uncertain images, and clients order tied classes as they please;
      comparing `lowest` compares answers, not tie-breaking.
    ties: images whose top score is shared by more than one class.
  """

  def __init__(self, first, lowest, ties: int = 0):
    self.first, self.lowest, self.ties = np.array(first), np.array(lowest), ties


def categories_of(clf, image) -> list:
  """MediaPipe's categories for one image, a file path (MediaPipe decodes it) or a
  uint8 RGB array. A grayscale file, decoded to one channel, is repeated to RGB."""
  import mediapipe as mp  # pylint: disable=g-import-not-at-top

  if isinstance(image, str):
    mp_image = mp.Image.create_from_file(image)
    if mp_image.image_format != mp.ImageFormat.GRAY8:
      return clf.classify(mp_image).classifications[0].categories
    gray = mp_image.numpy_view().reshape(mp_image.height, mp_image.width, 1)
    image = np.repeat(gray, 3, axis=2)
  pixels = np.ascontiguousarray(image)  # Kept alive while MediaPipe reads it.
  mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels)
  return clf.classify(mp_image).classifications[0].categories


def mediapipe_top1(clf, images, class_names: list[str]) -> tuple[Top1, int]:
  """Top-1 per image, and how many results named a category otherwise than
  `class_names` at its index."""
  first, lowest, ties, misnamed = [], [], 0, 0
  for image in images:
    categories = categories_of(clf, image)
    misnamed += any(c.index >= len(class_names) or c.category_name != class_names[c.index]
                    for c in categories)
    best = max(c.score for c in categories)
    tied = [c.index for c in categories if c.score == best]
    first.append(categories[0].index)
    lowest.append(min(tied))
    ties += len(tied) > 1
  return Top1(first, lowest, ties), misnamed


def mediapipe_unknown(model: str, images) -> np.ndarray:
  """Per image, whether MediaPipe with its default options returns no category."""
  clf = classifier(model, every_class=False)
  try:
    return np.array([not categories_of(clf, image) for image in images], bool)
  finally:
    clf.close()


def predict_results(model: str, workdir: str, paths: list[str]) -> list[dict]:
  """`flowers_main --mode=predict`'s JSON result per file (the library call), in order."""
  from flowers import modes  # pylint: disable=g-import-not-at-top
  from flowers.config import PredictConfig  # pylint: disable=g-import-not-at-top
  from flowers.config import RunConfig  # pylint: disable=g-import-not-at-top

  config = RunConfig(predict=PredictConfig(model=model, images=tuple(paths), top_k=5,
                                           output="json"))
  with contextlib.redirect_stdout(io.StringIO()):
    results = modes.predict(config, workdir)
  by_file = {os.path.abspath(r["image"]): r for r in results}
  return [by_file[os.path.abspath(path)] for path in paths]


def predict_top1(results: list[dict], class_names: list[str]) -> Top1:
  """Top-1 per image of predict's results."""
  index = {name: i for i, name in enumerate(class_names)}
  first, lowest, ties = [], [], 0
  for result in results:
    top = result["top_k"]
    tied = [index[t["label"]] for t in top if t["probability"] == top[0]["probability"]]
    first.append(index[top[0]["label"]])
    lowest.append(min(tied))
    ties += len(tied) > 1
  return Top1(first, lowest, ties)


def antialiased(encoded: bytes, size: int) -> np.ndarray:
  """flowers' preprocessing before it matched MediaPipe's (for comparison)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  resized = tf.image.resize(image, (size, size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


def center_crop(image: np.ndarray) -> np.ndarray:
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  return image[top:top + side, left:left + side]


def pad_to_square(image: np.ndarray) -> np.ndarray:
  height, width = image.shape[:2]
  side = max(height, width)
  top, left = (side - height) // 2, (side - width) // 2
  out = np.zeros((side, side, 3), np.uint8)
  out[top:top + height, left:left + width] = image
  return out


def top1_by_preprocessing(model: str, paths: list[str], predicted: Top1,
                          class_names: list[str], variants: list[str],
                          threads: int | None) -> tuple[dict[str, Top1], int]:
  """Top-1 index per image through MediaPipe, predict (`predicted`) and each variant.

  Also returns how many MediaPipe results named the categories, by index,
  otherwise than `class_names`.
  """
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import evaluate  # pylint: disable=g-import-not-at-top

  clf = classifier(model)
  top1 = {}
  top1["mediapipe"], misnamed = mediapipe_top1(clf, paths, class_names)
  top1["predict"] = predicted
  if not variants:
    clf.close()
    return top1, misnamed
  predictor = evaluate.tflite_predictor(model, num_threads=threads)
  size = predictor.input_size  # type: ignore[attr-defined]

  def encoded():
    for path in paths:
      with open(path, "rb") as f:
        yield f.read()

  def decoded():
    for data in encoded():
      yield data_lib.decode_with_pil(data)

  def ours(image):
    return data_lib.resize(image, size).numpy()

  def litert_top1(images):
    probs = [predictor(image[None])[0] for image in images]
    lowest = [int(p.argmax()) for p in probs]  # The first maximum.
    return Top1(lowest, lowest, sum(int((p == p.max()).sum() > 1) for p in probs))

  for variant in variants:
    if variant == "mediapipe_presized":
      top1[variant], extra = mediapipe_top1(clf, (ours(d) for d in decoded()), class_names)
      misnamed += extra
    elif variant == "antialiased":
      top1[variant] = litert_top1(antialiased(e, size) for e in encoded())
    elif variant == "center_crop":
      top1[variant] = litert_top1(ours(center_crop(d)) for d in decoded())
    elif variant == "pad":
      top1[variant] = litert_top1(ours(pad_to_square(d)) for d in decoded())
  clf.close()
  return top1, misnamed


def agreement_figures(top1: dict[str, Top1], labels: np.ndarray) -> dict[str, dict]:
  """Per way of classifying: accuracy, tied top scores, agreement with predict and with
  MediaPipe (answers compared, ties broken alike: lowest index)."""
  figures = {}
  for name, t in top1.items():
    figures[name] = {
        "accuracy": float((t.first == labels).mean()),
        "tied_top": t.ties,
        "agreement_with_predict": float((t.lowest == top1["predict"].lowest).mean()),
        "agreement_with_mediapipe": float((t.lowest == top1["mediapipe"].lowest).mean()),
    }
  figures["mediapipe"]["agreement_with_predict_as_listed"] = float(
      (top1["mediapipe"].first == top1["predict"].first).mean())
  return figures


def unknown_figures(mediapipe: np.ndarray, predict: np.ndarray, num_test: int) -> dict:
  """How often each said "unknown", and how often the two agree, on the test images
  and on the extra ones."""
  def counts(part: slice) -> dict:
    agree = mediapipe[part] == predict[part]
    return {"images": int(agree.size), "mediapipe_unknown": int(mediapipe[part].sum()),
            "predict_unknown": int(predict[part].sum()),
            "agreement": float(agree.mean()) if agree.size else None}

  return {"test": counts(slice(0, num_test)), "extra": counts(slice(num_test, None))}


def per_image(paths: list[str], labels: np.ndarray, extra_paths: Sequence[str],
              top1: dict[str, Top1], unknown: tuple[np.ndarray, np.ndarray] | None
              ) -> list[dict]:
  """One record per image: its label, both top-1 answers, both "unknown" verdicts."""
  records = []
  for i, path in enumerate(list(paths) + list(extra_paths)):
    record = {"image": path, "extra": i >= len(paths)}
    if i < len(paths):
      record.update(label=int(labels[i]), mediapipe_top1=int(top1["mediapipe"].first[i]),
                    predict_top1=int(top1["predict"].first[i]))
    if unknown is not None:
      record.update(mediapipe_unknown=bool(unknown[0][i]), predict_unknown=bool(unknown[1][i]))
    records.append(record)
  return records


def check(model: str, workdir: str, paths: list[str], labels, *,
          extra_paths: Sequence[str] = (), variants: Sequence[str] = (),
          threads: int | None = None) -> dict:
  """MediaPipe against `--mode=predict` on image files, without printing.

  `labels` are the class indices of `paths`; `extra_paths` (images of classes
  the model never saw, say) are scored for the "unknown" verdicts only.
  Returns `names_match` (the metadata's names equal `labels.txt` and every
  MediaPipe result names its classes so), `agreement` (top-1, ties broken
  alike), `accuracies`, the per-preprocessing `figures`, and, when the model
  has a score threshold, `unknown` and `unknown_agreement` (else None), with
  the verdicts per image in `per_image`.
  """
  from flowers import artifacts  # pylint: disable=g-import-not-at-top
  from flowers import evaluate  # pylint: disable=g-import-not-at-top
  from flowers import tflite_metadata  # pylint: disable=g-import-not-at-top

  paths, extra_paths, labels = list(paths), list(extra_paths), np.asarray(labels)
  class_names = evaluate.model_class_names(model)
  labels_txt = artifacts.labels_beside(model)
  reference = artifacts.read_labels(labels_txt) if os.path.exists(labels_txt) else None
  embedded = tflite_metadata.read_class_names(model)
  threshold = tflite_metadata.read_score_threshold(model)
  results = predict_results(model, workdir, paths + extra_paths)
  predicted = predict_top1(results[:len(paths)], class_names)
  top1, misnamed = top1_by_preprocessing(model, paths, predicted, class_names, list(variants),
                                         threads)
  figures = agreement_figures(top1, labels)
  unknown = None
  if threshold is not None:
    unknown = (mediapipe_unknown(model, paths + extra_paths),
               np.array([bool(r.get("unknown")) for r in results], bool))
  names_equal = embedded is not None and embedded == reference
  return {"num_images": len(paths), "num_extra": len(extra_paths),
          "class_names": class_names, "names_equal": names_equal,
          "reference_names": len(reference or []), "embedded_names": len(embedded or []),
          "misnamed_results": int(misnamed), "names_match": names_equal and not misnamed,
          "agreement": figures["mediapipe"]["agreement_with_predict"],
          "agreement_as_listed": figures["mediapipe"]["agreement_with_predict_as_listed"],
          "accuracies": {name: row["accuracy"] for name, row in figures.items()},
          "figures": figures, "score_threshold": threshold,
          "unknown": None if unknown is None else unknown_figures(*unknown, len(paths)),
          "unknown_agreement": None if unknown is None else float(
              (unknown[0] == unknown[1]).mean()),
          "per_image": per_image(paths, labels, extra_paths, top1, unknown)}


def print_table(figures: dict[str, dict]) -> None:
  header = (f"{'preprocessing':<20} {'top-1 acc':>9} {'tied top':>8} {'agree predict':>13} "
            f"{'agree mediapipe':>15}")
  print(header)
  print("-" * len(header))
  for name, row in figures.items():
    print(f"{name:<20} {row['accuracy']:>9.4f} {row['tied_top']:>8} "
          f"{row['agreement_with_predict']:>13.4f} {row['agreement_with_mediapipe']:>15.4f}")
  print("(accuracy of the class each lists first; agreement of answers, ties broken "
        "alike: lowest index)")


def print_unknown(result: dict) -> None:
  """The "unknown" verdicts of MediaPipe's default options and of predict."""
  if result["unknown"] is None:
    print("No score threshold in the model's metadata: no \"unknown\" verdicts to compare.")
    return
  for part, counts in result["unknown"].items():
    if counts["images"]:
      print(f"Unknown on the {part} images (score threshold {result['score_threshold']:.4f}): "
            f"MediaPipe returned no category for {counts['mediapipe_unknown']} of "
            f"{counts['images']}, --mode=predict said unknown for {counts['predict_unknown']}; "
            f"agreement {counts['agreement']:.4f}")
  differ = [r["image"] for r in result["per_image"]
            if r["mediapipe_unknown"] != r["predict_unknown"]]
  for image in differ[:SHOWN_DISAGREEMENTS]:
    print(f"  verdicts differ: {image}")
  if len(differ) > SHOWN_DISAGREEMENTS:
    print(f"  ... and {len(differ) - SHOWN_DISAGREEMENTS} more")
  print(f"unknown_agreement={result['unknown_agreement']:.4f}")


def export_accuracy(workdir: str) -> tuple[str, float | None]:
  """export_report.json's int8 test accuracy (its path, and None without one)."""
  from flowers import artifacts  # pylint: disable=g-import-not-at-top

  report_path = os.path.join(workdir, artifacts.EXPORT_REPORT)
  if not os.path.exists(report_path):
    return report_path, None
  with open(report_path, encoding="utf-8") as f:
    report = json.load(f)
  return report_path, report.get("int8_test_accuracy", report.get("tflite_test_accuracy"))


def print_targets(result: dict, workdir: str, subset: str) -> float | None:
  """Agreement and accuracy gap against their targets; returns the gap in points."""
  for what, value in (("ties broken alike", result["agreement"]),
                      ("as each lists them", result["agreement_as_listed"])):
    print(f"MediaPipe top-1 agreement with --mode=predict, {what}: {value:.4f} (target >= "
          f"{AGREEMENT_TARGET}): {'met' if value >= AGREEMENT_TARGET else 'NOT met'}{subset}")
  report_path, exported = export_accuracy(workdir)
  if exported is None:
    print(f"No int8_test_accuracy in {report_path} to compare with.")
    return None
  accuracy = result["accuracies"]["mediapipe"]
  gap = 100.0 * abs(accuracy - exported)
  print(f"MediaPipe accuracy {accuracy:.4f} vs export_report.json "
        f"{exported:.4f}: {gap:.2f} points apart (target <= {ACCURACY_GAP_TARGET}): "
        f"{'met' if gap <= ACCURACY_GAP_TARGET else 'NOT met'}{subset}")
  return gap


def run_check(args: argparse.Namespace, image_dir: str | None, variants: list[str]) -> dict:
  """`check` on the workdir's test split, from the image folder or TFDS; prints."""
  from flowers import artifacts  # pylint: disable=g-import-not-at-top

  model = os.path.abspath(args.model)
  workdir = args.workdir or os.path.dirname(model)
  keys, labels = test_examples(workdir, args.limit)
  unknowns = held_out_test_keys(workdir, args.tfds_data_dir, image_dir, args.limit)
  where = f" in {image_dir}" if image_dir else ""
  folder = None
  try:
    if image_dir:
      paths, extra = folder_images(image_dir, keys), folder_images(image_dir, unknowns)
    else:
      folder = tempfile.mkdtemp(prefix="flowers_mediapipe_")
      written = write_test_images(args.tfds_data_dir, keys + unknowns, folder)
      paths, extra = written[:len(keys)], written[len(keys):]
    print(f"{model}: {len(keys)} test images of {os.path.join(workdir, artifacts.SPLITS)}"
          f"{where}" + (f", and as extra images the {len(unknowns)} test images of the "
                        "classes the run held out (--holdout_classes)" if unknowns else ""))
    result = check(model, workdir, paths, labels, extra_paths=extra, variants=variants,
                   threads=args.threads)
  finally:
    if folder:
      shutil.rmtree(folder, ignore_errors=True)
  print(f"\nCategory names: {result['embedded_names']} in the metadata, "
        f"{result['reference_names']} in {artifacts.labels_beside(model)}; equal: "
        f"{'yes' if result['names_equal'] else 'NO'}. MediaPipe results naming "
        f"the categories otherwise, by index: {result['misnamed_results']}.")
  print_table(result["figures"])
  subset = f" (on {len(keys)} images only)" if args.limit else ""
  result["accuracy_gap_points"] = print_targets(result, workdir, subset)
  print_unknown(result)
  return {"model": model, "workdir": workdir, **result}


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, REPO_ROOT)
  model = os.path.abspath(args.model)
  image_dir = run_image_dir(args.workdir or os.path.dirname(model), args.image_dir)
  if image_dir is None and not os.path.isdir(
      os.path.join(args.tfds_data_dir, "oxford_flowers102")):
    print(f"Real data not found at {args.tfds_data_dir} (oxford_flowers102/); "
          "nothing to check.")
    return 0
  if image_dir is not None and not os.path.isdir(image_dir):
    print(f"Image folder {image_dir} not found; give --image_dir where the run's folder "
          "is now.", file=sys.stderr)
    return 2
  try:
    import mediapipe  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f"mediapipe cannot be imported ({e}); pip install mediapipe.", file=sys.stderr)
    return 2
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    print(f"--variants: unknown {unknown}; choose from {VARIANTS}.", file=sys.stderr)
    return 2
  start = time.time()
  result = run_check(args, image_dir, variants)
  print(f"({time.time() - start:.0f} s)")
  if args.out:
    _, result["export_accuracy"] = export_accuracy(result["workdir"])
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
