r"""`flowers_main`: the command-line entry point. Flags are declared here only.

    flowers_main --mode=tune --flagfile=flags/cpu.cfg --workdir=runs/tune
    flowers_main --mode=train --flagfile=flags/cpu.cfg --workdir=runs/cpu
    flowers_main --mode=predict --model=runs/cpu/model_int8.tflite --images=rose.jpg

Modes: prepare, train, evaluate, predict, tune, export, report. This file only
turns flags into plain arguments and calls the library; errors the user can fix
(`UserError`) are printed on one line, with exit status 2.
"""

from __future__ import annotations

import os
import sys

# The oneDNN kernels make MobileNetV2 2-3x faster on x86 CPUs; they must be
# switched on before TensorFlow loads. A user's own setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

MODES = ("prepare", "train", "evaluate", "predict", "tune", "export", "report")

_MODE = flags.DEFINE_enum("mode", "tune", MODES, "What to do.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Folder for every artifact of a run.")

# Data.
_TFDS_NAME = flags.DEFINE_string("tfds_name", "oxford_flowers102", "TFDS dataset.")
_TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir", None, "TFDS data folder (offline: ../shared/tensorflow_datasets).")
_DOWNLOAD = flags.DEFINE_boolean("download", True, "Let TFDS download a missing dataset.")
_IMAGE_DIR = flags.DEFINE_string(
    "image_dir", None, "A folder of class subfolders to use instead of TFDS.")
_STRICT = flags.DEFINE_boolean("strict", False, "Fail on unreadable images instead of skipping.")
_SPLIT = flags.DEFINE_string("split", "64,16,20", "train,val,test percent, or 'official'.")
_SEED = flags.DEFINE_integer("seed", 42, "Seed for the split, shuffling, augmentation, init.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square model input side.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_CACHE = flags.DEFINE_enum("cache", "memory", ["memory", "disk", "none"],
                           "Where decoded, resized images are cached.")

# Model.
_WEIGHTS = flags.DEFINE_string(
    "weights", "imagenet", "MobileNetV2 weights: imagenet, none, or an .h5 path.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
_DROPOUT = flags.DEFINE_float("dropout", 0.2, "Dropout before the classifier.")
_AUGMENT = flags.DEFINE_boolean("augment", True, "Augmentation layers in the model.")
_FLIP = flags.DEFINE_boolean("flip", True, "Random horizontal flips.")
_ROTATION = flags.DEFINE_float("rotation", 20.0, "Random rotation, degrees.")
_ZOOM = flags.DEFINE_float("zoom", 0.2, "Random zoom fraction.")
_TRANSLATION = flags.DEFINE_float("translation", 0.2, "Random shift fraction.")
_CONTRAST = flags.DEFINE_float("contrast", 0.1, "Random contrast factor.")

# Training.
_UNFREEZE_RATIO = flags.DEFINE_float(
    "unfreeze_ratio", 0.2, "Top fraction of base layers fine-tuned in stage 2.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "rmsprop", ["rmsprop", "adam", "adamw", "sgd"],
                               "Optimizer for both stages.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Stage 1 learning rate.")
_FINE_TUNE_LEARNING_RATE = flags.DEFINE_float(
    "fine_tune_learning_rate", None, "Stage 2 learning rate (default: stage 1 / 10).")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Stage 1 epochs (frozen base).")
_FINE_TUNE_EPOCHS = flags.DEFINE_integer("fine_tune_epochs", 10, "Stage 2 epochs.")
_LABEL_SMOOTHING = flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing.")
_LR_SCHEDULE = flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                                 "Learning rate over each stage: constant, or cosine to 0.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Weight decay (adamw).")
_PATIENCE = flags.DEFINE_integer(
    "early_stopping_patience", 3, "Epochs without val gain before stopping (0: off).")
_FEATURE_CACHE = flags.DEFINE_enum(
    "feature_cache", "auto", ["auto", "on", "off"],
    "Run the frozen base prefix once per view (auto: on without a GPU).")
_CACHE_VIEWS = flags.DEFINE_integer(
    "cache_views", 4, "Cached views per training image (1 plain + augmented).")
_INT8_GRID = flags.DEFINE_boolean(
    "int8_grid_weights", True,
    "Round trained conv kernels to the int8 export's grid, so int8 answers like float.")
_VERBOSE = flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 bars, 2 lines.")

# Evaluate / predict.
_MODEL = flags.DEFINE_string("model", None, "A .keras or .tflite model (default: in workdir).")
_IMAGES = flags.DEFINE_list("images", [], "Image files or folders to classify.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Labels shown per image.")
_OUTPUT = flags.DEFINE_enum("output", "table", ["table", "json"], "Prediction output format.")

# Tune.
_TUNER = flags.DEFINE_enum("tuner", "bayesian", ["bayesian", "hyperband", "random"],
                           "KerasTuner search algorithm.")
_MAX_TRIALS = flags.DEFINE_integer("max_trials", 10, "Trials to run.")
_EXECUTIONS = flags.DEFINE_integer("executions_per_trial", 1, "Fits averaged per trial.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Start the search afresh.")
_DROPOUT_RANGE = flags.DEFINE_list("dropout_range", ["0.0", "0.5"], "min,max dropout.")
_UNFREEZE_RANGE = flags.DEFINE_list("unfreeze_ratio_range", ["0.0", "0.5"],
                                    "min,max unfreeze ratio.")
_LR_RANGE = flags.DEFINE_list("fine_tune_learning_rate_range", ["1e-5", "1e-3"],
                              "min,max fine-tune learning rate (log scale).")
_DISTRIBUTION = flags.DEFINE_enum(
    "distribution_strategy", "default", ["default", "mirrored", "multi_worker"],
    "tf.distribute strategy for each trial.")

# Export.
_QUANTIZATION = flags.DEFINE_enum("quantization", "int8",
                                  ["int8", "float16", "dynamic", "none"], "TFLite quantization.")
_IO_DTYPE = flags.DEFINE_enum("io_dtype", "uint8", ["uint8", "int8"],
                              "int8 model input/output type.")
_CALIBRATION = flags.DEFINE_integer("calibration_examples", 300,
                                    "Training images for int8 calibration.")
_MAX_DROP = flags.DEFINE_float("max_accuracy_drop", 1.0,
                               "Largest allowed test accuracy drop, points.")
_EXPORT = flags.DEFINE_boolean("export", True, "tune: export the best model to TFLite.")

# Reports.
_PLOTS = flags.DEFINE_boolean("plots", True, "Write plots and summary.md after a run.")


def train_config():
  """The TrainConfig the training flags describe."""
  from flowers import model as model_lib  # pylint: disable=g-import-not-at-top
  from flowers import train  # pylint: disable=g-import-not-at-top

  weights = None if _WEIGHTS.value.lower() == "none" else _WEIGHTS.value
  return train.TrainConfig(
      image_size=_IMAGE_SIZE.value, batch_size=_BATCH_SIZE.value,
      dropout=_DROPOUT.value, unfreeze_ratio=_UNFREEZE_RATIO.value,
      optimizer=_OPTIMIZER.value, learning_rate=_LEARNING_RATE.value,
      fine_tune_learning_rate=_FINE_TUNE_LEARNING_RATE.value,
      epochs=_EPOCHS.value, fine_tune_epochs=_FINE_TUNE_EPOCHS.value,
      label_smoothing=_LABEL_SMOOTHING.value, weight_decay=_WEIGHT_DECAY.value,
      lr_schedule=_LR_SCHEDULE.value,
      early_stopping_patience=_PATIENCE.value, feature_cache=_FEATURE_CACHE.value,
      cache_views=_CACHE_VIEWS.value,
      int8_grid_weights=_INT8_GRID.value, augment=_AUGMENT.value,
      augmentation=model_lib.Augmentation(
          flip=_FLIP.value, rotation_degrees=_ROTATION.value, translation=_TRANSLATION.value,
          zoom=_ZOOM.value, contrast=_CONTRAST.value),
      weights=weights, alpha=_ALPHA.value, seed=_SEED.value, verbose=_VERBOSE.value)


def source():
  from flowers import data  # pylint: disable=g-import-not-at-top

  return data.load_source(image_dir=_IMAGE_DIR.value, tfds_name=_TFDS_NAME.value,
                          tfds_data_dir=_TFDS_DATA_DIR.value, download=_DOWNLOAD.value,
                          strict=_STRICT.value)


def search_space():
  from flowers import tune  # pylint: disable=g-import-not-at-top

  return tune.SearchSpace.from_strings(_DROPOUT_RANGE.value, _UNFREEZE_RANGE.value,
                                       _LR_RANGE.value)


def model_path(default_name: str = "model.keras") -> str:
  return _MODEL.value or os.path.join(_WORKDIR.value, default_name)


def write_flagfile() -> None:
  """Saves the resolved flags of this run as `WORKDIR/flags.cfg` (a --flagfile)."""
  from flowers import artifacts  # pylint: disable=g-import-not-at-top

  lines = flags.FLAGS.flags_into_string().splitlines()
  keep = [l for l in lines if not l.startswith(("--flagfile", "--undefok"))]
  module_flags = {f.name for f in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])}
  keep = [l for l in keep if l.lstrip("-").split("=")[0].removeprefix("no") in module_flags]
  artifacts.write_text(os.path.join(_WORKDIR.value, "flags.cfg"), "\n".join(keep) + "\n")


def check_flags(mode: str) -> None:
  """Rejects bad flag values in one line, before any data or model is loaded."""
  from flowers import split as split_lib  # pylint: disable=g-import-not-at-top
  from flowers.errors import UserError  # pylint: disable=g-import-not-at-top

  split_lib.parse_split(_SPLIT.value, _SEED.value)
  checks = [
      (_IMAGE_SIZE.value >= 32, "--image_size must be >= 32"),
      (_BATCH_SIZE.value >= 1, "--batch_size must be >= 1"),
      (_EPOCHS.value >= 0 and _FINE_TUNE_EPOCHS.value >= 0, "epochs must be >= 0"),
      (0.0 <= _DROPOUT.value < 1.0, "--dropout must be in [0, 1)"),
      (0.0 <= _UNFREEZE_RATIO.value <= 1.0, "--unfreeze_ratio must be in [0, 1]"),
      (_LEARNING_RATE.value > 0, "--learning_rate must be > 0"),
      (_FINE_TUNE_LEARNING_RATE.value is None or _FINE_TUNE_LEARNING_RATE.value > 0,
       "--fine_tune_learning_rate must be > 0"),
      (0.0 <= _LABEL_SMOOTHING.value < 1.0, "--label_smoothing must be in [0, 1)"),
      (_CACHE_VIEWS.value >= 1, "--cache_views must be >= 1"),
      (_TOP_K.value >= 1, "--top_k must be >= 1"),
      (_MAX_TRIALS.value >= 1, "--max_trials must be >= 1"),
      (_CALIBRATION.value >= 1, "--calibration_examples must be >= 1"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(f"{message}.")
  if _IMAGE_DIR.value and not os.path.isdir(_IMAGE_DIR.value):
    raise UserError(f"--image_dir={_IMAGE_DIR.value} is not a folder; give a folder "
                    "with one subfolder of images per class.")
  if mode == "tune":
    search_space()
  if mode == "predict" and not _IMAGES.value:
    raise UserError("--mode=predict needs --images=FILE_OR_DIR[,...].")
  if mode in ("evaluate", "predict", "export") and not os.path.isfile(model_path()):
    raise UserError(f"--model={model_path()} does not exist; train one first "
                    "(--mode=train) or pass --model=PATH.")


def run(mode: str) -> None:
  """Dispatches one mode to the library."""
  check_flags(mode)  # Before TensorFlow is even imported.
  from flowers import modes  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  if mode == "prepare":
    modes.prepare(source(), workdir, _SPLIT.value, _SEED.value)
  elif mode == "train":
    os.makedirs(workdir, exist_ok=True)
    write_flagfile()
    modes.train(train_config(), workdir, source(), _SPLIT.value, _CACHE.value,
                plots=_PLOTS.value)
  elif mode == "evaluate":
    modes.evaluate(model_path(), workdir, source(), _SPLIT.value, _SEED.value,
                   _BATCH_SIZE.value)
  elif mode == "predict":
    modes.predict(model_path(), _IMAGES.value, _TOP_K.value, _OUTPUT.value)
  elif mode == "tune":
    os.makedirs(workdir, exist_ok=True)
    write_flagfile()
    from flowers import tune  # pylint: disable=g-import-not-at-top
    # A multi-worker strategy must exist before TensorFlow runs its first op.
    tune.make_strategy(_DISTRIBUTION.value)
    modes.tune(train_config(), search_space(), workdir, source(), _SPLIT.value,
               tuner=_TUNER.value, max_trials=_MAX_TRIALS.value,
               executions_per_trial=_EXECUTIONS.value, overwrite=_OVERWRITE.value,
               distribution_strategy=_DISTRIBUTION.value, export=_EXPORT.value,
               export_options=export_options(), plots=_PLOTS.value)
  elif mode == "export":
    modes.export(model_path(), workdir, source(), _SPLIT.value, _SEED.value,
                 export_options(), plots=_PLOTS.value)
  elif mode == "report":
    modes.report(workdir)


def export_options():
  from flowers import export  # pylint: disable=g-import-not-at-top

  return export.ExportOptions(
      quantization=_QUANTIZATION.value, io_dtype=_IO_DTYPE.value,
      calibration_examples=_CALIBRATION.value, max_accuracy_drop=_MAX_DROP.value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from flowers.errors import UserError  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)
  # Our progress messages are INFO; TFDS's per-split INFO lines are noise here.
  logging.get_absl_handler().addFilter(
      lambda record: "tensorflow_datasets" not in record.pathname)
  try:
    run(_MODE.value)
  except UserError as e:
    print(f"flowers_main: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("flowers_main: interrupted; run the same command again to resume.",
          file=sys.stderr)
    sys.exit(130)


def entry_point() -> None:
  """The `flowers_main` console script."""
  app.run(main)


if __name__ == "__main__":
  entry_point()
