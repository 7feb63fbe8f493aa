"""An exponential moving average (EMA) of the weights stage 2 trains.

At a constant learning rate the fine-tuned weights keep jittering around a
good region from step to step; their running average sits nearer its middle,
and scores higher on val with less noise from epoch to epoch (on cpu.cfg's
search: docs/experiments.md, "Hyperparameter search", ema). Polyak averaging, as
`tf.train.ExponentialMovingAverage` and Keras' `use_ema` do it; here the
average is what val scores, what early stopping keeps and what the stage ends
on, and it is saved with the stage's state so a resumed stage goes on as the
run left alone would.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


class WeightAverage(keras.callbacks.Callback):
  """Keeps an EMA of `model`'s trainable weights and puts it in the model between epochs.

  From the end of an epoch's training steps to the start of the next epoch
  (while val scores the model, early stopping keeps its best weights and the
  stage's state is saved) and after training, the model holds the average and
  `values` the trained weights; during an epoch's steps, the other way round.
  The average starts at the weights the stage starts from.

  Put it first among a fit's callbacks: the others then see the average at
  an epoch's end.

  Attributes:
    momentum: the old average's share at each training step (0.99 averages
      over about the last 100 steps).
    values: the average during an epoch, the trained weights between epochs.
  """

  def __init__(self, model: keras.Model, momentum: float):
    super().__init__()
    if not 0.0 < momentum < 1.0:
      raise ValueError(f"momentum={momentum} must be in (0, 1).")
    self.momentum = momentum
    self._weights = list(model.trainable_weights)
    self.values = [tf.Variable(w.value, trainable=False, name=f"average_{i}")
                   for i, w in enumerate(self._weights)]
    # A fit starts at an epoch boundary (a resumed one's saved model holds the
    # average): the first epoch begins by swapping, a no-op on a fresh stage.
    self._averaged_in_model = True
    self._update = tf.function(self._update_values)
    self._swap = tf.function(self._swap_values)

  def _update_values(self) -> None:
    share = 1.0 - self.momentum
    for value, weight in zip(self.values, self._weights):
      value.assign_sub(share * (value - weight.value))

  def _swap_values(self) -> None:
    for value, weight in zip(self.values, self._weights):
      trained = tf.identity(weight.value)
      weight.assign(value)
      value.assign(trained)

  def _put_average(self, averaged: bool) -> None:
    if self._averaged_in_model != averaged:
      self._swap()
      self._averaged_in_model = averaged

  def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    self._put_average(False)

  def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
    self._update()

  def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
    self._put_average(True)  # Val scores the average.

  def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
    self._put_average(True)  # Without val data there was no test to swap at.
