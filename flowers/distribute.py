"""The tf.distribute strategy the two training stages run under.

    default       one device (TensorFlow's default strategy)
    mirrored      every local GPU, or the logical CPU devices without one
    multi_worker  MultiWorkerMirroredStrategy over the cluster in TF_CONFIG

Keras 3 (3.15 measured) cannot `fit` under a multi-worker strategy: it reduces
each input batch across workers just to learn its shapes, and reduces scalar
metrics along an axis they do not have (keras-team/keras#20585, open). Making
the multi-worker strategy here also mends those two steps, for this process
only; `tests/test_distributed_train.py` trains two workers on 127.0.0.1 and
checks they end with the same weights.
"""

from __future__ import annotations

import logging

import tensorflow as tf

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
      _let_keras_fit_on_several_workers()
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


def _let_keras_fit_on_several_workers() -> None:
  """Mends Keras's TensorFlow trainer for multi-worker training (keras#20585)."""
  from keras import tree  # pylint: disable=g-import-not-at-top
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top

  if getattr(trainer, "_flowers_multi_worker", False):
    return
  if not (hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build")
          and hasattr(trainer, "reduce_per_replica")):
    logging.warning("This Keras has no _maybe_symbolic_build/reduce_per_replica to mend; "
                    "multi-worker training may fail (keras-team/keras#20585).")
    return

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras reduces a distributed batch across workers to see its shapes, which
    # a multi-worker strategy cannot do; this worker's own first batch shows them.
    if self._distribute_strategy is None:  # pylint: disable=protected-access
      return
    strategy = self.distribute_strategy
    if iterator is not None:
      for _, _, batches in iterator:
        data_batch = tree.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues) else v, next(batches))
        break
    with strategy.scope():
      self._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

  reduce_per_replica = trainer.reduce_per_replica

  def reduce_scalars_too(values, strategy, reduction):
    # A per-replica scalar (a metric) has no axis 0 to reduce along: average it.
    if (reduction in ("auto", "mean")
        and trainer._collective_all_reduce_multi_worker(strategy)):  # pylint: disable=protected-access
      def mean(value):
        local = strategy.experimental_local_results(value)[0] if isinstance(
            value, tf.distribute.DistributedValues) else value
        return strategy.reduce("MEAN", value, axis=None if local.shape.rank == 0 else 0)
      return tree.map_structure(mean, values)
    return reduce_per_replica(values, strategy, reduction)

  trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build  # pylint: disable=protected-access
  trainer.reduce_per_replica = reduce_scalars_too
  trainer._flowers_multi_worker = True  # pylint: disable=protected-access
