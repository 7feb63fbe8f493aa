"""RandomGeometry: Keras's four geometric layers, drawn alike, resampled once."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from flowers import augment
from flowers import model as model_lib
from flowers.config import Augmentation

SIZE = 48
# RandomGeometry(rotation=20, zoom=0.2, translation=0.2, seed=6).sample_matrices
# twice on [3, 40, 56, 3], as recorded from the layer before the random resized
# crop was added: crop-free settings must keep drawing exactly these.
GOLDEN_MATRICES = np.array([
    [-1.134506, -0.154592, 57.7714, -0.154592, 1.134506, -3.789608, 0, 0],
    [-1.036651, 0.226811, 58.31319, 0.226811, 1.036651, -16.339168, 0, 0],
    [0.85436, 0.259192, -8.131912, -0.259192, 0.85436, 16.319313, 0, 0],
    [-0.809871, -0.081544, 45.432201, -0.081544, 0.809871, 7.234452, 0, 0],
    [1.17132, -0.233779, 5.000462, 0.233779, 1.17132, -9.321045, 0, 0],
    [-1.060725, -0.066934, 51.938866, -0.066934, 1.060725, -5.893616, 0, 0],
], np.float32)


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
  """Low-frequency colour images (bilinear resampling barely changes them)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  images = []
  for _ in range(count):
    channels = [127.5 + 120 * np.sin(2 * np.pi * (rng.uniform(0.3, 1) * x + rng.uniform(0.3, 1)
                                                  * y) + rng.uniform(0, 6)) for _ in range(3)]
    images.append(np.stack(channels, -1))
  return np.asarray(images, np.float32)


def apply(images, matrices):
  return np.asarray(keras.ops.image.affine_transform(
      images, matrices, interpolation="bilinear", fill_mode="reflect"))


class ComposeTest(parameterized.TestCase):

  def test_flip_alone_mirrors_exactly(self):
    images = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    matrices = augment.compose_transforms(
        flipped=np.array([True, False]), degrees=np.zeros(2, np.float32),
        scale=np.ones(2, np.float32), shift_x=np.zeros(2, np.float32),
        shift_y=np.zeros(2, np.float32), height=SIZE, width=SIZE)
    out = apply(images, matrices)
    np.testing.assert_allclose(out[0], images[0, :, ::-1], atol=1e-3)
    np.testing.assert_allclose(out[1], images[1], atol=1e-3)

  @parameterized.parameters(0, 1, 2, 3)
  def test_one_resampling_equals_kerass_chain_of_four(self, seed):
    """Keras's layers draw the transforms; RandomGeometry's matrix applies them at once."""
    images = smooth_images(4, seed)
    a = Augmentation(rotation=20.0, zoom=0.2, translation=0.2, contrast=0.0)
    flip, rotate, zoom, shift = augment.chained_augmentation_layers(a, seed=seed)
    draws = [layer.get_random_transformation(images, training=True)
             for layer in (flip, rotate, zoom, shift)]
    chained = images
    for layer, drawn in zip((flip, rotate, zoom, shift), draws):
      chained = layer.transform_images(chained, drawn, training=True)
    chained = np.asarray(chained)
    translations = np.asarray(draws[3]["translations"])
    matrices = augment.compose_transforms(
        flipped=np.asarray(draws[0]["flips"]).reshape(-1),
        degrees=np.asarray(draws[1]["angle"]),
        scale=np.asarray(draws[2]["height_zoom"]).reshape(-1),
        shift_x=translations[:, 0], shift_y=translations[:, 1], height=SIZE, width=SIZE)
    once = apply(images, matrices)
    # Where no step of the chain reads outside the image (reflection differs
    # between the two), they sample the same points: only interpolation differs.
    inside = self.read_inside_in_every_step(draws, len(images))
    self.assertGreater(inside.mean(), 0.25)
    diff = np.abs(once - chained)[inside]
    self.assertLess(diff.mean(), 0.5)  # Measured 0.16-0.27; a wrong sign or axis: 20-40.
    self.assertLess(np.percentile(diff, 99), 2.0)
    # And the whole image, borders included, stays close.
    self.assertLess(np.abs(once - chained).mean(), 12.0)

  def read_inside_in_every_step(self, draws, count):
    """[count, SIZE, SIZE, 3]: output pixels whose every intermediate read is in the image."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    translations = np.asarray(draws[3]["translations"])
    zooms = np.asarray(draws[2]["height_zoom"])[:, 0]
    rotations = np.asarray(draws[1]["rotation_matrix"])
    centre = (SIZE - 1) / 2
    mask = np.ones((count, SIZE, SIZE), bool)
    for i in range(count):
      # Where the shift layer reads its input, then the zoom layer, then the
      # rotation (the flip reads inside whatever it is given).
      px, py = x - translations[i, 0], y - translations[i, 1]
      reads = [(px, py)]
      px, py = zooms[i] * px + centre * (1 - zooms[i]), zooms[i] * py + centre * (1 - zooms[i])
      reads.append((px, py))
      m = rotations[i]
      reads.append((m[0] * px + m[1] * py + m[2], m[3] * px + m[4] * py + m[5]))
      for px, py in reads:
        mask[i] &= (px >= 0) & (px <= SIZE - 1) & (py >= 0) & (py <= SIZE - 1)
    return np.repeat(mask[..., None], 3, axis=-1)


class RandomGeometryTest(parameterized.TestCase):

  def test_draws_follow_the_configured_ranges(self):
    layer = augment.RandomGeometry(flip=True, rotation=20, zoom=0.2, translation=0.1, seed=3)
    matrices = np.asarray(layer.sample_matrices((4000, SIZE, SIZE, 3)))
    a0, a1, b0, b1 = matrices[:, 0], matrices[:, 1], matrices[:, 3], matrices[:, 4]
    # F R Z: [[s*f*cos, -s*f*sin], [s*sin, s*cos]] with f = -1 when flipped.
    scale = np.hypot(b0, b1)
    degrees = np.degrees(np.arctan2(b0, b1))
    flipped = np.sign(a0 * b1 - a1 * b0) < 0
    self.assertBetween(scale.min(), 0.8 - 1e-4, 0.82)
    self.assertBetween(scale.max(), 1.18, 1.2 + 1e-4)
    self.assertBetween(np.abs(degrees).max(), 19.5, 20.0 + 1e-3)
    self.assertBetween(flipped.mean(), 0.45, 0.55)
    self.assertBetween(np.abs(degrees).mean(), 9.0, 11.0)  # Uniform: mean |angle| 10.

  def test_crops_lie_inside_the_image_with_the_configured_area_and_aspect(self):
    layer = augment.RandomGeometry(flip=False, crop_area=0.3, seed=4)
    matrices = np.asarray(layer.sample_matrices((4000, SIZE, SIZE, 3)))
    sx, x0, sy, y0 = matrices[:, 0], matrices[:, 2], matrices[:, 4], matrices[:, 5]
    np.testing.assert_allclose(matrices[:, [1, 3, 6, 7]], 0.0, atol=1e-6)
    area, ratio = sx * sy, sx / sy
    self.assertBetween(area.min(), 0.3 - 1e-4, 0.32)
    self.assertBetween(area.max(), 0.98, 1.0 + 1e-4)
    self.assertBetween(ratio.min(), 0.75 - 1e-3, 0.77)
    self.assertBetween(ratio.max(), 1.31, 4 / 3 + 1e-3)
    for start, scale in ((x0, sx), (y0, sy)):  # The crop's far edge stays inside.
      self.assertGreaterEqual(start.min(), 0.0)
      self.assertLessEqual((start + scale * (SIZE - 1)).max(), SIZE - 1 + 1e-3)

  def test_a_crop_stretches_its_rectangle_over_the_output(self):
    ramp = np.broadcast_to(np.arange(SIZE, dtype=np.float32)[None, None, :, None],
                           (8, SIZE, SIZE, 3)).copy()  # Pixel value = its x.
    layer = augment.RandomGeometry(flip=False, crop_area=0.25, seed=2)
    rows = np.asarray(layer(ramp, training=True))[:, SIZE // 2, :, 0]
    slopes, starts = rows[:, 1] - rows[:, 0], rows[:, 0]
    # Width fraction sqrt(area * aspect) >= sqrt(0.25 * 3/4); a row reads x0 + slope * x.
    self.assertTrue(np.all(slopes <= 1.0 + 1e-4) and np.all(slopes >= 0.433), slopes)
    self.assertLess(slopes.min(), 0.9)
    np.testing.assert_allclose(rows, starts[:, None] + slopes[:, None] * np.arange(SIZE),
                               atol=1e-2)

  def test_without_a_crop_the_draws_are_unchanged(self):
    """Without a crop, two batches draw the matrices recorded before the crop existed."""
    shape = (3, 40, 56, 3)  # Not square: width and height must not trade places.
    images = np.random.default_rng(6).uniform(0, 255, shape).astype(np.float32)
    for crop_area in (None, 0.0):
      kwargs = {} if crop_area is None else {"crop_area": crop_area}
      layer = augment.RandomGeometry(rotation=20, zoom=0.2, translation=0.2, seed=6, **kwargs)
      matrices = np.concatenate([np.asarray(layer.sample_matrices(shape)) for _ in range(2)])
      np.testing.assert_allclose(matrices, GOLDEN_MATRICES, rtol=1e-5, atol=1e-4)
      # The layer resamples with those very draws, batch after batch.
      layer = augment.RandomGeometry(rotation=20, zoom=0.2, translation=0.2, seed=6, **kwargs)
      for golden in np.split(GOLDEN_MATRICES, 2):
        out = np.asarray(layer(images, training=True))
        np.testing.assert_allclose(out, apply(images, golden), atol=0.05)
    # The crop's draws follow the others: its matrix is the crop, then the same map.
    cropped = augment.RandomGeometry(rotation=20, zoom=0.2, translation=0.2, seed=6,
                                     crop_area=0.5)
    with_crop = np.asarray(cropped.sample_matrices(shape))
    expected = GOLDEN_MATRICES[:len(with_crop)]

    def square(m):
      return np.concatenate([m, np.ones((len(m), 1), m.dtype)], -1).reshape(-1, 3, 3)

    crops = np.linalg.solve(square(expected).transpose(0, 2, 1),
                            square(with_crop).transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_allclose(crops[:, 0, 1], 0.0, atol=1e-4)  # Axis-aligned rectangles.
    np.testing.assert_allclose(crops[:, 1, 0], 0.0, atol=1e-4)
    self.assertTrue(np.all(crops[:, 0, 0] * crops[:, 1, 1] >= 0.5 - 1e-3))

  def test_inference_passes_the_image_through(self):
    images = smooth_images(2)
    layer = augment.RandomGeometry(rotation=20, zoom=0.2, translation=0.2, seed=1)
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    self.assertGreater(np.abs(np.asarray(layer(images, training=True)) - images).mean(), 1.0)

  def test_seeded_layers_repeat_and_run_in_tf_data(self):
    images = smooth_images(3)
    outputs = []
    for _ in range(2):
      layer = augment.RandomGeometry(rotation=20, zoom=0.2, translation=0.2, seed=5)
      dataset = tf.data.Dataset.from_tensor_slices(images).batch(3).map(
          lambda x, layer=layer: layer(x, training=True))
      outputs.append(next(iter(dataset)).numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])

  def test_model_with_it_saves_loads_and_exports_without_it(self):
    augmentation = Augmentation(rotation=20.0, zoom=0.2, translation=0.1, crop_area=0.3)
    model = model_lib.build_model(3, image_size=SIZE, weights=None, seed=0,
                                  augmentation=augmentation)
    names = [l.name for l in model.get_layer(model_lib.AUGMENT_NAME).layers]
    self.assertEqual(names, ["random_geometry", "random_contrast"])
    path = os.path.join(self.create_tempdir().full_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    geometry = loaded.get_layer(model_lib.AUGMENT_NAME).get_layer("random_geometry")
    self.assertEqual((geometry.rotation, geometry.zoom, geometry.translation, geometry.crop_area),
                     (20.0, 0.2, 0.1, 0.3))
    inference = model_lib.inference_model(loaded)
    self.assertNotIn(model_lib.AUGMENT_NAME, [l.name for l in inference.layers])


if __name__ == "__main__":
  absltest.main()
