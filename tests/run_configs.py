"""Small `RunConfig`s for tests: random weights, 32 px, a few epochs, quiet."""

import dataclasses

from flowers import config as config_lib

# The library's defaults before cpu.cfg's recipe became them. The tests' small configs
# pin them, so each test computes what it was written for: the fine-tune rate follows
# the learning rate (None: learning_rate / 10), no weight average or label smoothing,
# the reference's shifts and zoom instead of a crop; searches draw every trial, over the
# older ranges, each in full. A test about the defaults builds its config without these.
OLD_TRAIN = dict(optimizer="rmsprop", unfreeze_ratio=0.2, fine_tune_learning_rate=None,
                 epochs=10, fine_tune_epochs=10, fine_tune_ema_momentum=0.0,
                 label_smoothing=0.0, early_stopping_patience=3, feature_cache_views=4,
                 augmentation=config_lib.Augmentation(zoom=0.2, translation=0.2,
                                                      crop_area=0.0))
OLD_SEARCH = dict(max_trials=10, dropout_range=(0.0, 0.5), unfreeze_ratio_range=(0.0, 0.5),
                  fine_tune_learning_rate_range=(1e-5, 1e-3), halving_rungs=(),
                  halving_factor=3, first_trial="drawn")


def tiny(data=None, search=None, export=None, **train):
  """A RunConfig that trains in seconds; `train` overrides TrainConfig fields.

  `data`, `search` and `export` are dicts of overrides for those parts; what
  they leave is OLD_TRAIN's and OLD_SEARCH's, then the defaults.
  """
  train_settings = dict(OLD_TRAIN, epochs=2, fine_tune_epochs=2, weights=None,
                        feature_cache_views=2, early_stopping_patience=0, verbose=0,
                        learning_rate=1e-2, optimizer="adam")
  train_settings.update(train)
  return config_lib.RunConfig(
      data=config_lib.DataConfig(**{"image_size": 32, "batch_size": 8, **(data or {})}),
      train=config_lib.TrainConfig(**train_settings),
      search=config_lib.SearchConfig(**{**OLD_SEARCH, **(search or {})}),
      export=config_lib.ExportConfig(**(export or {})),
      plots=False)


def with_train(config, **train):
  """`config` with some TrainConfig fields replaced."""
  return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def with_search(config, **search):
  """`config` with some SearchConfig fields replaced."""
  return dataclasses.replace(config, search=dataclasses.replace(config.search, **search))
