"""Shared test set-up: quiet TensorFlow, parsed absl flags, the shared data path."""

import os
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests must never reach for the network (TFDS retries a download for minutes).
os.environ.setdefault("NO_GCE_CHECK", "true")

sys.path.insert(0, os.path.dirname(__file__))

from absl import flags  # pylint: disable=g-import-not-at-top

# absltest helpers (create_tempdir, ...) read absl flags; pytest does not parse them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  """With FLOWERS_REQUIRE_SHARED=1 (CI), missing real data fails the run, not skips."""
  del config
  import shared_data  # pylint: disable=g-import-not-at-top

  if shared_data.REQUIRED and shared_data.missing():
    import pytest  # pylint: disable=g-import-not-at-top

    pytest.exit(f"FLOWERS_REQUIRE_SHARED=1 but the real data is missing: "
                f"{', '.join(shared_data.missing())}; put ../shared beside the checkout "
                "or set FLOWERS_SHARED.", returncode=3)
