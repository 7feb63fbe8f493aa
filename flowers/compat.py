"""Every reach into a private Keras, KerasTuner or TensorFlow API, each guarded.

A public API lacks each of these; each is one named function or class here,
written for (and tested on, `tests/test_compat.py`) the versions in its
`_Tested` range. Its guard runs before it is used:

- the installed package outside that range: one warning per process, naming
  the package, its version and the range; the patch is still applied when the
  private names it needs exist, with the signatures it expects;
- a private name missing or changed: a warning when flowers can go on without
  the patch, else a `UserError` naming the package, its version and the range
  to install; never an AttributeError from deep inside a run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
from typing import Any, Sequence

import keras
import keras_tuner
import tensorflow as tf

from flowers import artifacts
from flowers.errors import UserError


@dataclasses.dataclass(frozen=True)
class _Tested:
  """The versions of a package a patch was written and tested for: low <= v < high."""

  package: str  # The pip name, as a user would install it.
  low: tuple[int, ...]
  high: tuple[int, ...]

  def installed(self) -> str:
    module = {"keras": keras, "keras-tuner": keras_tuner, "tensorflow": tf}[self.package]
    return str(getattr(module, "__version__", "unknown"))

  def covers(self, version: str) -> bool:
    return self.low <= _release(version) < self.high

  def range(self) -> str:
    return f"{self.package}>={_dotted(self.low)},<{_dotted(self.high)}"

  def describe(self) -> str:
    return f"{self.package} {self.installed()}"


# The multi-worker mend replaces Keras internals: written and tested on 3.15.
KERAS = _Tested("keras", (3, 15), (3, 16))
# KerasTuner's trial checkpoint name, initial-space hook, first draw, gRPC oracle client and
# JSON reader and writer: tested on 1.4.8, accepted over the 1.4 releases setup.cfg allows.
KERAS_TUNER = _Tested("keras-tuner", (1, 4, 7), (1, 5))
# tf.data's `_variant_tensor` and `_inputs`: tested on 2.21, accepted over the
# TensorFlow versions setup.cfg allows.
TENSORFLOW = _Tested("tensorflow", (2, 16), (2, 22))

_WARNED: set[str] = set()  # Patches already warned about in this process.


def _release(version: str) -> tuple[int, ...]:
  """(3, 15, 1) for "3.15.1", "3.15.1rc0" or "3.15.1.dev2"; () when unreadable."""
  numbers = []
  for part in version.split("."):
    match = re.match(r"\d+", part)
    if not match:
      break
    numbers.append(int(match.group()))
    if match.group() != part:
      break
  return tuple(numbers)


def _dotted(release: tuple[int, ...]) -> str:
  return ".".join(str(n) for n in release)


def _guard(tested: _Tested, patch: str, needs: Sequence[tuple[Any, str, Sequence[str] | None]]
           ) -> list[str]:
  """Warns once if `tested.package` is outside its range; returns what `needs` lacks.

  `needs` holds (owner, name, parameters): `owner.name` must exist, and when
  `parameters` is given, be a callable whose parameters start with them.
  """
  if not tested.covers(tested.installed()) and patch not in _WARNED:
    _WARNED.add(patch)
    logging.warning("The flowers %s was written for %s and this is %s; it may not do what "
                    "it should (install %s if it misbehaves).", patch, tested.range(),
                    tested.describe(), tested.range())
  lacking = []
  for owner, name, parameters in needs:
    where = (f"{owner.__module__}.{owner.__qualname__}.{name}" if inspect.isclass(owner)
             else f"{owner.__name__}.{name}")
    value = getattr(owner, name, None)
    if value is None:
      lacking.append(where)
    elif parameters is not None:
      try:
        names = list(inspect.signature(value).parameters)
      except (TypeError, ValueError):
        names = []
      if names[:len(parameters)] != list(parameters):
        lacking.append(f"{where}({', '.join(parameters)})")
  return lacking


def _refuse(tested: _Tested, patch: str, lacking: Sequence[str]) -> UserError:
  return UserError(f"{tested.describe()} has no {', '.join(lacking)}, which flowers needs for "
                   f"its {patch}; install {tested.range()}.")


# Keras: multi-worker `fit` (keras-team/keras#20585).

_MULTI_WORKER = "multi-worker fit mend"


def let_keras_fit_on_several_workers() -> bool:
  """Mends Keras's TensorFlow trainer so that `fit` runs under MultiWorkerMirroredStrategy.

  Keras 3 (3.15) reduces each distributed input batch across workers just to
  learn its shapes (`TensorFlowTrainer._maybe_symbolic_build`), which a
  multi-worker strategy cannot do, and reduces per-replica scalar metrics
  along an axis 0 they lack (`trainer.reduce_per_replica`). This takes the
  shapes from this worker's own first batch and averages scalars. Installed
  once per process, by `distribute.make_strategy("multi_worker")`. Written
  for Keras 3.15; on a Keras whose trainer lacks those names (or changed
  their parameters), it warns and patches nothing, and multi-worker `fit`
  fails wherever the unmended Keras does.

  Returns whether the mend is installed.
  """
  from keras import tree  # pylint: disable=g-import-not-at-top
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top

  if getattr(trainer, "_flowers_multi_worker", False):
    return True
  lacking = _guard(KERAS, _MULTI_WORKER, [
      (trainer.TensorFlowTrainer, "_maybe_symbolic_build", ("self", "iterator", "data_batch")),
      (trainer.TensorFlowTrainer, "_symbolic_build", None),
      (trainer, "reduce_per_replica", ("values", "strategy", "reduction")),
      (trainer, "_collective_all_reduce_multi_worker", ("strategy",)),
  ])
  if lacking:
    logging.warning("%s has no %s, which the flowers %s needs; multi-worker fit may fail "
                    "(keras-team/keras#20585); %s is the tested range.", KERAS.describe(),
                    ", ".join(lacking), _MULTI_WORKER, KERAS.range())
    return False

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
  return True


# KerasTuner: the trial checkpoint, the initial space, the first draw, the chief's oracle,
# its JSON files.

_CHECKPOINT = "trial checkpoint path"
_SPACE = "declared search space"
_ORACLE = "distributed-tuning oracle client"
_FIRST = "configured first trial"
_JSON = "atomic search files"


def write_search_files_atomically() -> bool:
  """Makes KerasTuner write its JSON files atomically and refuse a damaged one in one line.

  KerasTuner writes oracle.json, trial_*/trial.json and tuner0.json in place
  (`keras_tuner.src.utils.save_json`, which every writer calls), so a kill
  during a write leaves a truncated file, and the next resume ends in a
  JSONDecodeError traceback from `load_json`. This writes each one to a
  temporary beside it, then renames it over the old (`artifacts.write_text`;
  remote paths such as gs:// are written as KerasTuner does), and turns a
  file that does not parse into a `UserError` naming it and the fix. Installed
  once per process, by `tune.make_tuner`. Written for KerasTuner 1.4; without
  those functions it warns, and KerasTuner writes as it does by default.

  Returns whether it is installed.
  """
  from keras_tuner.src import utils  # pylint: disable=g-import-not-at-top

  if getattr(utils, "_flowers_atomic", False):
    return True
  lacking = _guard(KERAS_TUNER, _JSON, [(utils, "save_json", ("path", "obj")),
                                        (utils, "load_json", ("path",))])
  if lacking:
    logging.warning("%s has no %s, which the flowers %s needs: a search killed while it "
                    "writes may leave a damaged file; %s is the tested range.",
                    KERAS_TUNER.describe(), ", ".join(lacking), _JSON, KERAS_TUNER.range())
    return False
  save_json, load_json = utils.save_json, utils.load_json

  def atomic_save_json(path, obj):
    if "://" in str(path):  # An object store writes an object whole.
      return save_json(path, obj)
    text = json.dumps(obj)
    artifacts.write_text(str(path), text)
    return text

  def checked_load_json(path):
    try:
      return load_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError.
      what = (str(e).splitlines() or [type(e).__name__])[0][:80]
      raise UserError(f"{path} is damaged ({what}), so the search cannot resume from it; "
                      "add --overwrite to start the search afresh, or use a new "
                      "--workdir.") from e

  utils.save_json = atomic_save_json
  utils.load_json = checked_load_json
  utils._flowers_atomic = True  # pylint: disable=protected-access
  return True


def trial_checkpoint(tuner: keras_tuner.Tuner, trial_id: str) -> str:
  """The path KerasTuner keeps trial `trial_id`'s weights at (`Tuner._get_checkpoint_fname`).

  A trial's weights must be where KerasTuner looks: Hyperband loads a
  continued trial's starting weights from there, and the search ships the
  best trial's from there. KerasTuner has no public name for the path.
  Written for KerasTuner 1.4 ("trial_<id>/checkpoint.weights.h5" under
  Keras 3); without the method, a `UserError` names the version to install.
  """
  lacking = _guard(KERAS_TUNER, _CHECKPOINT,
                   [(keras_tuner.Tuner, "_get_checkpoint_fname", ("self", "trial_id"))])
  if lacking:
    raise _refuse(KERAS_TUNER, _CHECKPOINT, lacking)
  return tuner._get_checkpoint_fname(trial_id)  # pylint: disable=protected-access


class DeclaredSpaceTuner:
  """A keras_tuner.Tuner mixin whose search space is declared, not found by building models.

  KerasTuner fills a new search's space by building the hypermodel until
  every conditional scope was active (`BaseTuner._populate_initial_space`,
  the hook it keeps for AutoKeras). A space without conditions needs no
  build: the subclass's `declare_space(hp)` declares it, which saves a model
  build (and the chief of a distributed search builds none). Written for
  KerasTuner 1.4; on a KerasTuner without that hook, it warns and
  KerasTuner builds a model to find the space, as it does by default.
  """

  def __init__(self, *args, **kwargs):
    lacking = _guard(KERAS_TUNER, _SPACE,
                     [(keras_tuner.Tuner, "_populate_initial_space", ("self",))])
    if lacking:
      logging.warning("%s has no %s, which the flowers %s needs: KerasTuner builds a model to find "
                      "the search space instead; %s is the tested range.",
                      KERAS_TUNER.describe(), ", ".join(lacking), _SPACE, KERAS_TUNER.range())
    super().__init__(*args, **kwargs)

  def declare_space(self, hp: keras_tuner.HyperParameters) -> None:
    raise NotImplementedError

  def _populate_initial_space(self):
    hp = self.oracle.get_space()
    self.declare_space(hp)
    self.oracle.update_space(hp)


def start_search_at(oracle: keras_tuner.Oracle, values: dict[str, Any]) -> None:
  """Makes `oracle`'s first trial take `values`; it draws every later one as before.

  KerasTuner has no public way to seed a search with known values (what
  Optuna's `enqueue_trial` does). Its oracles (Bayesian, random, Hyperband)
  draw a new trial's values through `Oracle._random_values`: while the oracle
  holds no trial, `values` come back instead, and no random state is used.
  A resumed search holds its trials, so it draws. Written for KerasTuner 1.4;
  without the method, a `UserError` names the version to install.
  """
  lacking = _guard(KERAS_TUNER, _FIRST, [(keras_tuner.Oracle, "_random_values", ("self",))])
  if lacking:
    raise _refuse(KERAS_TUNER, _FIRST, lacking)
  draw = oracle._random_values  # pylint: disable=protected-access

  def first_then_drawn() -> dict[str, Any] | None:
    return dict(values) if not oracle.trials else draw()

  oracle._random_values = first_then_drawn  # pylint: disable=protected-access


def publish_with_space(oracle: keras_tuner.Oracle, key: str, text: str) -> None:
  """Serves `text` under `key` with `oracle`'s search space, to every worker that asks.

  KerasTuner has no channel from the chief to its workers but the space it
  serves (`chief_published` reads it): a value under a name no
  hyperparameter declares travels with the space's values through the
  HyperParameters proto, and no trial draws it.
  """
  oracle.hyperparameters.values[key] = text


def chief_published(key: str) -> Any:
  """What the chief of this distributed search serves under `key` (None if nothing).

  Asks the chief's oracle for its space, through KerasTuner's gRPC client
  (`keras_tuner.src.distribute.oracle_client.OracleClient`, KerasTuner
  1.4; it has no public name), from KERASTUNER_ORACLE_IP/_PORT; waits
  until the chief serves. Without that client, a `UserError` names the
  version to install.
  """
  try:
    # Imported here as KerasTuner does: its gRPC protos load only where needed.
    from keras_tuner.src.distribute import oracle_client  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"{KERAS_TUNER.describe()} has no distributed-tuning client "
                    f"(keras_tuner.src.distribute.oracle_client: {e}), which flowers needs "
                    f"for its {_ORACLE}; install {KERAS_TUNER.range()}.") from e
  lacking = _guard(KERAS_TUNER, _ORACLE, [(oracle_client, "OracleClient", ("oracle",))])
  if lacking:
    raise _refuse(KERAS_TUNER, _ORACLE, lacking)
  return oracle_client.OracleClient(None).get_space().values.get(key)


# TensorFlow: a tf.data.Dataset under a Python class of one's own.

_DATASET = "dataset wrapper"


class DatasetView(tf.data.Dataset):
  """`dataset` itself, under a subclass that can add Python behaviour (count iterators).

  tf.data has no public way to subclass a Dataset around an existing one: a
  Dataset is built from its graph variant (`dataset._variant_tensor`) and
  names its inputs (`_inputs`). The view shares `dataset`'s variant, so it
  yields the same elements, in the same order, with the same random draws.
  Written for TensorFlow 2.16-2.21 (tested on 2.21); without those names,
  a `UserError` names the version to install.
  """

  def __init__(self, dataset: tf.data.Dataset):
    lacking = _guard(TENSORFLOW, _DATASET, [(tf.data.Dataset, "_inputs", ("self",))])
    if not hasattr(dataset, "_variant_tensor"):
      lacking.append("Dataset._variant_tensor")
    if lacking:
      raise _refuse(TENSORFLOW, _DATASET, lacking)
    self._dataset = dataset
    super().__init__(dataset._variant_tensor)  # pylint: disable=protected-access

  def _inputs(self) -> list[tf.data.Dataset]:
    return [self._dataset]

  @property
  def element_spec(self) -> Any:
    return self._dataset.element_spec
