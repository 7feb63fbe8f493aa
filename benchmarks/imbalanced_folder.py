"""Imbalanced folder benchmark: --class_weight=balanced against none, on real photos.

Usage, from the repository root (about 6 minutes on 2 CPU cores):

  python benchmarks/imbalanced_folder.py             # 20 classes, 60 down to 6 train images
  python benchmarks/imbalanced_folder.py --classes=4 --max_train=12 --epochs=1 \
      --fine_tune_epochs=1 --seeds=42                 # a quick try

It writes an image folder (`--root`/images) from oxford_flowers102 (the TFDS
copy in ../shared), `--classes` classes drawn at random (--seed) among those
with enough photos, whose training images fall geometrically from
`--max_train` to `--min_train`. flowers splits each class 64/16/20, so class c
gets the smallest number of photos whose split leaves it exactly its train
count: val and test are as unequal as train, as in a user's folder, and the
smallest classes have few test images (min class recall moves in big steps).

Then, for each of `--seeds` (the split's and the training's), `flowers_main
--mode=train` runs on it twice, with flags/cpu.cfg's settings made small
(--image_size, --epochs, --fine_tune_epochs, --feature_cache_views; any other
flowers_main flag after `--` is passed on): the baseline with
--class_weight=none, then with --class_weight=balanced. For each run it prints
val and test macro-F1, min class recall, the mean recall of the `--smallest`
classes with the fewest training images and test accuracy; then their means
over the seeds, with the ratio of balanced to none. The mean val macro-F1
decides which one to keep.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FLOWERS_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
DEFAULT_DATA_DIR = os.path.join(SHARED, "tensorflow_datasets")
DEFAULT_WEIGHTS = os.path.join(
    SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
SPLIT = "64,16,20"
VARIANTS = ("none", "balanced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default=os.path.join(REPO_ROOT, "runs", "imbalanced"),
                      help="Where the image folder and the two runs go.")
  parser.add_argument("--tfds_data_dir", default=DEFAULT_DATA_DIR)
  parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                      help="The backbone's weights (flowers_main --weights).")
  parser.add_argument("--classes", type=int, default=20)
  parser.add_argument("--max_train", type=int, default=60)
  parser.add_argument("--min_train", type=int, default=6)
  parser.add_argument("--seed", type=int, default=42, help="The classes and photos drawn.")
  parser.add_argument("--seeds", default="42,7,99",
                      help="Seeds of the split and the training, comma-separated.")
  parser.add_argument("--image_size", type=int, default=96)
  parser.add_argument("--feature_cache_views", type=int, default=2)
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--fine_tune_epochs", type=int, default=6)
  parser.add_argument("--smallest", type=int, default=5,
                      help="How many of the smallest classes to average the recall of.")
  parser.add_argument("flowers_flags", nargs="*", help="More flowers_main flags, after --.")
  return parser.parse_args(argv)


def train_counts(classes: int, largest: int, smallest: int) -> list[int]:
  """Training images per class, falling geometrically from `largest` to `smallest`."""
  if classes == 1:
    return [largest]
  ratio = (smallest / largest) ** (1 / (classes - 1))
  return [max(1, round(largest * ratio ** i)) for i in range(classes)]


def photos_for(train: int) -> int:
  """The fewest photos a class needs for flowers' split to leave it `train` of them."""
  from flowers import split as split_lib  # pylint: disable=g-import-not-at-top

  fractions = split_lib.parse_split(SPLIT, 0).fractions
  n = max(1, int(train / fractions[0]) - 2)
  while True:
    assignment = split_lib.stratified_split([str(i) for i in range(n)], [0] * n, fractions)
    got = collections.Counter(assignment.values())["train"]
    if got == train:
      return n
    if got > train:
      raise SystemExit(f"No class size gives exactly {train} training images.")
    n += 1


def choose_classes(by_class: dict[int, list[str]], needs: list[int], seed: int) -> list[int]:
  """A class for each need (largest first), drawn at random among those with enough photos."""
  order = list(np.random.default_rng(seed).permutation(sorted(by_class)))
  chosen = []
  for need in needs:
    found = next((c for c in order if len(by_class[c]) >= need and c not in chosen), None)
    if found is None:
      raise SystemExit(f"No class left with {need} photos; lower --max_train or --classes.")
    chosen.append(int(found))
  return chosen


def write_folder(args: argparse.Namespace, folder: str) -> dict[str, int]:
  """Writes the imbalanced image folder; returns class folder -> intended train images."""
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_tfds(data_dir=args.tfds_data_dir, download=False)
  by_class: dict[int, list[str]] = collections.defaultdict(list)
  for key, label in zip(source.keys, source.labels):
    by_class[label].append(key)
  trains = train_counts(args.classes, args.max_train, args.min_train)
  needs = [photos_for(t) for t in trains]
  rng = np.random.default_rng(args.seed)
  wanted, plan = {}, {}
  for rank, (label, need, train) in enumerate(zip(choose_classes(by_class, needs, args.seed),
                                                  needs, trains)):
    name = f"{rank:02d}_{source.class_names[label].replace(' ', '_')}"
    plan[name] = train
    for key in rng.choice(sorted(by_class[label]), need, replace=False):
      wanted[str(key)] = name
  for key, encoded in source.encoded().as_numpy_iterator():
    name = wanted.get(key.decode())
    if name is not None:
      os.makedirs(os.path.join(folder, name), exist_ok=True)
      with open(os.path.join(folder, name, key.decode()), "wb") as f:
        f.write(encoded)
  return plan


def run_flowers(args: argparse.Namespace, folder: str, workdir: str, seed: int,
                class_weight: str) -> float:
  """`flowers_main --mode=train` on the folder (this checkout's code); its seconds."""
  command = [sys.executable, "-m", "flowers.main", "--mode=train",
             f"--flagfile={os.path.join(REPO_ROOT, 'flags', 'cpu.cfg')}",
             f"--image_dir={folder}", f"--workdir={workdir}", f"--weights={args.weights}",
             f"--seed={seed}", f"--image_size={args.image_size}",
             f"--feature_cache_views={args.feature_cache_views}", f"--epochs={args.epochs}",
             f"--fine_tune_epochs={args.fine_tune_epochs}", f"--class_weight={class_weight}",
             "--verbose=0", "--noplots", *args.flowers_flags]
  start = time.time()
  done = subprocess.run(command, cwd=REPO_ROOT, check=False)
  if done.returncode != 0:
    raise SystemExit(f"flowers_main failed ({done.returncode}): {' '.join(command)}")
  return time.time() - start


def val_recall(workdir: str, folder: str, image_size: int, seed: int) -> dict[str, float]:
  """Per-class recall of the run's model.keras on its val split (report.json has test's)."""
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flowers.config import DataConfig  # pylint: disable=g-import-not-at-top

  splits = data_lib.load_splits(DataConfig(image_dir=folder, image_size=image_size,
                                           split_seed=seed, pixel_cache="none"))
  predict, _ = evaluate_lib.load_predictor(os.path.join(workdir, "model.keras"))
  probs, labels = evaluate_lib.predict_dataset(predict, splits.val)
  return evaluate_lib.metrics(probs, labels, splits.class_names, "val")["per_class_accuracy"]


def measure(workdir: str, val: dict[str, float], smallest: list[str]) -> dict[str, float]:
  """The figures of one run: val from `val`, test from its report.json."""
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  test = report["per_class_accuracy"]
  return {"val_macro_f1": report["val_macro_f1"], "val_min_recall": min(val.values()),
          "val_smallest_recall": float(np.mean([val[n] for n in smallest if n in val])),
          "test_macro_f1": report["test_macro_f1"], "test_min_recall": min(test.values()),
          "test_smallest_recall": float(np.mean([test[n] for n in smallest if n in test])),
          "test_accuracy": report["test_accuracy"]}


def print_table(results: dict[tuple[str, int], dict[str, float]]) -> None:
  """Each run's figures, then each variant's mean over the seeds and their ratio."""
  columns = list(next(iter(results.values())))
  print(f"{'run':16s} " + " ".join(f"{c:>20s}" for c in columns))
  for (variant, seed), figures in results.items():
    print(f"{variant + ' ' + str(seed):16s} " + " ".join(f"{figures[c]:20.4f}" for c in columns))
  means = {v: {c: float(np.mean([f[c] for (w, _), f in results.items() if w == v]))
               for c in columns} for v in VARIANTS}
  for variant, figures in means.items():
    print(f"{variant + ' mean':16s} " + " ".join(f"{figures[c]:20.4f}" for c in columns))
  ratios = [means["balanced"][c] / means["none"][c] if means["none"][c] else float("nan")
            for c in columns]
  print(f"{'ratio':16s} " + " ".join(f"{r:20.3f}" for r in ratios))
  kept = max(VARIANTS, key=lambda v: (means[v]["val_macro_f1"], v == "none"))
  print(f"chosen on mean val macro-F1: --class_weight={kept}")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  folder = os.path.join(args.root, "images")
  if os.path.exists(folder):
    raise SystemExit(f"{folder} exists; give a fresh --root.")
  plan = write_folder(args, folder)
  smallest = sorted(plan, key=lambda n: (plan[n], n))[:args.smallest]
  print(f"{len(plan)} classes, train images {max(plan.values())} down to "
        f"{min(plan.values())} ({sum(plan.values())} in all); image folder {folder}")
  results = {}
  for seed in [int(s) for s in args.seeds.split(",")]:
    for variant in VARIANTS:
      workdir = os.path.join(args.root, f"{variant}_{seed}")
      seconds = run_flowers(args, folder, workdir, seed, variant)
      results[variant, seed] = {
          **measure(workdir, val_recall(workdir, folder, args.image_size, seed), smallest),
          "seconds": seconds}
  print_table(results)


if __name__ == "__main__":
  main()
