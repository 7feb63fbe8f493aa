"""The training loop under --distribution_strategy=multi_worker: two processes.

Two `train_worker.py` tasks on 127.0.0.1 (TF_CONFIG, no "chief" task: worker 0
is the chief) train the plain path on mock data, each in its own workdir as on
two machines.
"""

import json
import os
import socket
import subprocess
import sys
import time

from absl.testing import absltest
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TIMEOUT_S = 240  # It takes about 75 s on 2 busy cores.
GRACE_S = 20


def free_ports(count):
  """`count` distinct free ports (the sockets stay bound until all are picked)."""
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def shown(outputs, procs):
  """Each worker's output for a failure message: its traceback's start and its end."""
  parts = []
  for i, out in enumerate(outputs):
    status = f" (exit {procs[i].returncode})"
    start = out.rfind("Traceback (most recent call last)")
    head = out[start:start + 3000] + "\n[...]\n" if start >= 0 else ""
    parts.append(f"--- worker {i}{status}:\n{head}{out[-1500:]}")
  return "\n".join(parts)


def run_cluster(workdirs, logdir, timeout=TIMEOUT_S):
  """Starts one train_worker.py per workdir as one cluster; returns their RESULTs.

  A worker that fails leaves the others waiting in a collective: they are
  killed `GRACE_S` later.
  """
  cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(len(workdirs))]}
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "NO_GCE_CHECK": "true",
         "TF_ENABLE_ONEDNN_OPTS": "1",
         "PYTHONPATH": os.pathsep.join(
             [REPO, TESTS] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
  env.pop("TF_CONFIG", None)
  procs, logs, hung = [], [], []
  started = time.time()
  try:
    for index, workdir in enumerate(workdirs):
      options = {"workdir": workdir, "tf_config": {
          "cluster": cluster, "task": {"type": "worker", "index": index}}}
      logs.append(os.path.join(logdir, f"worker{index}.log"))
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(TESTS, "train_worker.py"), json.dumps(options)],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO))
    deadline = started + timeout
    failed_at = None
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = time.time()
      if failed_at is not None and time.time() > failed_at + GRACE_S:
        break
      time.sleep(0.5)
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  outputs = []
  for path in logs:
    with open(path) as f:
      outputs.append(f.read())
  assert not hung, f"workers {hung} killed after {time.time() - started:.0f} s:\n" + shown(
      outputs, procs)
  assert all(p.returncode == 0 for p in procs), shown(outputs, procs)
  results = []
  for out in outputs:
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, shown(outputs, procs)
    results.append(json.loads(lines[-1][len("RESULT "):]))
  return results


class MultiWorkerTest(absltest.TestCase):

  @pytest.mark.slow
  def test_multi_worker_training_is_synchronous_and_only_the_chief_writes(self):
    tmp = self.create_tempdir().full_path
    workdirs = [os.path.join(tmp, "worker0"), os.path.join(tmp, "worker1")]
    chief, worker = run_cluster(workdirs, tmp)
    self.assertEqual((chief["replicas"], worker["replicas"]), (2, 2))
    # A collective after training.
    self.assertEqual((chief["arrived"], worker["arrived"]), (2, 2))
    self.assertTrue(chief["is_chief"] and chief["report_is_chief"])
    self.assertFalse(worker["is_chief"] or worker["report_is_chief"])
    self.assertBetween(chief["test_accuracy"], 0.0, 1.0)
    self.assertEqual(chief["num_test_examples"], 16)
    self.assertEqual(chief["num_train_examples"], 32)
    self.assertEqual(chief["fine_tune_until"], 1)
    self.assertNotIn("test_accuracy", worker)
    self.assertTrue(os.path.exists(os.path.join(workdirs[0], "model.keras")))
    self.assertTrue(os.path.exists(os.path.join(workdirs[0], "report.json")))
    self.assertFalse(os.path.exists(os.path.join(workdirs[1], "model.keras")))
    self.assertFalse(os.path.exists(os.path.join(workdirs[1], "report.json")))
    # Synchronous training: both workers end with the same weights.
    self.assertEqual(chief["classifier_digest"], worker["classifier_digest"])
    self.assertEqual(chief["trainable_digest"], worker["trainable_digest"])
    self.assertEqual(chief["num_trainable"], worker["num_trainable"])
    self.assertGreater(chief["num_trainable"], 2)


if __name__ == "__main__":
  absltest.main()
