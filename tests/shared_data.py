"""Where the real data lives (../shared beside the checkout), and a skip when absent.

Where the real data must be there (CI sets FLOWERS_REQUIRE_SHARED=1), a missing
copy stops the whole run (see conftest.py) instead of skipping those tests.
"""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FLOWERS_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
TFDS_DIR = os.path.join(SHARED, "tensorflow_datasets")
WEIGHTS = os.path.join(
    SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")

REQUIRED = os.environ.get("FLOWERS_REQUIRE_SHARED") == "1"


def missing() -> list[str]:
  """The real-data paths that are not there."""
  return [p for p in (os.path.join(TFDS_DIR, "oxford_flowers102"), WEIGHTS)
          if not os.path.exists(p)]


requires_tfds = pytest.mark.skipif(
    not os.path.isdir(os.path.join(TFDS_DIR, "oxford_flowers102")),
    reason=f"real data not found at {TFDS_DIR}")
requires_weights = pytest.mark.skipif(
    not os.path.isfile(WEIGHTS), reason=f"ImageNet weights not found at {WEIGHTS}")
