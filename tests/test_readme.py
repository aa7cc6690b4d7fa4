"""The README's usage example runs as written (on a smaller budget).

The only edit before running it: the number of epochs (1 instead of 5), so it
fits the fast suite. Everything else, the public API calls included, is
the README's text. The usage block is ten lines or fewer (issue 20).
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
  text = README.read_text()
  usage = text[text.index("## Usage"):]
  match = re.search(r"```python\n(.*?)```", usage, re.S)
  assert match, "README has no python block under ## Usage"
  return match.group(1)


def test_readme_usage_example_runs():
  code = _usage_block()
  assert len(code.strip().splitlines()) <= 10
  assert "epochs=5" in code and "make_private(" in code
  code = code.replace("epochs=5", "epochs=1")
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  private = namespace["private"]
  ledger, delta = private.ledger, private.delta
  eps = ledger.epsilon(delta)
  assert 0 < eps < 8.0 + 1e-9
  assert "Poisson sampling" in ledger.statement(delta)
