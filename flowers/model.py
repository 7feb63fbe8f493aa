"""The classifier: raw uint8 pixels in, class probabilities out.

    uint8 image -> augmentation (training only) -> the backbone's preprocessing
      -> the backbone's base (always in inference mode) -> global average pool
      -> Dropout -> Dense softmax

The backbone (MobileNetV2 by default) is a `flowers.backbone.Backbone`: this
module asks it how to build the base, scale the pixels, where blocks end and
which kernels the int8 grid rounds, and names no network itself.

The base is called with `training=False`, so its BatchNorm layers use their
ImageNet statistics in every stage; fine-tuning also keeps them frozen
(`unfreeze`). Dropout sits before the classifier, where it regularizes.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import keras
import numpy as np

from flowers import backbone as backbone_lib
from flowers.augment import augmentation_layers
from flowers.config import Augmentation
from flowers.errors import UserError

# How trained conv kernels are put on the int8 grid; recorded in each run.json.
INT8_GRID_METHOD = "per-channel symmetric rounding, BatchNorm mean corrected by dW . E[input]"

# The default backbone's base layer; `base_of` finds the base of any backbone.
BASE_NAME = backbone_lib.get(backbone_lib.DEFAULT).layer_name
AUGMENT_NAME = "augment"
PREPROCESS_NAME = "preprocess"
POOL_NAME = "pool"
DROPOUT_NAME = "head_dropout"
CLASSIFIER_NAME = "classifier"


def load_base(image_size: int = 224, weights: str | None = "imagenet",
              alpha: float = 1.0, backbone: str = backbone_lib.DEFAULT) -> keras.Model:
  """The backbone's base without its top, all layers frozen.

  Args:
    image_size: square input side (at least the backbone's `min_image_size`).
    weights: "imagenet" (Keras downloads and caches them), None (random), or a
      path to a `..._no_top.h5` file (offline use).
    alpha: the width multiplier (1.0 has ImageNet weights at every size).
    backbone: the name of a `flowers.backbone` spec.
  """
  spec = backbone_lib.get(backbone)
  if weights not in (None, "imagenet") and not os.path.isfile(weights):
    raise UserError(f"--weights={weights} is not a file; give the path of a "
                    f"{spec.title} no-top .h5, or 'imagenet' to download.")
  if image_size < spec.min_image_size:
    raise UserError(f"--image_size={image_size} is too small; {spec.title} needs "
                    f">= {spec.min_image_size}.")
  try:
    base = spec.build(image_size, weights, alpha)
  except ValueError as e:
    what = " ".join(str(e).split())[:160]
    raise UserError(f"Cannot load {spec.title} weights {weights!r}: {what}; give the "
                    f"no-top .h5 of {spec.title} with alpha={alpha:g}, or "
                    "--weights=imagenet.") from e
  except (OSError, KeyError) as e:
    # h5py: a truncated or damaged file, or one that is not HDF5 at all.
    what = " ".join(str(e).split())[:120] or type(e).__name__
    raise UserError(f"--weights={weights} cannot be read as a Keras .h5 weights file "
                    f"({what}); it may be truncated or damaged: copy or download it "
                    "again, or use --weights=imagenet.") from e
  base.trainable = False
  return base


def build_model(num_classes: int, *, image_size: int = 224, dropout: float = 0.2,
                weights: str | None = "imagenet", augment: bool = True,
                augmentation: Augmentation = Augmentation(), alpha: float = 1.0,
                seed: int | None = None,
                backbone: str = backbone_lib.DEFAULT) -> keras.Model:
  """Builds the transfer-learning classifier (base frozen; see `unfreeze`).

  Args:
    num_classes: number of output classes.
    image_size: square input side; inputs are raw uint8 RGB of that size.
    dropout: dropout rate before the classifier.
    weights: the base's weights: "imagenet", None, or a path to an .h5 file.
    augment: include the augmentation layers (active only when training).
    augmentation: which augmentations, and how strong.
    alpha: the base's width multiplier.
    seed: seed for augmentation and the classifier's initialization.
    backbone: the name of a `flowers.backbone` spec (the base and its
      preprocessing).

  Returns:
    A functional `keras.Model` from uint8 (None, image_size, image_size, 3) to
    float32 softmax probabilities (None, num_classes).
  """
  if num_classes < 2:
    raise UserError(f"Need at least 2 classes to train a classifier, got {num_classes}.")
  spec = backbone_lib.get(backbone)
  inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
  x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)
  if augment:
    x = keras.Sequential(augmentation_layers(augmentation, seed), name=AUGMENT_NAME)(x)
  # The pixels in the range the base's weights were trained on.
  x = keras.layers.Rescaling(spec.scale, offset=spec.offset, name=PREPROCESS_NAME)(x)
  base = load_base(image_size, weights, alpha, backbone)
  x = base(x, training=False)
  x = keras.layers.GlobalAveragePooling2D(name=POOL_NAME)(x)
  x = keras.layers.Dropout(dropout, seed=seed, name=DROPOUT_NAME)(x)
  init = keras.initializers.GlorotUniform(seed=seed)
  outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                               kernel_initializer=init, name=CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="flowers")


def backbone_of(model: keras.Model) -> backbone_lib.Backbone:
  """The spec of the base inside a model made by `build_model` (found by its layer name)."""
  for layer in model.layers:
    spec = backbone_lib.with_layer_name(layer.name)
    if spec is not None:
      return spec
  raise ValueError(f"Model {model.name!r} holds no base of a known backbone "
                   f"({', '.join(sorted(backbone_lib.BACKBONES))}).")


def base_of(model: keras.Model) -> keras.Model:
  """The backbone's base inside a model made by `build_model`."""
  return model.get_layer(backbone_of(model).layer_name)


def _spec_of_base(base: keras.Model) -> backbone_lib.Backbone:
  """The spec of `base` (a layer of a flowers model, or `load_base`'s result)."""
  spec = backbone_lib.with_layer_name(base.name)
  if spec is None:
    raise ValueError(f"{base.name!r} is not the base of a known backbone.")
  return spec


def cut_points(base: keras.Model) -> list[int]:
  """Indices of base layers whose output is the only tensor the rest needs.

  These are the ends of the backbone's blocks (`Backbone.ends_block`; for
  MobileNetV2 an `_add`, or a `project_BN` not followed by one), plus the input
  (0) and the last layer. Fine-tuning and the frozen-prefix cache split the
  base only at these points, so a residual block is never cut in two.
  """
  return _spec_of_base(base).cut_points([layer.name for layer in base.layers])


def cut_index(base: keras.Model, unfreeze_ratio: float) -> int:
  """The last frozen layer for `unfreeze_ratio`, rounded to whole blocks.

  `ceil(unfreeze_ratio * len(base.layers))` layers from the top are asked for;
  the block holding the lowest of them is unfrozen whole, so at least that
  many layers train. 0.0 trains none, 1.0 all.
  """
  if not 0.0 <= unfreeze_ratio <= 1.0:
    raise UserError(f"--unfreeze_ratio={unfreeze_ratio} must be in [0, 1].")
  n = len(base.layers)
  wanted = math.ceil(unfreeze_ratio * n - 1e-9)
  if wanted == 0:
    return n - 1
  first_trainable = n - wanted
  return max([0] + [c for c in cut_points(base) if c < first_trainable])


def unfreeze(model: keras.Model, unfreeze_ratio: float) -> int:
  """Makes the top `unfreeze_ratio` of the base trainable, BatchNorm excepted.

  Call `compile` afterwards. Returns the number of base layers now trainable
  (BatchNorm layers inside the unfrozen blocks are not counted: they stay in
  inference mode with frozen statistics, as the keras-io guide advises).
  """
  base = base_of(model)
  cut = cut_index(base, unfreeze_ratio)
  base.trainable = True
  trainable = 0
  for i, layer in enumerate(base.layers):
    layer.trainable = (i > cut and cut < len(base.layers) - 1 and
                       not isinstance(layer, keras.layers.BatchNormalization))
    trainable += int(layer.trainable)
  if cut == len(base.layers) - 1:
    base.trainable = False
  return trainable


def freeze_base(model: keras.Model) -> None:
  """Freezes the whole base (stage 1)."""
  base_of(model).trainable = False


def inference_model(model: keras.Model) -> keras.Model:
  """The same model without its augmentation layers, sharing all weights.

  Used for export: augmentation ops are inactive at inference anyway, and
  some converters cannot handle them.
  """
  base_name = backbone_of(model).layer_name
  layers = [l for l in model.layers if l.name not in (AUGMENT_NAME,)]
  inputs = keras.Input(model.input.shape[1:], dtype="uint8", name="image")
  x = inputs
  for layer in layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if layer.name == base_name:
      x = layer(x, training=False)
    else:
      x = layer(x)
  return keras.Model(inputs, x, name="flowers_inference")


def round_kernels_to_int8_grid(model: keras.Model,
                               calibration_images: Sequence[np.ndarray] = ()) -> int:
  """Rounds every conv kernel of the base to its per-channel int8 grid.

  The kernels are those of the layer classes the backbone names
  (`Backbone.int8_grid_layers`).

  The int8 TFLite export stores each conv kernel as int8 with one symmetric
  scale per output channel (`max|w| / 127`); BatchNorm folds in per channel,
  so it keeps the grid. Kernels already on the grid (ImageNet weights
  reconstructed from an int8 model, frozen layers) do not change; fine-tuned
  ones move by at most half a step. After this the float model holds exactly
  the weights the int8 model will, and the two differ only by activation
  rounding.

  Rounding shifts each channel's mean output by dW . E[input], which on its own
  costs accuracy.
  Given `calibration_images` (uint8 batches), that shift is measured on them
  and added to the moving mean of the BatchNorm that follows the conv (bias
  correction, as in Nagel et al. 2019, "Data-Free Quantization"), so each
  channel's mean output stays where training left it. The kernels stay on the
  grid; BatchNorm folds into the int8 model's int32 biases.

  Returns:
    The number of kernels that changed.
  """
  rounded = list(_int8_grid_kernels(model))
  if not rounded:
    return 0
  means = (_input_means(model, [layer for layer, _ in rounded], calibration_images)
           if len(calibration_images) else None)
  for i, (layer, kernel) in enumerate(rounded):
    if means is not None:
      delta = kernel - np.asarray(layer.kernel.numpy())
      if isinstance(layer, keras.layers.DepthwiseConv2D):
        shift = np.einsum("hwim,i->im", delta, means[i]).reshape(-1)
      else:
        shift = np.einsum("hwio,i->o", delta, means[i])
      _following_batchnorm(model, layer).moving_mean.assign_add(shift.astype(np.float32))
    layer.kernel.assign(kernel)
  return len(rounded)


def _input_means(model: keras.Model, layers: list[keras.layers.Layer],
                 images: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Per-channel mean of each layer's input over `images` (batches of uint8)."""
  base = base_of(model)
  inputs = keras.Model(base.input, [layer.input for layer in layers])
  preprocess = model.get_layer(PREPROCESS_NAME)
  sums = [np.zeros(layer.input.shape[-1], np.float64) for layer in layers]
  count = 0
  for batch in images:
    tensors = inputs(preprocess(keras.ops.cast(batch, "float32")), training=False)
    tensors = tensors if isinstance(tensors, (list, tuple)) else [tensors]
    for i, tensor in enumerate(tensors):
      sums[i] += np.asarray(keras.ops.sum(tensor, axis=(0, 1, 2)), np.float64) / (
          tensor.shape[1] * tensor.shape[2])
    count += len(batch)
  return [total / count for total in sums]


def _following_batchnorm(model: keras.Model,
                         layer: keras.layers.Layer) -> keras.layers.BatchNormalization:
  """The BatchNorm layer that reads `layer`'s output (each rounded conv has one)."""
  for candidate in base_of(model).layers:
    if isinstance(candidate, keras.layers.BatchNormalization) and candidate.input is layer.output:
      return candidate
  raise ValueError(f"No BatchNormalization follows {layer.name}.")


def kernels_off_int8_grid(model: keras.Model) -> list[str]:
  """Names of the base's conv layers whose kernels are not on the int8 grid."""
  return [layer.name for layer, _ in _int8_grid_kernels(model)]


def _int8_grid_kernels(model: keras.Model):
  """(layer, kernel rounded to the int8 grid) for each base conv off the grid."""
  kinds = tuple(getattr(keras.layers, kind) for kind in backbone_of(model).int8_grid_layers)
  for layer in base_of(model).layers:
    if not isinstance(layer, kinds):
      continue
    kernel = np.asarray(layer.kernel.numpy())
    # Output channels: the last axis of a conv kernel [h, w, in, out]; the
    # in * multiplier channels of a depthwise kernel [h, w, in, multiplier].
    if isinstance(layer, keras.layers.DepthwiseConv2D):
      channels = kernel.reshape(kernel.shape[:2] + (1, -1))
    else:
      channels = kernel
    rounded = int8_grid(channels, channel_axis=3).reshape(kernel.shape)
    # Kernels on the grid up to float32 round-off count as on it.
    if not np.allclose(rounded, kernel, rtol=1e-5, atol=0.0):
      yield layer, rounded


def int8_grid(weights: np.ndarray, channel_axis: int) -> np.ndarray:
  """`weights` rounded to symmetric int8 steps of `max|w| / 127` per channel."""
  other_axes = tuple(i for i in range(weights.ndim) if i != channel_axis)
  step = np.abs(weights).max(axis=other_axes, keepdims=True) / 127.0
  step = np.where(step > 0, step, 1.0)
  return (np.round(weights / step) * step).astype(weights.dtype)
