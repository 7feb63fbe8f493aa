"""The frozen-prefix cache: run the frozen part of the base once, not every epoch.

On a CPU the frozen layers of the base cost most of each training step,
yet their output for a given input never changes. So the training images go
through augmentation + preprocessing + the frozen prefix once per *view* (view 0
is the plain image, later views are random augmentations drawn by the model's
own augmentation layers), and the activations at the cut point are kept as
float16. Stage 1 trains the head on pooled features computed from them; stage 2
trains the unfrozen top of the base on them. Each epoch sees one random view
per image. Val is cached once, un-augmented. Test is never cached: it is
evaluated through the full model, as users run it.

The cache is saved under `WORKDIR/cache/` so a resumed run skips this pass.
Its id hashes everything that decides its bytes (`cache_identity`), which
`prefix_<id>.json` records beside the arrays; a workdir keeps only the cache
its run uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from flowers import artifacts
from flowers import model as model_lib


# A cache's files: prefix_<id>_<array>.npy and prefix_<id>.json.
_CACHE_FILE = re.compile(r"prefix_([0-9a-f]{16})[_.]")


def cache_identity(model: keras.Model, cut: int, views: int, seed: int,
                   split_keys: dict[str, list[str]],
                   key: dict[str, Any] | None = None) -> dict[str, Any]:
  """Everything the cached activations depend on, as JSON.

  The model's input, cut and augmentation; the views and their seed; which
  images are in each split; the first kernel of the base (which identifies
  its weights) and `key`: what the caller knows decides the bytes besides
  (the code's preprocessing and augmentation methods, package versions, the
  weights file, the images' content; see `inputs.cache_key`).
  """
  base = model_lib.base_of(model)
  first_conv = hashlib.sha256()
  first = next((layer for layer in base.layers if layer.weights), None)
  if first is not None:
    first_conv.update(np.ascontiguousarray(first.get_weights()[0]).tobytes())
  return {
      "cut": base.layers[cut].name, "views": views, "seed": seed,
      "input": list(model.input.shape[1:]),
      "augment": _augmentation(model),
      "splits": {split: hashlib.sha256("\n".join(keys).encode()).hexdigest()
                 for split, keys in sorted(split_keys.items())},
      "first_conv_sha256": first_conv.hexdigest(),
      "key": key or {},
  }


def _augmentation(model: keras.Model) -> list[dict[str, Any]] | None:
  """The configs of the model's augmentation layers, without the input layer
  (Keras numbers its name by how many models the process has built)."""
  if model_lib.AUGMENT_NAME not in [l.name for l in model.layers]:
    return None
  config = model.get_layer(model_lib.AUGMENT_NAME).get_config()
  return [l for l in config.get("layers", [config]) if l.get("class_name") != "InputLayer"]


def _cache_id(identity: dict[str, Any]) -> str:
  """A short hash of `cache_identity`."""
  text = json.dumps(identity, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _keep_only(cache_dir: str, cache_id: str) -> None:
  """Deletes the files of every other frozen-prefix cache in `cache_dir`: they
  were made by another recipe or run of this workdir, and would never be read."""
  for name in os.listdir(cache_dir):
    found = _CACHE_FILE.match(name)
    if found and found.group(1) != cache_id:
      os.remove(os.path.join(cache_dir, name))
      logging.info("Removed %s: a frozen-prefix cache this run does not use.", name)


class PrefixCache:
  """Cut-point activations of the train (several views), val and test images."""

  def __init__(self, model: keras.Model, cut: int, train_views: np.ndarray,
               train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray):
    self.model = model
    self.cut = cut
    self.train_views = train_views  # [views, N, h, w, c] float16
    self.train_labels = train_labels
    self.val = val  # [N, h, w, c] float16
    self.val_labels = val_labels

  @property
  def num_views(self) -> int:
    return self.train_views.shape[0]

  @classmethod
  def build(cls, model: keras.Model, cut: int, train_ds: tf.data.Dataset,
            val_ds: tf.data.Dataset, views: int, seed: int,
            cache_dir: str | None, split_keys: dict[str, list[str]],
            key: dict[str, Any] | None = None, verbose: int = 1) -> "PrefixCache":
    """Computes (or loads from `cache_dir`) the activations at layer `cut`.

    `train_ds` and `val_ds` yield batches of (uint8 images, labels) in a fixed
    order (not shuffled). `key`: what else decides the activations (see
    `cache_identity`); a cache is reused only when all of it matches, and
    the other caches in `cache_dir` are then deleted. The pass is the longest
    stretch of a CPU run, so it shows a Keras progress bar (images done,
    images/s, time left) at `verbose=1`, and logs a line per view at any
    verbosity.
    """
    identity = cache_identity(model, cut, views, seed, split_keys, key)
    cache_id = _cache_id(identity)
    paths = None
    if cache_dir:
      os.makedirs(cache_dir, exist_ok=True)
      paths = {name: os.path.join(cache_dir, f"prefix_{cache_id}_{name}.npy")
               for name in ("train", "train_labels", "val", "val_labels")}
      if all(os.path.exists(p) for p in paths.values()):
        logging.info("Reusing the frozen-prefix cache %s.", cache_id)
        loaded = {k: np.load(p, mmap_mode="r" if k == "train" else None)
                  for k, p in paths.items()}
        _record(cache_dir, cache_id, identity)
        return cls(model, cut, loaded["train"], loaded["train_labels"],
                   loaded["val"], loaded["val_labels"])
    embed = _prefix_fn(model, cut, seed)
    start = time.time()
    total = views * len(split_keys["train"]) + len(split_keys["val"])
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="image",
                                   stateful_metrics=["images/s"])
    done = 0

    def advance(images: int) -> None:
      nonlocal done
      done += images
      progress.update(done, values=[("images/s", done / max(time.time() - start, 1e-9))])

    train, train_labels = [], None
    for view in range(views):
      acts, labels = _run(embed, train_ds, augment=view > 0, on_batch=advance)
      train.append(acts)
      train_labels = labels
      logging.info("Frozen-prefix cache: view %d/%d of %d images done (%.0f s).",
                   view + 1, views, len(labels), time.time() - start)
    if split_keys["val"]:
      val, val_labels = _run(embed, val_ds, augment=False, on_batch=advance)
    else:  # No val split: no early stopping either.
      val, val_labels = train[0][:0], train_labels[:0]
    cache = cls(model, cut, np.stack(train), train_labels, val, val_labels)
    if paths:
      for name, array in (("train", cache.train_views), ("train_labels", train_labels),
                          ("val", val), ("val_labels", val_labels)):
        with artifacts.atomic_path(paths[name]) as tmp:
          with open(tmp, "wb") as f:
            np.save(f, array)
      _record(cache_dir, cache_id, identity)
    return cache

  def pooled(self, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Pooled base features of every train view and of val (for stage 1)."""
    suffix = suffix_model(self.model, self.cut)
    pool = self.model.get_layer(model_lib.POOL_NAME)

    @tf.function(reduce_retracing=True)
    def features(acts):
      return pool(suffix(tf.cast(acts, tf.float32), training=False))

    def run(array: np.ndarray) -> np.ndarray:
      if not len(array):  # No val split.
        return np.zeros((0, suffix.output.shape[-1]), np.float32)
      out = [features(array[i:i + batch_size]).numpy()
             for i in range(0, len(array), batch_size)]
      return np.concatenate(out).astype(np.float32)

    train = np.stack([run(self.train_views[v]) for v in range(self.num_views)])
    return train, run(self.val)


def _record(cache_dir: str, cache_id: str, identity: dict[str, Any]) -> None:
  """`prefix_<id>.json`: what made the cache, for people and lineage; then
  the other caches go."""
  path = os.path.join(cache_dir, f"prefix_{cache_id}.json")
  if not os.path.exists(path):
    artifacts.write_json(path, identity)
  _keep_only(cache_dir, cache_id)


def suffix_model(model: keras.Model, cut: int) -> keras.Model:
  """The base from layer `cut` on, sharing `model`'s layers (none when `cut` is the last)."""
  base = model_lib.base_of(model)
  name = f"{model_lib.backbone_of(model).layer_name}_top"
  if cut == len(base.layers) - 1:  # Nothing unfrozen: the cache holds the base's output.
    inputs = keras.Input(base.output.shape[1:])
    return keras.Model(inputs, keras.layers.Identity()(inputs), name=name)
  return keras.Model(base.layers[cut].output, base.output, name=name)


def _prefix_fn(model: keras.Model, cut: int, seed: int):
  """uint8 images -> cut activations (float16), optionally augmented first."""
  base = model_lib.base_of(model)
  prefix = keras.Model(base.input, base.layers[cut].output,
                       name=f"{model_lib.backbone_of(model).layer_name}_prefix")
  names = [l.name for l in model.layers]
  augment = model.get_layer(model_lib.AUGMENT_NAME) if model_lib.AUGMENT_NAME in names else None
  preprocess = model.get_layer(model_lib.PREPROCESS_NAME)
  tf.random.set_seed(seed)

  @tf.function(reduce_retracing=True)
  def embed(images, do_augment: bool):
    x = tf.cast(images, tf.float32)
    if do_augment and augment is not None:
      x = augment(x, training=True)
    x = preprocess(x)
    return tf.cast(prefix(x, training=False), tf.float16)

  return embed


def _run(embed, dataset: tf.data.Dataset, augment: bool,
         on_batch: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
  acts, labels = [], []
  for images, batch_labels in dataset:
    acts.append(embed(images, augment).numpy())
    labels.append(np.asarray(batch_labels))
    on_batch(len(labels[-1]))
  return np.concatenate(acts), np.concatenate(labels).astype(np.int64)


class ViewSampler(keras.utils.PyDataset):
  """Batches of cached inputs, one random view per image per epoch.

  `views` is [V, N, ...]; each epoch shuffles the images and picks a view for
  each, both from `seed` and the epoch number, so runs are reproducible.
  """

  def __init__(self, views: np.ndarray, labels: np.ndarray, num_classes: int,
               batch_size: int, seed: int):
    super().__init__(workers=1, use_multiprocessing=False, max_queue_size=4)
    self.views = views
    self.labels = labels
    self.num_classes = num_classes
    self.batch_size = batch_size
    self.seed = seed
    self.epoch = 0
    self._draw()

  def _draw(self) -> None:
    n = len(self.labels)
    rng = np.random.default_rng([self.seed, self.epoch])
    self.order = rng.permutation(n)
    self.view_of = rng.integers(0, self.views.shape[0], n)

  def __len__(self) -> int:
    return math.ceil(len(self.labels) / self.batch_size)

  def __getitem__(self, index: int):
    idx = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
    x = self.views[self.view_of[idx], idx].astype(np.float32)
    y = keras.utils.to_categorical(self.labels[idx], self.num_classes)
    return x, y

  def set_epoch(self, epoch: int) -> None:
    """Draws epoch `epoch`'s order and views (a resumed run's next epoch)."""
    self.epoch = epoch
    self._draw()

  def on_epoch_end(self) -> None:
    self.epoch += 1
    self._draw()
