"""The settings dataclasses: defaults, normalization, one-line validation errors."""

import dataclasses
import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

import run_configs
from flowers import cli
from flowers import config as config_lib
from flowers.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_DIR = os.path.join(REPO, "flags")
# What flags/cpu.cfg set before its recipe became the defaults, verbatim (--verbose, how
# much a run prints, apart).
OLD_CPU_CFG = """
--image_size=224 --split=64,16,20 --seed=42 --batch_size=32 --feature_cache=auto
--feature_cache_views=6 --optimizer=adam --learning_rate=1e-3 --fine_tune_learning_rate=2e-4
--unfreeze_ratio=0.3 --dropout=0.2 --label_smoothing=0.1 --crop_area=0.3 --zoom=0
--translation=0 --lr_schedule=constant --epochs=30 --fine_tune_epochs=12
--fine_tune_ema_momentum=0.99 --early_stopping_patience=4 --max_trials=6
--first_trial=configured --halving_rungs=2,4 --halving_factor=2 --dropout_range=0.1,0.4
--unfreeze_ratio_range=0.2,0.3 --fine_tune_learning_rate_range=1e-4,4e-4
""".split()


def parsed(*args):
  """The RunConfig `flowers_main` builds from `args`."""
  cli.define_flags()
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["flowers_main", *args])
    return cli.run_config()
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
                                fine_tune_learning_rate=3e-4)
    self.assertEqual((trial.dropout, trial.fine_tune_rate), (0.35, 3e-4))
    with self.assertRaisesRegex(UserError, "--dropout=1.2"):
      dataclasses.replace(train, dropout=1.2)  # A replace validates too.

  def test_an_unset_fine_tune_rate_is_a_tenth_of_the_rate_resolved_on_creation(self):
    train = config_lib.TrainConfig(learning_rate=1e-2, fine_tune_learning_rate=None)
    self.assertEqual(train.fine_tune_learning_rate, 1e-2 / 10.0)  # So run.json holds it.
    self.assertEqual(train.fine_tune_rate, 1e-2 / 10.0)

  def test_the_fine_tune_patience_is_the_stages_unless_set(self):
    self.assertEqual(config_lib.TrainConfig(early_stopping_patience=3).fine_tune_patience, 3)
    self.assertEqual(config_lib.TrainConfig(early_stopping_patience=3,
                                            fine_tune_early_stopping_patience=12
                                            ).fine_tune_patience, 12)
    with self.assertRaisesRegex(UserError, "--fine_tune_early_stopping_patience=-1"):
      config_lib.TrainConfig(fine_tune_early_stopping_patience=-1)

  def test_the_cache_cut_is_the_unfreeze_ratio_unless_set(self):
    self.assertEqual(config_lib.TrainConfig(unfreeze_ratio=0.3).feature_cache_cut, 0.3)
    self.assertEqual(
        config_lib.TrainConfig(unfreeze_ratio=0.3,
                               feature_cache_cut_ratio=0.6).feature_cache_cut, 0.6)

  def test_a_trial_is_one_execution(self):
    # A trial is scored and shipped as one run; there is no setting for several.
    self.assertNotIn("executions_per_trial",
                     {f.name for f in dataclasses.fields(config_lib.SearchConfig)})


class DefaultsTest(absltest.TestCase):
  """The defaults are cpu.cfg's recipe; each flagfile holds only what differs."""

  def test_the_defaults_are_what_cpu_cfg_set(self):
    old = parsed(*OLD_CPU_CFG)
    self.assertEqual(old, config_lib.RunConfig())
    # The shipped flagfile still makes that run, printing a line per epoch.
    shipped = parsed(f"--flagfile={os.path.join(FLAGS_DIR, 'cpu.cfg')}")
    self.assertEqual(shipped.train.verbose, 2)
    self.assertEqual(run_configs.with_train(shipped, verbose=1), old)

  def test_no_flags_give_the_default_run_config(self):
    # The command line and RunConfig agree on every default.
    self.assertEqual(parsed(), config_lib.RunConfig())
    self.assertEqual(parsed().to_json(), config_lib.RunConfig().to_json())

  def test_reference_cfg_is_the_blogs_protocol_as_it_ran_before(self):
    # Before, reference.cfg set only values that were the defaults of the time.
    reference = parsed(f"--flagfile={os.path.join(FLAGS_DIR, 'reference.cfg')}")
    self.assertEqual(reference.train, config_lib.TrainConfig(**run_configs.OLD_TRAIN))
    self.assertEqual(reference.train.fine_tune_learning_rate, 1e-4)
    # Without rungs the factor does nothing: the file leaves it out.
    self.assertEqual(dataclasses.replace(reference.search, halving_factor=3),
                     config_lib.SearchConfig(**run_configs.OLD_SEARCH))

  def test_smoke_cfg_is_tiny_and_tunes(self):
    smoke = parsed(f"--flagfile={os.path.join(FLAGS_DIR, 'smoke.cfg')}")
    self.assertEqual((smoke.data.image_size, smoke.train.epochs, smoke.train.fine_tune_epochs,
                      smoke.search.max_trials), (32, 1, 1, 2))
    smoke.check_search()  # --mode=tune runs it.
    cli.check_inputs("tune", smoke, self.create_tempdir().full_path)


class SearchOnlySettingsTest(absltest.TestCase):
  """The search's settings are checked where a search starts, never for --mode=train."""

  def test_rungs_past_the_fine_tune_epochs_refuse_a_search_not_a_train_run(self):
    workdir = self.create_tempdir().full_path
    # cpu.cfg's search (the default) with a shorter stage 2: trainable, not searchable.
    config = config_lib.RunConfig(train=config_lib.TrainConfig(fine_tune_epochs=3),
                                  search=config_lib.SearchConfig(halving_rungs=(2, 4)))
    cli.check_inputs("train", config, workdir)  # --mode=train ignores the search.
    message = ("--halving_rungs=2,4 must stay below --fine_tune_epochs=3 (the last rung's "
               "trials fine-tune to it); lower the rungs, or pass --halving_rungs= for every "
               "trial in full.")
    for check in (config.check_search, lambda: cli.check_inputs("tune", config, workdir)):
      with self.assertRaises(UserError) as error:
        check()
      self.assertEqual(str(error.exception), message)
    config_lib.RunConfig(train=config_lib.TrainConfig(fine_tune_epochs=5)).check_search()
    run_configs.with_search(config, halving_rungs=()).check_search()


class SeedsTest(absltest.TestCase):
  """The training seed seeds the split unless a split seed is given, in code as on the
  command line."""

  def test_the_training_seed_seeds_the_split_unless_one_is_given(self):
    seven = config_lib.RunConfig(train=config_lib.TrainConfig(seed=7))
    self.assertEqual((seven.data.split_seed, seven.train.seed), (7, 7))
    kept = config_lib.RunConfig(data=config_lib.DataConfig(split_seed=42),
                                train=config_lib.TrainConfig(seed=7))
    self.assertEqual((kept.data.split_seed, kept.train.seed), (42, 7))
    self.assertEqual(parsed("--seed=7"), seven)
    self.assertEqual(parsed("--seed=7", "--split_seed=42"), kept)

  def test_the_split_seed_is_an_int_everywhere(self):
    alone = config_lib.DataConfig()  # As load_splits(DataConfig()) gets it: a fixed split.
    self.assertEqual(alone.split_seed, config_lib.DEFAULT_SPLIT_SEED)
    self.assertIsInstance(alone.split_seed, int)
    self.assertEqual(repr(alone.split_seed), "42")
    self.assertIs(type(config_lib.RunConfig().data.split_seed), int)
    # A run.json records the int: an older flowers' run (split_seed 42) is the same run.
    self.assertEqual(json.loads(json.dumps(config_lib.RunConfig().to_json())),
                     config_lib.RunConfig(data=config_lib.DataConfig(split_seed=42)).to_json())
    self.assertIs(type(config_lib.RunConfig().to_json()["data"]["split_seed"]), int)


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
