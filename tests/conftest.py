"""Shared test set-up: quiet TensorFlow, parsed absl flags, the real-data marker.

pyproject.toml puts tests/ on the import path, so the helpers (fake_data,
run_configs, shared_data, ...) import by their bare names.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests must never reach for the network (TFDS retries a download for minutes).
os.environ.setdefault("NO_GCE_CHECK", "true")

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import pytest

import shared_data
# pylint: enable=g-import-not-at-top,g-bad-import-order

# absltest helpers (create_tempdir, ...) read absl flags; pytest does not parse them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  """With FLOWERS_REQUIRE_SHARED=1 (CI), missing real data fails the run, not skips."""
  del config
  if shared_data.REQUIRED and shared_data.missing():
    pytest.exit(f"FLOWERS_REQUIRE_SHARED=1 but the real data is missing: "
                f"{', '.join(shared_data.missing())}; put ../shared beside the checkout "
                "or set FLOWERS_SHARED.", returncode=3)


def pytest_collection_modifyitems(config, items):
  """Skips the tests marked `real_data` where ../shared is absent."""
  del config
  missing = shared_data.missing()
  if not missing:
    return
  skip = pytest.mark.skip(reason=f"real data not found: {', '.join(missing)}")
  for item in items:
    if item.get_closest_marker("real_data"):
      item.add_marker(skip)
