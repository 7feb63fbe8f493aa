"""Training-time augmentation: Keras layers that run inside the model.

    float pixels -> RandomGeometry (random resized crop, flip, rotation, zoom,
      translation: one resampling) -> RandomContrast

Chaining Keras's RandomFlip, RandomRotation, RandomZoom and RandomTranslation
resamples every image three times (bilinear, with reflection at the borders)
and blurs it a little each time. `RandomGeometry` draws the same four random
transforms, from the same distributions, composes them into one matrix and
resamples once: a sharper image, and less than half the work
(benchmarks/augment.py measures it).
"""

from __future__ import annotations

import math
from typing import Any

import keras

from flowers.config import Augmentation

# How augmentation resamples; recorded in each run.json.
METHOD = "flip, rotation, zoom, translation composed, one bilinear resampling; contrast"


@keras.saving.register_keras_serializable(package="flowers")
class RandomGeometry(keras.layers.Layer):
  """Random horizontal flip, rotation, zoom and translation, resampled once.

  Per image, as Keras's layers would draw them, in this order: a horizontal
  flip with probability 1/2 (`RandomFlip("horizontal")`), a rotation about the
  centre by U(-rotation, rotation) degrees (`RandomRotation`), one zoom factor
  1 + U(-zoom, zoom) for both axes (`RandomZoom((-zoom, zoom))`), and shifts of
  U(-translation, translation) times the width and the height
  (`RandomTranslation`). The output -> input maps compose into one affine
  matrix; points that land outside the image are reflected back in, bilinear
  sampling. Active only when training; at inference the input passes through.

  With `crop_area` > 0 an Inception-style random resized crop comes first: a
  rectangle of U(crop_area, 1) of the image's area and aspect ratio
  exp(U(log 3/4, log 4/3)) (each side at most the image's), placed uniformly
  inside the image and stretched to the full output; the four transforms
  above then act on the crop. Its draws come after the others, so the other
  transforms' draws do not depend on whether a crop is drawn.

  Attributes:
    flip: random horizontal flips.
    rotation: largest rotation, degrees.
    zoom: largest zoom, as a fraction of the side.
    translation: largest shift, as a fraction of the side.
    crop_area: smallest random-crop area, as a fraction of the image (0: none).
    seed: seed of the random draws (None: unseeded).
  """

  def __init__(self, flip: bool = True, rotation: float = 0.0, zoom: float = 0.0,
               translation: float = 0.0, seed: int | None = None,
               crop_area: float = 0.0, **kwargs: Any):
    super().__init__(**kwargs)
    self.flip = flip
    self.rotation = rotation
    self.zoom = zoom
    self.translation = translation
    self.crop_area = crop_area
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.supports_masking = True

  def call(self, images, training=None):
    if not training:
      return images
    matrices = self.sample_matrices(keras.ops.shape(images))
    return keras.ops.image.affine_transform(
        images, matrices, interpolation="bilinear", fill_mode="reflect")

  def sample_matrices(self, shape) -> Any:
    """Draws one composed output -> input transform per image: [batch, 8]."""
    batch, height, width = shape[0], shape[1], shape[2]
    u = keras.random.uniform((batch, 5), seed=self.seed_generator)

    def symmetric(column, limit):
      return (2.0 * u[:, column] - 1.0) * limit

    flipped = u[:, 0] <= 0.5 if self.flip else keras.ops.zeros((batch,), "bool")
    return compose_transforms(
        flipped=flipped, degrees=symmetric(1, self.rotation),
        scale=1.0 + symmetric(2, self.zoom),
        shift_x=symmetric(3, self.translation) * keras.ops.cast(width, "float32"),
        shift_y=symmetric(4, self.translation) * keras.ops.cast(height, "float32"),
        height=height, width=width,
        crop=self.sample_crops(batch, height, width) if self.crop_area else None)
  def sample_crops(self, batch, height, width) -> Any:
    """Random resized crops as (sx, sy, x0, y0), one of each per image.

    Reading the image at (x0 + sx * x, y0 + sy * y) for output pixel (x, y)
    shows the rectangle of width sx * (width - 1) from x0 (likewise y).
    """
    ops = keras.ops
    u = keras.random.uniform((batch, 4), seed=self.seed_generator)
    area = self.crop_area + (1.0 - self.crop_area) * u[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    ratio = ops.exp(log_ratio)  # Crop width / height, as fractions of the image's.
    sx = ops.minimum(ops.sqrt(area * ratio), 1.0)
    sy = ops.minimum(ops.sqrt(area / ratio), 1.0)
    w, h = ops.cast(width, "float32") - 1.0, ops.cast(height, "float32") - 1.0
    x0, y0 = u[:, 2] * (1.0 - sx) * w, u[:, 3] * (1.0 - sy) * h
    return sx, sy, x0, y0

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self) -> dict[str, Any]:
    return {**super().get_config(), "flip": self.flip, "rotation": self.rotation,
            "zoom": self.zoom, "translation": self.translation, "seed": self.seed,
            "crop_area": self.crop_area}


def compose_transforms(flipped, degrees, scale, shift_x, shift_y, height, width,
                       crop=None) -> Any:
  """One output -> input matrix per image ([batch, 8], `affine_transform`'s form).

  The same maps as Keras's layers, applied in their order: RandomFlip mirrors
  x, RandomRotation turns by `degrees` about the centre, RandomZoom scales by
  `scale` about the centre (> 1 shows more of the image), RandomTranslation
  shifts by (`shift_x`, `shift_y`) pixels. A layer reads its input at M(p) for
  each output point p, so the chain reads the original image at F R Z T (p).
  A `crop` (sx, sy, x0, y0) is cut from the image before them all: C F R Z T (p).
  """
  ops = keras.ops
  flipped = ops.cast(flipped, "float32")
  height, width = ops.cast(height, "float32"), ops.cast(width, "float32")
  cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
  zero, one = ops.zeros_like(flipped), ops.ones_like(flipped)

  def affine(a0, a1, a2, b0, b1, b2):
    """Rows [[a0 a1 a2] [b0 b1 b2] [0 0 1]], one matrix per image."""
    return ops.stack([ops.stack([a0, a1, a2], -1), ops.stack([b0, b1, b2], -1),
                      ops.stack([zero, zero, one], -1)], axis=1)

  flip = affine(1.0 - 2.0 * flipped, zero, flipped * (width - 1.0), zero, one, zero)
  angle = degrees * (math.pi / 180.0)
  cos, sin = ops.cos(angle), ops.sin(angle)
  rotate = affine(cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos)
  zoom = affine(scale, zero, cx * (1.0 - scale), zero, scale, cy * (1.0 - scale))
  shift = affine(one, zero, -shift_x, zero, one, -shift_y)
  matrix = ops.matmul(ops.matmul(ops.matmul(flip, rotate), zoom), shift)
  if crop is not None:
    sx, sy, x0, y0 = crop
    matrix = ops.matmul(affine(sx, zero, x0, zero, sy, y0), matrix)
  return ops.reshape(matrix, (-1, 9))[:, :8]


def augmentation_layers(augmentation: Augmentation,
                        seed: int | None = None) -> list[keras.layers.Layer]:
  """The layers that apply `augmentation`, seeded: geometry once, then contrast."""
  a = augmentation
  layers: list[keras.layers.Layer] = []
  if a.flip or a.rotation or a.zoom or a.translation or a.crop_area:
    layers.append(RandomGeometry(a.flip, a.rotation, a.zoom, a.translation, seed=seed,
                                 crop_area=a.crop_area, name="random_geometry"))
  if a.contrast:
    layers.append(keras.layers.RandomContrast(
        a.contrast, value_range=(0, 255), seed=None if seed is None else seed + 4,
        name="random_contrast"))
  return layers


def chained_augmentation_layers(augmentation: Augmentation,
                                seed: int | None = None) -> list[keras.layers.Layer]:
  """Keras's own layers, one resampling each: the baseline `RandomGeometry` replaces.

  Kept for benchmarks/augment.py and the test that compares the two; it draws
  no random resized crop (`crop_area` is RandomGeometry's alone).
  """
  def layer_seed(i: int) -> int | None:
    return None if seed is None else seed + i

  a = augmentation
  layers: list[keras.layers.Layer] = []
  if a.flip:
    layers.append(keras.layers.RandomFlip("horizontal", seed=layer_seed(0)))
  if a.rotation:
    layers.append(keras.layers.RandomRotation(
        a.rotation / 360.0, fill_mode="reflect", seed=layer_seed(1)))
  if a.zoom:
    layers.append(keras.layers.RandomZoom(
        (-a.zoom, a.zoom), fill_mode="reflect", seed=layer_seed(2)))
  if a.translation:
    layers.append(keras.layers.RandomTranslation(
        a.translation, a.translation, fill_mode="reflect", seed=layer_seed(3)))
  if a.contrast:
    layers.append(keras.layers.RandomContrast(
        a.contrast, value_range=(0, 255), seed=layer_seed(4)))
  return layers
