"""Sources and the tf.data pipeline, on mock TFDS data, image folders and real data."""

import io
import os
import shutil
import time
from unittest import mock

from absl.testing import absltest
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import fake_data
import shared_data
from flowers import data
from flowers import split as split_lib
from flowers.config import DataConfig
from flowers.errors import UserError

COUNTS = {"train": [4, 5, 6, 3], "validation": [3, 4, 2, 5], "test": [9, 8, 7, 6]}


def pixels(dataset: tf.data.Dataset) -> np.ndarray:
  """All images of an (image, label) dataset, batched or not, in one array."""
  return np.concatenate([image.reshape((-1,) + image.shape[-3:])
                         for image, _ in dataset.as_numpy_iterator()])


def jpeg_variants() -> dict[str, bytes]:
  """JPEGs as cameras and TFDS store them: chroma 4:2:0, 4:2:2 and 4:4:4,
  progressive, grayscale, odd and non-square sizes."""
  rng = np.random.default_rng(0)
  variants = {}
  for h, w in [(40, 40), (19, 61), (33, 17), (100, 3)]:
    image = fake_data.class_image(1, h * w, size=max(h, w))[:h, :w].astype(np.int64)
    image = np.clip(image + rng.integers(-60, 60, image.shape), 0, 255).astype(np.uint8)
    for name, options in [("420", {}), ("444", {"subsampling": 0, "quality": 95}),
                          ("422", {"subsampling": 1, "quality": 50}),
                          ("progressive", {"progressive": True}), ("gray", {})]:
      buf = io.BytesIO()
      Image.fromarray(image[:, :, 0] if name == "gray" else image).save(
          buf, format="JPEG", **options)
      variants[f"{h}x{w}_{name}.jpg"] = buf.getvalue()
  return variants


def assert_pipeline_matches_predict(test, source, keys, image_size):
  """The tf.data pipeline's pixels for `keys` equal --mode=predict's, bit for bit."""
  encoded = dict((k.decode(), v) for k, v in source.encoded().as_numpy_iterator()
                 if k.decode() in set(keys))
  order = [k.decode() for k, _ in source.encoded().as_numpy_iterator()
           if k.decode() in encoded]
  ds = data.make_dataset(source, keys, image_size=image_size, batch_size=None, cache="none")
  pipeline = pixels(ds)
  test.assertLen(pipeline, len(keys))
  for key, image in zip(order, pipeline):
    predicted = data.resize(data.decode_with_pil(encoded[key]), image_size).numpy()
    np.testing.assert_array_equal(image, predicted, err_msg=key)


class TfdsSourceTest(absltest.TestCase):

  def test_lists_all_splits_without_decoding(self):
    with fake_data.mock_flowers(COUNTS) as examples:
      source = data.load_tfds()
    self.assertLen(source.keys, sum(len(v) for v in examples.values()))
    self.assertEqual(source.num_classes, 102)  # Names come from TFDS's metadata.
    self.assertEqual(set(source.source_splits), set(data.TFDS_SPLITS))
    self.assertEqual(list(dict.fromkeys(source.source_splits)), list(data.TFDS_SPLITS))
    self.assertEqual(source.skipped, {})
    label_of = source.label_of()
    for rows in examples.values():
      for name, label, _ in rows:
        self.assertEqual(label_of[name], label)

  def test_split_is_stratified_and_independent_of_read_order(self):
    assignments = []
    for order_seed in (None, 1, 2):
      with fake_data.mock_flowers(COUNTS, shuffle_seed=order_seed):
        source = data.load_tfds()
        assignments.append(data.prepare_split(
            source, None, split_lib.parse_split("64,16,20", seed=9)))
    self.assertEqual(assignments[0], assignments[1])
    self.assertEqual(assignments[0], assignments[2])
    totals = np.sum([COUNTS[s] for s in COUNTS], axis=0)
    label_of = source.label_of()
    for label, total in enumerate(totals):
      for split, fraction in zip(split_lib.SPLITS, (0.64, 0.16, 0.2)):
        count = sum(1 for k, s in assignments[0].items() if s == split and label_of[k] == label)
        self.assertLessEqual(abs(count - total * fraction), 1.0)

  def test_official_split_keeps_tfds_splits(self):
    with fake_data.mock_flowers(COUNTS) as examples:
      source = data.load_tfds()
      assignment = data.prepare_split(source, None, split_lib.parse_split("official"))
    self.assertLen(split_lib.keys_of(assignment, "val"), len(examples["validation"]))
    self.assertLen(split_lib.keys_of(assignment, "test"), len(examples["test"]))

  def test_dataset_without_validation_split_lists_and_splits(self):
    counts = {"train": [6, 7, 8], "test": [5, 4, 6]}
    with fake_data.mock_flowers(counts) as examples:
      source = data.load_tfds()
      splits = data.load_splits(DataConfig(image_size=32, batch_size=4), source=source,
                                workdir=self.create_tempdir().full_path)
      val = pixels(splits.val)
      with self.assertRaises(UserError) as cm:
        data.prepare_split(source, None, split_lib.parse_split("official"))
    self.assertEqual(list(dict.fromkeys(source.source_splits)), ["train", "test"])
    self.assertLen(source.keys, sum(len(rows) for rows in examples.values()))
    self.assertLen(splits.assignment, len(source.keys))
    self.assertLen(val, len(splits.keys("val")))
    self.assertGreater(len(val), 0)
    self.assertIn("validation", str(cm.exception))
    self.assertNotIn("\n", str(cm.exception))

  def test_other_split_names_are_listed_after_the_usual_ones(self):
    counts = {"extra": [2, 2], "test": [3, 3], "train": [4, 4]}
    with fake_data.mock_flowers(counts):
      source = data.load_tfds()
      keys = [k for k, _ in source.encoded().as_numpy_iterator()]
    self.assertEqual(list(dict.fromkeys(source.source_splits)), ["train", "test", "extra"])
    self.assertEqual([k.decode() for k in keys], source.keys)

  def test_content_sha256_is_what_the_images_are(self):
    with fake_data.mock_flowers(COUNTS):
      source = data.load_tfds()
      digest = source.content_sha256()
    with fake_data.mock_flowers(COUNTS, shuffle_seed=3):
      shuffled = data.load_tfds().content_sha256()
    other_counts = dict(COUNTS, test=[9, 8, 7, 7])
    with fake_data.mock_flowers(other_counts):
      other = data.load_tfds().content_sha256()
    self.assertRegex(digest, "^[0-9a-f]{64}$")
    self.assertEqual(digest, source.content_sha256())
    self.assertEqual(digest, shuffled)  # The read order does not matter.
    self.assertNotEqual(digest, other)

  def test_missing_data_dir_is_one_line_error(self):
    with self.assertRaisesRegex(UserError, "does not exist"):
      data.load_tfds(data_dir="/nonexistent/tfds")

  def test_pipeline_shapes_dtypes_and_determinism(self):
    with fake_data.mock_flowers(COUNTS, size=48):
      splits = data.load_splits(DataConfig(image_size=32, batch_size=4, split_seed=3),
                                workdir=self.create_tempdir().full_path, shuffle_seed=3)
      batches = list(splits.train.as_numpy_iterator())
      again = list(splits.train.as_numpy_iterator())
      val_labels = np.concatenate([y for _, y in splits.val.as_numpy_iterator()])
    images, labels = batches[0]
    self.assertEqual(images.dtype, np.uint8)
    self.assertEqual(images.shape, (4, 32, 32, 3))
    self.assertEqual(labels.dtype, np.int32)
    self.assertEqual(sum(len(y) for _, y in batches), len(splits.keys("train")))
    # Reshuffled each epoch, same images; the same seed gives the same order.
    first = np.concatenate([y for _, y in batches])
    second = np.concatenate([y for _, y in again])
    self.assertCountEqual(first.tolist(), second.tolist())
    images_first = np.concatenate([x for x, _ in batches])
    images_second = np.concatenate([x for x, _ in again])
    self.assertFalse(np.array_equal(images_first, images_second))
    with fake_data.mock_flowers(COUNTS, size=48):
      rebuilt = data.load_splits(DataConfig(image_size=32, batch_size=4, split_seed=3),
                                 workdir=self.create_tempdir().full_path, shuffle_seed=3)
      rebuilt_first = np.concatenate([x for x, _ in rebuilt.train.as_numpy_iterator()])
    np.testing.assert_array_equal(rebuilt_first, images_first)
    self.assertLen(val_labels, len(splits.keys("val")))

  def test_shuffle_is_seeded(self):
    def first_epoch(seed):
      with fake_data.mock_flowers(COUNTS):
        source = data.load_tfds()
        ds = data.make_dataset(source, source.keys, image_size=16, batch_size=None,
                               shuffle=True, seed=seed)
        return [int(y) for _, y in ds.as_numpy_iterator()]
    self.assertEqual(first_epoch(5), first_epoch(5))
    self.assertNotEqual(first_epoch(5), first_epoch(6))

  def test_disk_cache(self):
    workdir = self.create_tempdir().full_path
    with fake_data.mock_flowers(COUNTS):
      splits = data.load_splits(DataConfig(image_size=32, batch_size=8, pixel_cache="disk"),
                                workdir=workdir)
      n = sum(len(y) for _, y in splits.test.as_numpy_iterator())
    self.assertEqual(n, len(splits.keys("test")))
    self.assertNotEmpty([f for f in os.listdir(os.path.join(workdir, "cache"))
                         if f.startswith("test_32")])

  def test_disk_cache_is_rebuilt_when_the_preprocessing_changes(self):
    workdir = self.create_tempdir().full_path
    cache_dir = os.path.join(workdir, "cache")
    config = DataConfig(image_size=32, batch_size=4, pixel_cache="disk")
    resize = data.resize
    with fake_data.mock_flowers(COUNTS):
      before = pixels(data.load_splits(config, workdir=workdir).test)
      stale = {f for f in os.listdir(cache_dir) if f.startswith("test_")}
      again = pixels(data.load_splits(config, workdir=workdir).test)
      reused = {f for f in os.listdir(cache_dir) if f.startswith("test_")}
      with mock.patch.object(data, "PREPROCESSING", "another recipe"), \
           mock.patch.object(data, "resize", lambda images, size: 255 - resize(images, size)):
        after = pixels(data.load_splits(config, workdir=workdir).test)
    np.testing.assert_array_equal(again, before)
    self.assertEqual(reused, stale)  # The same recipe reads the same cache.
    np.testing.assert_array_equal(after, 255 - before)
    fresh = {f for f in os.listdir(cache_dir) if f.startswith("test_")}
    self.assertTrue(any(f.endswith(".index") for f in fresh))
    self.assertEmpty(fresh & stale)  # The stale cache of the split is gone.


class DecodeTest(absltest.TestCase):

  def test_pipeline_and_predict_see_the_same_pixels(self):
    """A TFDS source's pipeline (TensorFlow's JPEG decoder) and --mode=predict
    (Pillow) decode and resize JPEGs to the same bytes, so predict answers as
    evaluated."""
    variants = jpeg_variants()
    keys = sorted(variants)
    source = data.Source(
        "tfds:generated", keys, [0] * len(keys), ["a", "b"], None,
        lambda: tf.data.Dataset.from_tensor_slices(
            (tf.constant(keys), tf.constant([variants[k] for k in keys]))))
    self.assertEqual(source.decoder, "tf")
    for size in (24, 32):
      assert_pipeline_matches_predict(self, source, keys, size)
    with fake_data.mock_flowers(COUNTS, size=45):
      source = data.load_tfds()
      assert_pipeline_matches_predict(self, source, source.keys[::3], 32)

  def test_16bit_png_is_scaled_not_clipped(self):
    values = np.array([[0, 128, 129, 257, 1000], [32767, 32896, 40000, 65534, 65535]],
                      np.uint16)
    path = os.path.join(self.create_tempdir().full_path, "deep.png")
    fake_data.write_gray16_png(path, values)
    with open(path, "rb") as f:
      image = data.decode_with_pil(f.read())
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    self.assertEqual(image.dtype, np.uint8)
    self.assertEqual(image.shape, values.shape + (3,))
    for channel in range(3):
      np.testing.assert_array_equal(image[:, :, channel], expected)

  def test_16bit_png_in_an_image_folder_trains_on_scaled_pixels(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [3, 3])
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    fake_data.write_gray16_png(os.path.join(root, "class_00", "deep.png"), ramp)
    source = data.load_image_dir(root)
    ds = data.make_dataset(source, ["class_00/deep.png"], image_size=16, batch_size=None)
    (image,) = pixels(ds)
    np.testing.assert_array_equal(image[0, :, 0], np.linspace(0, 255, 16).round())

  def test_8bit_images_decode_as_pillow_converts_them(self):
    image = fake_data.class_image(2, 3, size=20)
    cases = [("JPEG", None), ("PNG", None), ("BMP", None), ("GIF", None), ("PNG", "RGBA"),
             ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "LA"), ("PNG", "1")]
    for fmt, mode in cases:
      encoded = fake_data.encode(image, fmt, mode)
      with Image.open(io.BytesIO(encoded)) as im:
        expected = np.asarray(im.convert("RGB"))
      np.testing.assert_array_equal(data.decode_with_pil(encoded), expected,
                                    err_msg=f"{fmt} {mode}")


class ImageDirTest(absltest.TestCase):

  def test_mixed_formats_become_rgb(self):
    root = self.create_tempdir().full_path
    names = fake_data.write_image_dir(root, [7, 7, 7])
    source = data.load_image_dir(root)
    self.assertEqual(source.class_names, names)
    self.assertLen(source.keys, 21)
    extensions = {os.path.splitext(k)[1] for k in source.keys}
    self.assertEqual(extensions, {".jpg", ".png", ".bmp", ".gif"})
    ds = data.make_dataset(source, source.keys, image_size=24, batch_size=None)
    images = [(x, y) for x, y in ds.as_numpy_iterator()]
    self.assertLen(images, 21)
    for image, _ in images:
      self.assertEqual(image.shape, (24, 24, 3))
      self.assertEqual(image.dtype, np.uint8)

  def test_every_file_is_used_or_counted_and_named(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [3, 3])
    image = fake_data.class_image(0, 7)
    extras = {"class_00/scan.tif": "TIFF", "class_00/PHOTO.WEBP": "WEBP",
              "class_01/pic.jpe": "JPEG", "class_01/deep/nested.JPG": "JPEG",
              "class_01/no_extension": "PNG"}
    for key, fmt in extras.items():
      os.makedirs(os.path.dirname(os.path.join(root, key)), exist_ok=True)
      with open(os.path.join(root, key), "wb") as f:
        f.write(fake_data.encode(image, fmt))
    for key, text in {"class_00/notes.txt": b"not a picture", "README.md": b"# data",
                      "class_01/.DS_Store": b"\0\0\0\1Bud1"}.items():
      with open(os.path.join(root, key), "wb") as f:
        f.write(text)
    fake_data.write_raw(root, b"class_01/caf\xe9.jpg", fake_data.encode(image))
    with self.assertLogs(level="WARNING") as logs:
      source = data.load_image_dir(root)
    for key in extras:
      self.assertIn(key, source.keys)
    self.assertLen(source.keys, 6 + len(extras))
    self.assertEqual(sorted(source.skipped), sorted(
        ["class_00/notes.txt", "README.md", "class_01/.DS_Store", "class_01/caf\\xe9.jpg"]))
    self.assertEqual(source.skipped["class_00/notes.txt"], "not an image")
    self.assertEqual(source.skipped["README.md"], "not in a class subfolder")
    self.assertIn("UTF-8", source.skipped["class_01/caf\\xe9.jpg"])
    self.assertIn("hidden", source.skipped["class_01/.DS_Store"])
    for key in source.skipped:
      self.assertTrue(any(key in line for line in logs.output), key)
    self.assertTrue(any("Skipped 4 file(s)" in line for line in logs.output))
    # The new formats decode, and the whole folder trains and writes its split.
    ds = data.make_dataset(source, source.keys, image_size=16, batch_size=None)
    self.assertLen(pixels(ds), len(source.keys))
    workdir = self.create_tempdir().full_path
    splits = data.load_splits(DataConfig(image_dir=root, image_size=32, split="50,25,25"),
                              workdir=workdir)
    self.assertLen(splits.assignment, len(source.keys))

  def test_strict_refuses_skipped_files_but_not_hidden_ones(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [3, 3])
    with open(os.path.join(root, "class_00", ".DS_Store"), "wb") as f:
      f.write(b"\0\0\0\1Bud1")
    self.assertLen(data.load_image_dir(root, strict=True).keys, 6)
    for name in ("b_notes.txt", "a_notes.txt"):
      with open(os.path.join(root, "class_01", name), "w") as f:
        f.write("not a picture")
    with self.assertRaises(UserError) as cm:
      data.load_image_dir(root, strict=True)
    message = str(cm.exception)
    self.assertIn(os.path.join(root, "class_01", "a_notes.txt"), message)
    self.assertIn("2 skipped", message)
    self.assertNotIn("\n", message)

  def test_non_utf8_file_name_is_skipped_and_counted(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [3, 3])
    fake_data.write_raw(root, b"class_00/\xff\xfe.jpg", fake_data.encode(
        fake_data.class_image(0, 1)))
    source = data.load_image_dir(root)
    self.assertLen(source.keys, 6)
    self.assertEqual(list(source.skipped), ["class_00/\\xff\\xfe.jpg"])
    self.assertIn("rename", source.skipped["class_00/\\xff\\xfe.jpg"])
    workdir = self.create_tempdir().full_path
    splits = data.load_splits(DataConfig(image_dir=root, image_size=32, split="34,33,33"),
                              workdir=workdir)
    self.assertLen(pixels(splits.test), len(splits.keys("test")))
    with open(os.path.join(workdir, "splits.csv"), encoding="utf-8") as f:
      self.assertLen(f.read().splitlines(), 7)
    with self.assertRaisesRegex(UserError, "UTF-8"):
      data.load_image_dir(root, strict=True)

  def test_content_sha256_is_independent_of_where_the_folder_is(self):
    root = os.path.join(self.create_tempdir().full_path, "a")
    fake_data.write_image_dir(root, [3, 3])
    moved = os.path.join(self.create_tempdir().full_path, "b")
    shutil.copytree(root, moved)
    digest = data.load_image_dir(root).content_sha256()
    self.assertEqual(data.load_image_dir(moved).content_sha256(), digest)
    with open(os.path.join(moved, "class_00", "img_000.bmp"), "wb") as f:
      f.write(fake_data.encode(fake_data.class_image(0, 5, size=64), "BMP"))
    self.assertNotEqual(data.load_image_dir(moved).content_sha256(), digest)

  def test_disk_cache_is_rebuilt_when_an_image_changes(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [4, 4])
    workdir = self.create_tempdir().full_path
    config = DataConfig(image_dir=root, image_size=32, batch_size=4, pixel_cache="disk",
                        split="50,25,25")
    before = pixels(data.load_splits(config, workdir=workdir).test)
    splits = data.load_splits(config, workdir=workdir)
    key = splits.keys("test")[0]
    changed = fake_data.encode(fake_data.class_image(1, 77, size=64))
    with open(os.path.join(root, key), "wb") as f:
      f.write(changed)
    after = pixels(data.load_splits(config, workdir=workdir).test)
    np.testing.assert_array_equal(after[0], data.resize(data.decode_with_pil(changed), 32))
    self.assertFalse(np.array_equal(after[0], before[0]))
    np.testing.assert_array_equal(after[1:], before[1:])

  def test_corrupt_file_skipped_with_warning_or_strict_error(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [4, 4])
    bad = os.path.join(root, "class_01", "broken.jpg")
    with open(bad, "wb") as f:
      f.write(b"\xff\xd8 this is not really a jpeg")
    with self.assertLogs(level="WARNING") as logs:
      source = data.load_image_dir(root)
    self.assertLen(source.keys, 8)
    self.assertTrue(any(bad in line for line in logs.output))
    with self.assertRaises(UserError) as cm:
      data.load_image_dir(root, strict=True)
    self.assertIn(bad, str(cm.exception))
    self.assertNotIn("\n", str(cm.exception))

  def test_truncated_image_is_skipped_at_decode_time(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [3, 3])
    source = data.load_image_dir(root)
    path = os.path.join(root, source.keys[0])
    with open(path, "rb") as f:
      head = f.read()
    source.keys.append("class_00/truncated.jpg")
    source.labels.append(0)
    with open(os.path.join(root, "class_00", "truncated.jpg"), "wb") as f:
      f.write(head[:30])
    ds = data.make_dataset(source, source.keys, image_size=16, batch_size=None)
    self.assertLen(list(ds.as_numpy_iterator()), 6)

  def test_bad_folders_are_one_line_errors(self):
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(UserError, "no class subfolders"):
      data.load_image_dir(empty)
    os.makedirs(os.path.join(empty, "a"))
    os.makedirs(os.path.join(empty, "b"))
    with self.assertRaisesRegex(UserError, "no images"):
      data.load_image_dir(empty)
    with self.assertRaisesRegex(UserError, "not a folder"):
      data.load_image_dir(os.path.join(empty, "missing"))

  def test_class_with_too_few_images(self):
    root = self.create_tempdir().full_path
    fake_data.write_image_dir(root, [6, 2])
    source = data.load_image_dir(root)
    with self.assertRaisesRegex(UserError, "too few"):
      data.prepare_split(source, None, split_lib.parse_split("64,16,20"))


@pytest.mark.slow
@pytest.mark.real_data
class RealDataTest(absltest.TestCase):

  def test_prepare_split_on_real_data(self):
    start = time.time()
    source = data.load_tfds(data_dir=shared_data.TFDS_DIR, download=False)
    workdir = self.create_tempdir().full_path
    assignment = data.prepare_split(source, workdir, split_lib.parse_split("64,16,20", 42))
    self.assertLess(time.time() - start, 60)
    self.assertLen(assignment, 8189)
    self.assertEqual(source.num_classes, 102)
    assignment_csv, labels = split_lib.read_manifest(os.path.join(workdir, "splits.csv"))
    self.assertLen(assignment_csv, 8189)
    self.assertLen(set(labels.values()), 102)
    summary = split_lib.summarize(assignment, source.label_of(), 102)
    for name in split_lib.SPLITS:
      self.assertEqual(summary[name].classes, 102)
    self.assertEqual(sum(s.images for s in summary.values()), 8189)

  def test_pipeline_and_predict_see_the_same_pixels_on_real_images(self):
    source = data.load_tfds(data_dir=shared_data.TFDS_DIR, download=False)
    # The first images of each official split (train, validation, test).
    firsts = [source.source_splits.index(s) for s in data.TFDS_SPLITS]
    keys = [source.keys[i + j] for i in firsts for j in range(8)]
    assert_pipeline_matches_predict(self, source, keys, 224)

  def test_real_images_decode(self):
    source = data.load_tfds(data_dir=shared_data.TFDS_DIR, download=False)
    ds = data.make_dataset(source, source.keys[:8], image_size=224, batch_size=8)
    images, labels = next(iter(ds))
    self.assertEqual(images.shape, (8, 224, 224, 3))
    self.assertEqual(images.dtype, tf.uint8)
    self.assertGreater(float(tf.math.reduce_std(tf.cast(images, tf.float32))), 10.0)


if __name__ == "__main__":
  absltest.main()
