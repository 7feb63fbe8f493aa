r"""flowers_main: transfer-learning image classifiers on TensorFlow.

Oxford Flowers 102 (or your own folder of class subfolders) -> a stratified,
seeded split -> MobileNetV2 fine-tuned in two stages -> an int8 TFLite model.

USAGE: flowers_main --mode=MODE --workdir=DIR [--flagfile=flags/FILE.cfg] [flags]

Modes:
  prepare   list the images and write the split (splits.csv); decodes nothing
  train     stage 1 (frozen base), stage 2 (fine-tune the top of the base), test report
  evaluate  test metrics of a .keras or .tflite model (--model, default: WORKDIR)
  predict   top-k labels for image files or folders (--images)
  tune      KerasTuner search, then the best model trained, evaluated and exported
  export    int8 (or float16/dynamic/none) TFLite, verified on the test split
  report    redraw plots/ and summary.md from the workdir's saved results

Examples:
  flowers_main --mode=tune --flagfile=flags/cpu.cfg --workdir=runs/tune
  flowers_main --mode=train --flagfile=flags/reference.cfg --workdir=runs/reference
  flowers_main --mode=predict --model=runs/tune/model_int8.tflite --images=rose.jpg

Offline, add --tfds_data_dir=<prepared TFDS folder> and --weights=<MobileNetV2 no-top .h5>.
Every artifact goes to --workdir; run the same command again to resume.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from flowers import cli
from flowers.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
cli.define_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Our progress messages are INFO; TFDS's per-split INFO lines are noise here.
  logging.get_absl_handler().addFilter(
      lambda record: "tensorflow_datasets" not in record.pathname)
  mode, workdir = flags.FLAGS.mode, flags.FLAGS.workdir
  try:
    config = cli.run_config()
    cli.check_inputs(mode, config, workdir)
    if mode in ("train", "tune"):
      from flowers import distribute  # pylint: disable=g-import-not-at-top

      # A multi-worker strategy must exist before TensorFlow runs its first op.
      distribute.make_strategy(config.train.distribution_strategy)
    from flowers import modes  # pylint: disable=g-import-not-at-top

    modes.MODES[mode](config, workdir)
  except UserError as e:
    print(f"flowers_main: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("flowers_main: interrupted; run the same command again to resume.",
          file=sys.stderr)
    sys.exit(130)


def entry_point() -> None:
  """The `flowers_main` console script."""
  app.run(main, flags_parser=lambda argv: cli.parse(argv, __doc__))


if __name__ == "__main__":
  entry_point()
