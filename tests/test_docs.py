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

from absl.testing import absltest
from absl.testing import parameterized
import pytest

import fake_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = (["README.md", "BUILD.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))))
FLAGFILES = sorted(os.path.relpath(p, REPO)
                   for p in glob.glob(os.path.join(REPO, "flags", "*.cfg")))

# What the README's code needs changed to run in seconds on mock data.
TINY_DATA = {"image_size": 32, "batch_size": 8}
TINY_TRAIN = {"weights": None, "epochs": 1, "fine_tune_epochs": 1, "feature_cache_views": 2,
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


class ReadmeTest(absltest.TestCase):

  def test_readme_has_library_code_and_the_substitutions_apply(self):
    code = "\n".join(python_blocks(read("README.md")))
    self.assertTrue(code, "README.md has no ```python block")
    for old, _ in SUBSTITUTIONS:
      self.assertIn(old, code,
                    f"README.md's code no longer holds {old!r}; update SUBSTITUTIONS")
    for block in python_blocks(read("README.md")):
      ast.parse(block)

  @pytest.mark.slow
  def test_readme_library_code_runs_on_mock_data(self):
    tmp = self.create_tempdir().full_path
    checkout = os.path.join(tmp, "flowers")
    os.mkdir(checkout)
    os.makedirs(os.path.join(tmp, "shared", "tensorflow_datasets"))
    self.addCleanup(os.chdir, os.getcwd())
    os.chdir(checkout)
    namespace = {"TINY_DATA": TINY_DATA, "TINY_TRAIN": TINY_TRAIN, "__name__": "readme"}
    with fake_data.mock_flowers(fake_data.uniform_counts(4, train=6, val=2, test=2)):
      for block in python_blocks(read("README.md")):
        for old, new in SUBSTITUTIONS:
          block = block.replace(old, new)
        exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
    # The blocks did what they say: a model trained, a workdir written and loaded back.
    self.assertEqual(namespace["report"]["num_test_examples"], 8)
    self.assertBetween(namespace["report"]["test_accuracy"], 0.0, 1.0)
    self.assertTrue(os.path.isfile(os.path.join(checkout, "runs", "mine", "model.keras")))
    self.assertEqual(namespace["model"].output_shape,
                     (None, len(namespace["splits"].class_names)))


class ReadmeForUsersTest(absltest.TestCase):
  """What a new user copies from the README works on their machine, and its tables read."""

  def test_nothing_in_the_readme_needs_the_projects_shared_folder(self):
    # ../shared is this project's offline stand-in for the downloads; users have none.
    self.assertNotIn("../shared", read("README.md"))

  def test_every_table_row_has_as_many_cells_as_its_header(self):
    for name in DOCS:
      header = None
      for line in read(name).splitlines():
        if not line.startswith("|"):
          header = None
          continue
        # GitHub splits cells at every unescaped `|`, inside backticks too.
        cells = len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
        header = header or cells
        self.assertEqual(cells, header, f"{name}: {line[:60]}... has {cells} cells, not {header}")

  def test_every_script_the_docs_run_is_in_the_repository(self):
    for name in DOCS + FLAGFILES:
      for script in re.findall(r"python3? ([\w./-]+\.py)", read(name)):
        path = os.path.normpath(os.path.join(REPO, script))
        self.assertTrue(path.startswith(REPO + os.sep) and os.path.exists(path),
                        f"{name} runs {script}, which the repository does not hold")

  def test_the_first_screen_says_who_it_is_for_and_the_two_commands(self):
    first_screen = read("README.md").split("## ", 2)
    self.assertIn("app developers", first_screen[0])
    self.assertRegex(first_screen[0], r"\[a blog post\]\(https://")
    self.assertTrue(first_screen[1].startswith("Set-up: two commands"))
    commands = [l.strip() for l in first_screen[1].splitlines() if l.startswith("    ")]
    self.assertLen(commands, 2)
    self.assertIn("flowers_main --mode=tune", commands[0])
    self.assertIn("pytest", commands[1])


class DocsTextTest(parameterized.TestCase):

  @parameterized.parameters(*(DOCS + FLAGFILES))
  def test_no_machine_paths_or_issue_numbers(self, name):
    text = read(name)
    # The folder this checkout lives in stands for any machine's own paths.
    self.assertNotIn(os.path.dirname(REPO) + os.sep, text, f"{name} names a machine path")
    found = re.findall(r"\bissues?\s*#?\d+", text, re.IGNORECASE)
    self.assertEmpty(found, f"{name} cites {found}: say what the goal is instead")

  @parameterized.parameters(*DOCS)
  def test_every_test_the_docs_cite_exists(self, name):
    text = read(name)
    defined = _defined_tests()
    every = set().union(*defined.values())
    for file, rest in re.findall(r"tests/(\w+\.py)(?:::([\w:]+))?", text):
      self.assertTrue(
          file in defined or os.path.exists(os.path.join(REPO, "tests", file)),
          f"{name} cites tests/{file}, which does not exist")
      if rest:
        self.assertIn(rest, defined.get(file, ()), f"{name} cites tests/{file}::{rest}: not found")
    # A bare name: test_ and three words or more (shorter ones are report keys, test_accuracy).
    for test in re.findall(r"\b(test(?:_[a-z0-9]+){3,})\b(?!\.py)", text):
      self.assertIn(test, every, f"{name} cites {test}, which no file in tests/ defines")

  def test_flagfile_headers_are_short(self):
    for name in FLAGFILES:
      comments = [l for l in read(name).splitlines() if l.startswith("#")]
      self.assertLessEqual(len(comments), 9, f"{name} has {len(comments)} comment lines")


if __name__ == "__main__":
  absltest.main()
