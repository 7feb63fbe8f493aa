"""User folders: the README's folder commands, start to end, on folders that differ as users' do.

Usage, from the repository root (about 25 minutes on 2 CPU cores, run alone):

  python benchmarks/user_folders.py                      # all three folders
  python benchmarks/user_folders.py --folders=easy       # one of them
  python benchmarks/user_folders.py -- --max_trials=2    # more flowers_main flags after --

Three image folders (one subfolder per class, the photos as their original
JPEGs) are written from oxford_flowers102 (the TFDS copy in ../shared) under
`--root`:

  few         all 102 classes, 10 train images a class after flowers' 64/16/20
              split (16 photos a class): a user's folder of tens of photos
  imbalanced  20 classes whose train images fall geometrically from 60 to 6
              (benchmarks/imbalanced_folder.py's folder)
  easy        4 classes that are easy to tell apart (sunflower, passion flower,
              water lily, artichoke), up to 60 photos each: val saturates

Each goes through the README's folder commands with the library defaults (the
recipe) and the offline weights: `flowers_main --mode=tune --image_dir=FOLDER`
(which exports the best model to int8), `--mode=predict` of the int8 model on
the folder's test images, and benchmarks/mediapipe_check.py (MediaPipe Tasks
on the same files, at the threshold in the model's metadata). It prints, per
folder: val and test accuracy of the float model, the int8 model's test
accuracy, the thresholds, the share of known test images the int8 model
accepts at its metadata's threshold in MediaPipe Tasks and in predict, and the
wall time, with the machine rate read before and after each folder
(benchmarks/machine_rate.py) and the time scaled to 76 img/s. Nothing is
chosen here: the figures describe the shipped defaults.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

import imbalanced_folder
import machine_rate
import real_data

FOLDERS = ("few", "imbalanced", "easy")
EASY_CLASSES = ("sunflower", "passion flower", "water lily", "artichoke")
EASY_MOST_PHOTOS = 60
FEW_TRAIN = 10  # Train images a class in the "few" folder.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default=os.path.join(real_data.REPO_ROOT, "runs", "folders"))
  parser.add_argument("--folders", default=",".join(FOLDERS),
                      help=f"Which folders, comma-separated, of {FOLDERS}.")
  parser.add_argument("--seed", type=int, default=42, help="The photos drawn, the split, "
                      "the training.")
  parser.add_argument("--rate_seconds", type=float, default=10.0,
                      help="Seconds of each machine rate reading.")
  parser.add_argument("flowers_flags", nargs="*", help="More flowers_main flags, after --.")
  return parser.parse_args(argv)


def folder_plan(name: str, by_class: dict[int, list[str]], class_names: list[str],
                seed: int) -> dict[str, list[str]]:
  """Class folder name -> the TFDS keys of its photos, for folder `name`."""
  rng = np.random.default_rng(seed)
  if name == "few":
    need = imbalanced_folder.photos_for(FEW_TRAIN)
    return {f"{c:03d}_{class_names[c].replace(' ', '_')}":
            sorted(rng.choice(sorted(by_class[c]), need, replace=False).tolist())
            for c in sorted(by_class)}
  if name == "imbalanced":
    trains = imbalanced_folder.train_counts(20, 60, 6)
    needs = [imbalanced_folder.photos_for(t) for t in trains]
    chosen = imbalanced_folder.choose_classes(by_class, needs, seed)
    return {f"{rank:02d}_{class_names[c].replace(' ', '_')}":
            sorted(rng.choice(sorted(by_class[c]), need, replace=False).tolist())
            for rank, (c, need) in enumerate(zip(chosen, needs))}
  plan = {}
  for title in EASY_CLASSES:
    c = class_names.index(title)
    count = min(EASY_MOST_PHOTOS, len(by_class[c]))
    plan[title.replace(" ", "_")] = sorted(
        rng.choice(sorted(by_class[c]), count, replace=False).tolist())
  return plan


def write_folders(names: list[str], root: str, seed: int) -> dict[str, str]:
  """Writes the folders not yet there, in one pass over the TFDS files; name -> folder."""
  folders = {name: os.path.join(root, name, "images") for name in names}
  missing = [n for n in names if not os.path.isdir(folders[n])]
  if not missing:
    return folders
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_tfds(data_dir=real_data.DATA_DIR, download=False)
  by_class: dict[int, list[str]] = collections.defaultdict(list)
  for key, label in zip(source.keys, source.labels):
    by_class[label].append(key)
  wanted: dict[str, list[str]] = collections.defaultdict(list)  # key -> class folders.
  for name in missing:
    for class_folder, keys in folder_plan(name, by_class, source.class_names, seed).items():
      for key in keys:
        wanted[key].append(os.path.join(folders[name] + ".partial", class_folder))
  for key, encoded in source.encoded().as_numpy_iterator():
    for folder in wanted.get(key.decode(), ()):
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, key.decode()), "wb") as f:
        f.write(encoded)
  for name in missing:
    os.replace(folders[name] + ".partial", folders[name])
  return folders


def flowers_main(*flags: str) -> tuple[float, str]:
  """Runs `flowers_main` with `flags` (this checkout's code); returns its seconds and output."""
  command = [sys.executable, "-m", "flowers.main", *flags]
  start = time.time()
  done = subprocess.run(command, cwd=real_data.REPO_ROOT, check=False,
                        stdout=subprocess.PIPE, text=True)
  if done.returncode != 0:
    print(done.stdout)
    raise SystemExit(f"flowers_main failed ({done.returncode}): {' '.join(command)}")
  return time.time() - start, done.stdout


def test_files(workdir: str, folder: str) -> tuple[list[str], list[str]]:
  """The test split's image paths in the folder, and their class folder names."""
  paths, classes = [], []
  with open(os.path.join(workdir, "splits.csv"), encoding="utf-8") as f:
    for row in csv.DictReader(f):
      if row["split"] == "test":
        class_folder, name = row["file_name"].split("/", 1)
        paths.append(os.path.join(folder, class_folder, name))
        classes.append(class_folder)
  return paths, classes


def predict_figures(stdout: str, classes: list[str]) -> dict[str, float]:
  """Accuracy and acceptance of `--mode=predict --output=json` on the test images."""
  results = json.loads(stdout[stdout.index("["):])
  unknown = [bool(r.get("unknown")) for r in results]
  top = [r["top_k"][0]["label"] for r in results]
  return {"predict_accuracy": float(np.mean([t == c for t, c in zip(top, classes)])),
          "predict_accepts": 1.0 - float(np.mean(unknown))}


def run_folder(name: str, folder: str, args: argparse.Namespace) -> dict[str, object]:
  """The folder through tune, predict and the MediaPipe check; its figures."""
  workdir = os.path.join(args.root, name, "tune")
  rate_before = machine_rate.forward_rate(args.rate_seconds)
  tune_seconds, _ = flowers_main(
      "--mode=tune", f"--image_dir={folder}", f"--workdir={workdir}",
      f"--weights={real_data.WEIGHTS}", f"--seed={args.seed}", "--verbose=0",
      *args.flowers_flags)
  model = os.path.join(workdir, "model_int8.tflite")
  paths, classes = test_files(workdir, folder)
  predict_seconds, out = flowers_main(
      "--mode=predict", f"--workdir={workdir}", f"--model={model}", "--output=json",
      "--top_k=1", "--images=" + ",".join(paths))
  checked = os.path.join(args.root, name, "mediapipe.json")
  start = time.time()
  subprocess.run([sys.executable, os.path.join(real_data.REPO_ROOT, "benchmarks",
                                               "mediapipe_check.py"),
                  f"--model={model}", "--variants=", f"--out={checked}"],
                 cwd=real_data.REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
  mediapipe_seconds = time.time() - start
  rate_after = machine_rate.forward_rate(args.rate_seconds)
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  with open(os.path.join(workdir, "export_report.json"), encoding="utf-8") as f:
    exported = json.load(f)
  with open(checked, encoding="utf-8") as f:
    mediapipe = json.load(f)
  counted = (mediapipe.get("unknown") or {}).get("test")
  seconds = tune_seconds + predict_seconds
  rate = (rate_before + rate_after) / 2
  return {
      "classes": len(os.listdir(folder)), "train_images": report.get("num_train_examples"),
      "test_images": len(paths), "val_accuracy": report["val_accuracy"],
      "test_accuracy": report["test_accuracy"],
      "int8_test_accuracy": exported.get("int8_test_accuracy"),
      "float_threshold": (report.get("unknown_threshold") or {}).get("score"),
      "int8_threshold": exported.get("unknown_threshold"),
      **{k: v for k, v in exported.items() if "accept" in k},
      **predict_figures(out, classes),
      "mediapipe_accuracy": mediapipe["accuracies"]["mediapipe"],
      "mediapipe_agreement": mediapipe["agreement"],
      "mediapipe_accepts": (None if counted is None
                            else 1.0 - counted["mediapipe_unknown"] / counted["images"]),
      "tune_seconds": round(tune_seconds, 1), "predict_seconds": round(predict_seconds, 1),
      "mediapipe_seconds": round(mediapipe_seconds, 1),
      "rate_before": round(rate_before, 1), "rate_after": round(rate_after, 1),
      "minutes_at_76": round(seconds / 60 * rate / machine_rate.REFERENCE_RATE, 1)}


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if not real_data.available():
    print(f"Real data not found under {real_data.SHARED}; nothing to run.")
    return 0
  names = [n for n in args.folders.split(",") if n]
  unknown = sorted(set(names) - set(FOLDERS))
  if unknown:
    print(f"--folders: unknown {unknown}; choose from {FOLDERS}.", file=sys.stderr)
    return 2
  print(f"CPU: {','.join(machine_rate.cpu_flags())}")
  folders = write_folders(names, args.root, args.seed)
  results = {}
  for name in names:
    results[name] = run_folder(name, folders[name], args)
    print(f"{name}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in results[name].items()), flush=True)
  out = os.path.join(args.root, "results.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(f"Figures written to {out}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
