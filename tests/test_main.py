"""End-to-end smoke test of every `flowers_main` mode, as a user runs them.

The binary runs in subprocesses on a generated image folder (class subfolders)
with `flags/smoke.cfg`: random weights, 32 px, one epoch per stage. Bad flags
must give one-line errors and exit status 2, before any data is loaded.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from absl import flags
from absl.testing import flagsaver
import pytest

import fake_data
from flowers import cli
from flowers import config as config_lib
from flowers import main as main_lib
from flowers import tflite_metadata
from flowers.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "flags", "smoke.cfg")
MEDIAPIPE_CHECK = os.path.join(REPO, "benchmarks", "mediapipe_check.py")


def flowers_main(*args, check=True):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-m", "flowers.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"flowers_main {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def error_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.startswith("flowers_main: error")]


@pytest.mark.slow
class EveryModeTest(absltest.TestCase):
  """prepare -> train -> evaluate -> predict -> export -> report -> tune."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="flowers_main_test_")
    cls.image_dir = os.path.join(cls.root, "images")
    cls.class_names = fake_data.write_image_dir(cls.image_dir, [8, 8, 8], size=40)
    cls.workdir = os.path.join(cls.root, "run")
    cls.common = [f"--flagfile={SMOKE}", f"--image_dir={cls.image_dir}",
                  f"--workdir={cls.workdir}"]

  def test_modes_in_order(self):
    prepared = flowers_main("--mode=prepare", *self.common)
    self.assertIn("train", prepared.stdout)
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "splits.csv")))

    flowers_main("--mode=train", *self.common)
    for name in ("model.keras", "labels.txt", "report.json", "history.json", "flags.cfg",
                 "summary.md", os.path.join("plots", "history.png")):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, name)), name)
    with open(os.path.join(self.workdir, "flags.cfg")) as f:
      saved_flags = f.read()
    self.assertIn("--image_size=32", saved_flags)
    self.assertIn("--mode=train", saved_flags)

    evaluated = flowers_main("--mode=evaluate", *self.common)
    self.assertIn("test_accuracy=", evaluated.stdout)

    predicted = flowers_main("--mode=predict", *self.common, "--output=json", "--top_k=2",
                             f"--images={os.path.join(self.image_dir, 'class_01')}")
    results = json.loads(predicted.stdout)
    self.assertLen(results, 8)
    self.assertLen(results[0]["top_k"], 2)

    flowers_main("--mode=export", *self.common)
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "model_int8.tflite")))
    with open(os.path.join(self.workdir, "export_report.json")) as f:
      self.assertIn("int8_test_accuracy", json.load(f))
    # The metadata names the classes after the class folders, sorted (as labels.txt).
    self.assertEqual(
        tflite_metadata.read_class_names(os.path.join(self.workdir, "model_int8.tflite")),
        sorted(self.class_names))

    tflite = flowers_main("--mode=predict", *self.common, "--output=json",
                          f"--model={os.path.join(self.workdir, 'model_int8.tflite')}",
                          f"--images={os.path.join(self.image_dir, 'class_00')}")
    self.assertLen(json.loads(tflite.stdout), 8)

    os.remove(os.path.join(self.workdir, "summary.md"))
    flowers_main("--mode=report", f"--workdir={self.workdir}")
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "summary.md")))
    self.check_in_mediapipe(os.path.join(self.workdir, "model_int8.tflite"))

  def check_in_mediapipe(self, model):
    """MediaPipe Tasks on the folder's own test files agrees with --mode=predict.

    The tiny model scores every class alike (a tie at the top, below its
    "unknown" threshold), so this checks the path rather than the pixels: the
    run's folder found from run.json, its files read as they are (the formats
    fake_data mixes), the names, the answers and the "unknown" verdicts.
    """
    if importlib.util.find_spec("mediapipe") is None:
      self.skipTest("mediapipe is not installed; only the MediaPipe check is skipped.")
    spec = importlib.util.spec_from_file_location("mediapipe_check", MEDIAPIPE_CHECK)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    image_dir = check.run_image_dir(self.workdir, None)
    self.assertEqual(image_dir, os.path.abspath(self.image_dir))
    keys, labels = check.test_examples(self.workdir, limit=4)
    paths = check.folder_images(image_dir, keys)
    extra = [os.path.join(self.image_dir, self.class_names[0], "img_000.png")]
    result = check.check(model, self.workdir, paths, labels, extra_paths=extra)
    self.assertTrue(result["names_match"])
    self.assertEqual(result["agreement"], 1.0)
    self.assertIsNotNone(result["score_threshold"])
    self.assertEqual(result["unknown_agreement"], 1.0)
    self.assertLen(result["per_image"], len(paths) + 1)
    self.assertTrue(result["per_image"][-1]["extra"])

  def test_tune(self):
    workdir = os.path.join(self.root, "tune")
    flowers_main("--mode=tune", f"--flagfile={SMOKE}", f"--image_dir={self.image_dir}",
                 f"--workdir={workdir}", "--tuner=random")
    for name in ("trials.csv", "best_hparams.json", "model.keras", "report.json",
                 "model_int8.tflite", "labels.txt"):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)


@pytest.mark.slow
class KillAndResumeTest(parameterized.TestCase):
  """`kill -9` in stage 2, then the same command: it continues, losing at most one epoch."""

  # The CPU default (the feature cache); the plain path's kill and resume, at every epoch
  # boundary, is tests/test_resume.py's.
  def test_kill_in_stage_2_then_resume(self):
    feature_cache = "on"
    fine_tune_epochs = 12  # Enough that the kill lands midway.
    root = self.create_tempdir().full_path
    image_dir = os.path.join(root, "images")
    fake_data.write_image_dir(image_dir, [8, 8, 8], size=40)
    workdir = os.path.join(root, "run")
    args = [f"--flagfile={SMOKE}", f"--image_dir={image_dir}", f"--workdir={workdir}",
            "--mode=train", f"--fine_tune_epochs={fine_tune_epochs}",
            f"--feature_cache={feature_cache}",
            "--noplots"]
    history = os.path.join(workdir, "history_fine_tune.csv")

    def epochs():
      if not os.path.exists(history):
        return []
      with open(history) as f:
        return [int(line.split(",")[0]) for line in f.read().splitlines()[1:] if line]

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "flowers.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      deadline = time.time() + 300
      while len(epochs()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait()
    before = epochs()
    self.assertGreaterEqual(len(before), 2)
    self.assertLess(before[-1], fine_tune_epochs - 1,
                    "finished before the kill; the test needs more epochs")
    with open(os.path.join(workdir, "history_frozen.csv")) as f:
      frozen = f.read()

    flowers_main(*args)
    after = epochs()[len(before):]
    # The rerun starts at the epoch after the last logged one (or redoes that one).
    self.assertIn(after[0], (before[-1], before[-1] + 1), (before, after))
    self.assertEqual(sorted(set(before + after)), list(range(fine_tune_epochs)))
    with open(os.path.join(workdir, "history_frozen.csv")) as f:
      self.assertEqual(f.read(), frozen)  # Stage 1 was not run again.
    self.assertTrue(os.path.exists(os.path.join(workdir, "model.keras")))


class BadInputTest(parameterized.TestCase):

  @parameterized.parameters(
      (["--mode=prepare", "--split=64,16"], "--split"),
      (["--mode=prepare", "--split=nan,1,1"], "--split"),
      (["--mode=train", "--dropout=1.5"], "--dropout"),
      (["--mode=train", "--image_size=8"], "--image_size"),
      (["--mode=prepare", "--image_dir=/no/such/folder"], "--image_dir"),
      (["--mode=tune", "--unfreeze_ratio_range=0.6,0.2"], "unfreeze"),
      (["--mode=tune", "--fine_tune_learning_rate_range=0,1e-3"], "learning_rate"),
      (["--mode=tune", "--fine_tune_epochs=3"], "--halving_rungs=2,4 must stay below"),
      (["--mode=evaluate", "--model=/no/such/model.keras"], "--model"),
      (["--mode=predict", "--model=/no/such/model.tflite", "--images=x.jpg"], "--model"),
      (["--mode=report", "--workdir=/no/such/workdir"], "workdir"),
  )
  def test_one_line_error_before_loading_anything(self, args, mentions):
    proc = flowers_main(*args, "--tfds_data_dir=/no/such/tfds", check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    errors = error_lines(proc)
    self.assertLen(errors, 1, proc.stderr[-2000:])
    self.assertIn(mentions, errors[0])
    self.assertNotIn("Traceback", proc.stderr)

  @parameterized.named_parameters(
      ("choice", "--optimizer=adagrad",
       lambda: config_lib.TrainConfig(optimizer="adagrad")),
      ("range", "--dropout=1.5", lambda: config_lib.TrainConfig(dropout=1.5)),
      ("split", "--split=80,30,0", lambda: config_lib.DataConfig(split="80,30,0")),
      ("auto_choice", "--feature_cache=sometimes",
       lambda: config_lib.TrainConfig(feature_cache="sometimes")),
      ("export_choice", "--quantization=int4",
       lambda: config_lib.ExportConfig(quantization="int4")),
      ("search_range", "--dropout_range=0.5,0.1",
       lambda: config_lib.SearchConfig(dropout_range=("0.5", "0.1"))),
      ("size", "--image_size=8",
       lambda: config_lib.RunConfig(data=config_lib.DataConfig(image_size=8))),
      ("views", "--feature_cache_views=0", lambda: config_lib.TrainConfig(feature_cache_views=0)),
  )
  def test_command_line_and_library_give_the_same_one_line_error(self, flag, build):
    with self.assertRaises(UserError) as library:
      build()
    proc = flowers_main("--mode=train", flag, "--tfds_data_dir=/no/such/tfds", check=False)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertEqual(error_lines(proc), [f"flowers_main: error: {library.exception}"])
    self.assertNotIn("\n", str(library.exception))

  def test_unknown_mode_is_a_flag_error(self):
    proc = flowers_main("--mode=fly", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--mode", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


# A value other than the default for every settings flag, and the value the
# library must then see in its RunConfig.
NON_DEFAULTS = {
    "image_dir": ("/images", "/images"), "tfds_name": ("other", "other"),
    "tfds_data_dir": ("/tfds", "/tfds"), "download": ("false", False),
    "strict": ("true", True), "split": ("70,10,20", "70,10,20"), "split_seed": ("8", 8),
    "holdout_classes": ("10", 10), "seed": ("7", 7),
    "image_size": ("96", 96), "batch_size": ("16", 16), "pixel_cache": ("disk", "disk"),
    "backbone": ("mobilenet_v2", "mobilenet_v2"), "weights": ("/w.h5", "/w.h5"),
    "alpha": ("0.5", 0.5), "dropout": ("0.3", 0.3),
    "augment": ("false", False), "flip": ("false", False), "rotation": ("10", 10.0),
    "zoom": ("0.1", 0.1), "translation": ("0.05", 0.05), "contrast": ("0.05", 0.05),
    "crop_area": ("0.5", 0.5),
    "unfreeze_ratio": ("0.4", 0.4), "optimizer": ("sgd", "sgd"),
    "learning_rate": ("0.01", 0.01), "fine_tune_learning_rate": ("1e-4", 1e-4),
    "epochs": ("3", 3), "fine_tune_epochs": ("4", 4), "fine_tune_ema_momentum": ("0.9", 0.9),
    "label_smoothing": ("0.2", 0.2),
    "class_weight": ("balanced", "balanced"),
    "lr_schedule": ("cosine", "cosine"), "weight_decay": ("0.001", 0.001),
    "early_stopping_patience": ("5", 5), "fine_tune_early_stopping_patience": ("4", 4),
    "feature_cache": ("on", "on"), "feature_cache_views": ("3", 3),
    "int8_grid_weights": ("false", False),
    "calibrate": ("false", False), "true_accept_rate": ("0.9", 0.9),
    "distribution_strategy": ("mirrored", "mirrored"), "verbose": ("2", 2),
    "tuner": ("random", "random"), "max_trials": ("3", 3),
    "feature_cache_cut_ratio": ("0.5", 0.5), "median_stop_epoch": ("6", 6),
    "halving_rungs": ("1,2", (1, 2)), "halving_factor": ("3", 3),
    "first_trial": ("drawn", "drawn"),
    "overwrite": ("true", True),
    "dropout_range": ("0.15,0.35", (0.15, 0.35)),
    "unfreeze_ratio_range": ("0.1,0.3", (0.1, 0.3)),
    "fine_tune_learning_rate_range": ("3e-5,3e-4", (3e-5, 3e-4)), "export_best": ("false", False),
    "quantization": ("float16", "float16"), "io_dtype": ("int8", "int8"),
    "calibration_examples": ("50", 50), "max_accuracy_drop": ("2", 2.0),
    "model": ("m.keras", "m.keras"), "images": ("a.jpg,b.jpg", ("a.jpg", "b.jpg")),
    "top_k": ("3", 3), "output": ("json", "json"), "plots": ("false", False),
}


def field(config, path):
  for name in path:
    config = getattr(config, name)
  return config.value if isinstance(config, config_lib.Choice) else config


class FlagsReachTheLibraryTest(absltest.TestCase):

  def test_every_settings_flag_is_in_this_test(self):
    self.assertCountEqual(cli.FLAG_FIELDS, NON_DEFAULTS)

  def test_every_flag_reaches_the_run_config(self):
    default = config_lib.RunConfig()
    with flagsaver.flagsaver():
      for name, (text, _) in NON_DEFAULTS.items():
        flags.FLAGS[name].parse(text)
      config = cli.run_config()
    for name, path in cli.FLAG_FIELDS.items():
      expected = NON_DEFAULTS[name][1]
      self.assertEqual(field(config, path), expected, name)
      if name != "backbone":  # One backbone so far: no other value to pick.
        self.assertNotEqual(field(default, path), expected, f"{name}: pick a non-default")

  def test_a_runs_flags_cfg_reproduces_its_config(self):
    config = config_lib.RunConfig(
        data=config_lib.DataConfig(split="70,10,20", split_seed=3, tfds_data_dir="/tfds"),
        train=config_lib.TrainConfig(seed=5, weights=None, optimizer="adam", augment=False,
                                     fine_tune_learning_rate=3e-4),
        search=config_lib.SearchConfig(dropout_range=(0.1, 0.25)), overwrite=True)
    with flagsaver.flagsaver():
      flags.FLAGS(["flowers_main"] + cli.as_flags(config), known_only=False)
      # Every setting comes back; --overwrite is an action, never recorded.
      self.assertEqual(cli.run_config(), dataclasses.replace(config, overwrite=False))

  def test_seed_alone_seeds_the_split_too_and_split_seed_keeps_a_split(self):
    with flagsaver.flagsaver():
      flags.FLAGS(["flowers_main", "--seed=7"])
      alone = cli.run_config()
    with flagsaver.flagsaver():
      flags.FLAGS(["flowers_main", "--seed=7", "--split_seed=42"])
      kept = cli.run_config()
    self.assertEqual((alone.data.split_seed, alone.train.seed), (7, 7))
    self.assertEqual((kept.data.split_seed, kept.train.seed), (42, 7))

  def test_old_flag_names_still_load_with_a_note(self):
    with flagsaver.flagsaver():
      flags.FLAGS(["flowers_main", "--cache=disk", "--cache_views=3", "--cache_cut_ratio=0.5",
                   "--noexport"])
      config = cli.run_config()
      notes = cli.renamed_in_use()
    self.assertEqual((config.data.pixel_cache.value, config.train.feature_cache_views,
                      config.train.feature_cache_cut_ratio, config.export.export_best),
                     ("disk", 3, 0.5, False))
    self.assertCountEqual(notes, ["--cache is now --pixel_cache",
                                  "--cache_views is now --feature_cache_views",
                                  "--cache_cut_ratio is now --feature_cache_cut_ratio",
                                  "--export is now --export_best"])

  def test_importing_the_library_declares_no_flag(self):
    code = ("import absl.flags, flowers.cli, flowers.runs, flowers.config; "
            "assert 'seed' not in absl.flags.FLAGS and 'mode' not in absl.flags.FLAGS")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

  def test_the_mode_gets_that_config_and_the_workdir(self):
    seen = []
    from flowers import modes  # pylint: disable=g-import-not-at-top

    with flagsaver.flagsaver(mode="prepare", workdir="/some/workdir", dropout=0.35,
                             split="80,10,10"):
      with mock.patch.dict(modes.MODES, prepare=lambda c, w: seen.append((c, w))):
        main_lib.main(["flowers_main"])
      expected = cli.run_config()
    self.assertEqual(seen, [(expected, "/some/workdir")])
    self.assertEqual(expected.train.dropout, 0.35)


class HelpTest(absltest.TestCase):

  def test_help_lists_modes_every_flag_and_examples(self):
    proc = flowers_main("--help")
    text = proc.stdout
    for mode in cli.MODES:
      self.assertRegex(text, rf"\n  {mode} ")
    for name in list(cli.FLAG_FIELDS) + ["mode", "workdir", "flagfile"]:
      self.assertIn(f"--{name}", text)
    self.assertIn("Examples:", text)
    self.assertIn("flowers_main --mode=tune --flagfile=flags/cpu.cfg", text)
    self.assertNotIn("Try --helpfull", text)
    console_script = shutil.which("flowers_main")
    if console_script:  # Installed: the console script shows the same text.
      installed = subprocess.run([console_script, "--help"], capture_output=True, text=True,
                                 timeout=120)
      self.assertEqual(installed.stdout, text)


if __name__ == "__main__":
  absltest.main()
