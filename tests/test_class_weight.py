"""--class_weight: balanced weights from the train split reach both stages, the
fingerprint, the flags, report.json and summary.md."""

import json
import os
import shutil
import tempfile
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import pytest
import tensorflow as tf

import fake_data
import run_configs
from flowers import cli
from flowers import config as config_lib
from flowers import inputs
from flowers import model as model_lib
from flowers import modes
from flowers import runs
from flowers import schemas
from flowers import split as split_lib
from flowers import summary
from flowers import train
from flowers.config import ClassWeight

NUM_CLASSES = 3
BATCH_SIZE = 4
TRAIN_LABELS = [0] * 6 + [1] * 2 + [2] * 4  # 12 images: weights 12 / (3 x count).
WEIGHTS = {0: 12 / 18, 1: 12 / 6, 2: 12 / 12}


def fake_splits(train_labels=TRAIN_LABELS, val_labels=(1, 1, 1, 0)):
  """What `class_weights` and `PlainInputs` read of `data.Splits` (32 px zeros)."""
  def dataset(labels):
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    return tf.data.Dataset.from_tensor_slices(
        (images, np.asarray(labels, np.int64))).batch(BATCH_SIZE)

  keys = [f"t{i}" for i in range(len(train_labels))] + [f"v{i}" for i in range(len(val_labels))]
  assignment = {k: "train" if k.startswith("t") else "val" for k in keys}
  return types.SimpleNamespace(
      train=dataset(train_labels), train_batches=lambda seed: dataset(train_labels),
      val=dataset(val_labels), class_names=["a", "b", "c"],
      keys=lambda split: [k for k in keys if assignment[k] == split],
      source=types.SimpleNamespace(keys=keys, labels=list(train_labels) + list(val_labels)))


class BalancedWeightsTest(absltest.TestCase):

  def test_balanced_weights_come_from_the_train_split_only(self):
    weights = inputs.class_weights(fake_splits(), ClassWeight.BALANCED)
    self.assertEqual(set(weights), {0, 1, 2})
    for c, expected in WEIGHTS.items():
      self.assertAlmostEqual(weights[c], expected)
    # Each class weighs the same in total, and the mean image weight is 1.
    totals = {c: weights[c] * TRAIN_LABELS.count(c) for c in weights}
    self.assertAlmostEqual(max(totals.values()), min(totals.values()))
    self.assertAlmostEqual(np.mean([weights[c] for c in TRAIN_LABELS]), 1.0)

  def test_none_weighs_nothing_and_a_class_without_train_images_gets_no_weight(self):
    self.assertIsNone(inputs.class_weights(fake_splits(), ClassWeight.NONE))
    self.assertEqual(inputs.balanced_class_weights([0, 0, 2]), {0: 0.75, 2: 1.5})

  def test_the_setting_is_a_choice_refused_in_one_line(self):
    self.assertIs(config_lib.TrainConfig(class_weight="BALANCED").class_weight,
                  ClassWeight.BALANCED)
    with self.assertRaisesRegex(Exception, r"^--class_weight=equal is not one of none, "
                                r"balanced\.$"):
      config_lib.TrainConfig(class_weight="equal")


def fake_cache(model: keras.Model, cut: int, labels=TRAIN_LABELS, num_val: int = 2):
  """Arrays shaped as a `PrefixCache`'s for `model` cut at `cut` (no prefix pass)."""
  base = model_lib.base_of(model)
  activation = tuple(base.layers[cut].output.shape[1:])
  rng = np.random.default_rng(0)
  views, n = 2, len(labels)
  return types.SimpleNamespace(
      cut=cut, train_labels=np.asarray(labels), val_labels=np.arange(num_val) % NUM_CLASSES,
      train_views=rng.random((views, n) + activation).astype(np.float16),
      val=rng.random((num_val,) + activation).astype(np.float16),
      pooled=lambda: (rng.random((views, n, base.output.shape[-1])).astype(np.float32),
                      rng.random((num_val, base.output.shape[-1])).astype(np.float32)))


class WeightsReachBothStagesTest(parameterized.TestCase):
  """`fit_stages` with Keras `fit` recorded, not run: what each stage fits on."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = run_configs.tiny(alpha=0.35, class_weight="balanced")

  def fit_calls(self, make_inputs):
    model = train.new_model(self.config, NUM_CLASSES)
    stage_inputs = make_inputs(model)
    with mock.patch.object(keras.Model, "fit", autospec=True) as fit:
      train.fit_stages(model, stage_inputs, self.config.train,
                       self.create_tempdir().full_path, seed=0)
    self.assertLen(fit.call_args_list, 2)  # The frozen stage, then the fine-tune stage.
    return model, fit.call_args_list

  def test_the_cached_path_gives_keras_the_weights_in_both_stages(self):
    def cached(model):
      cut = model_lib.cut_index(model_lib.base_of(model), self.config.train.unfreeze_ratio)
      return inputs.CachedInputs(fake_cache(model, cut), NUM_CLASSES, BATCH_SIZE, WEIGHTS)

    _, calls = self.fit_calls(cached)
    for call, name in zip(calls, ("head", "top")):
      self.assertEqual(call.args[0].name, name)
      self.assertEqual(call.kwargs["class_weight"], WEIGHTS)

  def test_the_plain_path_weighs_every_batch_of_both_stages(self):
    model, calls = self.fit_calls(
        lambda model: inputs.PlainInputs(fake_splits(), BATCH_SIZE, WEIGHTS))
    for call in calls:
      self.assertIs(call.args[0], model)
      self.assertIsNone(call.kwargs["class_weight"])  # The batches carry the weights.
      data = call.args[1]
      self.assertIsInstance(data, inputs.CountedDataset)
      for _, labels, weights in data:
        expected = [WEIGHTS[c] for c in labels.numpy().argmax(-1)]
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)

  def test_weighted_batches_train_as_keras_class_weight_does_and_count_their_draws(self):
    def fitted(data, class_weight=None):
      keras.utils.set_random_seed(1)
      model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                                keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES,
                                                                           "softmax")])
      model.compile("sgd", "categorical_crossentropy")
      return model.fit(data, epochs=2, verbose=0, class_weight=class_weight).history["loss"]

    weighted = inputs.PlainInputs(fake_splits(), BATCH_SIZE, WEIGHTS).train(0)
    plain = inputs.PlainInputs(fake_splits(), BATCH_SIZE).train(0)
    np.testing.assert_allclose(fitted(weighted), fitted(plain, WEIGHTS), rtol=1e-5)
    # Exact resume counts the pipeline's iterators; Keras's class_weight would hide them.
    self.assertGreater(weighted.iterators, 0)
    self.assertEqual(plain.iterators, 0)
    self.assertEqual(inputs.PlainInputs(fake_splits(), BATCH_SIZE, WEIGHTS).num_train_images(),
                     len(TRAIN_LABELS))


class FingerprintAndFlagsTest(absltest.TestCase):

  def fingerprint(self, config):
    source = types.SimpleNamespace(name="tfds:oxford_flowers102", keys=["a", "b"],
                                   labels=[0, 1])
    return runs.fingerprint(config, "train", source=source, splits_sha256="x",
                            feature_cache=True)

  def test_the_fingerprint_carries_the_setting(self):
    plain = run_configs.tiny()
    balanced = run_configs.with_train(plain, class_weight="balanced")
    self.assertEqual(runs.differences(self.fingerprint(plain), self.fingerprint(balanced)),
                     ["train.class_weight: none -> balanced"])

  def test_an_older_run_json_without_the_setting_weighed_nothing(self):
    upgraded = runs.upgrade({"train": {"seed": 1}})
    self.assertEqual(upgraded["train"]["class_weight"], "none")
    self.assertEqual(runs.upgrade({"train": {"class_weight": "balanced"}})["train"]
                     ["class_weight"], "balanced")

  def test_flags_cfg_records_the_setting(self):
    self.assertIn("--class_weight=balanced",
                  cli.as_flags(run_configs.tiny(class_weight="balanced")))
    self.assertIn("--class_weight=none", cli.as_flags(run_configs.tiny()))


@pytest.mark.slow
class ImbalancedFolderRunTest(absltest.TestCase):
  """One tiny run on an unequal image folder with --class_weight=balanced."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp(prefix="flowers_class_weight_")
    cls.addClassCleanup(shutil.rmtree, tmp, ignore_errors=True)
    image_dir = os.path.join(tmp, "images")
    fake_data.write_image_dir(image_dir, [20, 6, 10], size=40)
    cls.workdir = os.path.join(tmp, "run")
    config = run_configs.tiny(data={"image_dir": image_dir}, class_weight="balanced",
                              feature_cache="on", epochs=1, fine_tune_epochs=1,
                              int8_grid_weights=False, calibrate=False)
    cls.report = modes.train(config, cls.workdir)
    assignment, labels = split_lib.read_manifest(os.path.join(cls.workdir, "splits.csv"))
    cls.train_counts = np.bincount([labels[k] for k, s in assignment.items() if s == "train"],
                                   minlength=3)

  def test_the_report_has_the_weights_macro_f1_and_per_class_recall(self):
    with open(os.path.join(self.workdir, "report.json"), encoding="utf-8") as f:
      report = json.load(f)
    self.assertEqual(schemas.problems(report, schemas.TrainReport), [])
    names = report["class_names"]
    n, counts = self.train_counts.sum(), self.train_counts
    self.assertEqual(list(report["class_weights"]), names)
    for i, name in enumerate(names):
      self.assertAlmostEqual(report["class_weights"][name], n / (3 * counts[i]))
    self.assertGreater(report["class_weights"][names[1]], report["class_weights"][names[0]])
    self.assertBetween(report["test_macro_f1"], 0.0, 1.0)
    self.assertBetween(report["val_macro_f1"], 0.0, 1.0)
    self.assertEqual(set(report["per_class_accuracy"]), set(names))
    self.assertEqual(report["config"]["train"]["class_weight"], "balanced")

  def test_the_summary_shows_the_smallest_classes_first(self):
    text = open(summary.write_report(self.workdir), encoding="utf-8").read()
    section = text.split("## Smallest classes")[1].split("\n## ")[0]
    header, _, *rows = [line for line in section.splitlines() if line.startswith("|")]
    self.assertIn("| class weight |", header)
    order = [int(row.split("|")[1].split(":")[0]) for row in rows]
    self.assertEqual(order, list(np.argsort(self.train_counts, kind="stable")))


if __name__ == "__main__":
  absltest.main()
