"""Where the real data lives: ../shared beside the checkout, or $FLOWERS_SHARED.

A test that needs it carries `@pytest.mark.real_data`; conftest.py skips those
tests where the data is absent, and with FLOWERS_REQUIRE_SHARED=1 (CI) stops
the whole run instead of skipping them.
"""

import os

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
