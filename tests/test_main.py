"""End-to-end smoke test of every `flowers_main` mode, as a user runs them.

The binary runs in subprocesses on a generated image folder (class subfolders)
with `flags/smoke.cfg`: random weights, 32 px, one epoch per stage. Bad flags
must give one-line errors and exit status 2, before any data is loaded.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

import fake_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "flags", "smoke.cfg")


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


class EveryModeTest(absltest.TestCase):
  """prepare -> train -> evaluate -> predict -> export -> report -> tune."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="flowers_main_test_")
    cls.image_dir = os.path.join(cls.root, "images")
    fake_data.write_image_dir(cls.image_dir, [8, 8, 8], size=40)
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

    tflite = flowers_main("--mode=predict", *self.common, "--output=json",
                          f"--model={os.path.join(self.workdir, 'model_int8.tflite')}",
                          f"--images={os.path.join(self.image_dir, 'class_00')}")
    self.assertLen(json.loads(tflite.stdout), 8)

    os.remove(os.path.join(self.workdir, "summary.md"))
    flowers_main("--mode=report", f"--workdir={self.workdir}")
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "summary.md")))

  def test_tune(self):
    workdir = os.path.join(self.root, "tune")
    flowers_main("--mode=tune", f"--flagfile={SMOKE}", f"--image_dir={self.image_dir}",
                 f"--workdir={workdir}", "--tuner=random")
    for name in ("trials.csv", "best_hparams.json", "model.keras", "report.json",
                 "model_int8.tflite", "labels.txt"):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)


class BadInputTest(parameterized.TestCase):

  @parameterized.parameters(
      (["--mode=prepare", "--split=64,16"], "--split"),
      (["--mode=train", "--dropout=1.5"], "--dropout"),
      (["--mode=train", "--image_size=8"], "--image_size"),
      (["--mode=prepare", "--image_dir=/no/such/folder"], "--image_dir"),
      (["--mode=tune", "--unfreeze_ratio_range=0.6,0.2"], "unfreeze"),
      (["--mode=tune", "--fine_tune_learning_rate_range=0,1e-3"], "learning_rate"),
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

  def test_unknown_mode_is_a_flag_error(self):
    proc = flowers_main("--mode=fly", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--mode", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
