"""Runs one test file under pytest: the main of every Bazel py_test in tests/.

Each `py_test` in tests/**/BUILD passes its test file's runfiles path
(`args = ["$(rootpath test_x.py)"]`); this runs pytest on that one file with
the default suite's marker filter (`-m "not slow"`), writes the JUnit XML that
Bazel asks for, and keeps pytest from writing a cache into the read-only
runfiles tree. Extra pytest arguments can be given with `--test_arg=...`.
Not a test file itself (its name does not start with `test_`).
"""

import os
import sys

# pytest's exit code when every test in the file was deselected (all slow).
_NO_TESTS_COLLECTED = 5


def main(argv: list[str]) -> int:
  """Runs pytest on argv (the test file first); returns the exit code."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import pytest  # pylint: disable=g-import-not-at-top
  args = ["-q", "-p", "no:cacheprovider", "-m", "not slow"]
  xml_output = os.environ.get("XML_OUTPUT_FILE")
  if xml_output:
    args.append(f"--junitxml={xml_output}")
  tmpdir = os.environ.get("TEST_TMPDIR")
  if tmpdir:
    args.append(f"--basetemp={os.path.join(tmpdir, 'pytest')}")
  code = pytest.main(args + argv)
  if code == _NO_TESTS_COLLECTED:
    print(f"pytest_main: every test in {argv[:1]} is marked slow; nothing to run.")
    return 0
  return int(code)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
