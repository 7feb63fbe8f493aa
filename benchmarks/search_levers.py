"""What each lever of the search saves, measured alone on this machine.

Usage, from the repository root (real data and weights in ../shared):

  python benchmarks/search_levers.py [--workdir=runs/tune] [--images=512]

Three levers, each against the search without it, in the same run:

  schedule   stage 2 epochs of cpu.cfg's successive halving (fixed by its settings)
             against the same trials run in full, and, given `--workdir` of a search
             whose trials all ran in full, against the median stopping rule replayed
             on its histories (`tune.replay_median_stopping`).
  scoring    a trial's score under successive halving (the val accuracy Keras measured
             in its epochs: no extra work) against the score of a full search (int8-grid
             rounding, then a pass over the val split through the full model), timed.
  batch      a stage 2 epoch on the frozen-prefix cache (cut for cpu.cfg's unfreeze
             ratio 0.3) at batch sizes 16, 32 and 64, in training images per second,
             beside the machine's MobileNetV2 forward rate (full model, inference) in
             the same run; the ratio says how far a training step is from a forward
             pass of the whole network (the step runs the top 30% forward and back).

  threads    the same stage 2 epochs (batch 32) in a fresh process per TensorFlow thread
             setting (intra-op, inter-op: 0 is TensorFlow's default, one per core),
             against the default, in training images per second.

Each lever prints a line `<lever>_ratio=X.XX` (with / without, in the lever's unit);
the seconds per unit travel between machines as ratios, not as seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import real_data

BATCH_SIZES = (16, 32, 64)
THREADS = ((0, 0), (1, 1), (2, 1), (1, 2))  # (intra-op, inter-op); (0, 0) is TF's default.


def cpu_cfg_search() -> dict[str, str]:
  """flags/cpu.cfg's settings (the defaults, and the file's own lines) as {flag: value}."""
  from flowers import cli  # pylint: disable=g-import-not-at-top
  from flowers import config  # pylint: disable=g-import-not-at-top

  lines = cli.as_flags(config.RunConfig())
  with open(real_data.CPU_CFG, encoding="utf-8") as f:
    lines += [line.strip() for line in f if line.startswith("--")]
  return dict(line[2:].split("=", 1) for line in lines if "=" in line)


def schedule_lever(workdir: str | None) -> None:
  """Stage 2 epochs: successive halving against every trial in full (and the median rule)."""
  from flowers import artifacts  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top
  from flowers import tune  # pylint: disable=g-import-not-at-top

  cfg = cpu_cfg_search()
  trials, epochs = int(cfg["max_trials"]), int(cfg["fine_tune_epochs"])
  rungs = tuple(int(r) for r in cfg["halving_rungs"].split(","))
  schedule = tune.halving_schedule(trials, rungs, int(cfg["halving_factor"]), epochs)
  budget = tune.halving_budget(schedule)
  print(f"schedule: cpu.cfg's successive halving {schedule} spends {budget} stage 2 epochs; "
        f"its {trials} trials in full: {trials * epochs}")
  print(f"schedule_ratio={budget / (trials * epochs):.2f}")
  if not workdir:
    return
  project = os.path.join(workdir, artifacts.TUNER_DIR)
  ids = sorted((n[len("trial_"):] for n in os.listdir(project) if n.startswith("trial_")),
               key=tune.trial_order)
  curves = [train.read_history(os.path.join(project, f"trial_{t}"), "fine_tune")
            .get("val_accuracy", []) for t in ids]
  full = sum(len(c) for c in curves)
  stops = tune.replay_median_stopping(curves, int(cfg.get("median_stop_epoch", 4)))
  median = sum(s or len(c) for s, c in zip(stops, curves))
  print(f"schedule: on {workdir}'s {len(ids)} full trials ({full} epochs), the median rule "
        f"runs {median}")
  print(f"schedule_vs_median_ratio={budget * len(ids) / trials / max(median, 1):.2f} "
        "(halving's budget scaled to these trials)")


def real_setup(num_images: int):
  """cpu.cfg's model on the real weights, and `num_images` train and val images."""
  from flowers import data as data_lib  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top
  from flowers.config import Augmentation  # pylint: disable=g-import-not-at-top
  from flowers.config import DataConfig  # pylint: disable=g-import-not-at-top
  from flowers.config import RunConfig  # pylint: disable=g-import-not-at-top
  from flowers.config import TrainConfig  # pylint: disable=g-import-not-at-top

  cpu_cfg = TrainConfig(weights=real_data.WEIGHTS, unfreeze_ratio=0.3, dropout=0.2,
                        augmentation=Augmentation(crop_area=0.3, zoom=0.0, translation=0.0),
                        optimizer="adam", label_smoothing=0.1)
  config = RunConfig(data=DataConfig(tfds_data_dir=real_data.DATA_DIR, download=False),
                     train=cpu_cfg)
  splits = data_lib.load_splits(config.data)
  model = train.new_model(config, len(splits.class_names))
  keys = {name: splits.keys(name)[:num_images] for name in ("train", "val")}
  keys["all_val"] = splits.keys("val")  # A trial's scoring pass reads all of them.
  datasets = {name: data_lib.make_dataset(splits.source, k, image_size=224, batch_size=64,
                                          cache="none") for name, k in keys.items()}
  return config, splits, model, keys, datasets


def forward_rate(model, images: np.ndarray) -> float:
  """The full model's inference images/s (the machine's MobileNetV2 forward rate)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  infer = tf.function(lambda x: model(x, training=False))
  infer(images[:64])
  start = time.time()
  for i in range(0, len(images), 64):
    infer(images[i:i + 64]).numpy()
  return len(images) / (time.time() - start)


def scoring_lever(config, splits, model, keys, datasets) -> None:
  """A trial's scoring: the rung's own val accuracy (free) against rounding + a full pass."""
  from flowers import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top

  calibration = train.calibration_images(config, splits)
  rounded = train.new_model(config, len(splits.class_names))
  rounded.set_weights(model.get_weights())
  start = time.time()
  model_lib.round_kernels_to_int8_grid(rounded, calibration)
  evaluate_lib.predict_dataset(evaluate_lib.keras_predictor(rounded), datasets["all_val"])
  full_seconds = time.time() - start
  print(f"scoring: int8-grid rounding + a full-model pass over the {len(keys['all_val'])} val "
        f"images: {full_seconds:.1f} s a trial (the untrained head's accuracy is no matter); "
        "the rung's val accuracy from its history: 0 s (Keras measured it in the epoch)")
  print(f"scoring_seconds_saved_per_trial={full_seconds:.1f}")


def one_view_cache(model, keys, datasets):
  """The frozen-prefix cache (one view) cut for cpu.cfg's unfreeze ratio 0.3."""
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers import prefix_cache  # pylint: disable=g-import-not-at-top

  cut = model_lib.cut_index(model_lib.base_of(model), 0.3)
  return prefix_cache.PrefixCache.build(model, cut, datasets["train"], datasets["val"], views=1,
                                        seed=0, cache_dir=None, verbose=0,
                                        split_keys={n: keys[n] for n in ("train", "val")})


def stage2_rate(config, splits, model, cache, num_train: int, batch_size: int,
                epochs: int = 1) -> float:
  """Stage 2's train images/s on `cache`, after a warm-up epoch."""
  from flowers import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top

  trial = train.new_model(config, len(splits.class_names))
  trial.set_weights(model.get_weights())
  model_lib.freeze_base(trial)
  model_lib.unfreeze(trial, 0.3)
  stage = inputs_lib.CachedInputs(cache, len(splits.class_names), batch_size).stage(trial, 2, 0)
  train.compile_model(stage.model, config.train, 2e-4, stage.steps)
  stage.model.fit(stage.train, epochs=1, verbose=0)  # Traces and warms up.
  start = time.time()
  stage.model.fit(stage.train, epochs=epochs, verbose=0)
  return epochs * num_train / (time.time() - start)


def threads_lever(num_images: int) -> None:
  """Stage 2 images/s per TensorFlow thread setting, each in a process of its own."""
  import subprocess  # pylint: disable=g-import-not-at-top

  rates = {}
  for intra, inter in THREADS:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--images={num_images}",
                          f"--threads={intra},{inter}"], check=True, capture_output=True,
                         text=True).stdout
    rates[intra, inter] = float(out.rsplit("stage2_img_per_s=", 1)[1].split()[0])
    print(f"threads intra {intra} inter {inter}: stage 2 {rates[intra, inter]:6.1f} train "
          "images/s" + ("  (TensorFlow's default)" if (intra, inter) == (0, 0) else ""))
  best = max(rates, key=rates.get)
  print(f"threads: fastest intra {best[0]} inter {best[1]}; the default runs at "
        f"{rates[0, 0] / rates[best]:.2f} of it")
  print(f"threads_ratio={rates[best] / rates[0, 0]:.2f}")


def one_thread_setting(threads: str, num_images: int) -> None:
  """The threads lever's child: one setting, set before TensorFlow runs anything."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  intra, inter = (int(v) for v in threads.split(","))
  tf.config.threading.set_intra_op_parallelism_threads(intra)
  tf.config.threading.set_inter_op_parallelism_threads(inter)
  config, splits, model, keys, datasets = real_setup(num_images)
  cache = one_view_cache(model, keys, datasets)
  rate = stage2_rate(config, splits, model, cache, len(keys["train"]), 32, epochs=2)
  print(f"stage2_img_per_s={rate:.1f}")


def batch_lever(config, splits, model, keys, datasets, images: np.ndarray) -> None:
  """Stage 2 images/s on the cache at each batch size, against the forward rate."""
  rate = forward_rate(model, images)
  cache = one_view_cache(model, keys, datasets)
  rates = {}
  for batch_size in BATCH_SIZES:
    rates[batch_size] = stage2_rate(config, splits, model, cache, len(keys["train"]), batch_size)
    print(f"batch {batch_size:3d}: stage 2 {rates[batch_size]:6.1f} train images/s, "
          f"{rates[batch_size] / rate:.2f} of the forward rate ({rate:.1f} img/s)")
  best = max(rates, key=rates.get)
  print(f"batch: fastest {best}; cpu.cfg's 32 runs at {rates[32] / rates[best]:.2f} of it")
  print(f"batch_ratio={rates[best] / rates[32]:.2f}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=None,
                      help="A search whose trials all ran in full, to replay the median rule.")
  parser.add_argument("--images", type=int, default=512,
                      help="Train and val images for the scoring, batch and threads levers.")
  parser.add_argument("--threads", default=None,
                      help="INTRA,INTER: time stage 2 under this thread setting only (the "
                           "threads lever runs itself so, once per setting).")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, real_data.REPO_ROOT)
  if args.threads:
    one_thread_setting(args.threads, args.images)
    return 0
  schedule_lever(args.workdir)
  if not real_data.available():
    print(f"Real data or weights not found under {real_data.SHARED}; the scoring and batch "
          "levers are skipped.")
    return 0
  config, splits, model, keys, datasets = real_setup(args.images)
  images = np.concatenate([x for x, _ in datasets["val"].as_numpy_iterator()])
  scoring_lever(config, splits, model, keys, datasets)
  del datasets["all_val"]
  batch_lever(config, splits, model, keys, datasets, images)
  threads_lever(args.images)
  return 0


if __name__ == "__main__":
  sys.exit(main())
