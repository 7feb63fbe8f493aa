"""The settings dataclasses: defaults, normalization, one-line validation errors."""

import dataclasses
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from flowers import cli
from flowers import config as config_lib
from flowers.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = (config_lib.DataConfig, config_lib.Augmentation, config_lib.TrainConfig,
            config_lib.SearchConfig, config_lib.ExportConfig, config_lib.PredictConfig,
            config_lib.RunConfig)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters((cls.__name__, cls) for cls in SECTIONS)
  def test_every_field_is_documented(self, cls):
    # The flags' help comes from these docstrings.
    docs = cli.attribute_docs(cls)
    self.assertEqual(set(docs), {f.name for f in dataclasses.fields(cls)})
    self.assertTrue(all(text.strip() for text in docs.values()))

  def test_choices_given_as_strings_become_enums_and_json_gives_them_back(self):
    config = config_lib.RunConfig(
        data=config_lib.DataConfig(pixel_cache="DISK"),
        train=config_lib.TrainConfig(optimizer="adam", feature_cache="on", weights="none"))
    self.assertIs(config.data.pixel_cache, config_lib.PixelCache.DISK)
    self.assertIs(config.train.optimizer, config_lib.Optimizer.ADAM)
    self.assertIsNone(config.train.weights)  # "none" means random weights.
    as_json = config.to_json()
    self.assertEqual(as_json["train"]["optimizer"], "adam")
    self.assertEqual(as_json["data"]["pixel_cache"], "disk")
    self.assertEqual(as_json["train"]["augmentation"]["rotation"], 20.0)

  def test_search_ranges_parse_from_flag_lists(self):
    search = config_lib.SearchConfig(dropout_range=["0.1", "0.3"], unfreeze_ratio_range="0,1",
                                     fine_tune_learning_rate_range=[" 1e-4", "1e-2"])
    self.assertEqual(search.dropout_range, (0.1, 0.3))
    self.assertEqual(search.unfreeze_ratio_range, (0.0, 1.0))
    self.assertEqual(search.range_of("fine_tune_learning_rate"), (1e-4, 1e-2))

  @parameterized.parameters(
      ("dropout_range", ["0.5", "0.1"], "--dropout_range=0.5,0.1", "min is above max"),
      ("unfreeze_ratio_range", ["0.6", "0.2"], "--unfreeze_ratio_range=0.6,0.2",
       "--unfreeze_ratio_range=0.2,0.6"),
      ("unfreeze_ratio_range", ["0", "1.5"], "--unfreeze_ratio_range", r"\[0, 1\]"),
      ("unfreeze_ratio_range", ["-0.1", "0.5"], "--unfreeze_ratio_range", r"\[0, 1\]"),
      ("dropout_range", ["0", "1"], "--dropout_range", r"\[0, 1\)"),
      ("fine_tune_learning_rate_range", ["0", "1e-3"], "--fine_tune_learning_rate_range",
       "> 0"),
      ("fine_tune_learning_rate_range", ["-1", "-0.5"], "--fine_tune_learning_rate_range",
       "> 0"),
      ("dropout_range", ["0.1"], "--dropout_range", "exactly two"),
      ("unfreeze_ratio_range", ["0", "0.2", "0.4"], "--unfreeze_ratio_range", "exactly two"),
      ("fine_tune_learning_rate_range", ["fast", "slow"], "--fine_tune_learning_rate_range",
       "two numbers"),
      ("dropout_range", ["0", "nan"], "--dropout_range", "exactly two"),
  )
  def test_bad_search_ranges_are_one_line_errors(self, field, value, flag, why):
    with self.assertRaisesRegex(UserError, why) as error:
      config_lib.SearchConfig(**{field: value})
    self.assertStartsWith(str(error.exception), flag)
    self.assertNotIn("\n", str(error.exception))

  @parameterized.parameters(
      (lambda: config_lib.DataConfig(split="nan,1,1"), "--split"),
      (lambda: config_lib.DataConfig(split="64,16"), "--split"),
      (lambda: config_lib.DataConfig(batch_size=0), "--batch_size=0"),
      (lambda: config_lib.DataConfig(pixel_cache="ram"),
       "--pixel_cache=ram is not one of memory, disk"),
      (lambda: config_lib.TrainConfig(optimizer="adagrad"), "--optimizer=adagrad"),
      (lambda: config_lib.TrainConfig(lr_schedule="step"), "--lr_schedule=step"),
      (lambda: config_lib.TrainConfig(distribution_strategy="tpu"), "--distribution_strategy"),
      (lambda: config_lib.TrainConfig(unfreeze_ratio=1.5), "--unfreeze_ratio=1.5"),
      (lambda: config_lib.TrainConfig(fine_tune_learning_rate=0.0),
       "--fine_tune_learning_rate=0.0"),
      (lambda: config_lib.TrainConfig(verbose=3), "--verbose=3"),
      (lambda: config_lib.TrainConfig(fine_tune_ema_momentum=1.0),
       "--fine_tune_ema_momentum=1.0 must be in [0, 1)"),
      (lambda: config_lib.TrainConfig(unfreeze_ratio=0.3, feature_cache_cut_ratio=0.2),
       "--feature_cache_cut_ratio=0.2 must be in [--unfreeze_ratio, 1] (here [0.3, 1])"),
      (lambda: config_lib.TrainConfig(feature_cache_cut_ratio=1.5),
       "--feature_cache_cut_ratio=1.5"),
      (lambda: config_lib.Augmentation(zoom=-0.1), "--zoom=-0.1"),
      (lambda: config_lib.Augmentation(crop_area=1.5), "--crop_area=1.5"),
      (lambda: config_lib.SearchConfig(tuner="grid"), "--tuner=grid"),
      (lambda: config_lib.SearchConfig(max_trials=0), "--max_trials=0"),
      (lambda: config_lib.SearchConfig(median_stop_epoch=-1), "--median_stop_epoch=-1"),
      (lambda: config_lib.ExportConfig(max_accuracy_drop=-1), "--max_accuracy_drop=-1"),
      (lambda: config_lib.PredictConfig(output="xml"), "--output=xml"),
      (lambda: config_lib.PredictConfig(top_k=0), "--top_k=0"),
  )
  def test_bad_values_are_one_line_errors_naming_the_flag(self, build, names):
    with self.assertRaises(UserError) as error:
      build()
    self.assertIn(names, str(error.exception))
    self.assertNotIn("\n", str(error.exception))

  def test_a_trial_is_a_replaced_train_config(self):
    train = config_lib.TrainConfig(dropout=0.2, unfreeze_ratio=0.2)
    trial = dataclasses.replace(train, dropout=0.35, unfreeze_ratio=0.1,
                                fine_tune_learning_rate=2e-4)
    self.assertEqual((trial.dropout, trial.fine_tune_rate), (0.35, 2e-4))
    self.assertAlmostEqual(train.fine_tune_rate, train.learning_rate / 10,
                           delta=1e-6 * train.learning_rate / 10)
    with self.assertRaisesRegex(UserError, "--dropout=1.2"):
      dataclasses.replace(train, dropout=1.2)  # A replace validates too.

  def test_the_cache_cut_is_the_unfreeze_ratio_unless_set(self):
    self.assertEqual(config_lib.TrainConfig(unfreeze_ratio=0.3).feature_cache_cut, 0.3)
    self.assertEqual(
        config_lib.TrainConfig(unfreeze_ratio=0.3,
                               feature_cache_cut_ratio=0.6).feature_cache_cut, 0.6)

  def test_a_trial_is_one_execution(self):
    # A trial is scored and shipped as one run; there is no setting for several.
    self.assertNotIn("executions_per_trial",
                     {f.name for f in dataclasses.fields(config_lib.SearchConfig)})


class ImportTest(parameterized.TestCase):
  """What `import flowers` and the config module do to a fresh process."""

  @parameterized.parameters((None, "1"), ("0", "0"))
  def test_import_flowers_switches_on_onednn_unless_set(self, preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if preset is not None:
      env["TF_ENABLE_ONEDNN_OPTS"] = preset
    code = "import os, flowers; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    self.assertEqual(out, expected)

  def test_config_loads_no_tensorflow(self):
    # flowers_main checks every setting before TensorFlow loads.
    code = ("import sys; from flowers import config, main; config.RunConfig(); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
    self.assertEqual(out, "False")


if __name__ == "__main__":
  absltest.main()
