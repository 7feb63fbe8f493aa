"""The backbone specs: the registry, the spec's numbers, its cut points on a real base."""

import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import shared_data
from flowers import backbone as backbone_lib
from flowers import model as model_lib
from flowers.errors import UserError

SPEC = backbone_lib.MOBILENET_V2
# The ends of MobileNetV2's 17 inverted-residual blocks: the `_add` of a block
# with a residual connection, else its `project_BN`.
BLOCK_ENDS = (["expanded_conv_project_BN", "block_1_project_BN", "block_2_add",
               "block_3_project_BN", "block_4_add", "block_5_add", "block_6_project_BN"]
              + [f"block_{i}_add" for i in (7, 8, 9)]
              + ["block_10_project_BN", "block_11_add", "block_12_add", "block_13_project_BN",
                 "block_14_add", "block_15_add", "block_16_project_BN"])


class RegistryTest(absltest.TestCase):

  def test_the_default_is_mobilenet_v2_and_every_spec_is_filed_by_its_name(self):
    self.assertIs(backbone_lib.get(backbone_lib.DEFAULT), SPEC)
    self.assertEqual(SPEC.name, "mobilenet_v2")
    for name, spec in backbone_lib.BACKBONES.items():
      self.assertEqual(spec.name, name)
      self.assertIs(backbone_lib.with_layer_name(spec.layer_name), spec)

  def test_an_unknown_name_is_a_one_line_error_listing_the_known_ones(self):
    with self.assertRaises(UserError) as cm:
      backbone_lib.get("resnet_50")
    message = str(cm.exception)
    self.assertIn("--backbone=resnet_50", message)
    self.assertIn("mobilenet_v2", message)
    self.assertNotIn("\n", message)

  def test_an_unknown_backbone_is_refused_before_a_model_is_built(self):
    with self.assertRaisesRegex(UserError, "--backbone=nope"):
      model_lib.build_model(3, image_size=32, weights=None, backbone="nope")

  def test_a_layer_name_of_no_backbone_finds_none(self):
    self.assertIsNone(backbone_lib.with_layer_name("classifier"))

  def test_the_module_imports_without_tensorflow(self):
    # flowers.config reads the choices and the size floor from it before TF loads.
    code = ("import flowers.backbone, sys; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                         text=True, timeout=120, check=False)
    self.assertEqual(out.returncode, 0, out.stderr)


class MobileNetV2SpecTest(parameterized.TestCase):

  def test_preprocessing_maps_uint8_to_minus_one_to_one(self):
    pixels = np.array([0, 255], np.float32)
    np.testing.assert_allclose(pixels * SPEC.scale + SPEC.offset, [-1.0, 1.0], atol=1e-6)

  def test_the_models_preprocessing_layer_is_the_specs(self):
    model = model_lib.build_model(3, image_size=32, weights=None, augment=False)
    preprocess = model.get_layer(model_lib.PREPROCESS_NAME)
    np.testing.assert_allclose(preprocess(np.array([[0.0, 255.0]], np.float32)),
                               [[-1.0, 1.0]], atol=1e-6)
    self.assertIs(model_lib.backbone_of(model), SPEC)
    self.assertEqual(model_lib.base_of(model).name, SPEC.layer_name)

  def test_the_input_size_floor(self):
    self.assertEqual(SPEC.min_image_size, 32)
    with self.assertRaisesRegex(UserError, "MobileNetV2 needs >= 32"):
      model_lib.load_base(SPEC.min_image_size - 1, None)

  @parameterized.parameters(
      (1.0, 224, os.path.basename(shared_data.WEIGHTS)),
      (0.35, 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"),
      # Keras has no weights of their own for other sizes: it loads the 224 px ones.
      (1.0, 32, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"))
  def test_the_weights_file_keras_caches(self, alpha, size, expected):
    self.assertEqual(SPEC.weights_file_name(alpha, size), expected)

  @parameterized.parameters(32, 64, 96)
  def test_cut_points_are_the_block_ends_and_the_models(self, size):
    base = model_lib.load_base(size, None)
    names = [layer.name for layer in base.layers]
    points = SPEC.cut_points(names)
    self.assertEqual(points, model_lib.cut_points(base))
    self.assertEqual(points[0], 0)
    self.assertEqual(points[-1], len(names) - 1)
    self.assertEqual([names[i] for i in points[1:-1]], BLOCK_ENDS)

  def test_the_int8_grid_layers_are_keras_layer_classes(self):
    import keras  # pylint: disable=g-import-not-at-top

    for kind in SPEC.int8_grid_layers:
      self.assertTrue(issubclass(getattr(keras.layers, kind), keras.layers.Layer), kind)


if __name__ == "__main__":
  absltest.main()
