"""TFLite benchmark: int8 against float32, batch-1 latency and file size.

Usage, from the repository root:

  python benchmarks/tflite.py                       # fresh MobileNetV2, 102 classes
  python benchmarks/tflite.py --model=runs/cpu/model.keras

Both `.tflite` files come from `flowers.export.convert` (int8: calibrated on
real training images, uint8 I/O; float32: no quantization). Each is run by the
LiteRT interpreter, batch 1, on a real image: after `--warmup` invokes, the
median of `--runs` timed invokes, per thread count. Without `--model`, the
model is `build_model(102, weights=<shared ImageNet weights>)` with its
untrained head: latency and size do not depend on the head's training.

The last line is `int8_latency_ratio=X.XX size_ratio=Y.YY`: int8 over
float32, the latency ratio at the largest thread count measured. The targets
are size_ratio <= 0.35 and int8_latency_ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FLOWERS_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
DEFAULT_DATA_DIR = os.path.join(SHARED, "tensorflow_datasets")
DEFAULT_WEIGHTS = os.path.join(
    SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
SIZE_TARGET = 0.35
LATENCY_TARGET = 1.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default=None,
                      help="A .keras model (default: fresh MobileNetV2, shared weights).")
  parser.add_argument("--tfds_data_dir", default=DEFAULT_DATA_DIR,
                      help="TFDS data folder holding oxford_flowers102/.")
  parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                      help="MobileNetV2 no-top .h5 for the default model.")
  parser.add_argument("--calibration_examples", type=int, default=100,
                      help="Training images for int8 calibration.")
  parser.add_argument("--threads", default="1,2", help="Thread counts to measure.")
  parser.add_argument("--runs", type=int, default=100, help="Timed invokes per setting.")
  parser.add_argument("--warmup", type=int, default=10, help="Untimed invokes first.")
  parser.add_argument("--resolvers", default="auto",
                      help="LiteRT op resolvers to compare: auto (XNNPACK on), "
                      "builtin_without_default_delegates (XNNPACK off), comma-separated.")
  parser.add_argument("--out", default=None,
                      help="Folder for the .tflite files (default: a temporary one).")
  parser.add_argument("--seed", type=int, default=42)
  return parser.parse_args(argv)


def calibration_images(data_dir: str, image_size: int, count: int, seed: int):
  """`count` un-augmented images of the official train split, seeded choice."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top

  source = data_lib.load_tfds(data_dir=data_dir, download=False)
  train = [k for k, s in zip(source.keys, source.source_splits) if s == "train"]
  chosen = sorted(train[i] for i in
                  np.random.default_rng(seed).permutation(len(train))[:count])
  dataset = data_lib.make_dataset(source, chosen, image_size=image_size,
                                  batch_size=32, cache="none")
  return [images for images, _ in dataset.as_numpy_iterator()]


def latency_ms(path: str, image, threads: int, runs: int, warmup: int,
               resolver: str = "auto") -> float:
  """Median milliseconds of one batch-1 invoke."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top

  interpreter = litert.Interpreter(
      model_path=path, num_threads=threads,
      experimental_op_resolver_type=litert.OpResolverType[resolver.upper()])
  interpreter.allocate_tensors()
  inp = interpreter.get_input_details()[0]
  if inp["dtype"] == np.int8:
    scale, zero = inp["quantization"]
    value = np.clip(np.round(image.astype(np.float32) / scale + zero), -128, 127)
  else:
    value = image
  interpreter.set_tensor(inp["index"], value.astype(inp["dtype"])[None])
  for _ in range(warmup):
    interpreter.invoke()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    interpreter.invoke()
    times.append(time.perf_counter() - start)
  return 1000.0 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if not os.path.isdir(os.path.join(args.tfds_data_dir, "oxford_flowers102")):
    print(f"Real data not found at {args.tfds_data_dir} (oxford_flowers102/); "
          "nothing to benchmark.")
    return 0
  if args.model is None and not os.path.isfile(args.weights):
    print(f"ImageNet weights not found at {args.weights}; give --model or --weights.")
    return 0
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, REPO_ROOT)
  from flowers import export  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers.config import ExportConfig  # pylint: disable=g-import-not-at-top

  if args.model:
    model = export.load_keras_model(args.model)
    described = args.model
  else:
    model = model_lib.build_model(102, weights=args.weights)
    described = "fresh MobileNetV2 (ImageNet base, untrained head), 102 classes"
  image_size = int(model.input.shape[1])
  images = calibration_images(args.tfds_data_dir, image_size, args.calibration_examples,
                              args.seed)
  out = args.out or tempfile.mkdtemp(prefix="flowers_tflite_")
  os.makedirs(out, exist_ok=True)
  variants = {"float32": ExportConfig(quantization="none"),
              "int8": ExportConfig(quantization="int8")}
  paths, convert_s = {}, {}
  for name, options in variants.items():
    start = time.time()
    data = export.convert(model, options, images if options.is_int8 else None)
    convert_s[name] = time.time() - start
    paths[name] = os.path.join(out, f"model_{name}.tflite")
    with open(paths[name], "wb") as f:
      f.write(data)

  image = images[0][0]
  threads = [int(t) for t in args.threads.split(",")]
  resolvers = args.resolvers.split(",")
  results = {}
  for name, path in paths.items():
    for resolver in resolvers:
      for t in threads:
        results[(name, resolver, t)] = latency_ms(path, image, t, args.runs, args.warmup,
                                                  resolver)
  sizes = {name: os.path.getsize(path) for name, path in paths.items()}

  print(f"\nModel: {described}, input {image_size}x{image_size}, "
        f"{sum(len(b) for b in images)} calibration images; files in {out}")
  print(f"Latency: median of {args.runs} batch-1 invokes after {args.warmup} warm-up, "
        f"{os.cpu_count()} CPUs.")
  header = f"{'model':<8} {'size MB':>8} {'convert s':>9} {'resolver':<34}" + "".join(
      f" {f'{t} thr ms':>9}" for t in threads)
  print(header)
  print("-" * len(header))
  for name in paths:
    for resolver in resolvers:
      row = f"{name:<8} {sizes[name] / 1e6:>8.2f} {convert_s[name]:>9.1f} {resolver:<34}"
      row += "".join(f" {results[(name, resolver, t)]:>9.2f}" for t in threads)
      print(row)
  top = max(threads)
  size_ratio = sizes["int8"] / sizes["float32"]
  ratios = {r: results[("int8", r, top)] / results[("float32", r, top)] for r in resolvers}
  for resolver, ratio in ratios.items():
    print(f"int8/float32 latency at {top} threads ({resolver}): {ratio:.2f}")
  main_resolver = resolvers[0]
  latency_ratio = ratios[main_resolver]
  print(f"Targets: size_ratio <= {SIZE_TARGET} "
        f"({'met' if size_ratio <= SIZE_TARGET else 'NOT met'}), int8_latency_ratio <= "
        f"{LATENCY_TARGET} ({'met' if latency_ratio <= LATENCY_TARGET else 'NOT met'}); "
        f"latency ratio at {top} threads, resolver {main_resolver}.")
  print(f"int8_latency_ratio={latency_ratio:.2f} size_ratio={size_ratio:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
