"""Workdir rules beside tests/test_lifecycle.py: a finished search rerun from its own
flags.cfg, the settings the fingerprint resolves, unreadable files given to predict."""

import builtins
import dataclasses
import glob
import io
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import pytest

import fake_data
from workdir_files import snapshot
from flowers import artifacts
from flowers import config as config_lib
from flowers import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "flags", "smoke.cfg")


def flowers_main(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "flowers.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)



@pytest.mark.slow
class FinishedSearchTest(absltest.TestCase):

  def test_a_finished_search_rerun_from_its_flags_cfg_changes_nothing(self):
    root = self.create_tempdir().full_path
    image_dir = os.path.join(root, "images")
    fake_data.write_image_dir(image_dir, [8, 8, 8], size=40)
    workdir = os.path.join(root, "tune")
    # --overwrite on the first run: the flags.cfg it leaves must not carry it.
    first = flowers_main("--mode=tune", f"--flagfile={SMOKE}", f"--image_dir={image_dir}",
                         f"--workdir={workdir}", "--tuner=random", "--overwrite", "--noplots")
    self.assertEqual(first.returncode, 0, first.stderr[-2000:])
    trials = sorted(glob.glob(os.path.join(workdir, "tuner", "trial_*")))
    self.assertLen(trials, 2)
    before = snapshot(workdir)

    again = flowers_main(f"--flagfile={os.path.join(workdir, 'flags.cfg')}")
    self.assertEqual(again.returncode, 0, again.stderr[-2000:])
    self.assertIn("already holds this run, finished", again.stdout)
    self.assertEqual(snapshot(workdir), before)  # Every trial kept; nothing rewritten.


class FingerprintTest(absltest.TestCase):
  """What --pixel_cache changes is in the fingerprint exactly when it changes the model."""

  def fingerprint(self, cache: str, feature_cache: bool):
    source = mock.Mock(name="source", keys=["a", "b"], labels=[0, 1], spec=["name", "keys",
                                                                           "labels"])
    source.name = "tfds:oxford_flowers102"
    config = config_lib.RunConfig(data=config_lib.DataConfig(pixel_cache=cache),
                                  train=config_lib.TrainConfig(weights=None))
    return runs.fingerprint(config, "train", source=source, splits_sha256="x",
                            feature_cache=feature_cache)

  def test_the_pixel_cache_counts_only_where_it_sets_the_shuffle(self):
    # The plain path shuffles over the whole split from memory, 2,048 images from disk.
    self.assertNotEqual(runs.differences(self.fingerprint("memory", False),
                                         self.fingerprint("disk", False)), [])
    # The feature cache reads its own sampler: where the pixels are kept changes nothing.
    self.assertEqual(runs.differences(self.fingerprint("memory", True),
                                      self.fingerprint("disk", True)), [])


class OlderStageNamesTest(absltest.TestCase):
  """Runs of an older flowers named the stages stage1 and stage2."""

  def test_an_older_runs_training_state_is_renamed_so_it_resumes(self):
    workdir = self.create_tempdir().full_path
    old = ["stage1.weights.h5", "history_stage2.csv", "backup/stage2/state.npz",
           "logs/stage1/events", "tuner/trial_0/stage2.weights.h5", "cache/stage1/x",
           "notes/stage1"]
    for name in old:
      os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
      with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(name)
    artifacts.rename_legacy_stage_files(workdir)
    renamed = {"frozen.weights.h5": "stage1.weights.h5",
               "history_fine_tune.csv": "history_stage2.csv",
               "backup/fine_tune/state.npz": "backup/stage2/state.npz",
               "logs/frozen/events": "logs/stage1/events",
               "tuner/trial_0/fine_tune.weights.h5": "tuner/trial_0/stage2.weights.h5",
               # Not training state: the caches, and files that only share a word.
               "cache/stage1/x": "cache/stage1/x", "notes/stage1": "notes/stage1"}
    for new, was in renamed.items():
      with open(os.path.join(workdir, new), encoding="utf-8") as f:
        self.assertEqual(f.read(), was)
    for name in ("stage1.weights.h5", "backup/stage2", "logs/stage1"):
      self.assertFalse(os.path.exists(os.path.join(workdir, name)), name)

  def test_an_older_history_json_reads_under_the_stage_names(self):
    history = artifacts.upgrade_history({"stage1": {"loss": [1.0]}, "stage2": {"loss": [0.5]}})
    self.assertEqual(history, {"frozen": {"loss": [1.0]}, "fine_tune": {"loss": [0.5]}})


class PredictTest(absltest.TestCase):

  def test_an_unreadable_file_is_named_and_skipped(self):
    from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
    from flowers import modes  # pylint: disable=g-import-not-at-top
    from flowers import artifacts  # pylint: disable=g-import-not-at-top

    folder = self.create_tempdir().full_path
    model_path = os.path.join(folder, "model.keras")
    model_lib.build_model(3, image_size=32, weights=None).save(model_path)
    artifacts.write_labels(artifacts.labels_beside(model_path), ["a", "b", "c"])
    images = os.path.join(folder, "images")
    os.makedirs(images)
    for name in ("locked.jpg", "fine.jpg"):
      with open(os.path.join(images, name), "wb") as f:
        f.write(fake_data.encode(fake_data.class_image(0, 1)))
    real_open = builtins.open

    def open_but_locked(path, *args, **kwargs):
      if str(path).endswith("locked.jpg"):
        raise PermissionError(13, "Permission denied", str(path))
      return real_open(path, *args, **kwargs)

    config = dataclasses.replace(config_lib.RunConfig(), predict=config_lib.PredictConfig(
        model=model_path, images=(images,)))
    with mock.patch.object(builtins, "open", open_but_locked), \
        mock.patch.object(sys, "stderr", new_callable=io.StringIO) as err:
      results = modes.predict(config, folder)
    self.assertEqual([os.path.basename(r["image"]) for r in results], ["fine.jpg"])
    self.assertIn("locked.jpg cannot be read (Permission denied); skipped", err.getvalue())


if __name__ == "__main__":
  absltest.main()
