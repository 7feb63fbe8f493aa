"""TFLite metadata: the class names and the input's description inside a `.tflite`.

Client libraries (MediaPipe Tasks, the TFLite Task Library, Android Studio's
ML model binding) read a model's metadata for its category names and for what
its input expects; without it MediaPipe names every category `None`. The
usual writer (`tflite-support`) cannot be installed beside TensorFlow 2.21
(it pins protobuf < 4), so flowers writes the documented format itself:

    .tflite = TFLite flatbuffer (schema "TFL3")
                metadata["TFLITE_METADATA"] -> a buffer holding a ModelMetadata
                flatbuffer (metadata_schema.fbs, identifier "M001")
              + a zip archive appended to the file, holding the associated
                files the metadata names (here labels.txt, uncompressed)

The model flatbuffer is read and rebuilt with LiteRT's generated schema
classes; the metadata with `metadata_schema_py_generated` (flatc output).
Every flowers model takes raw RGB pixels 0..255 and normalizes inside the
graph, so the input's NormalizationOptions are the identity (mean 0, std 1):
(pixel - mean) / std is exactly what the model's input means.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from typing import Sequence

import flatbuffers
import numpy as np

from flowers import artifacts
from flowers._vendor.tflite_metadata_schema import metadata_schema_py_generated as meta_fb

METADATA_NAME = "TFLITE_METADATA"  # The model metadata entry clients look up.
METADATA_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
# The oldest metadata parser that understands every field written here: all of
# them are in schema 1.0.0 (later versions added vocabularies, tokenizers and
# tensor groups).
MIN_PARSER_VERSION = "1.0.0"
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
# Weight buffers start on 16 bytes, as the TFLite schema asks (`force_align:
# 16`); the converter's own output only guarantees 4, Python's packer 1.
BUFFER_ALIGNMENT = 16
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # Fixed, so an export is byte-for-byte repeatable.


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the metadata says about the model as a whole.

  Attributes:
    name: the model's name, shown by clients.
    description: what it does, in a sentence or two.
    version: the model's version.
    author: who made it.
    license: the licence that applies, or "" for none stated.
  """

  name: str
  description: str
  version: str
  author: str
  license: str = ""


def _schema():
  """The TFLite model schema's generated classes (LiteRT's; TensorFlow's copy else)."""
  # pylint: disable=g-import-not-at-top
  try:
    from ai_edge_litert import schema_py_generated
  except ImportError:
    from tensorflow.lite.python import schema_py_generated
  return schema_py_generated


def _tensor_metadata(name: str, description: str, content_type: int, properties,
                     stats: tuple[float, float], process_units=None,
                     associated_files=None) -> meta_fb.TensorMetadataT:
  tensor = meta_fb.TensorMetadataT()
  tensor.name = name
  tensor.description = description
  tensor.content = meta_fb.ContentT()
  tensor.content.contentPropertiesType = content_type
  tensor.content.contentProperties = properties
  tensor.stats = meta_fb.StatsT()
  tensor.stats.min, tensor.stats.max = [stats[0]], [stats[1]]
  tensor.processUnits = process_units
  tensor.associatedFiles = associated_files
  return tensor


def _score_thresholding(threshold: float) -> meta_fb.ProcessUnitT:
  """The output's ScoreThresholdingOptions: clients drop every class scoring below it."""
  unit = meta_fb.ProcessUnitT()
  unit.optionsType = meta_fb.ProcessUnitOptions.ScoreThresholdingOptions
  unit.options = meta_fb.ScoreThresholdingOptionsT()
  unit.options.globalScoreThreshold = float(threshold)
  return unit


def model_metadata(info: ModelInfo, num_classes: int, image_size: int,
                   labels_file: str = artifacts.LABELS,
                   score_threshold: float | None = None) -> bytes:
  """The ModelMetadata flatbuffer of a flowers image classifier.

  Input: an RGB image tensor of pixels 0..255 (identity normalization).
  Output: `num_classes` probabilities whose axis is labelled by `labels_file`
  (a TENSOR_AXIS_LABELS associated file, one class name a line), and, given a
  `score_threshold`, a ScoreThresholdingOptions process unit holding it:
  MediaPipe Tasks and the TFLite Task Library return no class scoring below
  it (unless the app sets its own threshold), so an image none reaches gets
  no answer, "unknown".
  """
  image = meta_fb.ImagePropertiesT()
  image.colorSpace = meta_fb.ColorSpaceType.RGB
  normalization = meta_fb.ProcessUnitT()
  normalization.optionsType = meta_fb.ProcessUnitOptions.NormalizationOptions
  normalization.options = meta_fb.NormalizationOptionsT()
  normalization.options.mean, normalization.options.std = [0.0], [1.0]
  image_input = _tensor_metadata(
      INPUT_NAME, f"RGB image, {image_size}x{image_size}, raw pixel values 0..255; "
      "the model normalizes them itself.",
      meta_fb.ContentProperties.ImageProperties, image, (0.0, 255.0),
      process_units=[normalization])

  labels = meta_fb.AssociatedFileT()
  labels.name = labels_file
  labels.description = "Class names, one a line, in the order of the output."
  labels.type = meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS
  probabilities = _tensor_metadata(
      OUTPUT_NAME, f"Probabilities of the {num_classes} classes.",
      meta_fb.ContentProperties.FeatureProperties, meta_fb.FeaturePropertiesT(),
      (0.0, 1.0), associated_files=[labels],
      process_units=None if score_threshold is None else [_score_thresholding(score_threshold)])

  subgraph = meta_fb.SubGraphMetadataT()
  subgraph.inputTensorMetadata = [image_input]
  subgraph.outputTensorMetadata = [probabilities]
  model = meta_fb.ModelMetadataT()
  model.name = info.name
  model.description = info.description
  model.version = info.version
  model.author = info.author
  model.license = info.license or None
  model.subgraphMetadata = [subgraph]
  model.minParserVersion = MIN_PARSER_VERSION
  builder = flatbuffers.Builder(1024)
  builder.Finish(model.Pack(builder), file_identifier=METADATA_IDENTIFIER)
  return bytes(builder.Output())


def _aligned_buffer_type(schema):
  """LiteRT's BufferT, packed with its data on `BUFFER_ALIGNMENT` bytes."""

  class AlignedBufferT(schema.BufferT):

    def Pack(self, builder):  # pylint: disable=invalid-name
      if isinstance(self.data, np.ndarray) and self.data.size:
        # BufferT.Pack writes the data first: pad so that it starts aligned.
        builder.Prep(BUFFER_ALIGNMENT, self.data.size)
      return super().Pack(builder)

  return AlignedBufferT


def _aligned(buffer, aligned_type):
  aligned = aligned_type()
  aligned.__dict__.update(buffer.__dict__)
  return aligned


def add_metadata(tflite: bytes, info: ModelInfo, class_names: Sequence[str],
                 labels_file: str = artifacts.LABELS,
                 score_threshold: float | None = None) -> bytes:
  """`tflite` with metadata, and its class names as an associated label file.

  `class_names` are in output order; `score_threshold`, when given, is the
  output's score threshold (see `model_metadata`). Metadata written before is replaced (and
  the archive appended with it dropped); the converter's own metadata entries
  are kept. The flatbuffer is rebuilt with every weight buffer 16-byte aligned.
  """
  schema = _schema()
  if not schema.Model.ModelBufferHasIdentifier(tflite, 0):
    raise ValueError("Not a TFLite model: its flatbuffer identifier is not TFL3.")
  # Unpacking reads only what the flatbuffer points to, not an appended archive.
  model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
  graph = model.subgraphs[0]
  image_size = int(graph.tensors[graph.inputs[0]].shape[1])
  metadata = model_metadata(info, len(class_names), image_size, labels_file, score_threshold)

  model.metadata = list(model.metadata or [])
  entry = next((m for m in model.metadata if _text(m.name) == METADATA_NAME), None)
  if entry is None:
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers)
    model.buffers.append(schema.BufferT())
    model.metadata.append(entry)
  model.buffers[entry.buffer].data = np.frombuffer(metadata, np.uint8)
  aligned_type = _aligned_buffer_type(schema)
  model.buffers = [_aligned(b, aligned_type) for b in model.buffers]

  builder = flatbuffers.Builder(len(tflite) + len(metadata) + 4096)
  builder.Finish(model.Pack(builder), file_identifier=MODEL_IDENTIFIER)
  out = io.BytesIO()
  out.write(builder.Output())
  # Associated files: a zip archive after the flatbuffer, offsets counted from
  # the start of the file, entries stored uncompressed (clients map them).
  with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
    text = "".join(f"{name}\n" for name in class_names)
    archive.writestr(zipfile.ZipInfo(labels_file, _ZIP_DATE), text.encode("utf-8"))
  return out.getvalue()


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else (value or "")


def read_metadata(tflite: bytes) -> meta_fb.ModelMetadataT | None:
  """The model's ModelMetadata, or None when it has none."""
  schema = _schema()
  if not schema.Model.ModelBufferHasIdentifier(tflite, 0):
    raise ValueError("Not a TFLite model: its flatbuffer identifier is not TFL3.")
  model = schema.Model.GetRootAs(tflite, 0)
  for i in range(model.MetadataLength()):
    entry = model.Metadata(i)
    if _text(entry.Name()) != METADATA_NAME:
      continue
    data = model.Buffers(entry.Buffer()).DataAsNumpy()
    if not isinstance(data, np.ndarray):
      return None
    data = data.tobytes()
    if not meta_fb.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0):
      return None
    return meta_fb.ModelMetadataT.InitFromObj(meta_fb.ModelMetadata.GetRootAs(data, 0))
  return None


def associated_file(tflite: bytes, name: str) -> bytes | None:
  """An associated file packed into the model, or None."""
  try:
    with zipfile.ZipFile(io.BytesIO(tflite)) as archive:
      return archive.read(name)
  except (zipfile.BadZipFile, KeyError):
    return None


def class_names(tflite: bytes) -> list[str] | None:
  """The labels of the output's axis, from the metadata; None without them.

  The first TENSOR_AXIS_LABELS file of the first output tensor, as clients
  read it: one class name a line, in output order.
  """
  metadata = read_metadata(tflite)
  if metadata is None or not metadata.subgraphMetadata:
    return None
  outputs = metadata.subgraphMetadata[0].outputTensorMetadata or []
  files = (outputs[0].associatedFiles or []) if outputs else []
  for file in files:
    if file.type == meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS:
      data = associated_file(tflite, _text(file.name))
      if data is None:
        return None
      return [line for line in data.decode("utf-8").splitlines() if line.strip()]
  return None


def read_class_names(path: str) -> list[str] | None:
  """`class_names` of the `.tflite` file at `path`."""
  with open(path, "rb") as f:
    return class_names(f.read())


def score_threshold(tflite: bytes) -> float | None:
  """The output's score threshold (ScoreThresholdingOptions), as clients read it; None
  without one."""
  metadata = read_metadata(tflite)
  if metadata is None or not metadata.subgraphMetadata:
    return None
  outputs = metadata.subgraphMetadata[0].outputTensorMetadata or []
  for unit in (outputs[0].processUnits or []) if outputs else []:
    if unit.optionsType == meta_fb.ProcessUnitOptions.ScoreThresholdingOptions:
      return float(unit.options.globalScoreThreshold)
  return None


def read_score_threshold(path: str) -> float | None:
  """`score_threshold` of the `.tflite` file at `path`."""
  with open(path, "rb") as f:
    return score_threshold(f.read())
