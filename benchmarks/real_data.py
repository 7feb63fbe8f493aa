"""Where the benchmarks find the real data, the ImageNet weights and cpu.cfg.

The real data and weights are in `../shared` beside the checkout, or where
`$FLOWERS_SHARED` says. A benchmark run as `python benchmarks/NAME.py` imports
this module by its bare name (its folder is first on the path).
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FLOWERS_SHARED", os.path.join(os.path.dirname(REPO_ROOT), "shared"))
DATA_DIR = os.path.join(SHARED, "tensorflow_datasets")
WEIGHTS = os.path.join(SHARED, "weights",
                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
CPU_CFG = os.path.join(REPO_ROOT, "flags", "cpu.cfg")


def available() -> bool:
  """Whether the prepared TFDS `oxford_flowers102` and the weights file are there."""
  return os.path.isdir(os.path.join(DATA_DIR, "oxford_flowers102")) and os.path.exists(WEIGHTS)
