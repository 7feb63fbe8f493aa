"""Machine rate: how fast this CPU runs MobileNetV2, to put wall times on one scale.

Usage, from the repository root with the project installed:

  python benchmarks/machine_rate.py            # about 20 s; run it alone
  ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/machine_rate.py   # an AVX-512 CPU as an AVX2 one

It prints the frozen MobileNetV2 forward rate (224 px, batch 32, random
weights, oneDNN on, as `import flowers` sets it), in images a second, and the
CPU's vector instruction sets. The times in README.md, the flagfiles and
docs/experiments.md are stated "at 76 img/s": a wall time `t` measured at rate
`r` (the mean of a reading before and one after the run) is `t * r / 76` there.
Machines of one kind differ by up to 2x, and an AVX2-only CPU trains slower
relative to this forward rate than an AVX-512 one, so quote the flags too.
"""

from __future__ import annotations

import argparse
import os
import time

REFERENCE_RATE = 76.0  # img/s: the machine the project's time goals are stated at.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_flags() -> list[str]:
  """The vector instruction sets this CPU reports (Linux /proc/cpuinfo), in VECTOR_FLAGS order."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      words = set()
      for line in f:
        if line.startswith(("flags", "Features")):
          words.update(line.split(":", 1)[1].split())
  except OSError:
    return []
  return [flag for flag in VECTOR_FLAGS if flag in words]


def forward_rate(seconds: float = 15.0, image_size: int = 224, batch_size: int = 32) -> float:
  """Images a second through a frozen MobileNetV2 (random weights), after one warm-up batch."""
  import flowers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import (oneDNN on)
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  model = keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3),
                                         include_top=False, weights=None)
  batch = np.random.default_rng(0).random((batch_size, image_size, image_size, 3), np.float32)
  model.predict(batch, verbose=0)
  start, images = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    model.predict(batch, verbose=0)
    images += batch_size
  return images / (time.perf_counter() - start)


def describe(rate: float) -> str:
  """One line: the rate, its scale to the reference machine, the CPU's flags."""
  isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
  return (f"mobilenet_v2_forward_img_per_s={rate:.1f} scale_to_{REFERENCE_RATE:.0f}="
          f"{rate / REFERENCE_RATE:.2f} cpu_flags={','.join(cpu_flags()) or 'unknown'}"
          + (f" ONEDNN_MAX_CPU_ISA={isa}" if isa else ""))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seconds", type=float, default=15.0)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  print(describe(forward_rate(args.seconds)))


if __name__ == "__main__":
  main()
