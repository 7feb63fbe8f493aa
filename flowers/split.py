"""The stratified re-split: which image goes to train, val or test.

Pure Python and numpy on (key, label) pairs, so it never decodes an image and
never needs TensorFlow. The assignment depends only on the set of keys, their
labels, the fractions and the seed: not on the order the source yields them.

The manifest `splits.csv` (`file_name,label,split`) records the result; a
resumed or later run reads it back instead of recomputing, so the split a model
was trained on travels with its workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from flowers import artifacts
from flowers.errors import UserError

SPLITS = ("train", "val", "test")
OFFICIAL = "official"
MANIFEST_NAME = artifacts.SPLITS
MANIFEST_HEADER = ("file_name", "label", "split")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """How to split: `fractions` (train, val, test summing to 1) or the official one."""

  fractions: tuple[float, float, float] | None  # None means the source's own split.
  seed: int = 42

  @property
  def is_official(self) -> bool:
    return self.fractions is None


def parse_split(text: str, seed: int = 42) -> SplitSpec:
  """Parses `--split`: "64,16,20" (percent, or fractions) or "official"."""
  text = text.strip().lower()
  if text == OFFICIAL:
    return SplitSpec(None, seed)
  try:
    parts = [float(p) for p in text.split(",")]
  except ValueError:
    parts = []
  if len(parts) != 3 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
    raise UserError(
        f"--split={text!r} is not understood: give three train,val,test "
        "percentages such as --split=64,16,20, or --split=official.")
  total = sum(parts)
  if abs(total - 100) > 1e-6 and abs(total - 1) > 1e-6:
    raise UserError(f"--split={text!r} sums to {total:g}: the three parts must "
                    "sum to 100 (percent) or 1 (fractions).")
  if parts[0] == 0:
    raise UserError(f"--split={text!r} leaves no training images: give train a "
                    "non-zero share.")
  return SplitSpec(tuple(p / total for p in parts), seed)


def _class_counts(n: int, fractions: Sequence[float]) -> list[int]:
  """Per-class split sizes within 1 of `n * fraction`, summing to `n`.

  Largest remainder rounding; then, for classes of at least 3 images, every
  split with a non-zero fraction gets at least one image, taken from the split
  that has the most to spare relative to its exact share.
  """
  exact = [n * f for f in fractions]
  counts = [int(np.floor(e)) for e in exact]
  order = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
  for i in order[: n - sum(counts)]:
    counts[i] += 1
  if n >= 3:
    for i in range(3):
      if counts[i] == 0 and fractions[i] > 0:
        donors = [j for j in range(3) if counts[j] >= 2]
        donor = max(donors, key=lambda j: (counts[j] - exact[j], -j))
        counts[donor] -= 1
        counts[i] += 1
  return counts


def _class_seed(seed: int, label: int) -> int:
  """A per-class seed, so one class's shuffle does not depend on the others."""
  digest = hashlib.sha256(f"{seed}/{label}".encode()).digest()
  return int.from_bytes(digest[:8], "little")


def stratified_split(keys: Sequence[str], labels: Sequence[int],
                     fractions: Sequence[float], seed: int = 42) -> dict[str, str]:
  """Assigns each key to "train", "val" or "test", stratified by label.

  Args:
    keys: a stable, unique identifier per image (the TFDS file name, or the
      path relative to the image folder).
    labels: the class index of each key.
    fractions: (train, val, test) fractions summing to 1.
    seed: the shuffle seed; the same seed gives the same split.

  Returns:
    A mapping from key to split name. Per class, each split's size is within 1
    of its exact fraction, and classes of at least 3 images reach every split
    whose fraction is non-zero.
  """
  if len(keys) != len(labels):
    raise ValueError("keys and labels differ in length")
  if len(set(keys)) != len(keys):
    raise UserError("The source has duplicate image keys; each file name must "
                    "be unique to split the data.")
  by_class: dict[int, list[str]] = {}
  for key, label in zip(keys, labels):
    by_class.setdefault(int(label), []).append(key)
  assignment: dict[str, str] = {}
  for label in sorted(by_class):
    members = sorted(by_class[label])
    rng = np.random.default_rng(_class_seed(seed, label))
    members = [members[i] for i in rng.permutation(len(members))]
    start = 0
    for split, count in zip(SPLITS, _class_counts(len(members), fractions)):
      for key in members[start:start + count]:
        assignment[key] = split
      start += count
  return assignment


def official_split(keys: Sequence[str], source_splits: Sequence[str]) -> dict[str, str]:
  """Keeps the source's own split (TFDS train/validation/test -> train/val/test)."""
  rename = {"train": "train", "validation": "val", "val": "val", "test": "test"}
  unknown = sorted(set(source_splits) - set(rename))
  if unknown:
    raise UserError(f"--split=official needs train/validation/test splits in the "
                    f"source; it has {unknown}. Use --split=64,16,20 instead.")
  return {k: rename[s] for k, s in zip(keys, source_splits)}


def assign(keys: Sequence[str], labels: Sequence[int],
           source_splits: Sequence[str] | None, spec: SplitSpec) -> dict[str, str]:
  """Applies `spec`: the official split, or a stratified re-split."""
  if spec.is_official:
    if source_splits is None:
      raise UserError("--split=official needs a source with its own splits (TFDS); "
                      "an image folder has none. Use --split=64,16,20.")
    return official_split(keys, source_splits)
  return stratified_split(keys, labels, spec.fractions, spec.seed)


def manifest_text(assignment: Mapping[str, str], labels: Mapping[str, int]) -> str:
  """The CSV text of a manifest, rows sorted by key for stable diffs."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(MANIFEST_HEADER)
  for key in sorted(assignment):
    writer.writerow((key, int(labels[key]), assignment[key]))
  return buf.getvalue()


def write_manifest(path: str, assignment: Mapping[str, str],
                   labels: Mapping[str, int]) -> None:
  """Writes `splits.csv` atomically."""
  artifacts.write_text(path, manifest_text(assignment, labels))


def read_manifest(path: str) -> tuple[dict[str, str], dict[str, int]]:
  """Reads `splits.csv` into (key -> split, key -> label)."""
  assignment: dict[str, str] = {}
  labels: dict[str, int] = {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = tuple(next(reader, ()))
    if header != MANIFEST_HEADER:
      raise UserError(f"{path} is not a split manifest (header {header}); move it "
                      "away or choose another --workdir.")
    for line, row in enumerate(reader, start=2):
      try:
        key, label, split = row
        labels[key] = int(label)
      except ValueError:
        raise UserError(f"{path} line {line} is not file_name,label,split ({row}); "
                        "delete the file to write it again, or use another --workdir."
                        ) from None
      if split not in SPLITS:
        raise UserError(f"{path} has an unknown split {split!r} for {key}.")
      assignment[key] = split
  return assignment, labels


def load_or_create(workdir: str, keys: Sequence[str], labels: Sequence[int],
                   source_splits: Sequence[str] | None,
                   spec: SplitSpec) -> dict[str, str]:
  """Returns the split for this workdir: reuses `splits.csv`, else writes it.

  A manifest from an earlier run is reused only if it is exactly what `spec`
  gives for these images; anything else is a `UserError`, because silently
  training on a different split would make results incomparable.
  """
  path = os.path.join(workdir, MANIFEST_NAME)
  label_of = {k: int(l) for k, l in zip(keys, labels)}
  wanted = assign(keys, labels, source_splits, spec)
  if os.path.exists(path):
    existing, existing_labels = read_manifest(path)
    if existing != wanted or existing_labels != label_of:
      raise UserError(
          f"{path} was made with another --split, --split_seed or data source; use the "
          "same flags as before, or a fresh --workdir.")
    return existing
  write_manifest(path, wanted, label_of)
  return wanted


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  """Per-split image and class counts, for `--mode=prepare` and reports."""

  images: int
  classes: int
  smallest_class: int
  largest_class: int


def summarize(assignment: Mapping[str, str], labels: Mapping[str, int],
              num_classes: int | None = None) -> dict[str, SplitSummary]:
  """Counts images and classes per split."""
  out = {}
  for split in SPLITS:
    counts: dict[int, int] = {}
    for key, s in assignment.items():
      if s == split:
        counts[labels[key]] = counts.get(labels[key], 0) + 1
    sizes = list(counts.values())
    if num_classes is not None:
      sizes += [0] * (num_classes - len(counts))
    out[split] = SplitSummary(
        images=sum(counts.values()), classes=len(counts),
        smallest_class=min(sizes) if sizes else 0,
        largest_class=max(sizes) if sizes else 0)
  return out


def keys_of(assignment: Mapping[str, str], split: str) -> list[str]:
  """The sorted keys in one split."""
  return sorted(k for k, s in assignment.items() if s == split)


def check_fractions_cover(labels: Iterable[int], spec: SplitSpec) -> None:
  """Rejects a source whose classes are too small to appear in every split."""
  if spec.is_official:
    return
  counts: dict[int, int] = {}
  for label in labels:
    counts[int(label)] = counts.get(int(label), 0) + 1
  needed = sum(1 for f in spec.fractions if f > 0)
  small = sorted(l for l, c in counts.items() if c < needed)
  if small:
    raise UserError(
        f"Classes {small[:5]} have fewer than {needed} images, too few for the "
        f"train/val/test split; add images or remove those classes.")
