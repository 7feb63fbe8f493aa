"""The weight average of stage 2: an EMA of the trained weights, scored and kept between epochs."""

from absl.testing import absltest
import keras
import numpy as np

from flowers import runs
from flowers import weight_average

MOMENTUM = 0.9


def tiny_model() -> keras.Model:
  keras.utils.set_random_seed(0)
  inputs = keras.Input((3,))
  outputs = keras.layers.Dense(2, activation="softmax")(inputs)
  model = keras.Model(inputs, outputs)
  model.compile(keras.optimizers.SGD(0.5), loss="categorical_crossentropy", metrics=["accuracy"])
  return model


def data(seed: int, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  return x, keras.utils.to_categorical((x[:, 0] > 0).astype(int), 2)


class Steps(keras.callbacks.Callback):
  """Records the trained weights after every step, and the weights an epoch ends with."""

  def __init__(self):
    super().__init__()
    self.after_steps, self.at_epoch_end = [], []

  def on_train_batch_end(self, batch, logs=None):
    self.after_steps.append([w.numpy() for w in self.model.trainable_weights])

  def on_epoch_end(self, epoch, logs=None):
    self.at_epoch_end.append([w.numpy() for w in self.model.trainable_weights])


def running_average(start: list[np.ndarray], steps: list[list[np.ndarray]]) -> list[np.ndarray]:
  average = [w.astype(np.float64) for w in start]
  for weights in steps:
    average = [MOMENTUM * a + (1 - MOMENTUM) * w for a, w in zip(average, weights)]
  return average


class WeightAverageTest(absltest.TestCase):

  def test_val_scores_and_the_fit_ends_on_the_average_of_every_step(self):
    model = tiny_model()
    start = [w.numpy() for w in model.trainable_weights]
    average, steps = weight_average.WeightAverage(model, MOMENTUM), Steps()
    (x, y), val = data(0), data(1)
    history = model.fit(x, y, batch_size=8, epochs=3, validation_data=val, shuffle=False,
                        callbacks=[average, steps], verbose=0)

    self.assertLen(steps.after_steps, 12)
    # Trained weights and their average differ: the test can tell them apart.
    self.assertGreater(np.abs(steps.after_steps[-1][0] - running_average(
        start, steps.after_steps)[0]).max(), 1e-3)
    # At each epoch's end the model holds the average so far (epoch 2's goes on
    # from epoch 1's, not from the trained weights).
    for epoch in range(3):
      want = running_average(start, steps.after_steps[:4 * (epoch + 1)])
      for got, expected in zip(steps.at_epoch_end[epoch], want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    self.assertAlmostEqual(history.history["val_loss"][-1],
                           model.evaluate(*val, verbose=0)[0], places=5)
    for got, trained in zip([v.numpy() for v in average.values], steps.after_steps[-1]):
      np.testing.assert_allclose(got, trained, rtol=1e-6)  # Between epochs: the trained ones.

  def test_a_momentum_outside_0_1_is_refused(self):
    with self.assertRaisesRegex(ValueError, "momentum=1.0"):
      weight_average.WeightAverage(tiny_model(), 1.0)

  def test_a_run_recorded_before_the_setting_kept_the_trained_weights(self):
    self.assertEqual(runs.upgrade({"train": {}})["train"]["fine_tune_ema_momentum"], 0.0)
    self.assertEqual(runs.upgrade({"train": {"fine_tune_ema_momentum": 0.99}})["train"]
                     ["fine_tune_ema_momentum"], 0.99)


if __name__ == "__main__":
  absltest.main()
