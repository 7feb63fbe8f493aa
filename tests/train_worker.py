r"""Runs `flowers.train.train_and_evaluate` on mock data as one multi-worker task.

`test_distributed_train.py` starts two of these, one per task of a
`MultiWorkerMirroredStrategy` cluster on 127.0.0.1:

    python tests/train_worker.py '{"workdir": "/tmp/w0", "tf_config": {...}}'

Options (one JSON object): workdir (this worker's own, as on its own machine);
tf_config: the cluster, set as TF_CONFIG (else TF_CONFIG is read from the
environment). The strategy is made first, before TensorFlow runs any op, as
`flowers_main` does. The last line printed is `RESULT {json}`: is_chief,
replicas, a digest of the trained weights (every worker) and, on the chief, a
summary of the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import numpy as np  # pylint: disable=g-import-not-at-top

COUNTS = {"train": [8] * 4, "validation": [3] * 4, "test": [4] * 4}
IMAGE_SIZE = 40


def small_config():
  """Random weights, 32 px, alpha 0.35, 1 + 1 epochs on the plain path, multi-worker."""
  import run_configs  # pylint: disable=g-import-not-at-top
  from flowers.config import DataConfig, RunConfig, TrainConfig  # pylint: disable=g-import-not-at-top

  train = dict(run_configs.OLD_TRAIN,  # The older defaults below what is set here.
               seed=0, weights=None, epochs=1, fine_tune_epochs=1, feature_cache_views=2,
               early_stopping_patience=0, feature_cache="off",
               distribution_strategy="multi_worker", verbose=0, unfreeze_ratio=0.1, alpha=0.35)
  return RunConfig(
      data=DataConfig(image_size=32, batch_size=8, split_seed=0, split="official"),
      train=TrainConfig(**train), plots=False)


def digest(arrays) -> str:
  """sha256 of the arrays, rounded to 6 decimals (equal weights, equal digest)."""
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.round(np.asarray(a, np.float64), 6).tobytes())
  return h.hexdigest()


def main(options: dict) -> dict:
  if "tf_config" in options:
    os.environ["TF_CONFIG"] = json.dumps(options["tf_config"])
  start = time.time()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from flowers import distribute  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top

  strategy = distribute.make_strategy("multi_worker")  # Before any op, as main.py does.

  import fake_data  # pylint: disable=g-import-not-at-top
  from flowers import data  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top

  # The weights right after training, before the chief rounds them for int8.
  digests = {}
  fit_stages = train.fit_stages

  def fit_and_digest(model, *args, **kwargs):
    stage = fit_stages(model, *args, **kwargs)
    digests["classifier_digest"] = digest(
        model.get_layer(model_lib.CLASSIFIER_NAME).get_weights())
    digests["trainable_digest"] = digest(w.numpy() for w in model.trainable_weights)
    digests["num_trainable"] = len(model.trainable_weights)
    return stage

  train.fit_stages = fit_and_digest
  workdir = options["workdir"]
  with fake_data.mock_flowers(COUNTS, size=IMAGE_SIZE):
    source = data.load_tfds()
    report = train.train_and_evaluate(small_config(), workdir, source)
  # Every worker waits here for the others (the chief evaluates and saves
  # first), so that they all shut down together: one that leaves early makes the
  # others wait for its heartbeats to time out.
  arrived = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
  summary = {k: report[k] for k in ("test_accuracy", "num_test_examples",
                                     "num_train_examples") if k in report}
  summary.update(digests)
  summary["is_chief"] = distribute.is_chief(strategy)
  summary["report_is_chief"] = report.get("is_chief", True)
  summary["replicas"] = strategy.num_replicas_in_sync
  summary["arrived"] = int(arrived.numpy())
  summary["seconds"] = round(time.time() - start, 1)
  history = os.path.join(workdir, "history.json")
  if os.path.exists(history):
    with open(history) as f:
      summary["fine_tune_until"] = len(json.load(f)["fine_tune"].get("loss", []))
  return summary


if __name__ == "__main__":
  # Python puts this script's folder (tests/) first on the path: the helpers import.
  print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
  sys.stderr.flush()
  # A normal exit waits for TF's coordination service to see the other workers'
  # heartbeats stop (about 15 s); the artifacts are written, so leave now.
  os._exit(0)
