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
