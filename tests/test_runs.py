"""flowers.runs: what --overwrite deletes, what a search's fingerprint holds, which
weights a run stands on.

Fast: fake workdirs and fingerprints, no training. The runs that chain the modes
are in test_lifecycle.py.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import types

from absl.testing import absltest
import pytest

import fake_data
import run_configs
from workdir_files import snapshot
from flowers import artifacts
from flowers import backbone as backbone_lib
from flowers import modes
from flowers import runs
from flowers.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS_CSV = "file_name,label,split\na.jpg,0,train\nb.jpg,1,test\n"


def write(folder: str, name: str, text: str = "x") -> None:
  path = os.path.join(folder, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def files_under(folder: str) -> set[str]:
  return {os.path.relpath(os.path.join(root, name), folder)
          for root, _, names in os.walk(folder) for name in names}


def fake_source():
  return types.SimpleNamespace(name="tfds:oxford_flowers102", keys=["a", "b"], labels=[0, 1])


# A user's project folder: names a run also writes, none of them made by one.
PROJECT = {"logs/train.log": "mine", "backup/notes.txt": "mine", "plots/figure.png": "mine",
           "summary.md": "# My project", "labels.txt": "cat\ndog\n", "data.csv": "1,2"}


class OverwriteTest(absltest.TestCase):
  """--overwrite deletes what a run of flowers made, never a user's own files."""

  def test_a_project_folder_without_a_run_is_refused_and_left_as_it_was(self):
    folder = self.create_tempdir().full_path
    for name, text in PROJECT.items():
      write(folder, name, text)
    before = snapshot(folder)
    with self.assertRaisesRegex(UserError, r"^--overwrite deletes only what a flowers run "
                                r"made, and .* holds no run .*backup, data\.csv, labels\.txt, "
                                r"logs and 2 more; point --workdir at the run's folder") as e:
      runs.start_afresh(folder)
    self.assertNotIn("\n", str(e.exception))
    self.assertEqual(snapshot(folder), before)

  def test_train_with_overwrite_in_a_project_folder_writes_and_deletes_nothing(self):
    root = self.create_tempdir().full_path
    image_dir = os.path.join(root, "images")
    fake_data.write_image_dir(image_dir, [4, 4, 4], size=32)
    folder = os.path.join(root, "project")
    for name, text in PROJECT.items():
      write(folder, name, text)
    before = snapshot(folder)
    config = dataclasses.replace(run_configs.tiny(data={"image_dir": image_dir}), overwrite=True)
    with self.assertRaisesRegex(UserError, "holds no run"):
      modes.train(config, folder)
    self.assertEqual(snapshot(folder), before)

  def test_a_run_folder_loses_what_lineage_lists_and_the_training_state_only(self):
    folder = self.create_tempdir().full_path
    made = {"model.keras", "report.json", "plots/history.png", "evaluation_model.json",
            "model_int8.tflite"}
    for name in made:
      write(folder, name)
    write(folder, artifacts.LINEAGE, json.dumps({"owner": "r", "files": {
        name: {"mode": "train", "run": "r", "model": None, "sha256": "0"} for name in made}}))
    write(folder, artifacts.RUN, json.dumps({"mode": "train", "train": {}, "data": {}}))
    state = {"splits.csv", "flags.cfg", "frozen.weights.h5", "fine_tune.weights.h5",
             "history_frozen.csv", "backup/frozen/state.npz", "logs/fine_tune/events",
             "tuner/oracle.json", "tuner/trial_0/trial.json", "stage1.weights.h5"}
    for name in state:
      write(folder, name)
    # Not the run's: a user's notes, a summary no record names; the cache stays too.
    kept = {"notes.md", "summary.md", "plots/mine.png", "cache/prefix_abc.npy"}
    for name in kept:
      write(folder, name)
    runs.start_afresh(folder)
    self.assertEqual(files_under(folder), kept)

  def test_an_older_flowers_run_without_lineage_loses_what_it_wrote(self):
    folder = self.create_tempdir().full_path
    write(folder, artifacts.RUN, json.dumps({"mode": "tune", "train": {}, "data": {}}))
    for name in ("splits.csv", "model.keras", "report.json", "labels.txt", "summary.md",
                 "plots/history.png", "trials.csv", "evaluation_model.json",
                 "tuner/trial_0/trial.json", "notes.md", "cache/prefix_abc.npy"):
      write(folder, name)
    runs.start_afresh(folder)
    self.assertEqual(files_under(folder), {"notes.md", "cache/prefix_abc.npy"})

  def test_a_prepared_or_empty_folder_goes_on_and_a_damaged_run_json_is_deleted(self):
    runs.start_afresh(os.path.join(self.create_tempdir().full_path, "absent"))
    prepared = self.create_tempdir().full_path
    write(prepared, artifacts.SPLITS, SPLITS_CSV)
    write(prepared, "cache/pixels_train_32_abc.index")
    write(prepared, ".DS_Store")
    runs.start_afresh(prepared)  # --mode=prepare's split: a run's, deleted.
    self.assertEqual(files_under(prepared), {"cache/pixels_train_32_abc.index", ".DS_Store"})
    # The fix a damaged run.json names is --overwrite: the folder is still a run's.
    damaged = self.create_tempdir().full_path
    write(damaged, artifacts.SPLITS, SPLITS_CSV)
    write(damaged, artifacts.RUN, '{"mode": "tr')
    write(damaged, "backup/frozen/state.npz")
    runs.start_afresh(damaged)
    self.assertEqual(files_under(damaged), set())

  def test_a_lineage_record_outside_the_folder_is_not_deleted(self):
    root = self.create_tempdir().full_path
    folder = os.path.join(root, "run")
    write(root, "precious.txt")
    write(folder, artifacts.LINEAGE, json.dumps({"owner": "r", "files": {
        "../precious.txt": {}, ".": {}}}))
    runs.start_afresh(folder)
    self.assertTrue(os.path.exists(os.path.join(root, "precious.txt")))
    self.assertTrue(os.path.isdir(folder))


class SearchFingerprintTest(absltest.TestCase):
  """Under --first_trial=configured, the configured values decide the search's first trial."""

  def config(self, first_trial, **train):
    return run_configs.tiny(search={"first_trial": first_trial, "dropout_range": (0.1, 0.5)},
                            **{"dropout": 0.2, **train})

  def fingerprint(self, config):
    return runs.fingerprint(config, "tune", source=fake_source(), splits_sha256="x",
                            feature_cache=True)

  def test_the_configured_values_are_in_the_fingerprint_the_drawn_ones_not(self):
    self.assertEqual(
        runs.differences(self.fingerprint(self.config("configured")),
                         self.fingerprint(self.config("configured", dropout=0.3))),
        ["train.dropout: 0.2 -> 0.3"])
    self.assertEqual(
        runs.differences(self.fingerprint(self.config("drawn")),
                         self.fingerprint(self.config("drawn", dropout=0.3))), [])

  def test_a_search_begun_with_other_configured_values_is_refused(self):
    workdir = self.create_tempdir().full_path
    write(workdir, artifacts.SPLITS, SPLITS_CSV)
    runs.begin(self.config("configured"), workdir, "tune", fake_source(), feature_cache=True)
    with self.assertRaisesRegex(UserError, r"train\.dropout: 0\.2 -> 0\.3.*--overwrite"):
      runs.begin(self.config("configured", dropout=0.3), workdir, "tune", fake_source(),
                 feature_cache=True)

  def test_an_older_search_read_as_drawn_and_so_not_as_configured(self):
    old = self.fingerprint(self.config("drawn"))
    del old["search"]["first_trial"]  # Recorded before the setting: it drew its first trial.
    upgraded = runs.upgrade(old)
    self.assertEqual(runs.differences(upgraded, self.fingerprint(self.config("drawn"))), [])
    changed = runs.differences(upgraded, self.fingerprint(self.config("configured")))
    self.assertIn("search.first_trial: drawn -> configured", changed)
    self.assertIn("train.dropout: None -> 0.2", changed)


class ShuffleFingerprintTest(absltest.TestCase):
  """The plain path's shuffle, a seeded stream per stage, is part of its run."""

  def test_a_plain_run_of_an_older_flowers_is_refused_not_resumed_on_another_order(self):
    config = run_configs.tiny(feature_cache="off")
    workdir = self.create_tempdir().full_path
    write(workdir, artifacts.SPLITS, SPLITS_CSV)
    self.assertEqual(runs.begin(config, workdir, "train", fake_source(),
                                feature_cache=False)["data"]["shuffle"], "per stage, seeded")
    # Older flowers' stages and trials shared one stream: their run.json has no "shuffle".
    older = runs.read_run(workdir)
    del older["data"]["shuffle"]
    artifacts.write_json(os.path.join(workdir, artifacts.RUN), older)
    with self.assertRaisesRegex(UserError, r"data\.shuffle: None -> per stage, seeded.*"
                                           r"--overwrite"):
      runs.begin(config, workdir, "train", fake_source(), feature_cache=False)
    # The cached path draws from its own view sampler, seeded per stage as it always was.
    cached = runs.fingerprint(config, "train", source=fake_source(), splits_sha256="x",
                              feature_cache=True)
    self.assertNotIn("shuffle", cached["data"])


# Run in a fresh interpreter: Keras reads $KERAS_HOME once, when it is imported.
_IDENTITIES = """
import json, os, sys, tempfile
from flowers import config as config_lib, errors, runs
path = sys.argv[1]
source = type("S", (), {"name": "tfds:x", "keys": ["a"], "labels": [0]})()
def config(weights):
  return config_lib.RunConfig(data=config_lib.DataConfig(image_size=32),
                              train=config_lib.TrainConfig(weights=weights))
def fingerprint(weights):
  return runs.fingerprint(config(weights), "train", source=source, splits_sha256="x",
                          feature_cache=True)
# A run.json an older flowers wrote: the weights by name. Both spellings resume it.
workdir = tempfile.mkdtemp()
with open(os.path.join(workdir, "splits.csv"), "w") as f:
  f.write("file_name,label,split\\na,0,train\\n")
older = runs.run_fingerprint(config(None), workdir, "train", source, True)
older["train"]["weights"] = "imagenet"
with open(os.path.join(workdir, "run.json"), "w") as f:
  json.dump(older, f)
resumed = []
for weights in ("imagenet", path):
  try:
    runs.begin(config(weights), workdir, "train", source, feature_cache=True, chief=False)
    resumed.append(True)
  except errors.UserError as e:
    resumed.append(str(e))
print(json.dumps({"imagenet": runs.weights_identity("imagenet"),
                  "path": runs.weights_identity(path),
                  "fingerprints": [fingerprint("imagenet")["train"]["weights"],
                                   fingerprint(path)["train"]["weights"]],
                  "older_resumes": resumed}))
"""


class WeightsIdentityTest(absltest.TestCase):
  """--weights=imagenet and --weights=PATH to the file Keras loads for it are one run."""

  @pytest.mark.slow  # A fresh interpreter imports TensorFlow.
  def test_imagenet_is_the_file_keras_caches_so_both_spellings_are_one_run(self):
    keras_home = self.create_tempdir().full_path
    name = backbone_lib.get("mobilenet_v2").weights_file_name(1.0, 32)
    content = b"\x89HDF\r\n\x1a\n a stand-in for the no-top weights"
    write(keras_home, os.path.join("models", name), "")
    with open(os.path.join(keras_home, "models", name), "wb") as f:
      f.write(content)
    copy = os.path.join(self.create_tempdir().full_path, "my_weights.h5")
    with open(copy, "wb") as f:
      f.write(content)
    env = dict(os.environ, KERAS_HOME=keras_home, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", _IDENTITIES, copy], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    found = json.loads(done.stdout.strip().splitlines()[-1])
    expected = "sha256:" + hashlib.sha256(content).hexdigest()
    self.assertEqual(found, {"imagenet": expected, "path": expected,
                             "fingerprints": [expected, expected],
                             "older_resumes": [True, True]})

  def test_no_weights_are_random_and_a_missing_file_is_a_one_line_error(self):
    self.assertEqual(runs.weights_identity(None), "random")
    with self.assertRaisesRegex(UserError, r"^--weights=/no/such\.h5 is not a file"):
      runs.weights_identity("/no/such.h5")


if __name__ == "__main__":
  absltest.main()
