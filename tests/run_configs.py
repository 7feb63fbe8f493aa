"""Small `RunConfig`s for tests: random weights, 32 px, a few epochs, quiet."""

import dataclasses

from flowers import config as config_lib


def tiny(data=None, search=None, export=None, **train):
  """A RunConfig that trains in seconds; `train` overrides TrainConfig fields.

  `data`, `search` and `export` are dicts of overrides for those parts.
  """
  train_settings = dict(epochs=2, fine_tune_epochs=2, weights=None, feature_cache_views=2,
                        early_stopping_patience=0, verbose=0, learning_rate=1e-2,
                        optimizer="adam")
  train_settings.update(train)
  return config_lib.RunConfig(
      data=config_lib.DataConfig(**{"image_size": 32, "batch_size": 8, **(data or {})}),
      train=config_lib.TrainConfig(**train_settings),
      search=config_lib.SearchConfig(**(search or {})),
      export=config_lib.ExportConfig(**(export or {})),
      plots=False)


def with_train(config, **train):
  """`config` with some TrainConfig fields replaced."""
  return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def with_search(config, **search):
  """`config` with some SearchConfig fields replaced."""
  return dataclasses.replace(config, search=dataclasses.replace(config.search, **search))
