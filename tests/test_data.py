"""Sources and the tf.data pipeline, on mock TFDS data, image folders and real data."""

import os
import time

from absl.testing import absltest
import numpy as np
import tensorflow as tf

import fake_data
import shared_data
from flowers import data
from flowers import split as split_lib
from flowers.config import DataConfig
from flowers.errors import UserError

COUNTS = {"train": [4, 5, 6, 3], "validation": [3, 4, 2, 5], "test": [9, 8, 7, 6]}


class TfdsSourceTest(absltest.TestCase):

  def test_lists_all_splits_without_decoding(self):
    with fake_data.mock_flowers(COUNTS) as examples:
      source = data.load_tfds()
    self.assertLen(source.keys, sum(len(v) for v in examples.values()))
    self.assertEqual(source.num_classes, 102)  # Names come from TFDS's metadata.
    self.assertEqual(set(source.source_splits), set(data.TFDS_SPLITS))
    label_of = source.label_of()
    for split, rows in examples.items():
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

  def test_missing_data_dir_is_one_line_error(self):
    with self.assertRaisesRegex(UserError, "does not exist"):
      data.load_tfds(data_dir="/nonexistent/tfds")

  def test_pipeline_shapes_dtypes_and_determinism(self):
    with fake_data.mock_flowers(COUNTS, size=48):
      splits = data.load_splits(DataConfig(image_size=32, batch_size=4, seed=3),
                                workdir=self.create_tempdir().full_path)
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
      rebuilt = data.load_splits(DataConfig(image_size=32, batch_size=4, seed=3),
                                 workdir=self.create_tempdir().full_path)
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
      splits = data.load_splits(DataConfig(image_size=32, batch_size=8, cache="disk"),
                                workdir=workdir)
      n = sum(len(y) for _, y in splits.test.as_numpy_iterator())
    self.assertEqual(n, len(splits.keys("test")))
    self.assertNotEmpty([f for f in os.listdir(os.path.join(workdir, "cache"))
                         if f.startswith("test_32")])


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

  def test_pipeline_and_predict_see_the_same_pixels(self):
    """Training and evaluation (tf.data) and --mode=predict (Pillow) decode and
    resize every format to the same bytes, so predict answers as evaluated."""
    root = self.create_tempdir().full_path
    names = fake_data.write_image_dir(root, [4, 4, 4])
    odd = os.path.join(root, names[0], "odd.jpg")  # Non-square, upscaled on one side.
    with open(odd, "wb") as f:
      f.write(fake_data.encode(fake_data.class_image(0, 99, size=61)[:19]))
    source = data.load_image_dir(root)
    ds = data.make_dataset(source, source.keys, image_size=24, batch_size=None)
    pipeline = [image for image, _ in ds.as_numpy_iterator()]
    self.assertLen(pipeline, 13)
    for key, image in zip(source.keys, pipeline):
      with open(os.path.join(root, key), "rb") as f:
        predicted = data.resize(data.decode_with_pil(f.read()), 24).numpy()
      np.testing.assert_array_equal(image, predicted, err_msg=key)

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


@shared_data.requires_tfds
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

  def test_real_images_decode(self):
    source = data.load_tfds(data_dir=shared_data.TFDS_DIR, download=False)
    ds = data.make_dataset(source, source.keys[:8], image_size=224, batch_size=8)
    images, labels = next(iter(ds))
    self.assertEqual(images.shape, (8, 224, 224, 3))
    self.assertEqual(images.dtype, tf.uint8)
    self.assertGreater(float(tf.math.reduce_std(tf.cast(images, tf.float32))), 10.0)


if __name__ == "__main__":
  absltest.main()
