"""The command line: one flag per settings field, parsed into a `RunConfig`.

Every flag is declared here, generated from the dataclasses in
`flowers.config`: a flag has its field's name, default and `Attributes:`
text, so defaults and help live once. Choices are plain strings the
dataclasses check, so the command line and library code reject a bad value
with the same one-line message. Also here: `--help`, the flags older
flagfiles may hold (renamed ones still load, with a note; removed ones are
refused in one line naming what replaced them), the checks a mode needs before
TensorFlow loads, and `as_flags`, which writes a run's settings back as the
flags of its `WORKDIR/flags.cfg`.

This module needs no TensorFlow, and importing it declares no flag (`define_flags`
does, for `flowers_main`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import textwrap
import types
import typing
from typing import Any

from absl import flags

from flowers import config as config_lib
from flowers.errors import UserError

MODES = ("prepare", "train", "evaluate", "predict", "tune", "export", "report")

FLAG_FIELDS = config_lib.field_paths()
"""Every settings flag -> its field in `RunConfig` (e.g. "dropout" -> ("train", "dropout"))."""

REMOVED_FLAGS = {
    "executions_per_trial": "--executions_per_trial was removed: a trial is one execution, "
                            "scored and shipped as is; run more trials with --max_trials",
}
"""Flags older flagfiles may hold -> what replaced them (said instead of "unknown flag")."""

_ONE_SHOT = ("overwrite",)  # Actions, not settings: never recorded in flags.cfg.


def attribute_docs(cls: type) -> dict[str, str]:
  """Field name -> its text in the class docstring's `Attributes:` section."""
  docs: dict[str, str] = {}
  lines = (cls.__doc__ or "").split("Attributes:", 1)[-1].splitlines()
  current = None
  for line in lines:
    match = re.match(r"^\s{4}(\w+): (.*)$", line)
    if match:
      current = match.group(1)
      docs[current] = match.group(2).strip()
    elif current and line.startswith(" " * 6) and line.strip():
      docs[current] += " " + line.strip()
    elif not line.strip():
      current = None
  return docs


def _define(name: str, kind: Any, default: Any, help_text: str) -> None:
  """One absl flag for a settings field of type `kind`."""
  args = [a for a in typing.get_args(kind) if a is not type(None)]
  if isinstance(kind, types.UnionType) and len(args) == 1:
    kind = args[0]  # X | None: the flag may stay unset.
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
    raise TypeError(f"No flag type for {name}: {kind}")


def _define_flags(cls: type) -> None:
  """Declares one flag per field of the settings dataclass `cls`, recursively."""
  docs = attribute_docs(cls)
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[field.name]):
      _define_flags(hints[field.name])
    else:
      help_text = docs[field.name][:1].upper() + docs[field.name][1:]
      _define(field.name, hints[field.name], field.default, help_text)


def define_flags() -> None:
  """Declares `--mode`, `--workdir`, one flag per settings field and the old names.

  Called by the binary's main module only: importing the library declares no
  flag, so it never collides with an application's own.
  """
  if "mode" in flags.FLAGS:
    return
  flags.DEFINE_enum("mode", "tune", MODES, "What to do (see Modes above).")
  flags.DEFINE_string("workdir", "workdir", "Folder for every artifact of a run.")
  _define_flags(config_lib.RunConfig)
  for old, new in config_lib.RENAMED.items():
    flags.DEFINE_alias(old, new)


def _from_flags(cls: type) -> Any:
  """`cls` built from the flags `_define_flags` declared for it."""
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[field.name]):
      values[field.name] = _from_flags(hints[field.name])
    else:
      value = flags.FLAGS[field.name].value
      values[field.name] = tuple(value) if isinstance(value, list) else value
  return cls(**values)


def run_config() -> config_lib.RunConfig:
  """The `RunConfig` the parsed flags describe; a bad value is a `UserError`.

  `--seed` alone seeds the split too (`--split_seed` is unset, so `RunConfig`
  takes the training seed); `--split_seed` keeps a split while `--seed` varies
  the training.
  """
  return _from_flags(config_lib.RunConfig)


def renamed_in_use() -> list[str]:
  """Notes for the old flag names the command line used (they still work)."""
  return [f"--{old} is now --{new}" for old, new in config_lib.RENAMED.items()
          if flags.FLAGS[old].present]


def help_text(usage: str) -> str:
  """`--help`: `usage`, then every flag by group with its default and help."""
  groups: dict[str, list[str]] = {"Run": ["mode", "workdir"]}
  titles = {"data": "Data", "train": "Model and training", "search": "Tuning (--mode=tune)",
            "export": "Export (--mode=export, and tune)",
            "predict": "Evaluate and predict"}
  for name, path in FLAG_FIELDS.items():
    group = titles[path[0]] if len(path) > 1 else "Run"
    groups.setdefault(group, []).append(name)
  lines = [usage.strip(), ""]
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
  renamed = ", ".join(f"--{old} (--{new})" for old, new in config_lib.RENAMED.items())
  lines += [f"Older names still read: {renamed}.", "absl's and TensorFlow's own flags: --helpfull."]
  return "\n".join(lines)


def parse(argv: list[str], usage: str) -> list[str]:
  """absl's parsing, with our own `--help`/`-h`/`--helpshort` (absl's lists no flag).

  A flag absl itself rejects (an unknown flag, a word for a number) is one line
  and exit status 2, like every other bad input.
  """
  if any(a in ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?") for a in argv[1:]):
    print(help_text(usage))
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    removed = [note for name, note in REMOVED_FLAGS.items() if f"'{name}'" in message
               or f"'no{name}'" in message]
    print(f"flowers_main: error: {removed[0] if removed else message}; see flowers_main "
          "--help.", file=sys.stderr)
    sys.exit(2)
  for note in renamed_in_use():
    print(f"flowers_main: note: {note}.", file=sys.stderr)
  return rest


def check_inputs(mode: str, config: config_lib.RunConfig, workdir: str) -> None:
  """What a mode needs that no setting can check alone, before TensorFlow loads."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file; give a folder (a new one, or a run's).")
  if mode == "tune":
    config.check_search()  # `--mode=train` ignores the search settings.
  if mode == "predict" and not config.predict.images:
    raise UserError("--mode=predict needs --images=FILE_OR_DIR[,...].")
  if mode in ("evaluate", "predict", "export"):
    path = config.predict.model_path(workdir)
    if not os.path.isfile(path):
      raise UserError(f"--model={path} does not exist; train one first "
                      "(--mode=train) or pass --model=PATH.")


def as_flags(config: Any) -> list[str]:
  """`config` as `flowers_main` flags, one per settings field (unset ones and one-shot
  actions such as --overwrite left out), so a run's flags.cfg resumes it."""
  lines = []
  for field in dataclasses.fields(config):
    if field.name in _ONE_SHOT:
      continue
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      lines += as_flags(value)
    elif isinstance(value, bool):
      lines.append(f"--{'' if value else 'no'}{field.name}")
    elif isinstance(value, tuple):
      items = (f"{v:g}" if isinstance(v, float) else str(v) for v in value)
      lines.append(f"--{field.name}={','.join(items)}")
    elif value is None:
      if field.name == "weights":
        lines.append("--weights=none")
    else:
      lines.append(f"--{field.name}={value}")
  return lines
