"""Tests for flowers.hparams_board: a search's trials in TensorBoard's HParams dashboard.

Written from trials.csv-like rows and read back from the event files
(`workdir_files.hparams_board`); the board of a real search is checked in
test_tune.py (`SuccessiveHalvingTest`, `SearchTest`).
"""

import os
from unittest import mock

from absl.testing import absltest

from workdir_files import hparams_board
from flowers import artifacts
from flowers import config as config_lib
from flowers import hparams_board as board_lib

SEARCH = config_lib.SearchConfig(dropout_range=(0.1, 0.4), unfreeze_ratio_range=(0.2, 0.2),
                                 fine_tune_learning_rate_range=(1e-4, 1e-2))


def row(trial_id, dropout, val_accuracy=None, epochs=None, status="COMPLETED", seconds=None):
  """A trials.csv row as `tune.trial_rows` gives it (None where blank)."""
  return {"trial_id": trial_id, "dropout": dropout, "unfreeze_ratio": 0.2,
          "fine_tune_learning_rate": 1e-3, "val_accuracy": val_accuracy, "seconds": seconds,
          "status": status, "tuner_id": "tuner0", "median_stop": None,
          "fine_tune_epochs": epochs}


# Successive halving's rungs: trial 1 went on to epoch 4; trial 2 failed.
ROWS = [row("1", 0.3, 0.75, 4, seconds=12.5), row("0", 0.1, 0.5, 2, seconds=6.0),
        row("2", 0.2, status="FAILED")]


class HparamsBoardTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self.create_tempdir().full_path
    self.folder = os.path.join(self.workdir, "logs", "hparams")

  def test_one_session_per_trial_with_its_values_scores_and_status(self):
    self.assertEqual(board_lib.write(self.workdir, ROWS, SEARCH), self.folder)
    board = hparams_board(self.folder)
    self.assertEqual(board["experiment"], {"dropout": (0.1, 0.4), "unfreeze_ratio": (0.2, 0.2),
                                           "fine_tune_learning_rate": (1e-4, 1e-2)})
    self.assertEqual(board["metrics"], ["val_accuracy", "fine_tune_epochs", "seconds"])
    self.assertEqual(sorted(board["sessions"]), ["trial_0", "trial_1", "trial_2"])
    for r in ROWS:
      session = board["sessions"][f"trial_{r['trial_id']}"]
      self.assertEqual(session["group"], r["trial_id"])
      self.assertEqual(session["hparams"], {name: r[name] for name in config_lib.HPARAMS})
    # Each score at the stage 2 epoch it was reached (successive halving's rung).
    one, zero = board["sessions"]["trial_1"], board["sessions"]["trial_0"]
    self.assertEqual(one["metrics"]["val_accuracy"], (4, 0.75))
    self.assertEqual(one["metrics"]["fine_tune_epochs"], (4, 4.0))
    self.assertEqual(one["metrics"]["seconds"], (4, 12.5))
    self.assertEqual(zero["metrics"]["val_accuracy"], (2, 0.5))
    self.assertEqual(one["status"], "STATUS_SUCCESS")
    # A failed trial: its values, no metrics, shown as failed.
    failed = board["sessions"]["trial_2"]
    self.assertEqual((failed["metrics"], failed["status"]), ({}, "STATUS_FAILURE"))

  def test_a_rewrite_replaces_the_folder_so_no_trial_is_listed_twice(self):
    board_lib.write(self.workdir, ROWS[:2], SEARCH)
    board_lib.write(self.workdir, ROWS, SEARCH)  # An extended search ...
    board_lib.write(self.workdir, ROWS, SEARCH)  # ... and its rerun.
    files = hparams_board(self.folder)["files"]
    self.assertEqual(sorted(files), [".", "trial_0", "trial_1", "trial_2"])
    for run, names in files.items():
      self.assertLen(names, 1, run)
    self.assertEqual(os.listdir(os.path.dirname(self.folder)), ["hparams"])  # No temporaries.

  def test_a_failed_rewrite_keeps_the_last_board_and_leaves_no_temporary(self):
    board_lib.write(self.workdir, ROWS[:1], SEARCH)
    with mock.patch.object(board_lib, "_trial_summaries", side_effect=OSError("disk full")):
      with self.assertRaisesRegex(OSError, "disk full"):
        board_lib.write(self.workdir, ROWS, SEARCH)
    self.assertEqual(sorted(hparams_board(self.folder)["sessions"]), ["trial_1"])
    self.assertEqual(os.listdir(os.path.dirname(self.folder)), ["hparams"])

  def test_the_folder_of_a_killed_rewrite_is_removed_by_the_next_run(self):
    board_lib.write(self.workdir, ROWS[:1], SEARCH)
    with artifacts.atomic_folder(self.folder) as live:
      name = os.path.basename(live).split("-")
      dead = os.path.join(os.path.dirname(live), "-".join(name[:2] + ["999999999"] + name[3:]))
      os.makedirs(os.path.join(dead, "trial_0"))
      self.assertEqual(artifacts.remove_orphaned_temporaries(self.workdir), 1)
      self.assertTrue(os.path.isdir(live))  # This process is alive: its folder stays.
    self.assertFalse(os.path.exists(dead))
    self.assertEqual(os.listdir(os.path.dirname(self.folder)), ["hparams"])


if __name__ == "__main__":
  absltest.main()
