"""What a workdir holds, for tests that check a mode left it as it was."""

import glob
import os


def snapshot(workdir: str) -> dict[str, tuple[bytes, int]]:
  """Every file under `workdir` (but the caches): its bytes and modification time."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
    if os.path.isfile(path) and f"{os.sep}cache{os.sep}" not in path:
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = (f.read(), os.stat(path).st_mtime_ns)
  return found


def hparams_board(folder: str) -> dict:
  """What a TensorBoard HParams folder (flowers.hparams_board) says, read from its events.

  {"experiment": {hparam: (min, max)}, "metrics": [tag, ...], "files": {run: events files},
   "sessions": {run: {"group", "hparams", "metrics": {tag: (step, value)}, "status"}}}
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top

  board = {"experiment": None, "metrics": None, "files": {}, "sessions": {}}
  for path in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"),
                               recursive=True)):
    run = os.path.relpath(os.path.dirname(path), folder)
    board["files"].setdefault(run, []).append(os.path.basename(path))
    session = board["sessions"].setdefault(run, {"metrics": {}}) if run != "." else None
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data
        if plugin.plugin_name == "hparams":
          data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
          if data.HasField("experiment"):
            board["experiment"] = {
                h.name: (h.domain_interval.min_value, h.domain_interval.max_value)
                for h in data.experiment.hparam_infos}
            board["metrics"] = [m.name.tag for m in data.experiment.metric_infos]
          elif data.HasField("session_start_info"):
            start = data.session_start_info
            session["group"] = start.group_name
            session["hparams"] = {k: v.number_value for k, v in start.hparams.items()}
          elif data.HasField("session_end_info"):
            session["status"] = api_pb2.Status.Name(data.session_end_info.status)
        elif session is not None:
          session["metrics"][value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
  board["sessions"] = {k: v for k, v in board["sessions"].items() if "group" in v}
  return board
