#!/usr/bin/env bash
# Regenerates metadata_schema_py_generated.py from metadata_schema.fbs.
#
# Usage:
#   regenerate.sh          rewrite metadata_schema_py_generated.py in place
#   regenerate.sh --check  regenerate into a temporary folder and compare with
#                          the vendored file: exit 0 when identical, 1 when not
#
# Needs flatc 2.0.8 (Debian and Ubuntu: apt-get install -y flatbuffers-compiler;
# or set FLATC to its path). Other flatc versions write different code, so the
# script refuses them. After a rewrite, put the printed sha256 in README.md.
set -euo pipefail

readonly FLATC_VERSION="2.0.8"
readonly HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly VENDORED="${HERE}/metadata_schema_py_generated.py"
readonly FLATC="${FLATC:-flatc}"

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if ! command -v "${FLATC}" >/dev/null 2>&1; then
  echo "regenerate.sh: flatc not found; install flatc ${FLATC_VERSION}" \
    "(apt-get install -y flatbuffers-compiler) or set FLATC" >&2
  exit 2
fi
version="$("${FLATC}" --version | awk '{print $NF}')"
if [[ "${version}" != "${FLATC_VERSION}" ]]; then
  echo "regenerate.sh: flatc ${version} found but ${FLATC_VERSION} is needed" \
    "(each version writes different code)" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
cp "${HERE}/metadata_schema.fbs" "${tmp}/"
# flatc's Python output carries none of the schema's comments, so the
# commented original regenerates the vendored file exactly. flatc warns that
# the upstream field sentencePiece_model is not snake_case; that is expected.
if ! (cd "${tmp}" && "${FLATC}" --python --gen-object-api --gen-onefile \
      metadata_schema.fbs) 2>"${tmp}/flatc.log"; then
  cat "${tmp}/flatc.log" >&2
  exit 2
fi

generated="${tmp}/metadata_schema_py_generated.py"
{
  cat <<'EOF'
# Generated code: Python classes for the TFLite metadata flatbuffer schema.
#
# Made by regenerate.sh in this folder: flatc 2.0.8 --python --gen-object-api
# --gen-onefile on metadata_schema.fbs beside it: tflite-support's
# tensorflow_lite_support/metadata/metadata_schema.fbs at commit
# 49b22edaca62d3dc53db7c34836210a09595448f, schema version 1.2.1
# (file_identifier "M001"). Copyright 2020 The TensorFlow Authors, Apache
# License 2.0 (LICENSE in this folder).
# Do not edit by hand: regenerate; `regenerate.sh --check` tells whether this
# file is what flatc makes. It needs only the `flatbuffers` runtime.
# flowers/tflite_metadata.py writes and reads the model metadata with it.
# pylint: skip-file
EOF
  cat "${tmp}/metadata_schema_generated.py"
} >"${generated}"

if (( check )); then
  if cmp -s "${generated}" "${VENDORED}"; then
    echo "regenerate.sh: ${VENDORED##*/} matches flatc ${FLATC_VERSION}'s" \
      "output"
    exit 0
  fi
  diff -u "${VENDORED}" "${generated}" | head -n 60 || true
  echo "regenerate.sh: ${VENDORED##*/} differs from flatc's output;" \
    "run regenerate.sh without --check to rewrite it" >&2
  exit 1
fi

cp "${generated}" "${VENDORED}"
echo "regenerate.sh: wrote ${VENDORED##*/}"
echo "sha256 (record it in README.md):" \
  "$(sha256sum "${VENDORED}" | awk '{print $1}')"
