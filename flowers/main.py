r"""flowers_main: transfer-learning image classifiers on TensorFlow.

Oxford Flowers 102 (or your own folder of class subfolders) -> a stratified,
seeded split -> MobileNetV2 fine-tuned in two stages -> an int8 TFLite model.

USAGE: flowers_main --mode=MODE --workdir=DIR [--flagfile=flags/FILE.cfg] [flags]

Modes:
  prepare   list the images and write the split (splits.csv); decodes nothing
  train     stage 1 (frozen base), stage 2 (top of the base unfrozen), test report
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

import dataclasses
import os
import sys
import textwrap
import types
import typing
from typing import Any

from absl import app
from absl import flags
from absl import logging

from flowers import config as config_lib
from flowers.errors import UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODES = ("prepare", "train", "evaluate", "predict", "tune", "export", "report")

_MODE = flags.DEFINE_enum("mode", "tune", MODES, "What to do (see Modes above).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Folder for every artifact of a run.")


def _define_flags(cls: type, path: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
  """Declares one flag per field of the settings dataclass `cls`, recursively.

  A flag has its field's name, default and `Attributes:` text; choices are
  plain strings that the dataclass checks, so the command line and library
  code reject a bad value with the same message. Returns flag -> field path.
  """
  docs = config_lib.attribute_docs(cls)
  hints = typing.get_type_hints(cls)
  defined: dict[str, tuple[str, ...]] = {}
  for field in dataclasses.fields(cls):
    kind, default, help_text = hints[field.name], field.default, docs[field.name]
    help_text = help_text[:1].upper() + help_text[1:]
    if dataclasses.is_dataclass(kind):
      defined.update(_define_flags(kind, path + (field.name,)))
      continue
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if isinstance(kind, types.UnionType) and len(args) == 1:
      kind = args[0]  # X | None: the flag may stay unset.
    name = field.name
    if kind is bool:
      flags.DEFINE_boolean(name, default, help_text)
    elif kind is int:
      flags.DEFINE_integer(name, default, help_text)
    elif kind is float:
      flags.DEFINE_float(name, default, help_text)
    elif kind is str:
      flags.DEFINE_string(name, default, help_text)
    elif isinstance(kind, type) and issubclass(kind, config_lib.Choice):
      choices = "|".join(member.value for member in kind)
      flags.DEFINE_string(name, default.value, f"{help_text} One of {choices}.")
    elif typing.get_origin(kind) is tuple:
      flags.DEFINE_list(name, [f"{v:g}" if isinstance(v, float) else str(v)
                               for v in default], help_text)
    else:
      raise TypeError(f"No flag type for {cls.__name__}.{name}: {kind}")
    defined[name] = path + (name,)
  return defined


FLAG_FIELDS = _define_flags(config_lib.RunConfig)
"""Every settings flag -> its field in `RunConfig` (e.g. "dropout" -> ("train", "dropout"))."""


def _from_flags(cls: type, path: tuple[str, ...] = ()) -> Any:
  """`cls` built from the flags `_define_flags` declared for it."""
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[field.name]):
      values[field.name] = _from_flags(hints[field.name], path + (field.name,))
    else:
      value = flags.FLAGS[field.name].value
      values[field.name] = tuple(value) if isinstance(value, list) else value
  return cls(**values)


def run_config() -> config_lib.RunConfig:
  """The `RunConfig` the parsed flags describe; a bad value is a `UserError`."""
  return _from_flags(config_lib.RunConfig)


def help_text() -> str:
  """`--help`: what the binary does, its modes, examples, and every flag by group."""
  groups: dict[str, list[str]] = {"Run": ["mode", "workdir"]}
  titles = {"data": "Data", "train": "Model and training", "search": "Tuning (--mode=tune)",
            "export": "Export (--mode=export, and tune)",
            "predict": "Evaluate and predict"}
  for name, path in FLAG_FIELDS.items():
    group = titles[path[0]] if len(path) > 1 else "Run"
    groups.setdefault(group, []).append(name)
  lines = [__doc__.strip(), ""]
  for title, names in groups.items():
    lines.append(f"{title}:")
    if title == "Run":
      lines += ["  --flagfile", "      Read flags from a file, one per line (flags/*.cfg, or a "
                "run's WORKDIR/flags.cfg)."]
    for name in names:
      flag = flags.FLAGS[name]
      default = "" if flag.default is None else f" (default: {flag.default_as_str or repr('')})"
      lines.append(f"  --{name}{default}")
      lines += textwrap.wrap(flag.help, 92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines.append("")
  lines.append("absl's and TensorFlow's own flags: --helpfull.")
  return "\n".join(lines)


REMOVED_FLAGS = {
    "executions_per_trial": "--executions_per_trial was removed: a trial is one execution, "
                            "scored and shipped as is; run more trials with --max_trials",
}
"""Flags older flagfiles may hold -> what replaced them (said instead of "unknown flag")."""


def _parse(argv: list[str]) -> list[str]:
  """absl's parsing, with our own `--help`/`-h`/`--helpshort` (absl's lists no flag).

  A flag absl itself rejects (an unknown flag, a word for a number) is one line
  and exit status 2, like every other bad input.
  """
  if any(a in ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?") for a in argv[1:]):
    print(help_text())
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    removed = [note for name, note in REMOVED_FLAGS.items() if f"'{name}'" in message
               or f"'no{name}'" in message]
    print(f"flowers_main: error: {removed[0] if removed else message}; see flowers_main "
          "--help.", file=sys.stderr)
    sys.exit(2)


def _check_inputs(mode: str, config: config_lib.RunConfig, workdir: str) -> None:
  """What a mode needs that no setting can check alone, before TensorFlow loads."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file; give a folder (a new one, or a run's).")
  if mode == "predict" and not config.predict.images:
    raise UserError("--mode=predict needs --images=FILE_OR_DIR[,...].")
  if mode in ("evaluate", "predict", "export"):
    path = config.predict.model_path(workdir)
    if not os.path.isfile(path):
      raise UserError(f"--model={path} does not exist; train one first "
                      "(--mode=train) or pass --model=PATH.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Our progress messages are INFO; TFDS's per-split INFO lines are noise here.
  logging.get_absl_handler().addFilter(
      lambda record: "tensorflow_datasets" not in record.pathname)
  mode, workdir = _MODE.value, _WORKDIR.value
  try:
    config = run_config()
    _check_inputs(mode, config, workdir)
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
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  entry_point()
