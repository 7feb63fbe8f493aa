"""What a training stage trains and validates on: the plain pipeline or the cache.

`train.fit_stages` asks its `Inputs` for each stage (`Inputs.stage`) and gets
a `Stage`: the model to fit (the full model, or a sub-model sharing its
layers), its training and val batches and its steps per epoch. Two sources
give the same interface, the model's weights being the same either way:
  * `PlainInputs`: the full model, augmentation included, on the tf.data
    pipeline every step. Right on an accelerator.
  * `CachedInputs`: the frozen prefix of the base ran once per augmented view
    of each training image (`prefix_cache`); stage 1 trains the head on pooled
    features, stage 2 the unfrozen top on the cut-point activations. Right on a
    CPU, where the frozen layers would otherwise dominate every step.

A stage's training data is drawn afresh from its seed for each `stage` call
(each stage of each `fit_stages` call: a run, a search trial, a trial's later
rung): the plain pipeline's shuffle stream and the cache's view sampler alike.
Exact resume counts how far the stream got (`CountedDataset`, the sampler's
epoch).

Under `--class_weight=balanced` both weigh each training image by its class
(`class_weights`, from the train split's labels): the plain pipeline in its
batches, the cache through `Stage.class_weight` (Keras `fit(class_weight=)`).

`make_inputs` picks one for a run (`uses_feature_cache`) and builds the cache,
keyed by what decides its bytes (`cache_key`). This module knows nothing of
the training loop; `train` and `tune` import it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Protocol, Sequence

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import compat
from flowers import data as data_lib
from flowers import model as model_lib
from flowers import prefix_cache
from flowers import runs
from flowers.config import ClassWeight
from flowers.config import FeatureCache
from flowers.config import RunConfig
from flowers.config import TrainConfig


@dataclasses.dataclass
class Stage:
  """What one stage fits: a model sharing the full model's layers, and its data.

  Attributes:
    model: the full model (plain inputs) or a sub-model of it (cached inputs).
    train: training batches of (inputs, one-hot labels).
    val: val batches, an (inputs, one-hot labels) pair, or None without a val split.
    steps: training steps per epoch.
    full_model: the full model `model` shares its layers with (its random seed
      states are saved with the stage's state).
    class_weight: class index -> weight, for Keras `fit(class_weight=)` (the
      cached path); None when the batches carry their weights or none are set.
  """

  model: keras.Model
  train: Any
  val: Any
  steps: int
  full_model: keras.Model | None = None
  class_weight: dict[int, float] | None = None


class Inputs(Protocol):
  """Where a stage's data comes from: `stage(model, 1 or 2, seed)` -> `Stage`."""

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    ...

  def num_train_images(self) -> int:
    """How many training images the stages see (undecodable ones are dropped)."""
    ...


class CountedDataset(compat.DatasetView):
  """`dataset` itself, counting the iterators made of it.

  A dataset shuffled with `reshuffle_each_iteration` draws a new order for
  each iterator, from a sequence that restarts in a new process. Counting
  the iterators (Keras makes one or more per epoch) lets a resumed process
  skip to the draw the interrupted one had reached (`skip_to`).
  """

  def __init__(self, dataset: tf.data.Dataset):
    self.iterators = 0
    super().__init__(dataset)

  def __iter__(self):
    self.iterators += 1
    return super().__iter__()

  def skip_to(self, iterators: int) -> None:
    """Makes (and drops) iterators until `iterators` were made; none is read."""
    while self.iterators < iterators:
      iter(self)


def one_hot(num_classes: int):
  """A `Dataset.map` function: (images, labels) -> (images, one-hot labels)."""
  return lambda images, labels: (images, tf.one_hot(labels, num_classes))


def weighted(class_weight: dict[int, float], num_classes: int):
  """A `Dataset.map` function: (images, one-hot labels) -> (images, labels, weights).

  Each image weighs its class's weight, as Keras's `fit(class_weight=)` would
  weigh it; done here because Keras would map the dataset into a new one,
  whose iterators `CountedDataset` cannot count (exact resume needs them).
  """
  table = tf.constant([class_weight.get(c, 1.0) for c in range(num_classes)], tf.float32)
  return lambda images, labels: (images, labels,
                                 tf.gather(table, tf.argmax(labels, axis=-1)))


def balanced_class_weights(labels: Sequence[int]) -> dict[int, float]:
  """n / (classes x count_c) for each class in `labels`: every class weighs the same
  in total and the mean image weight is 1. Classes absent from `labels` get none."""
  counts = np.bincount(np.asarray(labels, np.int64))
  present = np.flatnonzero(counts)
  return {int(c): len(labels) / (len(present) * int(counts[c])) for c in present}


def class_weights(splits: data_lib.Splits, kind: ClassWeight) -> dict[int, float] | None:
  """The class weights of `kind` from the train split's labels; None under none."""
  if kind is ClassWeight.NONE:
    return None
  label_of = dict(zip(splits.source.keys, splits.source.labels))
  return balanced_class_weights([label_of[k] for k in splits.keys("train")])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return max(1, math.ceil(num_examples / batch_size))


class PlainInputs:
  """The full model on the tf.data pipeline: augmentation runs every step.

  Each stage gets a shuffle stream of its own (`train`), seeded by the stage's
  seed, over the one in-memory (or file) pixel cache: a run's order depends on
  its seed only, never on what read the data before (an earlier trial of a
  search), as the cached path's view sampler does. With `class_weight`, each
  training batch carries its images' weights.
  """

  def __init__(self, splits: data_lib.Splits, batch_size: int,
               class_weight: dict[int, float] | None = None):
    self.splits = splits
    self.num_classes = len(splits.class_names)
    self.class_weight = class_weight
    self.val = splits.val.map(one_hot(self.num_classes)) if splits.keys("val") else None
    self.steps = steps_per_epoch(len(splits.keys("train")), batch_size)

  def train(self, seed: int) -> CountedDataset:
    """A new stream of (images, one-hot labels[, weights]) training batches,
    shuffled by `seed` (`Splits.train_batches`); it counts its iterators for
    exact resume."""
    train = self.splits.train_batches(seed).map(one_hot(self.num_classes))
    if self.class_weight:
      train = train.map(weighted(self.class_weight, self.num_classes))
    return CountedDataset(train)

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    # Stage 1 shuffles by `seed`, stage 2 by `seed + 1` (as the view sampler draws).
    return Stage(model, self.train(seed + stage - 1), self.val, self.steps, full_model=model)

  def num_train_images(self) -> int:
    # After training this reads the pipeline's cache, not the image files.
    return sum(int(batch[1].shape[0]) for batch in self.train(0))


class CachedInputs:
  """The frozen-prefix cache: stage 1 on pooled features, stage 2 on activations.

  One cache serves any model whose unfrozen top starts at or after its cut
  (tune cuts it for the largest unfreeze ratio of the search): the layers
  between the cache's cut and the model's own cut run frozen in stage 2.
  """

  def __init__(self, cache: prefix_cache.PrefixCache, num_classes: int, batch_size: int,
               class_weight: dict[int, float] | None = None):
    self.cache = cache
    self.class_weight = class_weight
    self.num_classes = num_classes
    self.batch_size = batch_size
    has_val = len(cache.val_labels) > 0
    self.val_y = keras.utils.to_categorical(cache.val_labels, num_classes) if has_val else None

  @functools.cached_property
  def _pooled(self) -> tuple[np.ndarray, np.ndarray]:
    return self.cache.pooled()

  @functools.cached_property
  def _val_activations(self) -> np.ndarray:
    return np.asarray(self.cache.val, np.float32)

  def num_train_images(self) -> int:
    return len(self.cache.train_labels)

  def _sampler(self, views: np.ndarray, seed: int) -> prefix_cache.ViewSampler:
    return prefix_cache.ViewSampler(views, self.cache.train_labels, self.num_classes,
                                    self.batch_size, seed)

  def stage(self, model: keras.Model, stage: int, seed: int) -> Stage:
    if stage == 1:
      return self._head_stage(model, seed)
    return self._top_stage(model, seed)

  def _head_stage(self, model: keras.Model, seed: int) -> Stage:
    """Stage 1: the head on the pooled features of every view."""
    train_features, val_features = self._pooled
    sampler = self._sampler(train_features, seed)
    val = (val_features, self.val_y) if self.val_y is not None else None
    return Stage(head_model(model, train_features.shape[-1]), sampler, val, len(sampler),
                 full_model=model, class_weight=self.class_weight)

  def _top_stage(self, model: keras.Model, seed: int) -> Stage:
    """Stage 2: the base from the cache's cut on, and the head, on the activations."""
    base = model_lib.base_of(model)
    below = [l.name for l in base.layers[:self.cache.cut + 1] if l.trainable and l.weights]
    if base.trainable and below:
      raise ValueError(f"{below[0]} trains but lies below the cache's cut; build the "
                       "cache for a larger unfreeze ratio.")
    sampler = self._sampler(self.cache.train_views, seed + 1)
    val = (self._val_activations, self.val_y) if self.val_y is not None else None
    return Stage(top_model(model, self.cache.cut), sampler, val, len(sampler),
                 full_model=model, class_weight=self.class_weight)


def head_model(model: keras.Model, feature_dim: int) -> keras.Model:
  """Pooled features -> dropout -> classifier, sharing the full model's head."""
  inputs = keras.Input((feature_dim,), name="features")
  x = model.get_layer(model_lib.DROPOUT_NAME)(inputs)
  outputs = model.get_layer(model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="head")


def top_model(model: keras.Model, cut: int) -> keras.Model:
  """Cut-point activations -> the base from `cut` on -> head, sharing the layers."""
  suffix = prefix_cache.suffix_model(model, cut)
  inputs = keras.Input(suffix.input.shape[1:], name="activations")
  x = suffix(inputs)
  x = model.get_layer(model_lib.POOL_NAME)(x)
  x = model.get_layer(model_lib.DROPOUT_NAME)(x)
  outputs = model.get_layer(model_lib.CLASSIFIER_NAME)(x)
  return keras.Model(inputs, outputs, name="top")


def uses_feature_cache(config: TrainConfig) -> bool:
  """Whether the stages train on the frozen-prefix cache (auto: without a GPU)."""
  if config.feature_cache is FeatureCache.AUTO:
    return not tf.config.list_physical_devices("GPU")
  return config.feature_cache is FeatureCache.ON


def cache_key(splits: data_lib.Splits, config: RunConfig) -> dict[str, Any]:
  """What decides the frozen-prefix cache's bytes beyond the model and the split.

  The code's methods (decoding, resizing, augmentation), the package versions,
  the weights file and the images' content: a cache made by an older recipe or
  from other images is then never reused.
  """
  source = splits.source
  content = getattr(source, "content_sha256", None)
  return {"recipe": runs.recipe(), "versions": runs.versions(),
          "weights": runs.run_weights_identity(config),
          "images": content() if content else runs.listing_sha256(source.keys, source.labels)}


def make_inputs(model: keras.Model, splits: data_lib.Splits, config: RunConfig,
                workdir: str, largest_unfreeze_ratio: float) -> Inputs:
  """The stages' inputs for `config`: plain, or a cache cut for the largest ratio.

  The cache (kept in WORKDIR/cache, reused by a resumed run) is computed with
  `model`, which must still hold its initial weights.
  """
  weights = class_weights(splits, config.train.class_weight)
  if not uses_feature_cache(config.train):
    return PlainInputs(splits, config.data.batch_size, weights)
  ratio = largest_unfreeze_ratio if config.train.fine_tune_epochs > 0 else 0.0
  cut = model_lib.cut_index(model_lib.base_of(model), ratio)
  ordered = {name: data_lib.make_dataset(
      splits.source, splits.keys(name), image_size=config.data.image_size,
      batch_size=64, shuffle=False, cache="none") for name in ("train", "val")}
  cache = prefix_cache.PrefixCache.build(
      model, cut, ordered["train"], ordered["val"], views=config.train.feature_cache_views,
      seed=config.train.seed, cache_dir=os.path.join(workdir, artifacts.CACHE_DIR),
      split_keys={n: splits.keys(n) for n in ("train", "val")},
      key=cache_key(splits, config), verbose=config.train.verbose)
  return CachedInputs(cache, len(splits.class_names), config.data.batch_size, weights)
