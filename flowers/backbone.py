"""The pretrained bases a classifier can stand on, one spec each.

Everything flowers needs to know about a base lives in its `Backbone`: how to
build it, what pixels it expects, where it may be cut, which kernels the int8
grid rounds, and what to call it. `flowers.model` and the modules after it ask
the spec instead of naming a network, so a new backbone is one more entry in
`BACKBONES`.

This module imports no TensorFlow or Keras at import time (`flowers.config`
reads the choices and the input-size floor from it); `Backbone.build` imports
Keras when called.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from flowers.errors import UserError

DEFAULT = "mobilenet_v2"


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What flowers needs to know about one pretrained base.

  Attributes:
    name: the name users choose it by (`--backbone`).
    title: its usual name, for messages and the exported model's metadata.
    application: the `keras.applications` function that builds it.
    layer_name: the base's layer name inside a flowers model; a saved model's
      base is found by it, so it never changes for a backbone.
    min_image_size: the smallest square input side it accepts.
    scale: preprocessing, `x * scale + offset` maps uint8 [0, 255] pixels to
      the input range its weights were trained on.
    offset: see `scale`.
    ends_block: `(layer name, next layer's name) -> bool`: whether the layer
      ends a block, so its output is the only tensor the rest of the base
      needs (where the base may be cut).
    int8_grid_layers: the `keras.layers` classes whose kernels are rounded to
      the int8 grid; each is followed by a BatchNormalization, which takes the
      bias correction.
    weights_file: the name Keras caches the no-top ImageNet weights under,
      with `{alpha}` and `{size}` to fill (see `weights_file_name`).
    weights_sizes: the input sides with weights of their own; Keras uses the
      largest one's for any other side.
    weights_origin: the URL Keras downloads `weights_file` from (the file name
      appended), as its application does for weights="imagenet".
    description: one line on what it is, for help texts and model metadata.
  """

  name: str
  title: str
  application: str
  layer_name: str
  min_image_size: int
  scale: float
  offset: float
  ends_block: Callable[[str, str], bool]
  int8_grid_layers: tuple[str, ...]
  weights_file: str
  weights_sizes: tuple[int, ...]
  weights_origin: str
  description: str

  def cut_points(self, layer_names: Sequence[str]) -> list[int]:
    """Indices of the layers that end a block, plus the input (0) and the last layer."""
    points = [0]
    for i, layer_name in enumerate(layer_names[:-1]):
      if self.ends_block(layer_name, layer_names[i + 1]):
        points.append(i)
    points.append(len(layer_names) - 1)
    return sorted(set(points))

  def weights_file_name(self, alpha: float = 1.0, image_size: int = 224) -> str:
    """The file Keras downloads the no-top ImageNet weights to, for this width and size."""
    size = image_size if image_size in self.weights_sizes else max(self.weights_sizes)
    return self.weights_file.format(alpha=float(alpha), size=size)

  def imagenet_weights(self, alpha: float = 1.0, image_size: int = 224) -> str:
    """The path of the file Keras loads for weights="imagenet" at this width and size.

    Keras's own `get_file`, as its application calls it: the copy cached in
    `$KERAS_HOME/models`, downloaded there first when missing (so the run that
    follows finds it). Without it and without a network, a one-line `UserError`.
    """
    import keras  # pylint: disable=g-import-not-at-top

    name = self.weights_file_name(alpha, image_size)
    url = self.weights_origin + name
    try:
      return keras.utils.get_file(name, url, cache_subdir="models")
    except Exception as e:  # pylint: disable=broad-except
      what = (str(e).replace(url, "it").splitlines() or [type(e).__name__])[0][:120]
      raise UserError(f"--weights=imagenet: cannot download {self.title}'s ImageNet weights "
                      f"from {url} ({what}); connect to the network once (Keras keeps them in "
                      "$KERAS_HOME/models), or pass --weights=PATH to that no-top .h5.") from e

  def build(self, image_size: int, weights: str | None, alpha: float = 1.0) -> Any:
    """The Keras application without its top (a `keras.Model`), named `layer_name`.

    Keras's own errors pass through; `flowers.model.load_base` words them.
    """
    import keras  # pylint: disable=g-import-not-at-top

    application = getattr(keras.applications, self.application)
    return application(input_shape=(image_size, image_size, 3), include_top=False,
                       weights=weights, alpha=alpha, name=self.layer_name)


def _mobilenet_v2_ends_block(layer_name: str, following: str) -> bool:
  """An inverted-residual block ends at its `_add`, or at its `project_BN` when no add follows."""
  return layer_name.endswith("_add") or (
      layer_name.endswith("project_BN") and not following.endswith("_add"))


MOBILENET_V2 = Backbone(
    name="mobilenet_v2",
    title="MobileNetV2",
    application="MobileNetV2",
    layer_name="mobilenetv2",
    min_image_size=32,
    scale=1.0 / 127.5,
    offset=-1.0,
    ends_block=_mobilenet_v2_ends_block,
    int8_grid_layers=("Conv2D", "DepthwiseConv2D"),
    weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5",
    weights_sizes=(96, 128, 160, 192, 224),
    weights_origin="https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/",
    description="MobileNetV2 (inverted residual blocks, ImageNet weights from Keras "
                "Applications; inputs in [-1, 1])",
)

BACKBONES: dict[str, Backbone] = {spec.name: spec for spec in (MOBILENET_V2,)}


def get(name: str) -> Backbone:
  """The spec called `name`; an unknown name is a one-line `UserError`."""
  if name not in BACKBONES:
    raise UserError(f"--backbone={name} is not a known backbone; choose one of: "
                    f"{', '.join(sorted(BACKBONES))}.")
  return BACKBONES[name]


def with_layer_name(layer_name: str) -> Backbone | None:
  """The spec whose base is the layer `layer_name` in a flowers model, if any."""
  for spec in BACKBONES.values():
    if spec.layer_name == layer_name:
      return spec
  return None
