"""The docs hold what they promise: the README's code runs, cited tests exist, no local paths.

The README's ```python blocks run in order, in one namespace, on mock TFDS data
(`fake_data.mock_flowers`) from a scratch folder laid out like a checkout
beside `../shared`. Only what a tiny run needs is substituted: every
`DataConfig(` and `TrainConfig(` gets small settings first (32 px, random
weights, one epoch), `weights="imagenet"` becomes `weights=None` and
`epochs=10` becomes `epochs=1`.
"""

import ast
import glob
import os
import re

import pytest

import fake_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = (["README.md", "BUILD.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))))
FLAGFILES = sorted(os.path.relpath(p, REPO)
                   for p in glob.glob(os.path.join(REPO, "flags", "*.cfg")))

# What the README's code needs changed to run in seconds on mock data.
TINY_DATA = {"image_size": 32, "batch_size": 8}
TINY_TRAIN = {"weights": None, "epochs": 1, "fine_tune_epochs": 1, "cache_views": 2,
              "early_stopping_patience": 0, "verbose": 0}
SUBSTITUTIONS = (
    ("DataConfig(", "DataConfig(**TINY_DATA, "),
    ("TrainConfig(", "TrainConfig(**TINY_TRAIN, "),
    ('weights="imagenet"', "weights=None"),
    ("epochs=10", "epochs=1"),
)


def read(name: str) -> str:
  with open(os.path.join(REPO, name), encoding="utf-8") as f:
    return f.read()


def python_blocks(markdown: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def test_readme_has_library_code_and_the_substitutions_apply():
  code = "\n".join(python_blocks(read("README.md")))
  assert code, "README.md has no ```python block"
  for old, _ in SUBSTITUTIONS:
    assert old in code, f"README.md's code no longer holds {old!r}; update SUBSTITUTIONS"
  for block in python_blocks(read("README.md")):
    ast.parse(block)


@pytest.mark.slow
def test_readme_library_code_runs_on_mock_data(tmp_path, monkeypatch):
  checkout = tmp_path / "flowers"
  checkout.mkdir()
  (tmp_path / "shared" / "tensorflow_datasets").mkdir(parents=True)
  monkeypatch.chdir(checkout)
  namespace = {"TINY_DATA": TINY_DATA, "TINY_TRAIN": TINY_TRAIN, "__name__": "readme"}
  with fake_data.mock_flowers(fake_data.uniform_counts(4, train=6, val=2, test=2)):
    for block in python_blocks(read("README.md")):
      for old, new in SUBSTITUTIONS:
        block = block.replace(old, new)
      exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  # The blocks did what they say: a model trained, a workdir written and loaded back.
  assert namespace["report"]["num_test_examples"] == 8
  assert 0.0 <= namespace["report"]["test_accuracy"] <= 1.0
  assert (checkout / "runs" / "mine" / "model.keras").is_file()
  assert namespace["model"].output_shape == (None, len(namespace["splits"].class_names))


@pytest.mark.parametrize("name", DOCS + FLAGFILES)
def test_no_machine_paths_or_issue_numbers(name):
  text = read(name)
  assert "/work/" not in text, f"{name} names a machine path"
  found = re.findall(r"\bissues?\s*#?\d+", text, re.IGNORECASE)
  assert not found, f"{name} cites {found}: say what the goal is instead"


def _defined_tests() -> dict[str, set[str]]:
  """Test file -> the names of its test functions, classes and `Class::method`s."""
  found = {}
  for path in glob.glob(os.path.join(REPO, "tests", "*.py")):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        names.add(node.name)
      if isinstance(node, ast.ClassDef):
        names |= {f"{node.name}::{m.name}" for m in node.body
                  if isinstance(m, ast.FunctionDef)}
        names |= {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
    found[os.path.basename(path)] = names
  return found


@pytest.mark.parametrize("name", DOCS)
def test_every_test_the_docs_cite_exists(name):
  text = read(name)
  defined = _defined_tests()
  every = set().union(*defined.values())
  for file, rest in re.findall(r"tests/(\w+\.py)(?:::([\w:]+))?", text):
    assert file in defined or os.path.exists(os.path.join(REPO, "tests", file)), (
        f"{name} cites tests/{file}, which does not exist")
    if rest:
      assert rest in defined.get(file, ()), f"{name} cites tests/{file}::{rest}: not found"
  # A bare name: test_ and three words or more (shorter ones are report keys, test_accuracy).
  for test in re.findall(r"\b(test(?:_[a-z0-9]+){3,})\b(?!\.py)", text):
    assert test in every, f"{name} cites {test}, which no file in tests/ defines"


def test_flagfile_headers_are_short():
  for name in FLAGFILES:
    comments = [l for l in read(name).splitlines() if l.startswith("#")]
    assert len(comments) <= 9, f"{name} has {len(comments)} comment lines"
