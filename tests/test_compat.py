"""Each private-API patch in flowers.compat still does its job on the installed versions.

One test per patch checks what the patch is for (not only that the names
exist); the guard tests fake another version or remove a name and expect a
warning or a one-line UserError naming the package, never an AttributeError.
"""

import logging
import os
import re
import sys
import types

import grpc
import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import trainer

import run_configs
from flowers import compat
from flowers import inputs
from flowers import tune
from flowers.errors import UserError


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
  """Every test sees the once-per-process version warnings afresh."""
  monkeypatch.setattr(compat, "_WARNED", set())


def _mend_restored_afterwards(monkeypatch):
  """Lets a test mend Keras's trainer; the original functions come back after it."""
  monkeypatch.setattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build",
                      trainer.TensorFlowTrainer._maybe_symbolic_build)
  monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)
  monkeypatch.setattr(trainer, "_flowers_multi_worker", False, raising=False)


def _tiny_fit_data():
  x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
  y = (x[:, 0] > 0).astype("float32")
  return x, y


def _dense_model() -> keras.Model:
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
  model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy"])
  return model


# Keras: multi-worker fit.

def test_the_multi_worker_mend_is_installed_once_and_keras_fit_calls_it(monkeypatch):
  _mend_restored_afterwards(monkeypatch)
  original = trainer.TensorFlowTrainer._maybe_symbolic_build
  assert compat.let_keras_fit_on_several_workers()
  mended = trainer.TensorFlowTrainer._maybe_symbolic_build
  reduce = trainer.reduce_per_replica
  assert mended is not original
  assert compat.let_keras_fit_on_several_workers()  # Once: the mend is not wrapped again.
  assert trainer.TensorFlowTrainer._maybe_symbolic_build is mended
  assert trainer.reduce_per_replica is reduce

  # Keras still reaches both through these names: fit under a strategy calls them.
  calls = {"build": 0, "reduce": 0}

  def build_spy(self, iterator=None, data_batch=None):
    calls["build"] += 1
    return mended(self, iterator=iterator, data_batch=data_batch)

  def reduce_spy(values, strategy, reduction):
    calls["reduce"] += 1
    return reduce(values, strategy, reduction)

  monkeypatch.setattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build", build_spy)
  monkeypatch.setattr(trainer, "reduce_per_replica", reduce_spy)
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  with strategy.scope():
    model = _dense_model()
  x, y = _tiny_fit_data()
  history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  assert calls["build"] >= 1 and calls["reduce"] >= 1
  assert np.isfinite(history.history["loss"][0])
  assert set(history.history) == {"loss", "accuracy"}


# KerasTuner: the trial checkpoint, the declared space, the chief's value.

class _CountingHyperModel(keras_tuner.HyperModel):
  """A one-layer model; counts its builds."""

  def __init__(self):
    super().__init__()
    self.builds = 0

  def build(self, hp):
    self.builds += 1
    hp.Float("x", 0.0, 1.0)
    return _dense_model()


def test_trial_checkpoint_is_where_keras_tuner_writes_the_trial_weights(tmp_path):
  tuner = keras_tuner.RandomSearch(_CountingHyperModel(), objective="loss", max_trials=1,
                                   seed=1, directory=str(tmp_path), project_name="p")
  x, y = _tiny_fit_data()
  tuner.search(x, y, epochs=1, batch_size=8, verbose=0)
  (trial,) = tuner.oracle.trials.values()
  path = compat.trial_checkpoint(tuner, trial.trial_id)
  # Existing workdirs hold the weights under this name; Hyperband loads them from there.
  assert path == os.path.join(tuner.get_trial_dir(trial.trial_id), "checkpoint.weights.h5")
  assert os.path.exists(path)
  model = _dense_model()
  model.load_weights(path)


def test_a_declared_space_builds_no_model(tmp_path):
  class Declared(compat.DeclaredSpaceTuner, keras_tuner.RandomSearch):

    def declare_space(self, hp):
      hp.Float("x", 0.0, 1.0)

  built = {}
  for kind in (keras_tuner.RandomSearch, Declared):
    hypermodel = _CountingHyperModel()
    tuner = kind(hypermodel, objective="loss", max_trials=1, seed=1,
                 directory=str(tmp_path), project_name=kind.__name__)
    assert [hp.name for hp in tuner.oracle.get_space().space] == ["x"]
    built[kind] = hypermodel.builds
  # KerasTuner still fills the space through the hook the mixin replaces.
  assert built == {keras_tuner.RandomSearch: 1, Declared: 0}


def test_the_search_declares_its_space_without_a_model(tmp_path):
  config = run_configs.tiny(search={"tuner": "random", "max_trials": 1})
  hypermodel = tune.TwoStageHyperModel(
      config, types.SimpleNamespace(class_names=list("abcd")), str(tmp_path))
  tuner = tune.make_tuner(hypermodel, str(tmp_path), overwrite=True)
  assert sorted(hp.name for hp in tuner.oracle.get_space().space) == sorted(tune.HPARAMS)
  assert hypermodel._template is None  # pylint: disable=protected-access


@pytest.mark.parametrize("kind", [keras_tuner.oracles.RandomSearchOracle,
                                  keras_tuner.oracles.BayesianOptimizationOracle,
                                  keras_tuner.oracles.HyperbandOracle])
def test_a_started_search_takes_the_values_first_and_then_draws_as_before(kind, tmp_path):
  def oracle(name):
    budget = ({"max_epochs": 9} if kind is keras_tuner.oracles.HyperbandOracle
              else {"max_trials": 4})
    made = kind(objective="loss", seed=3, **budget)
    made._set_project_dir(str(tmp_path), name)  # pylint: disable=protected-access
    space = made.get_space()
    space.Float("x", 0.0, 1.0)
    space.Float("y", 1e-4, 1e-2, sampling="log")
    made.update_space(space)
    return made

  def values(trial):
    return {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}

  plain, started = oracle("plain"), oracle("started")
  compat.start_search_at(started, {"x": 0.25, "y": 1e-3})
  assert values(started.create_trial("a")) == {"x": 0.25, "y": 1e-3}
  # Its draws are the ones a search without a start makes, in the same order.
  assert values(started.create_trial("b")) == values(plain.create_trial("a"))


def test_a_missing_random_values_method_is_a_user_error(monkeypatch):
  monkeypatch.delattr(keras_tuner.Oracle, "_random_values")
  with pytest.raises(UserError, match=r"^keras-tuner \S+ has no .*Oracle\._random_values,"):
    compat.start_search_at(types.SimpleNamespace(), {"x": 0.5})


def test_the_chief_run_survives_the_proto_and_reaches_a_worker(tmp_path, monkeypatch):
  from keras_tuner.src import protos  # pylint: disable=g-import-not-at-top
  from keras_tuner.src.distribute import oracle_chief  # pylint: disable=g-import-not-at-top

  tuner = keras_tuner.RandomSearch(_CountingHyperModel(), objective="loss", max_trials=1,
                                   seed=1, directory=str(tmp_path), project_name="p")
  compat.publish_with_space(tuner.oracle, "flowers/test", '{"mode": "tune"}')
  space = tuner.oracle.get_space()
  assert [hp.name for hp in space.space] == ["x"]  # Not a hyperparameter: no trial draws it.
  served = keras_tuner.HyperParameters.from_proto(space.to_proto())
  assert served.values["flowers/test"] == '{"mode": "tune"}'

  # A worker asks KerasTuner's oracle server for it, over gRPC.
  server = grpc.server(oracle_chief.futures.ThreadPoolExecutor(max_workers=1))
  protos.get_service_grpc().add_OracleServicer_to_server(
      oracle_chief.OracleServicer(tuner.oracle), server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    assert compat.chief_published("flowers/test") == '{"mode": "tune"}'
    assert compat.chief_published("flowers/absent") is None
  finally:
    server.stop(None)


# KerasTuner: its JSON files.

def _json_functions_restored_afterwards(monkeypatch):
  """Lets a test install the atomic JSON writes; KerasTuner's own come back after it."""
  from keras_tuner.src import utils  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(utils, "save_json", utils.save_json)
  monkeypatch.setattr(utils, "load_json", utils.load_json)
  monkeypatch.setattr(utils, "_flowers_atomic", False, raising=False)


def _search_with_one_trial(folder):
  """The search's tuner (`tune.make_tuner`) in `folder`, its first trial begun and saved."""
  config = run_configs.tiny(search={"tuner": "random", "max_trials": 1})
  hypermodel = tune.TwoStageHyperModel(
      config, types.SimpleNamespace(class_names=list("abcd")), folder)
  tuner = tune.make_tuner(hypermodel, folder, overwrite=True)
  tuner.oracle.create_trial("tuner0")
  tuner.save()
  return hypermodel, tuner


def test_keras_tuner_writes_its_files_through_a_temporary_beside_them(tmp_path, monkeypatch):
  _json_functions_restored_afterwards(monkeypatch)
  replace = os.replace
  renamed = []
  monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((a, b)), replace(a, b))[1])
  _, tuner = _search_with_one_trial(str(tmp_path))
  oracle = os.path.join(tuner.project_dir, "oracle.json")
  trial = os.path.join(tuner.project_dir, "trial_0", "trial.json")
  targets = {b: a for a, b in renamed}
  for path in (oracle, trial, os.path.join(tuner.project_dir, "tuner0.json")):
    assert path in targets, path
    assert os.path.dirname(targets[path]) == os.path.dirname(path)
    assert os.path.basename(targets[path]).startswith(".tmp-")
  # Killed before the rename: the file holds its old state whole, and no temporary stays.
  with open(oracle, encoding="utf-8") as f:
    before = f.read()

  def killed(a, b):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed)
  tuner.oracle.seed += 1
  with pytest.raises(KeyboardInterrupt):
    tuner.oracle.save()
  with open(oracle, encoding="utf-8") as f:
    assert f.read() == before
  assert not [n for n in os.listdir(tuner.project_dir) if n.startswith(".tmp-")]


@pytest.mark.parametrize("name", ["oracle.json", os.path.join("trial_0", "trial.json"),
                                  "tuner0.json"])
def test_a_damaged_search_file_is_a_one_line_error_naming_it(name, tmp_path, monkeypatch):
  _json_functions_restored_afterwards(monkeypatch)
  hypermodel, tuner = _search_with_one_trial(str(tmp_path))
  path = os.path.join(tuner.project_dir, name)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(text[:len(text) // 2])  # What a kill in the middle of an in-place write leaves.
  with pytest.raises(UserError, match=rf"^{re.escape(path)} is damaged \(.*\), so the search "
                                      r"cannot resume from it; add --overwrite") as raised:
    tune.make_tuner(hypermodel, str(tmp_path), overwrite=False)
  assert "\n" not in str(raised.value)


def test_without_keras_tuners_json_functions_it_writes_as_before_with_a_warning(monkeypatch,
                                                                                 caplog):
  from keras_tuner.src import utils  # pylint: disable=g-import-not-at-top

  _json_functions_restored_afterwards(monkeypatch)
  save_json = utils.save_json
  monkeypatch.delattr(utils, "load_json")
  with caplog.at_level(logging.WARNING):
    assert not compat.write_search_files_atomically()
  assert utils.save_json is save_json
  assert any("keras_tuner.src.utils.load_json" in r.getMessage() for r in caplog.records)


# TensorFlow: a Dataset under a class of one's own.

def _shuffled():
  return tf.data.Dataset.range(12).shuffle(12, seed=3, reshuffle_each_iteration=True)


def _orders(dataset, n):
  return [[int(v) for v in dataset] for _ in range(n)]


def test_a_counted_dataset_yields_what_its_dataset_does_and_counts_iterators():
  counted = inputs.CountedDataset(_shuffled())
  assert isinstance(counted, compat.DatasetView)
  assert counted.element_spec == _shuffled().element_spec
  expected = _orders(_shuffled(), 5)
  assert len({tuple(o) for o in expected}) > 1  # Each iterator draws its own order.
  assert _orders(counted, 2) == expected[:2]
  assert counted.iterators == 2
  counted.skip_to(4)  # As a resumed process does: the 5th iterator draws the 5th order.
  assert counted.iterators == 4
  assert _orders(counted, 1) == expected[4:]
  # tf.data builds on it like on any dataset.
  (batch,) = list(counted.map(lambda v: v * 0).batch(12))
  assert batch.numpy().tolist() == [0] * 12


# The guards.

def test_an_untested_version_warns_once_and_still_patches(monkeypatch, caplog):
  monkeypatch.setattr(tf, "__version__", "2.99.0rc1")
  with caplog.at_level(logging.WARNING):
    views = [compat.DatasetView(tf.data.Dataset.range(3)) for _ in range(2)]
  warned = [r.getMessage() for r in caplog.records if "tensorflow 2.99.0rc1" in r.getMessage()]
  assert len(warned) == 1
  assert "tensorflow>=2.16,<2.22" in warned[0]
  assert [int(v) for v in views[1]] == [0, 1, 2]


def test_the_installed_versions_are_in_their_tested_ranges():
  for tested in (compat.KERAS, compat.KERAS_TUNER, compat.TENSORFLOW):
    assert tested.covers(tested.installed()), tested.describe()
  assert not compat.KERAS.covers("3.16.0")
  assert compat.KERAS.covers("3.15.0.dev2024")


def test_a_missing_checkpoint_method_is_a_user_error(monkeypatch):
  monkeypatch.delattr(keras_tuner.Tuner, "_get_checkpoint_fname")
  with pytest.raises(UserError, match=r"^keras-tuner \S+ has no .*Tuner\._get_checkpoint_fname,"
                                      r" .*; install keras-tuner>=1\.4\.7,<1\.5\.$"):
    compat.trial_checkpoint(types.SimpleNamespace(), "0")


def test_a_missing_or_changed_trainer_name_leaves_keras_unmended(monkeypatch, caplog):
  _mend_restored_afterwards(monkeypatch)
  original = trainer.TensorFlowTrainer._maybe_symbolic_build
  monkeypatch.delattr(trainer, "_collective_all_reduce_multi_worker")
  monkeypatch.setattr(trainer, "reduce_per_replica", lambda values, strategy: values)
  with caplog.at_level(logging.WARNING):
    assert not compat.let_keras_fit_on_several_workers()
  (message,) = [r.getMessage() for r in caplog.records if "keras 3" in r.getMessage()]
  assert "_collective_all_reduce_multi_worker" in message
  assert "reduce_per_replica(values, strategy, reduction)" in message
  assert trainer.TensorFlowTrainer._maybe_symbolic_build is original


def test_a_missing_space_hook_warns(monkeypatch, caplog, tmp_path):
  from keras_tuner.src.engine import base_tuner  # pylint: disable=g-import-not-at-top

  class Declared(compat.DeclaredSpaceTuner, keras_tuner.RandomSearch):

    def declare_space(self, hp):
      hp.Float("x", 0.0, 1.0)

  monkeypatch.delattr(base_tuner.BaseTuner, "_populate_initial_space")
  with caplog.at_level(logging.WARNING):
    Declared(_CountingHyperModel(), objective="loss", max_trials=1,
             directory=str(tmp_path), project_name="p")
  assert any("_populate_initial_space" in r.getMessage() and "keras-tuner" in r.getMessage()
             for r in caplog.records)


def test_a_missing_oracle_client_is_a_user_error(monkeypatch):
  from keras_tuner.src import distribute  # pylint: disable=g-import-not-at-top

  monkeypatch.delattr(distribute, "oracle_client", raising=False)
  monkeypatch.setitem(sys.modules, "keras_tuner.src.distribute.oracle_client", None)
  with pytest.raises(UserError, match=r"^keras-tuner \S+ has no distributed-tuning client"):
    compat.chief_published("flowers/test")


def test_a_dataset_without_its_private_names_is_a_user_error(monkeypatch):
  monkeypatch.delattr(tf.data.Dataset, "_inputs")
  with pytest.raises(UserError, match=r"^tensorflow \S+ has no .*Dataset\w*\._inputs, .*; "
                                      r"install tensorflow>=2\.16,<2\.22\.$"):
    compat.DatasetView(tf.data.Dataset.range(3))
