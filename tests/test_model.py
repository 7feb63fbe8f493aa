"""build_model, unfreezing, cut points, determinism, save/load."""

import os
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import keras
import numpy as np
import pytest

import shared_data
from flowers import backbone as backbone_lib
from flowers import build_model
from flowers import evaluate as evaluate_lib
from flowers import model as model_lib
from flowers.errors import UserError

SIZE = 32


def tiny_model(num_classes=5, **kwargs):
  return build_model(num_classes, image_size=SIZE, weights=None, seed=0, **kwargs)


def images(n=4, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


class BuildModelTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tiny_model()

  def test_shapes_and_dtypes(self):
    self.assertEqual(self.model.input.dtype, "uint8")
    self.assertEqual(tuple(self.model.input.shape), (None, SIZE, SIZE, 3))
    out = self.model(images(), training=False)
    self.assertEqual(tuple(out.shape), (4, 5))
    self.assertEqual(out.dtype, "float32")
    np.testing.assert_allclose(np.sum(out, axis=1), 1.0, rtol=1e-5)

  def test_dropout_sits_before_the_softmax(self):
    names = [layer.name for layer in self.model.layers]
    self.assertEqual(names[-2:], [model_lib.DROPOUT_NAME, model_lib.CLASSIFIER_NAME])
    self.assertEqual(self.model.get_layer(model_lib.CLASSIFIER_NAME).get_config()["activation"],
                     "softmax")

  def test_base_frozen_and_head_trainable(self):
    trainable = {w.path.split("/")[0] for w in self.model.trainable_weights}
    self.assertEqual(trainable, {model_lib.CLASSIFIER_NAME})

  def test_inference_is_deterministic_and_augmentation_trains_only(self):
    x = images()
    a = self.model(x, training=False)
    b = self.model(x, training=False)
    np.testing.assert_array_equal(a, b)
    augmented = self.model.get_layer(model_lib.AUGMENT_NAME)(x.astype("float32"), training=True)
    self.assertFalse(np.allclose(augmented, x))
    plain = self.model.get_layer(model_lib.AUGMENT_NAME)(x.astype("float32"), training=False)
    np.testing.assert_allclose(plain, x)

  def test_inference_model_matches(self):
    inference = model_lib.inference_model(self.model)
    self.assertNotIn(model_lib.AUGMENT_NAME, [l.name for l in inference.layers])
    np.testing.assert_allclose(inference(images(), training=False),
                               self.model(images(), training=False), rtol=1e-5, atol=1e-6)

  def test_a_models_predictors_share_one_trace_and_see_weights_assigned_since(self):
    model = tiny_model()
    first = evaluate_lib.keras_predictor(model)
    before = first(images())
    np.testing.assert_allclose(before, model(images(), training=False), rtol=1e-5, atol=1e-6)
    head = model.get_layer(model_lib.CLASSIFIER_NAME)
    # In place, as rounding and the temperature change weights (the bias: a random
    # base's features are ~0 here).
    head.bias.assign(np.arange(head.bias.shape[0], dtype="float32"))
    second = evaluate_lib.keras_predictor(model)
    after = second(images())
    self.assertFalse(np.allclose(after, before))
    np.testing.assert_allclose(after, model(images(), training=False), rtol=1e-5, atol=1e-6)
    self.assertIs(second._infer, first._infer)
    self.assertEqual(second._infer.experimental_get_tracing_count(), 1)

  def test_save_load_round_trip(self):
    path = os.path.join(self.create_tempdir().full_path, "m.keras")
    self.model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(images(), training=False),
                               self.model(images(), training=False), rtol=1e-5, atol=1e-6)
    self.assertIs(model_lib.backbone_of(loaded), backbone_lib.MOBILENET_V2)

  def test_the_base_is_found_by_its_backbones_layer_name(self):
    self.assertIs(model_lib.backbone_of(self.model), backbone_lib.get(backbone_lib.DEFAULT))
    self.assertEqual(model_lib.base_of(self.model).name, model_lib.BASE_NAME)
    no_base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="classifier")])
    with self.assertRaisesRegex(ValueError, "no base of a known backbone"):
      model_lib.base_of(no_base)

  @pytest.mark.slow
  def test_usable_from_plain_keras(self):
    model = tiny_model(num_classes=3, augment=False)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(images(8), np.arange(8) % 3, epochs=1, verbose=0)
    self.assertIn("accuracy", history.history)

  def test_one_class_is_not_a_classifier(self):
    with self.assertRaisesRegex(UserError, "classes"):
      tiny_model(num_classes=1)

  def test_missing_weights_file(self):
    with self.assertRaisesRegex(UserError, "not a file"):
      build_model(3, image_size=SIZE, weights="/no/such/weights.h5")

  def test_damaged_weights_file_is_one_line_error(self):
    import h5py  # pylint: disable=g-import-not-at-top

    folder = self.create_tempdir().full_path
    whole = os.path.join(folder, "whole.h5")
    with h5py.File(whole, "w") as f:
      f.create_dataset("kernel", data=np.arange(50_000, dtype=np.float32))
    with open(whole, "rb") as f:
      head = f.read()
    truncated = os.path.join(folder, "truncated_no_top.h5")
    with open(truncated, "wb") as f:
      f.write(head[:len(head) // 2])
    not_hdf5 = os.path.join(folder, "page_no_top.h5")
    with open(not_hdf5, "w") as f:
      f.write("<html>Download quota exceeded</html>")
    for path in (truncated, not_hdf5):
      with self.assertRaises(UserError) as cm:
        model_lib.load_base(SIZE, path)
      message = str(cm.exception)
      self.assertIn(path, message)
      self.assertIn("again", message)
      self.assertNotIn("\n", message)

  def test_weights_of_another_shape_are_one_line_error(self):
    path = os.path.join(self.create_tempdir().full_path, "narrow.weights.h5")
    keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False,
                                   weights=None, alpha=0.35).save_weights(path)
    with self.assertRaises(UserError) as cm, warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Keras warns once per layer it cannot fill.
      model_lib.load_base(SIZE, path)
    self.assertIn(path, str(cm.exception))
    self.assertNotIn("\n", str(cm.exception))


class UnfreezeTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = tiny_model()
    cls.base = model_lib.base_of(cls.model)

  def setUp(self):
    super().setUp()
    # The model is shared (building it is slow): every test starts from a frozen
    # base, whatever an earlier (maybe failed) test left.
    model_lib.freeze_base(self.model)

  def trainable_layers(self):
    return [l for l in self.base.layers if l.trainable and l.weights]

  def test_batchnorm_never_trains(self):
    for ratio in (0.2, 0.5, 1.0):
      model_lib.unfreeze(self.model, ratio)
      self.assertNotEmpty(self.trainable_layers())
      for layer in self.base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
          self.assertFalse(layer.trainable, f"{layer.name} at ratio {ratio}")
    model_lib.freeze_base(self.model)

  def test_reference_ratio_unfreezes_block_13_on(self):
    model_lib.unfreeze(self.model, 0.2)
    names = {l.name for l in self.trainable_layers()}
    self.assertIn("block_13_expand", names)
    self.assertIn("Conv_1", names)
    self.assertNotIn("block_12_project", names)
    model_lib.freeze_base(self.model)

  def test_at_least_the_asked_fraction_trains(self):
    n = len(self.base.layers)
    for ratio in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
      cut = model_lib.cut_index(self.base, ratio)
      self.assertGreaterEqual(n - 1 - cut, int(np.ceil(ratio * n)) - 1, ratio)

  def test_zero_ratio_trains_nothing_in_the_base(self):
    model_lib.unfreeze(self.model, 0.0)
    self.assertEmpty(self.trainable_layers())
    model_lib.freeze_base(self.model)

  def test_compiled_trainable_weights_follow_unfreeze(self):
    model = tiny_model(num_classes=3)
    before = len(model.trainable_weights)
    model_lib.unfreeze(model, 0.2)
    after = len(model.trainable_weights)
    self.assertGreater(after, before)
    self.assertFalse(any("_bn" in w.path.lower() or "bn/" in w.path.lower()
                         for w in model.trainable_weights))

  def test_cut_points_split_the_base_exactly(self):
    x = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype("float32")
    full = self.base(x, training=False)
    points = model_lib.cut_points(self.base)
    self.assertGreater(len(points), 15)
    for cut in points[1:-1:3]:
      prefix = keras.Model(self.base.input, self.base.layers[cut].output)
      suffix = keras.Model(self.base.layers[cut].output, self.base.output)
      np.testing.assert_allclose(suffix(prefix(x)), full, rtol=1e-4, atol=1e-4,
                                 err_msg=self.base.layers[cut].name)

  def test_bad_ratio(self):
    with self.assertRaisesRegex(UserError, "unfreeze_ratio"):
      model_lib.cut_index(self.base, 1.5)


class Int8GridTest(absltest.TestCase):

  def conv_layers(self, model):
    return [l for l in model_lib.base_of(model).layers
            if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]

  def test_kernels_land_on_the_per_channel_grid(self):
    model = tiny_model()
    classifier_before = model.get_layer(model_lib.CLASSIFIER_NAME).kernel.numpy().copy()
    self.assertLen(model_lib.kernels_off_int8_grid(model), len(self.conv_layers(model)))
    changed = model_lib.round_kernels_to_int8_grid(model)
    self.assertEqual(changed, len(self.conv_layers(model)))  # Random init: all off-grid.
    self.assertEmpty(model_lib.kernels_off_int8_grid(model))
    for layer in self.conv_layers(model):
      kernel = layer.kernel.numpy()
      # One scale per output channel: the last axis ([h, w, in, out]), or
      # in * multiplier for a depthwise kernel.
      depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
      channels = kernel.reshape(kernel.shape[:2] + (1, -1)) if depthwise else kernel
      step = np.abs(channels).max(axis=(0, 1, 2)) / 127.0
      steps = channels / np.where(step > 0, step, 1.0)  # All-zero channels stay 0.
      np.testing.assert_allclose(steps, np.round(steps), atol=1e-3, err_msg=layer.name)
      self.assertLessEqual(np.abs(steps).max(), 127.0 + 1e-3)
    # Idempotent, and the classifier is left alone.
    self.assertEqual(model_lib.round_kernels_to_int8_grid(model), 0)
    np.testing.assert_array_equal(
        model.get_layer(model_lib.CLASSIFIER_NAME).kernel.numpy(), classifier_before)

  def test_bias_correction_keeps_each_channels_mean_output(self):
    # Bright images: a mean input far from 0, so rounding shifts the outputs.
    images = [np.random.default_rng(i).integers(96, 256, (8, SIZE, SIZE, 3), np.uint8)
              for i in range(2)]
    trained = tiny_model()

    def copy():
      model = tiny_model()
      model.set_weights(trained.get_weights())
      return model

    norms = [l for l in model_lib.base_of(trained).layers
             if isinstance(l, keras.layers.BatchNormalization)]

    def mean_outputs(model):
      """Per BatchNorm layer: its mean output per channel over `images`."""
      probe = keras.Model(model_lib.base_of(model).input,
                          [model_lib.base_of(model).get_layer(l.name).output for l in norms])
      preprocess = model.get_layer(model_lib.PREPROCESS_NAME)
      outputs = [probe(preprocess(b.astype(np.float32)), training=False) for b in images]
      return [np.mean([np.asarray(o[i]).mean(axis=(0, 1, 2)) for o in outputs], axis=0)
              for i in range(len(norms))]

    as_trained = mean_outputs(trained)
    errors = {}
    for name, calibration in (("rounded", ()), ("corrected", images)):
      model = copy()
      model_lib.round_kernels_to_int8_grid(model, calibration)
      self.assertEmpty(model_lib.kernels_off_int8_grid(model))  # Still on the grid.
      errors[name] = [np.abs(a - b).mean() for a, b in zip(mean_outputs(model), as_trained)]
    # The first conv sees the same input either way: corrected but for the
    # zero padding at the borders (measured 3.8e-4 -> 2.9e-5 at 32 px).
    self.assertGreater(errors["rounded"][0], 1e-4)
    self.assertLess(errors["corrected"][0], errors["rounded"][0] / 5)
    # Deeper ones see their inputs move with the rounding above them: closer.
    self.assertLess(np.mean(errors["corrected"]), np.mean(errors["rounded"]) / 2)

  def test_rounding_moves_each_weight_by_at_most_half_a_step(self):
    weights = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype(np.float32)
    rounded = model_lib.int8_grid(weights, channel_axis=3)
    step = np.abs(weights).max(axis=(0, 1, 2)) / 127.0
    self.assertTrue(np.all(np.abs(rounded - weights) <= step / 2 + 1e-7))
    self.assertFalse(np.array_equal(rounded, weights))


@pytest.mark.real_data
class RealWeightsTest(absltest.TestCase):

  def test_loads_imagenet_weights_by_path(self):
    model = build_model(102, weights=shared_data.WEIGHTS, image_size=96)
    random_init = build_model(102, weights=None, image_size=96)
    first = model_lib.base_of(model).layers[1].get_weights()[0]
    other = model_lib.base_of(random_init).layers[1].get_weights()[0]
    self.assertFalse(np.allclose(first, other))


if __name__ == "__main__":
  absltest.main()
