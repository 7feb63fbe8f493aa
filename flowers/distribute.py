"""The tf.distribute strategy the two training stages run under.

    default       one device (TensorFlow's default strategy)
    mirrored      every local GPU, or the logical CPU devices without one
    multi_worker  MultiWorkerMirroredStrategy over the cluster in TF_CONFIG

Keras 3 (3.15 measured) cannot `fit` under a multi-worker strategy: it reduces
each input batch across workers just to learn its shapes, and reduces scalar
metrics along an axis they do not have (keras-team/keras#20585, open). Making
the multi-worker strategy here also mends those two steps, for this process
only (`compat.let_keras_fit_on_several_workers`); `tests/test_distributed_train.py`
trains two workers on 127.0.0.1 and checks they end with the same weights.
"""

from __future__ import annotations

import tensorflow as tf

from flowers import compat
from flowers.config import Strategy
from flowers.errors import UserError

_STRATEGIES: dict[Strategy, tf.distribute.Strategy] = {}


def make_strategy(name: Strategy | str) -> tf.distribute.Strategy:
  """The strategy called `name`, made once per process.

  "multi_worker" reads the cluster from TF_CONFIG and must be made before
  TensorFlow runs its first op: `flowers_main` makes it first thing.
  """
  name = Strategy(name)
  if name is Strategy.DEFAULT:
    return tf.distribute.get_strategy()
  if name not in _STRATEGIES:
    if name is Strategy.MIRRORED:
      gpus = tf.config.list_logical_devices("GPU")
      devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
      _STRATEGIES[name] = tf.distribute.MirroredStrategy(devices)
    else:
      try:
        _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
      except RuntimeError as e:
        raise UserError(
            "--distribution_strategy=multi_worker must be set up before TensorFlow "
            f"starts ({e}); create it first with flowers.distribute.make_strategy.") from e
      compat.let_keras_fit_on_several_workers()
  return _STRATEGIES[name]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's artifacts (always, unless multi-worker).

  The chief is the "chief" task, or worker 0 of a cluster that names none.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
  if not cluster:
    return True
  if "chief" in cluster:
    return resolver.task_type == "chief"
  return resolver.task_type == "worker" and resolver.task_id == 0

