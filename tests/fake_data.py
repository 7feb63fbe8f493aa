"""Small, controlled stand-ins for oxford_flowers102 and image folders.

`mock_flowers` patches TFDS (through `tfds.testing.mock_data(as_dataset_fn=...)`)
so `tfds.load`/`flowers.data.load_tfds` see a tiny dataset with unique file
names and chosen labels: TFDS's default mock draws random labels and repeats
the same examples in every split, which cannot test stratification. Images are
learnable: each class has its own colour, plus noise.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator, Sequence
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

OFFICIAL_SPLITS = ("train", "validation", "test")


def class_image(label: int, index: int, size: int = 40, num_classes: int = 4) -> np.ndarray:
  """A uint8 RGB image whose colour encodes `label`, with per-image noise."""
  rng = np.random.default_rng(label * 100_003 + index)
  hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 160) % 256])
  image = np.tile(hue, (size, size, 1)).astype(np.float32)
  image += rng.normal(0, 20, image.shape)
  image[: size // 2, :, :] *= 0.6 + 0.4 * (label % 2)
  return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  im = Image.fromarray(image)
  if mode:
    im = im.convert(mode)
  im.save(buf, format=fmt)
  return buf.getvalue()


def make_examples(counts_per_split: dict[str, Sequence[int]], size: int = 40,
                  key_prefix: str = "image",
                  corrupt: Sequence[str] = ()) -> dict[str, list[tuple[str, int, bytes]]]:
  """Per official split: a list of (file_name, label, jpeg bytes).

  `counts_per_split[split][c]` images of class c go to that split; file names
  are unique across splits, like the real dataset's. The images named in
  `corrupt` get bytes no decoder reads (a damaged record).
  """
  examples: dict[str, list[tuple[str, int, bytes]]] = {}
  serial = 0
  for split, counts in counts_per_split.items():
    rows = []
    for label, count in enumerate(counts):
      for _ in range(count):
        serial += 1
        image = class_image(label, serial, size)
        name = f"{key_prefix}_{serial:05d}.jpg"
        rows.append((name, label, b"\xff\xd8 not a jpeg" if name in corrupt
                     else encode(image)))
    examples[split] = rows
  return examples


@contextlib.contextmanager
def mock_flowers(counts_per_split: dict[str, Sequence[int]], size: int = 40,
                 shuffle_seed: int | None = None,
                 corrupt: Sequence[str] = ()) -> Iterator[dict]:
  """Patches TFDS so oxford_flowers102 yields the given controlled examples.

  `shuffle_seed` permutes the order in which each split yields its examples,
  to test that results do not depend on read order. The dataset has exactly
  the splits of `counts_per_split` (`info.splits` lists them); reading any
  other split raises, as TFDS does.
  """
  examples = make_examples(counts_per_split, size, corrupt=corrupt)
  if shuffle_seed is not None:
    rng = np.random.default_rng(shuffle_seed)
    examples = {s: [rows[i] for i in rng.permutation(len(rows))]
                for s, rows in examples.items()}

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, read_config, shuffle_files
    if str(split) not in examples:
      raise ValueError(f"Unknown split {str(split)!r}. Should be one of {list(examples)}.")
    rows = examples[str(split)]
    names = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], np.int64)
    images = [r[2] for r in rows]
    ds = tf.data.Dataset.from_tensor_slices({
        "file_name": tf.constant(names, tf.string) if rows else tf.zeros([0], tf.string),
        "label": tf.constant(labels, tf.int64),
        "image": tf.constant(images, tf.string) if rows else tf.zeros([0], tf.string),
    })
    # flowers reads with SkipDecoding (image bytes) or PartialDecoding (no
    # image); only a plain read (decoders=None) gets decoded pixels.
    if decoders is None:
      ds = ds.map(lambda ex: {**ex, "image": tf.io.decode_jpeg(ex["image"], channels=3)})
    return ds

  with contextlib.ExitStack() as stack:
    stack.enter_context(tfds.testing.mock_data(as_dataset_fn=as_dataset))
    splits = tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[len(rows)], num_bytes=0)
        for name, rows in examples.items()])
    stack.enter_context(mock.patch.object(
        tfds.core.DatasetInfo, "splits", new_callable=mock.PropertyMock,
        return_value=splits))
    yield examples


def uniform_counts(num_classes: int, train: int, val: int, test: int) -> dict[str, list[int]]:
  return {"train": [train] * num_classes, "validation": [val] * num_classes,
          "test": [test] * num_classes}


def write_image_dir(root: str, counts: Sequence[int], size: int = 40,
                    class_names: Sequence[str] | None = None) -> list[str]:
  """Writes a class-subfolder image tree, formats mixed; returns the class names."""
  names = list(class_names or [f"class_{i:02d}" for i in range(len(counts))])
  formats = [("JPEG", ".jpg", None), ("PNG", ".png", None), ("BMP", ".bmp", None),
             ("GIF", ".gif", None), ("PNG", ".png", "RGBA"), ("JPEG", ".jpg", "L"),
             ("JPEG", ".jpg", "CMYK")]
  serial = 0
  for label, (name, count) in enumerate(zip(names, counts)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(count):
      serial += 1
      fmt, ext, mode = formats[serial % len(formats)]
      path = os.path.join(root, name, f"img_{i:03d}{ext}")
      with open(path, "wb") as f:
        f.write(encode(class_image(label, serial, size), fmt, mode))
  return names


def write_gray16_png(path: str, values: np.ndarray) -> None:
  """Writes a 16-bit grayscale PNG of `values` (H, W) in 0..65535."""
  Image.fromarray(np.asarray(values, np.uint16)).save(path, format="PNG")


def write_raw(root: str, relative: bytes, data: bytes) -> str:
  """Writes `data` under `root` at `relative` given as bytes (any, not only UTF-8).

  Returns the path as `os.listdir` spells it (undecodable bytes as surrogates).
  """
  path = os.path.join(os.fsencode(root), relative)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return os.fsdecode(path)
