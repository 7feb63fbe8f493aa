"""The stratified re-split: bounds, coverage, disjointness, determinism."""

import os
import random

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from flowers import split as split_lib
from flowers.errors import UserError

FRACTIONS = (0.64, 0.16, 0.20)


def make_labels(sizes):
  keys, labels = [], []
  for label, size in enumerate(sizes):
    for i in range(size):
      keys.append(f"c{label:03d}_img{i:04d}.jpg")
      labels.append(label)
  return keys, labels


class StratifiedSplitTest(parameterized.TestCase):

  @parameterized.parameters(
      ((40, 41, 255, 3, 7, 100),),
      (tuple(range(3, 60)),),
      ((1, 2, 3, 4, 5),),
  )
  def test_per_class_counts_within_one_of_exact(self, sizes):
    keys, labels = make_labels(sizes)
    assignment = split_lib.stratified_split(keys, labels, FRACTIONS, seed=7)
    for label, size in enumerate(sizes):
      members = [k for k, l in zip(keys, labels) if l == label]
      for split, fraction in zip(split_lib.SPLITS, FRACTIONS):
        count = sum(assignment[k] == split for k in members)
        self.assertLessEqual(abs(count - size * fraction), 1.0,
                             f"class {label} ({size} images), {split}: {count}")

  def test_every_class_with_three_images_is_in_every_split(self):
    keys, labels = make_labels([3, 3, 4, 5, 6, 2, 1])
    assignment = split_lib.stratified_split(keys, labels, FRACTIONS, seed=1)
    for label in range(5):
      splits = {assignment[k] for k, l in zip(keys, labels) if l == label}
      self.assertEqual(splits, set(split_lib.SPLITS), f"class {label}")

  def test_each_key_in_exactly_one_split(self):
    keys, labels = make_labels([50, 60, 70])
    assignment = split_lib.stratified_split(keys, labels, FRACTIONS, seed=3)
    self.assertCountEqual(assignment.keys(), keys)
    self.assertTrue(set(assignment.values()) <= set(split_lib.SPLITS))

  def test_deterministic_and_independent_of_read_order(self):
    keys, labels = make_labels([30, 45, 12, 80])
    first = split_lib.stratified_split(keys, labels, FRACTIONS, seed=42)
    again = split_lib.stratified_split(keys, labels, FRACTIONS, seed=42)
    pairs = list(zip(keys, labels))
    random.Random(0).shuffle(pairs)
    shuffled = split_lib.stratified_split([k for k, _ in pairs], [l for _, l in pairs],
                                          FRACTIONS, seed=42)
    self.assertEqual(first, again)
    self.assertEqual(first, shuffled)

  def test_seed_changes_the_split(self):
    keys, labels = make_labels([30, 45, 12, 80])
    a = split_lib.stratified_split(keys, labels, FRACTIONS, seed=1)
    b = split_lib.stratified_split(keys, labels, FRACTIONS, seed=2)
    self.assertNotEqual(a, b)
    # Same sizes per class and split, only different members.
    self.assertEqual(sorted(a.values()), sorted(b.values()))

  def test_one_class_does_not_move_another(self):
    keys, labels = make_labels([30, 45])
    both = split_lib.stratified_split(keys, labels, FRACTIONS, seed=5)
    only_first = split_lib.stratified_split(keys[:30], labels[:30], FRACTIONS, seed=5)
    self.assertEqual({k: both[k] for k in keys[:30]}, only_first)

  def test_duplicate_keys_rejected(self):
    with self.assertRaises(UserError):
      split_lib.stratified_split(["a", "a", "b"], [0, 0, 1], FRACTIONS)


class ParseSplitTest(parameterized.TestCase):

  @parameterized.parameters(("64,16,20", (0.64, 0.16, 0.2)),
                            ("0.8,0.1,0.1", (0.8, 0.1, 0.1)),
                            ("70, 30, 0", (0.7, 0.3, 0.0)))
  def test_valid(self, text, fractions):
    spec = split_lib.parse_split(text, seed=3)
    np.testing.assert_allclose(spec.fractions, fractions)
    self.assertEqual(spec.seed, 3)

  def test_official(self):
    self.assertTrue(split_lib.parse_split("official").is_official)

  @parameterized.parameters("64,16", "a,b,c", "50,50,50", "0,50,50", "-10,60,50", "")
  def test_invalid_is_one_line_user_error(self, text):
    with self.assertRaises(UserError) as cm:
      split_lib.parse_split(text)
    self.assertNotIn("\n", str(cm.exception))
    self.assertIn("--split", str(cm.exception))


class ManifestTest(parameterized.TestCase):

  def test_round_trip_and_reuse(self):
    workdir = self.create_tempdir().full_path
    keys, labels = make_labels([10, 12, 9])
    spec = split_lib.parse_split("64,16,20", seed=42)
    first = split_lib.load_or_create(workdir, keys, labels, None, spec)
    path = os.path.join(workdir, split_lib.MANIFEST_NAME)
    with open(path) as f:
      self.assertEqual(f.readline().strip(), "file_name,label,split")
      self.assertLen(f.readlines(), len(keys))
    again = split_lib.load_or_create(workdir, keys, labels, None, spec)
    self.assertEqual(first, again)
    assignment, label_of = split_lib.read_manifest(path)
    self.assertEqual(assignment, first)
    self.assertEqual(label_of, dict(zip(keys, labels)))

  def test_mismatching_manifest_is_a_clear_error(self):
    workdir = self.create_tempdir().full_path
    keys, labels = make_labels([10, 12, 9])
    split_lib.load_or_create(workdir, keys, labels, None, split_lib.parse_split("64,16,20", 1))
    with self.assertRaisesRegex(UserError, "another --split"):
      split_lib.load_or_create(workdir, keys, labels, None,
                               split_lib.parse_split("64,16,20", 2))

  def test_official_split_needs_source_splits(self):
    keys, labels = make_labels([4, 4])
    with self.assertRaisesRegex(UserError, "official"):
      split_lib.assign(keys, labels, None, split_lib.parse_split("official"))
    source_splits = ["train", "validation", "test", "test"] * 2
    assignment = split_lib.assign(keys, labels, source_splits,
                                  split_lib.parse_split("official"))
    self.assertEqual([assignment[k] for k in keys], ["train", "val", "test", "test"] * 2)

  def test_summary(self):
    keys, labels = make_labels([10, 20])
    assignment = split_lib.stratified_split(keys, labels, FRACTIONS)
    summary = split_lib.summarize(assignment, dict(zip(keys, labels)), 2)
    self.assertEqual(sum(s.images for s in summary.values()), 30)
    self.assertEqual(summary["train"].classes, 2)
    self.assertEqual(summary["train"].largest_class, 13)

  def test_too_small_classes_rejected(self):
    with self.assertRaisesRegex(UserError, "too few"):
      split_lib.check_fractions_cover([0, 0, 0, 1, 1], split_lib.parse_split("64,16,20"))


  @parameterized.parameters("a.jpg,x,train", "a.jpg,1", "a.jpg,1,train,extra")
  def test_a_malformed_manifest_row_is_a_one_line_error(self, row):
    path = os.path.join(self.create_tempdir(), "splits.csv")
    with open(path, "w") as f:
      f.write("file_name,label,split\nb.jpg,0,val\n" + row + "\n")
    with self.assertRaisesRegex(UserError, "line 3 is not file_name,label,split") as error:
      split_lib.read_manifest(path)
    self.assertNotIn("\n", str(error.exception))


if __name__ == "__main__":
  absltest.main()
