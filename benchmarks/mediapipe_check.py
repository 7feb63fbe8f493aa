"""MediaPipe check: the exported model in a client nobody here wrote.

Usage, from the repository root (mediapipe installed: `pip install mediapipe`):

  python benchmarks/mediapipe_check.py --model=runs/cpu/model_int8.tflite \
      --tfds_data_dir=../shared/tensorflow_datasets          # add --limit=20 to try it

Over the test split of the model's workdir (`splits.csv` beside the model, or
`--workdir`), each test image of oxford_flowers102 is written to a folder as
its original JPEG, then classified twice:

  mediapipe   MediaPipe Tasks `vision.ImageClassifier` on the file (its own
              decoding and resize; category names from the model's metadata)
  predict     `flowers_main --mode=predict` on the same files (`modes.predict`)

It prints whether MediaPipe's category names, by index, equal `labels.txt`;
the top-1 agreement of the two; both accuracies; and `export_report.json`'s
int8 test accuracy for comparison. Targets: agreement >= 0.99,
MediaPipe's accuracy within 0.5 points of the export's.

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

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FLOWERS_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
DEFAULT_DATA_DIR = os.path.join(SHARED, "tensorflow_datasets")
VARIANTS = ("mediapipe_presized", "antialiased", "center_crop", "pad")
AGREEMENT_TARGET = 0.99
ACCURACY_GAP_TARGET = 0.5  # Points.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="An exported .tflite (with metadata).")
  parser.add_argument("--workdir", default=None,
                      help="The run holding splits.csv (default: the model's folder).")
  parser.add_argument("--tfds_data_dir", default=DEFAULT_DATA_DIR,
                      help="TFDS data folder holding oxford_flowers102/.")
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


def classifier(model: str):
  """MediaPipe's ImageClassifier for `model`, every category returned.

  A score threshold of 0 overrides the one in the model's metadata (the
  "unknown" threshold), which would drop the categories scoring below it.
  """
  from mediapipe.tasks.python import vision  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.core import base_options  # pylint: disable=g-import-not-at-top

  options = vision.ImageClassifierOptions(
      base_options=base_options.BaseOptions(model_asset_path=model), max_results=-1,
      score_threshold=0.0)
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


def mediapipe_top1(clf, images, class_names: list[str]) -> tuple[Top1, int]:
  """Top-1 per image, and how many results named the categories otherwise.

  `images` are file paths (MediaPipe decodes them) or uint8 RGB arrays.
  """
  import mediapipe as mp  # pylint: disable=g-import-not-at-top

  first, lowest, ties, misnamed = [], [], 0, 0
  for image in images:
    if isinstance(image, str):
      mp_image = mp.Image.create_from_file(image)
    else:
      pixels = np.ascontiguousarray(image)  # Kept alive while MediaPipe reads it.
      mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels)
    categories = clf.classify(mp_image).classifications[0].categories
    names = [c.category_name for c in sorted(categories, key=lambda c: c.index)]
    misnamed += names != class_names
    best = max(c.score for c in categories)
    tied = [c.index for c in categories if c.score == best]
    first.append(categories[0].index)
    lowest.append(min(tied))
    ties += len(tied) > 1
  return Top1(first, lowest, ties), misnamed


def predict_top1(model: str, folder: str, workdir: str, class_names: list[str],
                 paths: list[str]) -> Top1:
  """Top-1 per file from `flowers_main --mode=predict` (the library call)."""
  from flowers import modes  # pylint: disable=g-import-not-at-top
  from flowers.config import PredictConfig  # pylint: disable=g-import-not-at-top
  from flowers.config import RunConfig  # pylint: disable=g-import-not-at-top

  config = RunConfig(predict=PredictConfig(model=model, images=(folder,), top_k=5,
                                           output="json"))
  with contextlib.redirect_stdout(io.StringIO()):
    results = modes.predict(config, workdir)
  index = {name: i for i, name in enumerate(class_names)}
  by_file = {os.path.abspath(r["image"]): r["top_k"] for r in results}
  first, lowest, ties = [], [], 0
  for path in paths:
    top = by_file[os.path.abspath(path)]
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


def top1_by_preprocessing(model: str, workdir: str, paths: list[str],
                          class_names: list[str], variants: list[str],
                          threads: int | None) -> tuple[dict[str, Top1], int]:
  """Top-1 index per image through MediaPipe, predict and each variant.

  Also returns how many MediaPipe results named the categories, by index,
  otherwise than `class_names`.
  """
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import evaluate  # pylint: disable=g-import-not-at-top

  clf = classifier(model)
  top1 = {}
  top1["mediapipe"], misnamed = mediapipe_top1(clf, paths, class_names)
  top1["predict"] = predict_top1(model, os.path.dirname(paths[0]), workdir, class_names,
                                 paths)
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


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if not os.path.isdir(os.path.join(args.tfds_data_dir, "oxford_flowers102")):
    print(f"Real data not found at {args.tfds_data_dir} (oxford_flowers102/); "
          "nothing to check.")
    return 0
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
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, REPO_ROOT)
  from flowers import artifacts  # pylint: disable=g-import-not-at-top
  from flowers import evaluate  # pylint: disable=g-import-not-at-top
  from flowers import tflite_metadata  # pylint: disable=g-import-not-at-top

  start = time.time()
  model = os.path.abspath(args.model)
  workdir = args.workdir or os.path.dirname(model)
  keys, labels = test_examples(workdir, args.limit)
  labels_txt = artifacts.labels_beside(model)
  reference = artifacts.read_labels(labels_txt) if os.path.exists(labels_txt) else None
  embedded = tflite_metadata.read_class_names(model)
  class_names = evaluate.model_class_names(model)
  folder = tempfile.mkdtemp(prefix="flowers_mediapipe_")
  try:
    paths = write_test_images(args.tfds_data_dir, keys, folder)
    print(f"{model}: {len(keys)} test images of {os.path.join(workdir, artifacts.SPLITS)}")
    top1, misnamed = top1_by_preprocessing(model, workdir, paths, class_names, variants,
                                           args.threads)
  finally:
    shutil.rmtree(folder, ignore_errors=True)

  names_equal = embedded is not None and embedded == reference
  print(f"\nCategory names: {len(embedded or [])} in the metadata, {len(reference or [])} in "
        f"{labels_txt}; equal: {'yes' if names_equal else 'NO'}. MediaPipe results naming "
        f"the categories otherwise, by index: {misnamed}.")
  header = (f"{'preprocessing':<20} {'top-1 acc':>9} {'tied top':>8} {'agree predict':>13} "
            f"{'agree mediapipe':>15}")
  print(header)
  print("-" * len(header))
  figures = {}
  for name, t in top1.items():
    figures[name] = {
        "accuracy": float((t.first == labels).mean()),
        "tied_top": t.ties,
        "agreement_with_predict": float((t.lowest == top1["predict"].lowest).mean()),
        "agreement_with_mediapipe": float((t.lowest == top1["mediapipe"].lowest).mean()),
    }
    row = figures[name]
    print(f"{name:<20} {row['accuracy']:>9.4f} {row['tied_top']:>8} "
          f"{row['agreement_with_predict']:>13.4f} {row['agreement_with_mediapipe']:>15.4f}")
  print("(accuracy of the class each lists first; agreement of answers, ties broken "
        "alike: lowest index)")

  subset = f" (on {len(keys)} images only)" if args.limit else ""
  agreement = figures["mediapipe"]["agreement_with_predict"]
  as_listed = float((top1["mediapipe"].first == top1["predict"].first).mean())
  figures["mediapipe"]["agreement_with_predict_as_listed"] = as_listed
  for what, value in (("ties broken alike", agreement), ("as each lists them", as_listed)):
    print(f"MediaPipe top-1 agreement with --mode=predict, {what}: {value:.4f} (target >= "
          f"{AGREEMENT_TARGET}): {'met' if value >= AGREEMENT_TARGET else 'NOT met'}{subset}")
  report_path = os.path.join(workdir, artifacts.EXPORT_REPORT)
  export_accuracy, gap = None, None
  if os.path.exists(report_path):
    with open(report_path, encoding="utf-8") as f:
      report = json.load(f)
    export_accuracy = report.get("int8_test_accuracy", report.get("tflite_test_accuracy"))
  if export_accuracy is None:
    print(f"No int8_test_accuracy in {report_path} to compare with.")
  else:
    gap = 100.0 * abs(figures["mediapipe"]["accuracy"] - export_accuracy)
    print(f"MediaPipe accuracy {figures['mediapipe']['accuracy']:.4f} vs export_report.json "
          f"{export_accuracy:.4f}: {gap:.2f} points apart (target <= {ACCURACY_GAP_TARGET}): "
          f"{'met' if gap <= ACCURACY_GAP_TARGET else 'NOT met'}{subset}")
  print(f"({time.time() - start:.0f} s)")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"model": model, "num_images": len(keys), "names_equal": names_equal,
                 "misnamed_results": int(misnamed), "figures": figures,
                 "export_accuracy": export_accuracy, "accuracy_gap_points": gap}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
