"""Atomic artifact writes: a file appears at its final path only when complete.

Every file a mode leaves in the workdir goes through here, so an interrupted
run never leaves a half-written `model.keras`, `report.json` or `.tflite`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` on success.

  The temporary name ends with the final name (Keras checks `.keras` and
  `.weights.h5`), and lives in
  the same folder so the rename is atomic. On an exception it is removed.
  """
  folder = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path),
                             dir=folder)
  os.close(fd)
  os.remove(tmp)  # Writers (Keras, TFLite) want to create the file themselves.
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON to `path` atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str, made_by: str | None = None) -> Any:
  """Reads a JSON artifact; a missing file is a `UserError` naming its maker."""
  from flowers.errors import UserError  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    hint = f" (run --mode={made_by} first)" if made_by else ""
    raise UserError(f"{path} not found{hint}.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
