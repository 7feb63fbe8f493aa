"""Image sources and the tf.data input pipeline.

A `Source` lists its images as (key, label) without decoding any of them, which
is all the split needs. `make_dataset` then streams the encoded images of one
split: filter by key, decode once, resize, keep uint8 (normalization belongs to
the model), cache, shuffle with a seed, batch and prefetch. No step ever holds
the whole dataset as one array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import split as split_lib
from flowers.config import DataConfig
from flowers.config import PixelCache
from flowers.errors import UserError

TFDS_SPLITS = ("train", "validation", "test")  # Listed first, in this order.
# Usual image file extensions (e.g. for --mode=predict's folder walk). An image
# folder reads whatever Pillow reads, whatever its extension; a file it cannot
# read is skipped and counted, as "not an image" unless its extension is here.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif",
                    ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
SHUFFLE_BUFFER_ON_DISK = 2048
# How pixels are made (`decode_image`, `resize`); recorded in each run.json.
PREPROCESSING = "jpeg integer-accurate DCT; squash, bilinear at x*W/S, no antialias"


@dataclasses.dataclass
class Source:
  """A labelled image collection, listed without decoding.

  Attributes:
    name: where it came from, for reports ("tfds:oxford_flowers102", a folder).
    keys: a stable unique key per image (TFDS file name or relative path).
    labels: class index per key.
    class_names: class index -> name.
    source_splits: the source's own split per key (TFDS), or None.
    encoded: makes a dataset of (key, encoded image bytes), in a fixed order.
    decoder: "tf" (JPEG/PNG/BMP/GIF through TensorFlow) or "pil" (Pillow, for
      image folders: CMYK, palettes, 16-bit and the rest).
    skipped: files the listing left out, relative path -> one short reason
      (image folders; empty for TFDS). Reports count them.
    describe: what the images are beyond their keys and labels, independent of
      where they live (file sizes, dataset version); see `content_sha256`.
  """

  name: str
  keys: list[str]
  labels: list[int]
  class_names: list[str]
  source_splits: list[str] | None
  encoded: Callable[[], tf.data.Dataset]
  decoder: str = "tf"
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  describe: Callable[[], dict[str, Any]] = dataclasses.field(default=dict, repr=False)
  _content_sha256: str | None = dataclasses.field(default=None, init=False, repr=False,
                                                  compare=False)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def label_of(self) -> dict[str, int]:
    return dict(zip(self.keys, self.labels))

  def content_sha256(self) -> str:
    """A digest of what the images are, not where they live (computed once).

    It covers the class names, each key and label, and `describe()`: each
    file's size for an image folder; the dataset's name, version and prepared
    files (base name and size) for TFDS. Caches keyed by it are rebuilt when
    the images change, and stay valid when the data moves.
    """
    if self._content_sha256 is None:
      rows = sorted((key, int(label)) for key, label in zip(self.keys, self.labels))
      text = json.dumps({"describe": self.describe(), "class_names": list(self.class_names),
                         "decoder": self.decoder, "images": rows},
                        sort_keys=True, separators=(",", ":"))
      self._content_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return self._content_sha256


def load_tfds(name: str = DataConfig.tfds_name, data_dir: str | None = None,
              download: bool = True) -> Source:
  """Lists a TFDS image classification dataset, all official splits merged.

  Args:
    name: the TFDS name; it needs `image`, `label` and `file_name` features.
    data_dir: the TFDS data folder (e.g. `../shared/tensorflow_datasets` for
      offline use); None means TFDS's default (`~/tensorflow_datasets`).
    download: download and prepare the dataset if it is not there yet.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _prepared_builder(name, data_dir, download)
  features = builder.info.features
  for feature in ("image", "label", "file_name"):
    if feature not in features:
      raise UserError(f"TFDS {name} has no {feature!r} feature; flowers needs "
                      "image, label and file_name.")
  class_names = list(features["label"].names)
  splits = _tfds_splits(builder)
  keys, labels, source_splits = _list_tfds(builder, splits)

  def encoded() -> tf.data.Dataset:
    datasets = [builder.as_dataset(split=s, decoders={"image": tfds.decode.SkipDecoding()},
                                   shuffle_files=False) for s in splits]
    ds = datasets[0]
    for other in datasets[1:]:
      ds = ds.concatenate(other)
    return ds.map(lambda ex: (ex["file_name"], ex["image"]))

  version = str(builder.info.version)
  data_dir_of_version = str(builder.data_dir)

  def describe() -> dict[str, Any]:
    return {"tfds": name, "version": version, "splits": splits,
            "files": _prepared_files(data_dir_of_version)}

  return Source(f"tfds:{name}", keys, labels, class_names, source_splits, encoded,
                describe=describe)


def _prepared_builder(name: str, data_dir: str | None, download: bool) -> Any:
  """The TFDS builder of `name`, prepared (downloading only if allowed), or a one-line
  error naming the flag to fix."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if data_dir is not None and not os.path.isdir(data_dir):
    raise UserError(f"--tfds_data_dir={data_dir} does not exist; point it at the "
                    "folder holding oxford_flowers102/, or leave it unset to download.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f"TFDS has no dataset {name!r}: check --tfds_name.") from e
  if not builder.is_prepared():
    if not download:
      raise UserError(f"{name} is not prepared under {builder.data_dir}; set "
                      "--tfds_data_dir to a prepared copy, or allow --download.")
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(
          f"Could not download and prepare {name} ({type(e).__name__}); check the "
          "network, or pass --tfds_data_dir=<folder with a prepared copy>.") from e
  return builder


def _tfds_splits(builder: Any) -> list[str]:
  """The dataset's own splits, the usual three first; TFDS's names if it lists none."""
  available = list(builder.info.splits.keys()) or list(TFDS_SPLITS)
  return ([s for s in TFDS_SPLITS if s in available] +
          sorted(s for s in available if s not in TFDS_SPLITS))


def _list_tfds(builder: Any, splits: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
  """Every example's file name, label and split, in split order.

  Only the names and labels are parsed: no image bytes are materialized.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  listing = tfds.decode.PartialDecoding({"file_name": True, "label": True})
  keys, labels, source_splits = [], [], []
  for split in splits:
    metadata = builder.as_dataset(split=split, decoders=listing, shuffle_files=False).map(
        lambda ex: (ex["file_name"], ex["label"]))
    for names, labs in metadata.batch(4096).as_numpy_iterator():
      keys.extend(n.decode() for n in names)
      labels.extend(int(l) for l in labs)
      source_splits.extend([split] * len(names))
  return keys, labels, source_splits


def _prepared_files(folder: str) -> list[tuple[str, int]]:
  """(base name, size) of each file of a prepared TFDS dataset, sorted."""
  try:
    names = tf.io.gfile.listdir(folder)
  except (tf.errors.OpError, OSError):
    return []
  files = []
  for base in sorted(names):
    path = os.path.join(folder, base)
    if base.startswith(".") or tf.io.gfile.isdir(path):
      continue
    try:
      files.append((base, int(tf.io.gfile.stat(path).length)))
    except (tf.errors.OpError, OSError):
      continue
  return files


def _sniff_image(path: str) -> str | None:
  """Returns why `path` is not a readable image, or None if it looks fine.

  Pillow's `verify` reads headers and checksums without decoding pixels, which
  keeps listing fast; a file that fails later at decode time is still caught
  and reported by path in `make_dataset`. Any format Pillow reads is accepted,
  whatever the file's extension.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as im:
      im.verify()
  except Image.UnidentifiedImageError:
    if path.lower().endswith(IMAGE_EXTENSIONS):
      return "unreadable (not a format Pillow reads)"
    return "not an image"
  except Exception as e:  # pylint: disable=broad-except
    return f"unreadable ({_one_line(f'{type(e).__name__}: {e}')})"
  return None


def _one_line(text: str, limit: int = 160) -> str:
  """`text` on one line, at most `limit` characters."""
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _printable(path: str) -> str:
  """`path` as text that can always be printed (undecodable bytes as \\xNN)."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:  # os.listdir's surrogate escapes of undecodable bytes.
    return False
  return True


NOT_UTF8 = "file name is not UTF-8; rename it"
HIDDEN = "hidden file"


def load_image_dir(path: str, strict: bool = False) -> Source:
  """Lists a folder of class subfolders (`path/<class>/<image>`).

  Class names are the subfolder names in sorted order. Every file Pillow reads
  is used (JPEG, PNG, BMP, GIF's first frame, TIFF, WebP, ..., whatever the
  extension); grayscale, RGBA, palette, CMYK and 16-bit images become 8-bit
  RGB. Every other file under the class subfolders, or beside them, is left
  out and recorded in `Source.skipped` with its reason (not an image,
  unreadable, a name that is not UTF-8, hidden), each with a warning. Under
  `strict` a skipped file is an error, hidden files (.DS_Store, ...) excepted.
  """
  if not os.path.isdir(path):
    raise UserError(f"--image_dir={path} is not a folder; give a folder with one "
                    "subfolder of images per class.")
  skipped: dict[str, str] = {}

  def skip(full: str, reason: str) -> None:
    skipped[_printable(os.path.relpath(full, path).replace(os.sep, "/"))] = reason

  class_names = _class_folders(path, skip)
  keys, labels, sizes = _list_class_images(path, class_names, skip)
  _report_skipped(path, skipped, strict)
  if not keys:
    raise UserError(f"--image_dir={path} holds no images in its class subfolders "
                    f"({len(skipped)} other file(s) skipped); add JPEG, PNG or other "
                    "images Pillow reads.")
  empty = [n for i, n in enumerate(class_names) if i not in set(labels)]
  if empty:
    raise UserError(f"Class folder(s) {empty[:5]} under {path} hold no readable "
                    "images; add images or remove the folder.")
  root = os.path.abspath(path)

  def encoded() -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(np.array(keys, dtype=object))
    return ds.map(lambda k: (k, tf.io.read_file(tf.strings.join([root, "/", k]))))

  return Source(os.path.abspath(path), keys, labels, class_names, None, encoded,
                decoder="pil", skipped=skipped,
                describe=lambda: {"image_dir": True, "sizes": sizes})


def _class_folders(path: str, skip: Callable[[str, str], None]) -> list[str]:
  """The class subfolders of `path`, sorted; what is not one is skipped with why."""
  class_names = []
  for entry in sorted(os.listdir(path)):
    full = os.path.join(path, entry)
    if os.path.isdir(full):
      if entry.startswith("."):
        continue  # .git and the like: not a class.
      if _is_utf8(entry):
        class_names.append(entry)
      else:
        for root, _, files in os.walk(full):
          for file in files:
            skip(os.path.join(root, file), "class folder name is not UTF-8; rename it")
    else:
      skip(full, HIDDEN if entry.startswith(".") else "not in a class subfolder")
  if not class_names:
    raise UserError(f"--image_dir={path} has no class subfolders; put each class's "
                    "images in its own subfolder.")
  return class_names


def _list_class_images(path: str, class_names: Sequence[str], skip: Callable[[str, str], None]
                       ) -> tuple[list[str], list[int], dict[str, int]]:
  """Every image under the class folders (key, label, size in bytes), in sorted order;
  other files are skipped with why."""
  keys, labels, sizes = [], [], {}
  for label, name in enumerate(class_names):
    folder = os.path.join(path, name)
    for root, dirs, files in os.walk(folder):
      dirs.sort()
      for file in sorted(files):
        full = os.path.join(root, file)
        key = os.path.relpath(full, path).replace(os.sep, "/")
        if file.startswith("."):
          skip(full, HIDDEN)
          continue
        if not _is_utf8(key):
          skip(full, NOT_UTF8)
          continue
        problem = _sniff_image(full)
        if problem:
          skip(full, problem)
          continue
        keys.append(key)
        labels.append(label)
        sizes[key] = os.path.getsize(full)
  return keys, labels, sizes


def _report_skipped(path: str, skipped: dict[str, str], strict: bool) -> None:
  """Warns once per skipped file and once in all; under `strict`, refuses them."""
  if not skipped:
    return
  refused = [k for k, reason in skipped.items() if reason != HIDDEN]
  if strict and refused:
    first = os.path.join(path, refused[0])
    raise UserError(f"--strict: {first} was skipped ({skipped[refused[0]]}); fix or remove "
                    f"it, or drop --strict to skip it ({len(refused)} skipped file(s) in all).")
  for key, reason in skipped.items():
    logging.warning("Skipping %s: %s.", os.path.join(path, key), reason)
  reasons: dict[str, int] = {}
  for reason in skipped.values():
    reason = re.split(r" \(|;", reason)[0]  # "unreadable (...)" -> "unreadable".
    reasons[reason] = reasons.get(reason, 0) + 1
  logging.warning("Skipped %d file(s) under %s: %s.", len(skipped), path,
                  ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())))


def load_source(data: DataConfig = DataConfig()) -> Source:
  """The images `data` names: its image folder if given, else its TFDS dataset."""
  if data.image_dir:
    return load_image_dir(data.image_dir, strict=data.strict)
  return load_tfds(data.tfds_name, data.tfds_data_dir, data.download)


def resize(images: tf.Tensor, image_size: int) -> tf.Tensor:
  """Squashes images to `image_size` x `image_size` the way MediaPipe Tasks does.

  The whole image is resized (no crop, no padding), sampled bilinearly at
  x_src = x * W / S (no half-pixel offset) and without antialiasing: what
  MediaPipe's ImageClassifier does before the model on a phone (read off a
  probe model in tests/test_tflite_metadata.py). Training, evaluation and
  `--mode=predict` all call this, so the exported model sees in an app the
  pixels it was trained and measured on (docs/design.md, "Preprocessing matched to MediaPipe").
  Accepts one image (H, W, C) or a batch; returns uint8.
  """
  images = tf.convert_to_tensor(images)
  batch = images if images.shape.rank == 4 else images[tf.newaxis]
  resized = tf.raw_ops.ResizeBilinear(images=batch, size=[image_size, image_size],
                                      align_corners=False, half_pixel_centers=False)
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return resized if images.shape.rank == 4 else resized[0]


# Pillow modes holding more than 8 bits a pixel (16-bit grayscale PNG and TIFF,
# 32-bit integer images): read at full depth, scaled from 16 bits to 8.
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_with_pil(data: bytes) -> np.ndarray | None:
  """Decodes any Pillow-readable image (first frame) to uint8 RGB, or None.

  8-bit images become RGB through Pillow's own conversion. 16-bit grayscale
  is scaled to 8 bits (v * 255 / 65535, rounded) instead of being clipped at
  255. (Pillow reads 16-bit RGB(A) PNGs as 8-bit already, by their high byte.)
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  if isinstance(data, np.ndarray):
    data = data.item()
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.seek(0)
      if im.mode in _DEEP_MODES:
        return _gray16_to_rgb8(np.asarray(im))
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Exception:  # pylint: disable=broad-except
    return None


def _gray16_to_rgb8(values: np.ndarray) -> np.ndarray:
  """16-bit grayscale (H, W) -> uint8 RGB, round(v * 255 / 65535), exactly."""
  v = np.clip(values.astype(np.int64), 0, 65535)
  gray = ((v * 255 + 32767) // 65535).astype(np.uint8)
  return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def _pil_decode(data: bytes) -> tuple[np.ndarray, bool]:
  image = decode_with_pil(data)
  if image is None:
    return np.zeros((1, 1, 3), np.uint8), False
  return image, True


def decode_image(data: tf.Tensor, decoder: str = "tf") -> tuple[tf.Tensor, tf.Tensor]:
  """Decodes one encoded image to uint8 RGB; returns (image, ok)."""
  if decoder == "pil":
    image, ok = tf.numpy_function(_pil_decode, [data], (tf.uint8, tf.bool),
                                  stateful=False)
    image.set_shape((None, None, 3))
    ok.set_shape(())
    return image, ok
  # JPEGs with the accurate integer DCT (libjpeg's default, as in Pillow and
  # the phone's decoder) rather than TensorFlow's faster default, which is up
  # to 6 levels off per pixel.
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  image.set_shape((None, None, 3))
  return image, tf.constant(True)


def _clear_unfinished_file_cache(prefix: str) -> None:
  """Removes what an interrupted run left of a file cache, so it is rebuilt.

  tf.data writes the `.index` file last; without it the cache is incomplete,
  and its lock file would otherwise make the next run fail.
  """
  folder = os.path.dirname(os.path.abspath(prefix))
  os.makedirs(folder, exist_ok=True)
  name = os.path.basename(prefix)
  files = [f for f in os.listdir(folder) if f.startswith(name + ".") or f.startswith(name + "_")]
  if not any(f.endswith(".index") for f in files):
    for f in files:
      os.remove(os.path.join(folder, f))


def _label_table(source: Source, keys: Sequence[str]) -> tf.lookup.StaticHashTable:
  """key -> label for `keys`; -1 for any other key (an image to leave out)."""
  label_of = source.label_of()
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(list(keys) or [""], dtype=tf.string),
          tf.constant([label_of[k] for k in keys] or [-1], tf.int32)),
      default_value=-1)


def make_dataset(source: Source, keys: Sequence[str], *, image_size: int = 224,
                 batch_size: int | None = 32, shuffle: bool = False, seed: int = 0,
                 cache: str = "memory") -> tf.data.Dataset:
  """The input pipeline for the images in `keys`: (uint8 images, int32 labels).

  `decoded_images` then `batched`.

  Args:
    source: where the images come from.
    keys: which images (one split of the manifest).
    image_size: the square side images are resized to.
    batch_size: the batch size, or None for single examples.
    shuffle: shuffle (training); the order is fixed by `seed` for each epoch.
    seed: the shuffle seed.
    cache: "memory", a file path prefix (for when memory is short), or "none".
      Images are decoded and resized once; later epochs read the cache.
  """
  images = decoded_images(source, keys, image_size=image_size, cache=cache)
  return batched(images, batch_size=batch_size,
                 shuffle_buffer=shuffle_buffer(len(keys), cache) if shuffle else 0, seed=seed)


def decoded_images(source: Source, keys: Sequence[str], *, image_size: int = 224,
                   cache: str = "memory") -> tf.data.Dataset:
  """The images in `keys`, decoded and resized, one by one in the source's order:
  (uint8 image, int32 label); undecodable ones dropped (and named on stderr).

  `cache` as `make_dataset`'s: every pipeline built on this dataset (`batched`)
  reads the one cache, so the images are decoded once however many are built.
  """
  table = _label_table(source, keys)
  decoder = source.decoder

  def with_label(key, data):
    return key, data, table.lookup(key)

  def decode(key, data, label):
    image, ok = decode_image(data, decoder)
    return key, resize(image, image_size), label, ok

  def report_bad(key, image, label, ok):
    del image, label
    if not ok:
      tf.print("WARNING: skipping undecodable image", key, output_stream=sys.stderr)
    return ok

  ds = source.encoded().map(with_label).filter(lambda k, d, l: l >= 0)
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  # TensorFlow's decoder raises on a corrupt image (a bad record in a TFDS
  # file, say) where Pillow's reports it: drop it too. Evaluation counts what
  # a split lost (`evaluate.count_skipped`), so the loss is never silent.
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.filter(report_bad).map(lambda k, image, label, ok: (image, label))
  if cache == "memory":
    ds = ds.cache()
  elif cache and cache != "none":
    _clear_unfinished_file_cache(cache)
    ds = ds.cache(cache)
  return ds.with_options(_deterministic())


def shuffle_buffer(num_images: int, cache: str) -> int:
  """The training shuffle's buffer for `num_images` images cached in `cache`.

  A full-size buffer is free when the cache is in memory (it holds references
  to cached images); with a file cache it would pull every image back into
  RAM, so it is bounded there.
  """
  buffer = num_images if cache == "memory" else min(num_images, SHUFFLE_BUFFER_ON_DISK)
  return max(buffer, 1)


def batched(images: tf.data.Dataset, *, batch_size: int | None, shuffle_buffer: int = 0,
            seed: int = 0) -> tf.data.Dataset:
  """`images` (from `decoded_images`) shuffled (when `shuffle_buffer` > 0), batched
  and prefetched.

  The shuffle draws a new order for each iterator (`reshuffle_each_iteration`),
  from a stream of orders that each call starts afresh: fixed by `seed` and
  TensorFlow's global seed when the call is made (tf.data combines the two).
  """
  ds = images
  if shuffle_buffer > 0:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if batch_size:
    ds = ds.batch(batch_size)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_deterministic())


def _deterministic() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def undecodable(source: Source, keys: Sequence[str]) -> list[str]:
  """The keys among `keys` whose images cannot be decoded, sorted (one decode pass).

  The pipeline drops such images and the reports count them; this names them,
  for `--strict`.
  """
  table = _label_table(source, keys)
  decoder = source.decoder

  def decoded(key, data):
    image, ok = decode_image(data, decoder)
    return key, tf.logical_and(ok, tf.size(image) > 0)

  ds = source.encoded().filter(lambda key, data: table.lookup(key) >= 0)
  ds = ds.map(decoded, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors().filter(lambda key, ok: ok)
  read = {key.decode() for key, _ in ds.as_numpy_iterator()}
  return sorted(set(keys) - read)


def check_decodable(source: Source, keys: Sequence[str]) -> None:
  """Raises a one-line `UserError` naming the images of `keys` that cannot be decoded."""
  bad = undecodable(source, keys)
  if bad:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise UserError(f"--strict: {len(bad)} image(s) of {source.name} could not be decoded: "
                    f"{', '.join(bad[:3])}{more}; fix or remove them, or drop --strict to "
                    "skip them (each report counts what it skipped).")


@dataclasses.dataclass
class Splits:
  """The three datasets of a split, with what a model needs to know about them."""

  train: tf.data.Dataset
  val: tf.data.Dataset
  test: tf.data.Dataset
  class_names: list[str]
  assignment: dict[str, str]
  source: Source
  # The open-set protocol (--holdout_classes): the classes left out of training, and
  # where their images fall in the same split (their val and test images are unknowns).
  held_out: Source | None = None
  held_out_assignment: dict[str, str] = dataclasses.field(default_factory=dict)
  # The train split's decoded images (`decoded_images`: cached, unshuffled, unbatched)
  # and how `train` shuffles and batches them, for `train_batches`.
  train_images: tf.data.Dataset | None = None
  shuffle_buffer: int = 1
  batch_size: int | None = None

  def keys(self, split: str) -> list[str]:
    return split_lib.keys_of(self.assignment, split)

  def train_batches(self, seed: int) -> tf.data.Dataset:
    """`train`'s pipeline anew: the same cached images (not decoded again), batched
    and shuffled alike, in a stream of orders of its own, seeded by `seed` (and
    TensorFlow's global seed, as `batched` says). Training takes one per stage, so
    no run's order depends on what read the data before it (an earlier trial)."""
    if self.train_images is None:
      raise ValueError("These Splits hold no train_images; make them with load_splits.")
    return batched(self.train_images, batch_size=self.batch_size,
                   shuffle_buffer=self.shuffle_buffer, seed=seed)

  def held_out_keys(self, split: str) -> list[str]:
    return split_lib.keys_of(self.held_out_assignment, split)


def prepare_split(source: Source, workdir: str | None,
                  spec: split_lib.SplitSpec) -> dict[str, str]:
  """The key -> split assignment, reusing or writing `workdir/splits.csv`."""
  split_lib.check_fractions_cover(source.labels, spec)
  if spec.is_official and source.source_splits is not None:
    _check_official_splits(source)
  if workdir is None:
    return split_lib.assign(source.keys, source.labels, source.source_splits, spec)
  return split_lib.load_or_create(workdir, source.keys, source.labels,
                                  source.source_splits, spec)


def _check_official_splits(source: Source) -> None:
  """Refuses `--split=official` for a source without its own train, val and test."""
  have = set(source.source_splits or ())
  names = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}
  missing = [n for n, aliases in names.items() if not have.intersection(aliases)]
  if missing:
    raise UserError(f"--split=official needs train, validation and test splits, but "
                    f"{source.name} has no {', '.join(missing)} split (it has "
                    f"{', '.join(sorted(have))}); use --split=64,16,20 instead.")


# A pixel cache's files (--pixel_cache=disk): `<split>_<size>[_<digest>]` then `.index`, `.data-*`,
# or a writer's `_<n>.lockfile` and temporaries.
_PIXEL_CACHE = re.compile(
    r"^(?P<stem>(?P<split>train|val|test)_\d+(?:_[0-9a-f]{16})?)(?:_\d+)?(?:\..*)?$")


def pixel_cache_prefix(folder: str, split: str, keys: Sequence[str], image_size: int,
                       source: Source) -> str:
  """The file cache prefix of one split in `folder`, keyed by what decides its bytes.

  The name is `<split>_<size>_<digest>`, the digest covering the split's keys,
  the image size, `PREPROCESSING`, the source's content, its decoder (and
  Pillow's version for it) and TensorFlow's version: a change of any of them
  gets a new cache rather than stale pixels. Caches of the same split under
  other names (and their lock files) are deleted.
  """
  recipe = {"keys": sorted(keys), "image_size": image_size,
            "preprocessing": PREPROCESSING, "source": source.content_sha256(),
            "decoder": source.decoder, "tensorflow": tf.__version__}
  if source.decoder == "pil":
    import PIL  # pylint: disable=g-import-not-at-top
    recipe["pillow"] = PIL.__version__
  digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()
  stem = f"{split}_{image_size}_{digest[:16]}"
  if os.path.isdir(folder):
    for file in os.listdir(folder):
      match = _PIXEL_CACHE.match(file)
      if match and match["split"] == split and match["stem"] != stem:
        os.remove(os.path.join(folder, file))
  return os.path.join(folder, stem)


def hold_out(source: Source, count: int, seed: int) -> tuple[Source, Source]:
  """`source` cut by class for the open-set protocol: (known, held_out).

  `count` classes with images, a choice seeded by `seed`, make `held_out`;
  `known` keeps the others, numbered 0.. in their order, with their names.
  Both read the same encoded images (a dataset lists only its own keys).
  """
  present = sorted(set(source.labels))
  if count > len(present) - 2:
    raise UserError(f"--holdout_classes={count} leaves fewer than 2 of the "
                    f"{len(present)} classes of {source.name} to train on; hold out fewer.")
  chosen = set(np.random.default_rng(seed).choice(present, count, replace=False).tolist())
  return (_classes_of(source, [c for c in range(source.num_classes) if c not in chosen]),
          _classes_of(source, sorted(chosen)))


def _classes_of(source: Source, classes: Sequence[int]) -> Source:
  """The images of `classes` only, their labels renumbered in that order."""
  new_label = {old: new for new, old in enumerate(classes)}
  rows = [i for i, label in enumerate(source.labels) if label in new_label]
  splits = source.source_splits
  return dataclasses.replace(
      source, keys=[source.keys[i] for i in rows],
      labels=[new_label[source.labels[i]] for i in rows],
      class_names=[source.class_names[c] for c in classes],
      source_splits=None if splits is None else [splits[i] for i in rows])


def split_held_out(source: Source, data: DataConfig) -> tuple[Source, Source, dict[str, str]]:
  """Under `data.holdout_classes`: the classes trained on, the held-out ones, and
  where the held-out images fall in `data`'s split (`hold_out`, then the split)."""
  known, held_out = hold_out(source, data.holdout_classes, data.split_seed)
  spec = split_lib.parse_split(data.split, data.split_seed)
  return known, held_out, split_lib.assign(held_out.keys, held_out.labels,
                                           held_out.source_splits, spec)


def load_splits(data: DataConfig = DataConfig(), *, source: Source | None = None,
                workdir: str | None = None, shuffle_seed: int = 42) -> Splits:
  """Train/val/test datasets of (uint8 images, labels), stratified and seeded.

  Usable from any code: `flowers.load_splits(DataConfig(tfds_data_dir=...))`
  gives the default oxford_flowers102 64/16/20 split (seeded by
  `data.split_seed`). Train is shuffled (by `shuffle_seed`, the training
  seed), val and test are in key order; `Splits.train_batches` gives more train
  streams over the same cached images. With a `workdir`, its `splits.csv` is
  reused (or written), and the disk cache lives there. With
  `data.holdout_classes`, the split and the datasets hold the other classes only
  (`hold_out`); the held-out ones are split alike, into `Splits.held_out_assignment`.
  """
  if source is None:
    source = load_source(data)
  spec = split_lib.parse_split(data.split, data.split_seed)
  held_out, held_out_assignment = None, {}
  if data.holdout_classes:
    source, held_out, held_out_assignment = split_held_out(source, data)
  assignment = prepare_split(source, workdir, spec)
  if data.strict:
    check_decodable(source, [k for k in source.keys if k in assignment])

  def cache_for(name: str) -> str:
    if data.pixel_cache is PixelCache.DISK and workdir is not None:
      return pixel_cache_prefix(os.path.join(workdir, artifacts.CACHE_DIR), name,
                            split_lib.keys_of(assignment, name), data.image_size, source)
    return "none" if data.pixel_cache is PixelCache.NONE else "memory"

  images = {name: decoded_images(source, split_lib.keys_of(assignment, name),
                                 image_size=data.image_size, cache=cache_for(name))
            for name in split_lib.SPLITS}
  buffer = shuffle_buffer(len(split_lib.keys_of(assignment, "train")), cache_for("train"))
  return Splits(
      batched(images["train"], batch_size=data.batch_size, shuffle_buffer=buffer,
              seed=shuffle_seed),
      batched(images["val"], batch_size=data.batch_size),
      batched(images["test"], batch_size=data.batch_size),
      source.class_names, assignment, source, held_out, held_out_assignment,
      train_images=images["train"], shuffle_buffer=buffer, batch_size=data.batch_size)


def calibration_images(splits: Splits, count: int, seed: int,
                       image_size: int) -> list[np.ndarray]:
  """`count` un-augmented training images, a seeded random choice, in batches of 32.

  The int8 export calibrates on them, and the int8-grid rounding measures its
  bias correction on them (`model.round_kernels_to_int8_grid`).

  Only the chosen images are decoded (the shuffled train dataset would decode
  the whole split to fill its shuffle buffer).
  """
  keys = splits.keys(split_lib.SPLITS[0])
  if not keys or count < 1:
    return []
  order = np.random.default_rng(seed).permutation(len(keys))[:count]
  chosen = sorted(keys[i] for i in order)
  dataset = make_dataset(splits.source, chosen, image_size=image_size, batch_size=32,
                         cache="none")
  return [images for images, _ in dataset.as_numpy_iterator()]
