"""What a workdir holds, for tests that check a mode left it as it was."""

import glob
import os


def snapshot(workdir: str) -> dict[str, tuple[bytes, int]]:
  """Every file under `workdir` (but the caches): its bytes and modification time."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
    if os.path.isfile(path) and f"{os.sep}cache{os.sep}" not in path:
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = (f.read(), os.stat(path).st_mtime_ns)
  return found
