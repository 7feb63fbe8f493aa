"""Input pipeline benchmark: ours (tf.data) against the blog-post reference.

Usage, from the repository root:

  python benchmarks/pipeline.py --tfds_data_dir=../shared/tensorflow_datasets

Each side runs in its own fresh Python process, one after the other, and
reports the images it yielded, the seconds from the start of loading to the
end of the last epoch, and its peak resident set size (read by the parent with
`os.wait4`, which gives each child's own rusage):

* ours: `flowers.data.load_tfds` + `flowers.data.make_dataset` over every
  image (decode, MediaPipe-matched resize to uint8, in-memory cache, seeded shuffle,
  batch, prefetch), as training reads it. Augmentation runs inside the model,
  on the accelerator, so it is not part of the input pipeline.
* reference: for every image `keras.utils.load_img(path, target_size=(224,
  224))` + `img_to_array` into one preallocated float32 array, then
  `ImageDataGenerator(rotation, shifts, zoom, shear, preprocess_input).flow`.
  The JPEGs are first extracted from the TFDS records to a temporary folder,
  once and outside the timed region, to stand in for the blog's image files.

Both sides import their libraries before the clock starts. The last line is
`pipeline_speedup=X.XX memory_ratio=Y.YY` (ours over reference: images/s, and
peak RSS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared",
                                "tensorflow_datasets")
DEFAULT_JPEG_DIR = os.path.join(tempfile.gettempdir(), "flowers_bench_jpegs")
INDEX_NAME = "index.tsv"
RESULT_MARKER = "BENCH_RESULT "
SIDES = ("ours", "reference", "ours_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tfds_data_dir", default=DEFAULT_DATA_DIR,
                      help="TFDS data folder holding oxford_flowers102/.")
  parser.add_argument("--side", choices=SIDES + ("extract",), default=None,
                      help="Internal: run one side in this process.")
  parser.add_argument("--sides", default="ours_train,reference,ours",
                      help="Sides to run, in order (also: ours_train, the 64%% "
                      "train split through flowers.data.load_splits).")
  parser.add_argument("--limit", type=int, default=0,
                      help="Use only the first N images on both sides (0: all).")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--seed", type=int, default=42)
  parser.add_argument("--jpeg_dir", default=DEFAULT_JPEG_DIR,
                      help="Where the reference's JPEG files are extracted.")
  return parser.parse_args(argv)


def peak_rss_mib() -> float:
  """This process's peak RSS so far, in MiB (ru_maxrss is KiB on Linux)."""
  import resource  # pylint: disable=g-import-not-at-top

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict[str, Any]) -> None:
  """Prints a child's result as one marked JSON line."""
  print(RESULT_MARKER + json.dumps(result), flush=True)


def read_index(jpeg_dir: str) -> list[tuple[str, int]] | None:
  """The extracted (file name, label) list, or None if it is incomplete."""
  path = os.path.join(jpeg_dir, INDEX_NAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  entries = [(name, int(label)) for name, label in rows]
  if not all(os.path.exists(os.path.join(jpeg_dir, n)) for n, _ in entries):
    return None
  return entries


def run_extract(args: argparse.Namespace) -> None:
  """Writes every TFDS JPEG to `jpeg_dir`, in source order, plus an index."""
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_tfds(data_dir=args.tfds_data_dir, download=False)
  os.makedirs(args.jpeg_dir, exist_ok=True)
  for key, data in source.encoded().as_numpy_iterator():
    with open(os.path.join(args.jpeg_dir, key.decode()), "wb") as f:
      f.write(data)
  tmp = os.path.join(args.jpeg_dir, INDEX_NAME + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for key, label in zip(source.keys, source.labels):
      f.write(f"{key}\t{label}\n")
  os.replace(tmp, os.path.join(args.jpeg_dir, INDEX_NAME))
  emit({"images": len(source.keys)})


def iterate_epochs(ds, epochs: int) -> tuple[int, list[float]]:
  """Reads `ds` for `epochs` epochs: (uint8 images seen, seconds per epoch)."""
  images = 0
  epoch_seconds = []
  for _ in range(epochs):
    epoch_start = time.perf_counter()
    for batch, _ in ds:
      assert batch.dtype.name == "uint8", batch.dtype
      images += int(batch.shape[0])
    epoch_seconds.append(time.perf_counter() - epoch_start)
  return images, epoch_seconds


def run_ours(args: argparse.Namespace) -> None:
  """Our tf.data pipeline over the first `limit` images (all by default)."""
  import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

  import_rss = peak_rss_mib()
  start = time.perf_counter()
  source = data_lib.load_tfds(data_dir=args.tfds_data_dir, download=False)
  keys = source.keys[:args.limit] if args.limit else source.keys
  ds = data_lib.make_dataset(source, keys, image_size=args.image_size,
                             batch_size=args.batch_size, shuffle=True,
                             seed=args.seed, cache="memory")
  images, epoch_seconds = iterate_epochs(ds, args.epochs)
  seconds = time.perf_counter() - start
  emit({"images": images, "seconds": seconds, "epoch_seconds": epoch_seconds,
        "import_rss_mib": import_rss, "self_peak_rss_mib": peak_rss_mib(),
        "what": f"make_dataset over {len(keys)} images, cache=memory"})


def run_ours_train(args: argparse.Namespace) -> None:
  """Our pipeline exactly as training builds it: the train split of load_splits."""
  import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers.config import DataConfig  # pylint: disable=g-import-not-at-top

  import_rss = peak_rss_mib()
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    source = data_lib.load_tfds(data_dir=args.tfds_data_dir, download=False)
    if args.limit:
      source.keys = source.keys[:args.limit]
      source.labels = source.labels[:args.limit]
      source.source_splits = source.source_splits[:args.limit]
    data = DataConfig(split_seed=args.seed, image_size=args.image_size,
                      batch_size=args.batch_size)
    splits = data_lib.load_splits(data, source=source, workdir=workdir, shuffle_seed=args.seed)
    images, epoch_seconds = iterate_epochs(splits.train, args.epochs)
    seconds = time.perf_counter() - start
  emit({"images": images, "seconds": seconds, "epoch_seconds": epoch_seconds,
        "import_rss_mib": import_rss, "self_peak_rss_mib": peak_rss_mib(),
        "what": f"load_splits train split ({len(splits.keys('train'))} images)"})


def image_data_generator() -> tuple[Any, str]:
  """The ImageDataGenerator class this TF/Keras has, and where it was found."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    return tf.keras.preprocessing.image.ImageDataGenerator, (
        "tf.keras.preprocessing.image.ImageDataGenerator")
  except AttributeError:
    pass
  import keras  # pylint: disable=g-import-not-at-top

  try:
    return keras.preprocessing.image.ImageDataGenerator, (
        "keras.preprocessing.image.ImageDataGenerator")
  except AttributeError:
    pass
  from keras.src.legacy.preprocessing import image  # pylint: disable=g-import-not-at-top

  return image.ImageDataGenerator, (
      "keras.src.legacy.preprocessing.image.ImageDataGenerator")


def run_reference(args: argparse.Namespace) -> None:
  """The blog's approach: load_img into one float32 array, ImageDataGenerator."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  generator_class, generator_name = image_data_generator()
  entries = read_index(args.jpeg_dir)
  if entries is None:
    raise SystemExit(f"No complete JPEG extraction under {args.jpeg_dir}.")
  if args.limit:
    entries = entries[:args.limit]
  size = args.image_size
  import_rss = peak_rss_mib()

  start = time.perf_counter()
  x = np.empty((len(entries), size, size, 3), dtype=np.float32)
  y = np.empty((len(entries),), dtype=np.int64)
  for i, (name, label) in enumerate(entries):
    img = keras.utils.load_img(os.path.join(args.jpeg_dir, name),
                               target_size=(size, size))
    x[i] = keras.utils.img_to_array(img)
    y[i] = label
  load_seconds = time.perf_counter() - start
  datagen = generator_class(
      rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,
      zoom_range=0.2, shear_range=0.1,
      preprocessing_function=keras.applications.mobilenet_v2.preprocess_input)
  flow = datagen.flow(x, y, batch_size=args.batch_size, seed=args.seed)
  steps = math.ceil(len(entries) / args.batch_size)
  images = 0
  epoch_seconds = []
  for _ in range(args.epochs):
    epoch_start = time.perf_counter()
    for _ in range(steps):
      batch, _ = next(flow)
      images += int(batch.shape[0])
    epoch_seconds.append(time.perf_counter() - epoch_start)
  seconds = time.perf_counter() - start
  emit({"images": images, "seconds": seconds, "load_seconds": load_seconds,
        "epoch_seconds": epoch_seconds, "import_rss_mib": import_rss,
        "self_peak_rss_mib": peak_rss_mib(), "generator": generator_name,
        "what": f"load_img of {len(entries)} files + {generator_name}.flow"})


def run_child(args: argparse.Namespace, side: str) -> dict[str, Any]:
  """Runs one side in a fresh process; adds its peak RSS as seen by wait4."""
  command = [sys.executable, os.path.abspath(__file__), f"--side={side}",
             f"--tfds_data_dir={args.tfds_data_dir}", f"--limit={args.limit}",
             f"--epochs={args.epochs}", f"--batch_size={args.batch_size}",
             f"--image_size={args.image_size}", f"--seed={args.seed}",
             f"--jpeg_dir={args.jpeg_dir}"]
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  with tempfile.TemporaryFile(mode="w+") as stderr:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr,
                            cwd=REPO_ROOT, env=env, text=True)
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    results = [line[len(RESULT_MARKER):] for line in stdout.splitlines()
               if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not results:
      stderr.seek(0)
      tail = stderr.read()[-4000:]
      raise SystemExit(f"--side={side} failed (exit {proc.returncode}):\n"
                       f"{stdout[-2000:]}\n{tail}")
  result = json.loads(results[-1])
  result["peak_rss_mib"] = usage.ru_maxrss / 1024
  if "seconds" in result:
    result["images_per_s"] = result["images"] / result["seconds"]
  return result


def main() -> None:
  args = parse_args()
  runners = {"ours": run_ours, "reference": run_reference,
             "ours_train": run_ours_train, "extract": run_extract}
  if args.side:
    runners[args.side](args)
    return
  args.tfds_data_dir = os.path.abspath(args.tfds_data_dir)
  if not os.path.isdir(os.path.join(args.tfds_data_dir, "oxford_flowers102")):
    print(f"No oxford_flowers102 under {args.tfds_data_dir}: nothing to "
          "benchmark. Pass --tfds_data_dir=<folder holding oxford_flowers102/>.")
    return
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  unknown = sorted(set(sides) - set(SIDES))
  if unknown:
    raise SystemExit(f"--sides: unknown {unknown}; choose from {SIDES}.")

  if "reference" in sides and read_index(args.jpeg_dir) is None:
    print(f"Extracting the TFDS JPEGs to {args.jpeg_dir} (untimed, once)...",
          flush=True)
    run_child(args, "extract")

  results = {}
  for side in sides:
    print(f"Running {side}...", flush=True)
    results[side] = run_child(args, side)
    r = results[side]
    print(f"  {r['what']}: epochs "
          + ", ".join(f"{s:.1f}s" for s in r["epoch_seconds"])
          + f"; RSS after imports {r['import_rss_mib']:.0f} MiB", flush=True)

  print()
  print(f"{'side':<11} {'images':>7} {'seconds':>8} {'images/s':>9} "
        f"{'peak RSS MiB':>13} {'after imports':>14}")
  for side, r in results.items():
    print(f"{side:<11} {r['images']:>7d} {r['seconds']:>8.1f} "
          f"{r['images_per_s']:>9.1f} {r['peak_rss_mib']:>13.0f} "
          f"{r['import_rss_mib']:>14.0f}")
  # The headline compares the training pipeline as training builds it (the
  # train split, decoded once and cached); "ours" over all images is context.
  ours_side = next((s for s in ("ours_train", "ours") if s in results), None)
  if ours_side and "reference" in results:
    ours, ref = results[ours_side], results["reference"]
    print(f"(reference generator: {ref['generator']}; reference load_img phase "
          f"{ref['load_seconds']:.1f}s)")
    above = {k: r["peak_rss_mib"] - r["import_rss_mib"]
             for k, r in (("ours", ours), ("reference", ref))}
    print(f"(peak RSS above the imports: ours {above['ours']:.0f} MiB, reference "
          f"{above['reference']:.0f} MiB, ratio "
          f"{above['ours'] / above['reference']:.2f})")
    speedup = ours["images_per_s"] / ref["images_per_s"]
    ratio = ours["peak_rss_mib"] / ref["peak_rss_mib"]
    print(f"(headline side: {ours_side})")
    print(f"pipeline_speedup={speedup:.2f} memory_ratio={ratio:.2f}")


if __name__ == "__main__":
  main()
