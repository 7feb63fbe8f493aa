"""Replays the median stopping rule on a finished search: stage 2 epochs saved, best kept?

Usage, from the repository root, on a search whose trials all ran in full
(`--median_stop_epoch=0`, or a search from before the rule):

  python benchmarks/median_stopping.py --workdir=runs/tune

For each start epoch the rule could use (`--median_stop_epoch`), it replays
`flowers.tune.replay_median_stopping` on the trials' stage 2 val accuracies
(`tuner/trial_*/history_fine_tune.csv`, in trial order, as they ran) and prints the
stage 2 epochs the search would have run against those it ran, the trials it
would have stopped (id@epoch), and whether the best trial of `trials.csv` ran
in full. Everything it reads is val: choosing the start epoch with it keeps
test out of the choice.

The last line is `epochs_ratio=X.XX best_kept=True` for `--start_epoch`.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from flowers import artifacts  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from flowers import train  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from flowers import tune  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="A --mode=tune WORKDIR.")
  parser.add_argument("--start_epoch", type=int, default=4,
                      help="The --median_stop_epoch the last line reports.")
  args = parser.parse_args(argv)

  with open(os.path.join(args.workdir, artifacts.TRIALS), newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["status"] == "COMPLETED"]
  if any(r.get("median_stop") for r in rows):
    sys.exit(f"{args.workdir}: some trials were already stopped by the rule; replay a search "
             "run with --median_stop_epoch=0.")
  ids = sorted((r["trial_id"] for r in rows), key=tune.trial_order)
  best_id = rows[0]["trial_id"]  # trials.csv lists the best first.
  project = os.path.join(args.workdir, artifacts.TUNER_DIR)
  curves = [train.read_history(os.path.join(project, f"trial_{t}"), "fine_tune")["val_accuracy"]
            for t in ids]
  full = sum(len(c) for c in curves)
  print(f"{len(ids)} trials, {full} stage 2 epochs run; best trial {best_id} "
        f"(val {float(rows[0]['val_accuracy']):.4f})")
  last = ""
  for start in range(1, max(len(c) for c in curves) + 1):
    stops = tune.replay_median_stopping(curves, start)
    epochs = sum(s or len(c) for s, c in zip(stops, curves))
    best_kept = stops[ids.index(best_id)] is None
    stopped = " ".join(f"{t}@{s}" for t, s in zip(ids, stops) if s) or "-"
    print(f"start epoch {start:2d}: {epochs:3d}/{full} epochs ({epochs / full:.2f}), "
          f"best kept: {best_kept}, stopped: {stopped}")
    if start == args.start_epoch:
      last = f"epochs_ratio={epochs / full:.2f} best_kept={best_kept}"
  print(last)


if __name__ == "__main__":
  main()
