"""Stage 2 with and without a weight average, scored on val after every epoch, in one run.

Usage, from the repository root (real data and weights in ../shared):

  python benchmarks/weight_average.py --workdir=runs/tune_42 --seed=42

`--workdir` is a finished `--mode=tune --flagfile=flags/cpu.cfg --seed=S` run whose
trial 0 took cpu.cfg's values (`--first_trial=configured`): its frozen-prefix cache
and trial 0's finished stage 1 are reused, read-only. Stage 2 of trial 0 is trained
again here (into a temporary folder) as with `--fine_tune_ema_momentum=0`, and after
each epoch the val split (its cached activations, as the search's rungs score it)
scores:

  trained    the weights as trained (the baseline: stage 2 without an average)
  ema M      an exponential moving average of the trained weights over the steps,
             M the old average's share at each step (`--fine_tune_ema_momentum`)
  mean E     the plain mean of the weights at the ends of epochs E.. (stochastic
             weight averaging, from epoch E on)

Each prints its val accuracy per epoch, then `<name>_gain=+X.XX points`: its best
epoch's val against the trained weights' best epoch, as early stopping would pick
each; and `ema_update_share=X.XXXX`: the seconds of one EMA's per-step update
against a training step's. No test image is read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import real_data

MOMENTA = (0.99, 0.995, 0.998)
MEAN_FROM = (4, 7, 10)  # Stage 2 epochs (1-based) the plain means start at.


def scorer(x: np.ndarray, labels: np.ndarray):
  """Returns the callback that scores val on every kind of weights after each epoch."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  class Scorer(keras.callbacks.Callback):
    """Keeps the averages of the trained weights and scores them on val."""

    def __init__(self):
      super().__init__()
      self.curves: dict[str, list[float | None]] = {"trained": []}
      self.curves.update({f"ema {m}": [] for m in MOMENTA})
      self.curves.update({f"mean {e}": [] for e in MEAN_FROM})
      self.update_seconds, self.scoring_seconds, self.steps = 0.0, 0.0, 0

    def on_train_begin(self, logs=None):
      trained = self.model.trainable_weights
      self.emas = {m: [tf.Variable(w.value, trainable=False) for w in trained] for m in MOMENTA}
      self.sums = {e: [np.zeros(w.shape, np.float64) for w in trained] for e in MEAN_FROM}

      @tf.function
      def update():
        for m, ema in self.emas.items():
          for average, weight in zip(ema, trained):
            average.assign_sub((1.0 - m) * (average - weight.value))

      self.update = update
      self.forward = tf.function(lambda batch: self.model(batch, training=False))

    def on_train_batch_end(self, batch, logs=None):
      start = time.time()
      self.update()
      self.update_seconds += (time.time() - start) / len(MOMENTA)
      self.steps += 1

    def _accuracy(self, values: list[np.ndarray]) -> float:
      weights = self.model.trainable_weights
      trained = [w.numpy() for w in weights]
      for w, v in zip(weights, values):
        w.assign(v)
      hits = 0
      for i in range(0, len(x), 256):
        scores = self.forward(tf.constant(x[i:i + 256])).numpy()
        hits += int(np.sum(scores.argmax(-1) == labels[i:i + 256]))
      for w, v in zip(weights, trained):
        w.assign(v)
      return hits / len(x)

    def on_epoch_end(self, epoch, logs=None):
      start = time.time()
      self._score(epoch, logs)
      self.scoring_seconds += time.time() - start

    def _score(self, epoch, logs):
      self.curves["trained"].append(float(logs["val_accuracy"]))
      for m, ema in self.emas.items():
        self.curves[f"ema {m}"].append(self._accuracy([v.numpy() for v in ema]))
      trained = [w.numpy() for w in self.model.trainable_weights]
      for first, sums in self.sums.items():
        if epoch + 1 < first:
          self.curves[f"mean {first}"].append(None)
          continue
        for total, w in zip(sums, trained):
          total += w
        count = epoch + 2 - first
        self.curves[f"mean {first}"].append(
            self._accuracy([(t / count).astype(np.float32) for t in sums]))

  return Scorer()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="a finished cpu.cfg tune whose trial 0 took cpu.cfg's values")
  parser.add_argument("--seed", type=int, required=True, help="the tune's --seed")
  args = parser.parse_args()
  if not real_data.available():
    print(f"Real data or weights not found under {real_data.SHARED}; nothing to measure.")
    return
  sys.path.insert(0, real_data.REPO_ROOT)
  import dataclasses  # pylint: disable=g-import-not-at-top

  from flowers import artifacts  # pylint: disable=g-import-not-at-top
  from flowers import cli  # pylint: disable=g-import-not-at-top
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top
  from flowers import tune  # pylint: disable=g-import-not-at-top

  cli.define_flags()
  cli.parse(["weight_average", f"--flagfile={real_data.CPU_CFG}", f"--seed={args.seed}",
             f"--tfds_data_dir={real_data.DATA_DIR}", f"--weights={real_data.WEIGHTS}",
             "--verbose=2"], "")
  config = cli.run_config()
  values = tune.first_trial_values(config)
  if values is None:
    sys.exit("weight_average: flags/cpu.cfg must set --first_trial=configured.")
  source = data_lib.load_source(config.data)
  splits = train.load_splits_seeded(config, source, args.workdir)
  hypermodel = tune.TwoStageHyperModel(config, splits, args.workdir)
  inputs = hypermodel.inputs()  # The workdir's cache (its key must match).
  trial = hypermodel.trial_config(values)
  trial = dataclasses.replace(trial, train=dataclasses.replace(
      trial.train, fine_tune_ema_momentum=0.0))  # The trained weights; averaged here.
  model = hypermodel.model_for(values)
  trial_0 = os.path.join(args.workdir, artifacts.TUNER_DIR, "trial_0")
  stage_1_files = (artifacts.FROZEN_WEIGHTS, artifacts.stage_history("frozen"),
                   os.path.join(artifacts.BACKUP_DIR, "frozen", artifacts.RESUME_STATE))
  run_dir = tempfile.mkdtemp(prefix="weight_average_")
  try:
    for name in stage_1_files:
      os.makedirs(os.path.dirname(os.path.join(run_dir, name)), exist_ok=True)
      shutil.copyfile(os.path.join(trial_0, name), os.path.join(run_dir, name))
    model_lib.freeze_base(model)  # (As `fit_stages` does first.)
    x, y = inputs.stage(model, 2, trial.train.seed).val
    callback = scorer(np.asarray(x), np.argmax(y, -1))
    start = time.time()
    # Under cpu.cfg's halving the trial's stage 2 patience is all its epochs: it never stops.
    train.fit_stages(model, inputs, trial.train, run_dir, seed=trial.train.seed,
                     fine_tune_callbacks=[callback])
    seconds = time.time() - start
  finally:
    shutil.rmtree(run_dir, ignore_errors=True)

  curves = callback.curves
  epochs = len(curves["trained"])
  print(f"\nval accuracy after each stage 2 epoch ({args.workdir}, seed {args.seed}, trial 0: "
        f"{values})")
  print(f"{'weights':<12}" + "".join(f"{e + 1:>7}" for e in range(epochs)) + f"{'best':>8}")
  for name, curve in curves.items():
    cells = "".join("      -" if v is None else f"{v:7.4f}" for v in curve)
    print(f"{name:<12}{cells}{max(v for v in curve if v is not None):8.4f}")
  baseline = max(curves["trained"])
  for name, curve in curves.items():
    if name != "trained":
      gain = 100 * (max(v for v in curve if v is not None) - baseline)
      print(f"{name.replace(' ', '_')}_gain={gain:+.2f} points")
  training = seconds - callback.scoring_seconds  # Stage 2 without this script's scoring.
  steps = max(callback.steps, 1)
  print(f"ema_update_share={callback.update_seconds / training:.4f} (one EMA's update, "
        f"{1000 * callback.update_seconds / steps:.2f} ms a step, against a stage 2 step, "
        f"{1000 * training / steps:.0f} ms; {callback.steps} steps)")


if __name__ == "__main__":
  main()
