"""flowers: transfer-learning image classifiers on TensorFlow.

    from flowers import build_model, load_splits
    splits = load_splits(tfds_data_dir="../shared/tensorflow_datasets")
    model = build_model(len(splits.class_names), weights="imagenet")

Names are imported lazily, so `import flowers` (and the split logic in
`flowers.split`) does not load TensorFlow until a TensorFlow name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "flowers.model",
    "unfreeze": "flowers.model",
    "Augmentation": "flowers.model",
    "load_splits": "flowers.data",
    "load_source": "flowers.data",
    "make_dataset": "flowers.data",
    "stratified_split": "flowers.split",
    "TrainConfig": "flowers.train",
    "train_and_evaluate": "flowers.train",
    "UserError": "flowers.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'flowers' has no attribute {name!r}")
