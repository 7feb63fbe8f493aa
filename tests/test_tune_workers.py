"""KerasTuner searches in processes of their own (tests/tune_worker.py).

Logical CPU devices must be set before TensorFlow starts, and a distributed
search needs a chief and workers: each runs `tune.run_search` on the mock data.
"""

import csv
import json
import os
import socket
import subprocess
import sys

from absl.testing import absltest
import pytest

import fake_data
from flowers import artifacts

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def read_trials(workdir):
  with open(os.path.join(workdir, artifacts.TRIALS), newline="") as f:
    return list(csv.DictReader(f))


def run_workers(options_list, envs, timeout=420):
  """Starts tune_worker.py processes; returns their RESULT summaries."""
  procs = []
  for options, env in zip(options_list, envs):
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(TESTS, "tune_worker.py"), json.dumps(options)],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=REPO))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  results = []
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-5000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT "):]))
  return results


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def flowers_main(args, env):
  return subprocess.Popen([sys.executable, "-m", "flowers.main", *args],
                          env={**os.environ, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)


class TuneWorkersTest(absltest.TestCase):

  @pytest.mark.slow
  def test_mirrored_strategy_on_two_logical_cpus(self):
    tmp = self.create_tempdir().full_path
    [result] = run_workers([{"workdir": tmp, "max_trials": 1, "fine_tune_ema_momentum": 0.9,
                             "distribution_strategy": "mirrored", "logical_cpus": 2}], [{}])
    self.assertEqual(result["replicas"], 2)
    self.assertTrue(result["is_chief"])
    self.assertEqual(result["num_trials"], 1)
    self.assertTrue(os.path.exists(os.path.join(tmp, "model.keras")))

  @pytest.mark.slow
  def test_distributed_search_shares_trials_between_workers(self):
    tmp = self.create_tempdir().full_path
    workdir = os.path.join(tmp, "work")
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    common = {"workdir": workdir, "max_trials": 2, "chief_poll_s": 1}
    barrier = [os.path.join(tmp, "barrier"), 2]
    chief, *workers = run_workers(
        [common, {**common, "barrier": barrier}, {**common, "barrier": barrier}],
        [{**oracle, "KERASTUNER_TUNER_ID": "chief"},
         {**oracle, "KERASTUNER_TUNER_ID": "tuner0"},
         {**oracle, "KERASTUNER_TUNER_ID": "tuner1"}])
    self.assertTrue(chief["is_chief"] and chief["distributed"])
    self.assertEqual(chief["num_trials"], 2)
    self.assertEqual([w["is_chief"] for w in workers], [False, False])
    self.assertEqual([w["tuner_id"] for w in workers], ["tuner0", "tuner1"])
    # Both workers asked at once (the barrier): each ran one of the two trials.
    ran = [w["trials_run"] for w in workers]
    self.assertEqual(sorted(ran), [["0"], ["1"]], ran)
    rows = read_trials(workdir)
    self.assertLen(rows, 2)
    self.assertEqual({r["tuner_id"] for r in rows}, {"tuner0", "tuner1"})
    for name in ("model.keras", "report.json", "best_hparams.json", "labels.txt"):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)

  @pytest.mark.slow
  def test_a_worker_with_other_settings_than_the_chief_refuses_before_it_writes(self):
    tmp = self.create_tempdir().full_path
    images = os.path.join(tmp, "images")
    fake_data.write_image_dir(images, [5] * 4)
    flags = ["--mode=tune", f"--flagfile={os.path.join(REPO, 'flags', 'smoke.cfg')}",
             f"--image_dir={images}", "--seed=3"]
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    # Workers on disks of their own: only the chief can tell them apart.
    changed = {"tuner0": ("--dropout_range=0.2,0.3",
                          "search.dropout_range: [0.1, 0.4] -> [0.2, 0.3]"),
               "tuner1": ("--seed=4", "data.split_seed: 3 -> 4")}
    chief = flowers_main(flags + [f"--workdir={os.path.join(tmp, 'chief')}"],
                         {**oracle, "KERASTUNER_TUNER_ID": "chief"})
    workers = {name: flowers_main(flags + [flag, f"--workdir={os.path.join(tmp, name)}"],
                                  {**oracle, "KERASTUNER_TUNER_ID": name})
               for name, (flag, _) in changed.items()}
    try:
      ended = {name: proc.communicate(timeout=300) for name, proc in workers.items()}
    finally:
      for proc in [chief, *workers.values()]:
        if proc.poll() is None:
          proc.kill()
        proc.communicate()
    for name, (_, difference) in changed.items():
      _, err = ended[name]
      self.assertEqual(workers[name].returncode, 2, err[-3000:])
      [line] = [l for l in err.splitlines() if l.startswith("flowers_main: error:")]
      self.assertIn(f"{name} runs another search than the chief at 127.0.0.1", line)
      self.assertIn(difference, line)
      # Refused before it wrote anything.
      self.assertFalse(os.path.exists(os.path.join(tmp, name)))
    self.assertEmpty([n for n in os.listdir(os.path.join(tmp, "chief", artifacts.TUNER_DIR))
                      if n.startswith("trial_")])


if __name__ == "__main__":
  absltest.main()
