"""Augmentation benchmark: one resampling (RandomGeometry) against Keras's chain.

Usage, from the repository root:

  python benchmarks/augment.py            # --image_size=224 --batch_size=32 --batches=8

Both variants draw flip, rotation (20 degrees), zoom (0.2), translation (0.2)
and contrast (0.1), the reference's generator (flags/reference.cfg; Keras's chain
has no crop):

* chained (baseline): Keras's RandomFlip, RandomRotation, RandomZoom,
  RandomTranslation and RandomContrast, one after the other: the geometric
  layers resample the image three times.
* fused: `flowers.augment.RandomGeometry` (one resampling) and RandomContrast.

For each it times, in one process, alternating the variants over `--rounds`
rounds and keeping each one's best round (random uint8 images; the cost does
not depend on their content):

* augment: the augmentation layers alone, ms per image;
* prefix pass: augmentation + MobileNetV2 preprocessing + the frozen prefix up
  to the cut of `--unfreeze_ratio` (default 0.2: block_12_add; flags/cpu.cfg's 0.3 cuts lower): one
  augmented view of the frozen-prefix cache, images/s (random weights: the
  same cost as ImageNet's).

and prints each with its ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=8, help="timed batches per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--unfreeze_ratio", type=float, default=0.2)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from flowers import augment  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers.config import Augmentation  # pylint: disable=g-import-not-at-top

  model = model_lib.build_model(102, image_size=args.image_size, weights=None, augment=False)
  base = model_lib.base_of(model)
  cut = model_lib.cut_index(base, args.unfreeze_ratio)
  prefix = keras.Model(base.input, base.layers[cut].output)
  preprocess = model.get_layer(model_lib.PREPROCESS_NAME)
  images = tf.constant(np.random.default_rng(0).integers(
      0, 256, (args.batch_size, args.image_size, args.image_size, 3), np.uint8))

  reference = Augmentation(zoom=0.2, translation=0.2, crop_area=0.0)
  variants = {
      "chained": keras.Sequential(augment.chained_augmentation_layers(reference, 0)),
      "fused": keras.Sequential(augment.augmentation_layers(reference, 0)),
  }
  steps = {}
  for name, layers in variants.items():
    @tf.function
    def augment_only(x, layers=layers):
      return layers(tf.cast(x, tf.float32), training=True)

    @tf.function
    def prefix_pass(x, layers=layers):
      x = preprocess(layers(tf.cast(x, tf.float32), training=True))
      return tf.cast(prefix(x, training=False), tf.float16)

    steps[name] = {"augment": augment_only, "prefix pass": prefix_pass}

  best = {(name, kind): float("inf") for name in steps for kind in ("augment", "prefix pass")}
  for kind in ("augment", "prefix pass"):
    for name in steps:  # Trace and warm up.
      steps[name][kind](images).numpy()
    for _ in range(args.rounds):
      for name in steps:
        start = time.perf_counter()
        for _ in range(args.batches):
          steps[name][kind](images).numpy()
        seconds = time.perf_counter() - start
        best[name, kind] = min(best[name, kind], seconds)

  count = args.batches * args.batch_size
  print(f"{count} images of {args.image_size} px per round, best of {args.rounds} rounds; "
        f"prefix up to base layer {cut} ({base.layers[cut].name})")
  base_ms = 1000 * best["chained", "augment"] / count
  base_rate = count / best["chained", "prefix pass"]
  for name in steps:
    augment_ms = 1000 * best[name, "augment"] / count
    rate = count / best[name, "prefix pass"]
    print(f"{name:8s} augment {augment_ms:6.2f} ms/image (ratio {augment_ms / base_ms:.2f})   "
          f"prefix pass {rate:6.1f} images/s (ratio {rate / base_rate:.2f})")


if __name__ == "__main__":
  main()
