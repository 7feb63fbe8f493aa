r"""Runs `flowers.tune.run_search` on mock data in a process of its own.

`test_tune_workers.py` starts it for what needs a fresh process: logical CPU devices
(set before TensorFlow starts) and distributed tuning (a chief and workers).

    python tests/tune_worker.py '{"workdir": "/tmp/w", "max_trials": 2}'

Options (one JSON object): workdir, tuner, max_trials, distribution_strategy,
feature_cache, fine_tune_ema_momentum; logical_cpus: split the CPU into that
many logical devices; barrier: [folder, n], wait until n processes reached the search before
starting it (so that every worker asks for a trial at once); chief_poll_s: how
often a distributed chief checks whether the workers are done (KerasTuner
waits 20 s). The last line printed is `RESULT {json}`, a summary of the report.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

COUNTS = {"train": [6] * 4, "validation": [2] * 4, "test": [2] * 4}
IMAGE_SIZE = 40


def small_config(search=None, data=None, **train):
  """A RunConfig whose search trains in seconds: random weights, 32 px, 1 + 1 epochs.

  `train` overrides TrainConfig fields; `search` and `data` are dicts of overrides.
  The default space's top models are a few blocks: quick to trace.
  """
  import run_configs  # pylint: disable=g-import-not-at-top
  from flowers import config as config_lib  # pylint: disable=g-import-not-at-top

  # The older defaults (run_configs.OLD_TRAIN, OLD_SEARCH) below what is set here.
  train_settings = dict(run_configs.OLD_TRAIN, epochs=1, fine_tune_epochs=1,
                        feature_cache_views=2, weights=None, early_stopping_patience=0,
                        feature_cache="on", verbose=0, seed=0,
                        unfreeze_ratio=0.1)  # Inside the range, for --first_trial=configured.
  train_settings.update(train)
  search_settings = dict(run_configs.OLD_SEARCH, dropout_range=(0.0, 0.5),
                         unfreeze_ratio_range=(0.05, 0.15),
                         fine_tune_learning_rate_range=(1e-4, 1e-2), tuner="random",
                         max_trials=1)
  search_settings.update(search or {})
  return config_lib.RunConfig(
      data=config_lib.DataConfig(**{"image_size": 32, "batch_size": 8, "split_seed": 0,
                                    **(data or {})}),
      train=config_lib.TrainConfig(**train_settings),
      search=config_lib.SearchConfig(**search_settings),
      export=config_lib.ExportConfig(export_best=False), plots=False)


def _wait_for_barrier(folder: str, count: int, timeout_s: float = 300.0) -> None:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{os.getpid()}.ready"), "w", encoding="utf-8"):
    pass
  deadline = time.time() + timeout_s
  while len([n for n in os.listdir(folder) if n.endswith(".ready")]) < count:
    if time.time() > deadline:
      raise TimeoutError(f"barrier {folder}: fewer than {count} processes arrived")
    time.sleep(0.1)


def main(options: dict) -> dict:
  if options.get("logical_cpus"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * options["logical_cpus"])

  import fake_data  # pylint: disable=g-import-not-at-top
  from flowers import data  # pylint: disable=g-import-not-at-top
  from flowers import distribute  # pylint: disable=g-import-not-at-top
  from flowers import tune  # pylint: disable=g-import-not-at-top
  from keras_tuner.src.distribute import oracle_chief  # pylint: disable=g-import-not-at-top
  from keras_tuner.src.engine import base_tuner  # pylint: disable=g-import-not-at-top

  if options.get("barrier"):
    search = base_tuner.BaseTuner.search
    folder, count = options["barrier"]

    def search_after_barrier(self, *args, **kwargs):
      _wait_for_barrier(folder, count)
      return search(self, *args, **kwargs)

    base_tuner.BaseTuner.search = search_after_barrier
  if options.get("chief_poll_s"):
    poll = float(options["chief_poll_s"])
    oracle_chief.time = types.SimpleNamespace(sleep=lambda s: time.sleep(min(s, poll)))

  strategy_name = options.get("distribution_strategy", "default")
  strategy = distribute.make_strategy(strategy_name)  # Before any data, as main.py does.
  config = small_config(
      feature_cache=options.get("feature_cache", "on"), distribution_strategy=strategy_name,
      fine_tune_ema_momentum=options.get("fine_tune_ema_momentum", 0.0),
      search={"tuner": options.get("tuner", "random"),
              "max_trials": options.get("max_trials", 1)})
  with fake_data.mock_flowers(COUNTS, size=IMAGE_SIZE):
    source = data.load_tfds()
    report = tune.run_search(config, options["workdir"], source)
  keys = ("is_chief", "tuner_id", "trials_run", "num_trials", "best_trial_id",
          "test_accuracy", "val_accuracy", "distributed")
  summary = {k: report[k] for k in keys if k in report}
  summary["replicas"] = strategy.num_replicas_in_sync
  return summary


if __name__ == "__main__":
  # Python puts this script's folder (tests/) first on the path: the helpers import.
  print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
