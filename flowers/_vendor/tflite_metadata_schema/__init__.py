"""The TFLite metadata flatbuffer schema and flatc's Python classes for it.

`metadata_schema_py_generated` is flatc's output for `metadata_schema.fbs`
(tflite-support, Apache License 2.0); README.md says which version, its digest
and how to regenerate it.
"""
