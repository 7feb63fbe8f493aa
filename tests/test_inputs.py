"""What a stage trains and validates on: plain pipeline, frozen-prefix cache, the choice.

No training here: tiny in-memory datasets, a stand-in for the prefix cache's
arrays and one 32 px model with random weights.
"""

import ast
import inspect
import os
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import run_configs
from flowers import data
from flowers import inputs
from flowers import model as model_lib
from flowers import prefix_cache
from flowers import runs
from flowers import train

NUM_CLASSES = 3
BATCH_SIZE = 4


def fake_splits(num_train: int = 10, num_val: int = 3, class_names=("a", "b", "c")):
  """A `data.Splits` of in-memory images: image i is all i, its label i mod 3."""
  def images(n):
    pixels = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 32, 32, 3))
    labels = np.arange(n, dtype=np.int64) % len(class_names)
    return tf.data.Dataset.from_tensor_slices((pixels, labels))

  assignment = {**{f"t{i}": "train" for i in range(num_train)},
                **{f"v{i}": "val" for i in range(num_val)}}
  source = types.SimpleNamespace(keys=list(assignment), labels=[0] * len(assignment))
  val = data.batched(images(num_val), batch_size=BATCH_SIZE)
  return data.Splits(
      data.batched(images(num_train), batch_size=BATCH_SIZE, shuffle_buffer=num_train),
      val, val, list(class_names), assignment, source, train_images=images(num_train),
      shuffle_buffer=num_train, batch_size=BATCH_SIZE)


def orders(dataset, epochs: int = 2) -> list[list[int]]:
  """The image order of each of `epochs` iterators of `dataset` (images as `fake_splits`')."""
  return [[int(x) for images, _ in dataset for x in images[:, 0, 0, 0]] for _ in range(epochs)]


class ModuleTest(absltest.TestCase):

  def test_inputs_does_not_import_the_training_loop(self):
    """`train` and `tune` import `inputs`, never the other way round."""
    tree = ast.parse(inspect.getsource(inputs))
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        imported.update(f"{node.module}.{a.name}" for a in node.names)
      elif isinstance(node, ast.Import):
        imported.update(a.name for a in node.names)
    self.assertNotEmpty(imported)
    self.assertEmpty({m for m in imported
                      if m.startswith(("flowers.train", "flowers.tune"))})


class PlainInputsTest(absltest.TestCase):

  def test_both_stages_fit_the_full_model_on_one_hot_batches(self):
    plain = inputs.PlainInputs(fake_splits(num_train=10), BATCH_SIZE)
    model = object()  # The plain path never looks into the model.
    first = plain.stage(model, 1, 0)
    self.assertIs(first.model, model)
    self.assertIs(first.full_model, model)
    self.assertEqual(first.steps, 3)  # ceil(10 / 4)
    self.assertIsInstance(first.train, inputs.CountedDataset)
    images, labels = next(iter(first.train))
    np.testing.assert_array_equal(labels.numpy(),
                                  np.eye(NUM_CLASSES)[images.numpy()[:, 0, 0, 0] % 3])
    _, val_labels = next(iter(first.val))
    self.assertEqual(val_labels.shape[-1], NUM_CLASSES)
    self.assertEqual(plain.num_train_images(), 10)

  def test_each_stage_draws_a_fresh_stream_of_its_seed(self):
    """Whatever read the data before (an earlier trial), a stage's orders are its seed's."""
    keras.utils.set_random_seed(0)  # As fit_stages sets it: tf.data combines the two seeds.
    plain = inputs.PlainInputs(fake_splits(num_train=10), BATCH_SIZE)
    first = plain.stage(object(), 1, 0)
    drawn = orders(first.train)
    self.assertEqual(first.train.iterators, 2)
    self.assertNotEqual(drawn[0], drawn[1])  # A new order each epoch.
    self.assertEqual(sorted(drawn[0]), list(range(10)))
    again = plain.stage(object(), 1, 0)
    self.assertIsNot(again.train, first.train)
    self.assertEqual(again.train.iterators, 0)
    self.assertEqual(orders(again.train), drawn)  # The same stream, from its start.
    self.assertNotEqual(orders(plain.stage(object(), 2, 0).train), drawn)  # Seed + 1.
    self.assertEqual(orders(plain.stage(object(), 2, 0).train),
                     orders(plain.stage(object(), 1, 1).train))
    # Skipping to where a killed run was goes on with its stream.
    resumed = plain.stage(object(), 1, 0).train
    resumed.skip_to(1)
    self.assertEqual(orders(resumed, 1), drawn[1:])

  def test_without_a_val_split_there_is_no_val_data(self):
    plain = inputs.PlainInputs(fake_splits(num_val=0), BATCH_SIZE)
    self.assertIsNone(plain.stage(object(), 1, 0).val)

  def test_steps_per_epoch_rounds_up_and_is_at_least_one(self):
    self.assertEqual([inputs.steps_per_epoch(n, 4) for n in (0, 1, 4, 5)], [1, 1, 1, 2])


class CachedInputsTest(absltest.TestCase):
  """`CachedInputs` on arrays shaped as a `PrefixCache`'s (no prefix pass)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = run_configs.tiny(alpha=0.35)
    cls.model = train.new_model(config, NUM_CLASSES)
    cls.base = model_lib.base_of(cls.model)
    cls.cut = model_lib.cut_index(cls.base, 0.2)

  def fake_cache(self, views: int = 2, num_train: int = 6, num_val: int = 2):
    activation = tuple(self.base.layers[self.cut].output.shape[1:])
    pooled = self.base.output.shape[-1]
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(
        cut=self.cut,
        train_labels=np.arange(num_train) % NUM_CLASSES,
        val_labels=np.arange(num_val) % NUM_CLASSES,
        train_views=rng.random((views, num_train) + activation).astype(np.float16),
        val=rng.random((num_val,) + activation).astype(np.float16),
        pooled=lambda: (rng.random((views, num_train, pooled)).astype(np.float32),
                        rng.random((num_val, pooled)).astype(np.float32)))

  def test_stage_1_trains_the_shared_head_on_pooled_features(self):
    cached = inputs.CachedInputs(self.fake_cache(), NUM_CLASSES, BATCH_SIZE)
    model_lib.freeze_base(self.model)
    stage = cached.stage(self.model, 1, seed=5)
    self.assertEqual(stage.model.name, "head")
    self.assertIs(stage.model.get_layer(model_lib.CLASSIFIER_NAME),
                  self.model.get_layer(model_lib.CLASSIFIER_NAME))
    self.assertIs(stage.full_model, self.model)
    self.assertIsInstance(stage.train, prefix_cache.ViewSampler)
    self.assertEqual(stage.train.seed, 5)
    self.assertEqual(stage.steps, 2)  # ceil(6 / 4)
    features, labels = stage.val
    self.assertEqual(features.shape, (2, self.base.output.shape[-1]))
    np.testing.assert_array_equal(labels, np.eye(NUM_CLASSES)[[0, 1]])
    self.assertEqual(cached.num_train_images(), 6)

  def test_stage_2_trains_the_top_on_activations_with_its_own_draws(self):
    cached = inputs.CachedInputs(self.fake_cache(), NUM_CLASSES, BATCH_SIZE)
    model_lib.unfreeze(self.model, 0.1)  # Above the cache's cut (for 0.2).
    stage = cached.stage(self.model, 2, seed=5)
    self.assertEqual(stage.model.name, "top")
    self.assertEqual(tuple(stage.model.input.shape[1:]),
                     tuple(self.base.layers[self.cut].output.shape[1:]))
    self.assertEqual(stage.model.output.shape[-1], NUM_CLASSES)
    self.assertEqual(stage.train.seed, 6)  # Not stage 1's view draws.
    self.assertEqual(stage.val[0].dtype, np.float32)

  def test_a_trainable_layer_below_the_cut_is_refused(self):
    cached = inputs.CachedInputs(self.fake_cache(), NUM_CLASSES, BATCH_SIZE)
    model_lib.unfreeze(self.model, 0.6)
    with self.assertRaisesRegex(ValueError, "lies below the cache's cut"):
      cached.stage(self.model, 2, seed=5)

  def test_without_val_images_there_is_no_val_data(self):
    cached = inputs.CachedInputs(self.fake_cache(num_val=0), NUM_CLASSES, BATCH_SIZE)
    model_lib.freeze_base(self.model)
    self.assertIsNone(cached.stage(self.model, 1, seed=0).val)


class ChoiceTest(parameterized.TestCase):

  @parameterized.parameters(("on", [], True), ("off", [], False), ("auto", [], True),
                            ("auto", ["GPU"], False), ("on", ["GPU"], True))
  def test_the_cache_is_used_when_asked_or_without_a_gpu(self, setting, gpus, expected):
    config = run_configs.tiny(feature_cache=setting).train
    with mock.patch.object(tf.config, "list_physical_devices", return_value=gpus):
      self.assertIs(inputs.uses_feature_cache(config), expected)

  def test_plain_inputs_build_no_cache(self):
    workdir = self.create_tempdir().full_path
    made = inputs.make_inputs(object(), fake_splits(), run_configs.tiny(feature_cache="off"),
                              workdir, largest_unfreeze_ratio=0.2)
    self.assertIsInstance(made, inputs.PlainInputs)
    self.assertEmpty(os.listdir(workdir))

  def test_cache_key_names_the_images_by_content_or_by_listing(self):
    config = run_configs.tiny()
    splits = fake_splits()
    key = inputs.cache_key(splits, config)
    self.assertEqual(set(key), {"recipe", "versions", "weights", "images"})
    self.assertEqual(key["weights"], "random")
    self.assertEqual(key["images"],
                     runs.listing_sha256(splits.source.keys, splits.source.labels))
    relabelled = fake_splits()
    relabelled.source.labels = [1] * len(relabelled.source.labels)
    self.assertNotEqual(inputs.cache_key(relabelled, config)["images"], key["images"])
    splits.source.content_sha256 = lambda: "digest of the image bytes"
    self.assertEqual(inputs.cache_key(splits, config)["images"], "digest of the image bytes")


if __name__ == "__main__":
  absltest.main()
