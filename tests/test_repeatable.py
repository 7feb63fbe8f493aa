"""Same machine, same command, same result: a small real training, run twice.

Real oxford_flowers102 images (the first 8 of each of 6 classes, from
../shared) and the real ImageNet weights, on the cached and the plain path.
Two fresh workdirs must end with identical report.json and history.json: the
split, the shuffles, the augmentation draws, dropout and the int8 rounding are
all seeded, and nothing depends on what ran earlier in the process.
"""

import dataclasses
import functools
import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import pytest

import run_configs
import shared_data
from flowers import artifacts
from flowers import data
from flowers import train

NUM_CLASSES = 6
PER_CLASS = 8
# Wall time is the one field that may differ.
NOT_RESULTS = ("train_seconds",)


@functools.cache
def real_subset() -> data.Source:
  """The first PER_CLASS images (in key order) of the first NUM_CLASSES classes."""
  source = data.load_tfds(data_dir=shared_data.TFDS_DIR, download=False)
  kept = []
  for label in range(NUM_CLASSES):
    keys = sorted(k for k, l in zip(source.keys, source.labels) if l == label)
    kept += [(k, label) for k in keys[:PER_CLASS]]
  return dataclasses.replace(source, keys=[k for k, _ in kept], labels=[l for _, l in kept],
                             class_names=source.class_names[:NUM_CLASSES],
                             source_splits=None)


def read(workdir: str, name: str) -> dict:
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.real_data
class RepeatableTest(parameterized.TestCase):

  # The CPU default; the plain path repeats itself in tests/test_resume.py (a killed and
  # resumed run against one left alone, in one process).
  def test_same_command_twice_gives_the_same_report(self):
    feature_cache = "on"
    source = real_subset()
    config = run_configs.tiny(
        data={"image_size": 32, "tfds_data_dir": shared_data.TFDS_DIR},
        weights=shared_data.WEIGHTS, feature_cache=feature_cache, epochs=2,
        fine_tune_epochs=1, learning_rate=1e-3, dropout=0.3, unfreeze_ratio=0.2)
    reports, histories = [], []
    for _ in range(2):
      workdir = self.create_tempdir().full_path
      train.train_and_evaluate(config, workdir, source)
      report = read(workdir, artifacts.REPORT)
      reports.append({k: v for k, v in report.items() if k not in NOT_RESULTS})
      histories.append(read(workdir, artifacts.HISTORY))
    self.assertEqual(reports[0]["feature_cache"], feature_cache == "on")
    self.assertEqual(reports[0]["num_test_examples"] + reports[0]["num_val_examples"]
                     + reports[0]["num_train_examples"], NUM_CLASSES * PER_CLASS)
    # It trained (the loss fell), so equal figures are not trivially equal. (Two
    # epochs on 30 images at 32 px learn little: val stays near chance.)
    loss = histories[0]["frozen"]["loss"]
    self.assertLess(loss[-1], loss[0])
    self.assertEqual(reports[0], reports[1])
    self.assertEqual(histories[0], histories[1])


if __name__ == "__main__":
  absltest.main()
