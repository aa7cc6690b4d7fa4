"""Command-line conventions shared by the project's binaries (examples, tools).

Bad input to a command line prints ONE line on stderr and exits with status 2,
never a traceback: a bad flag (absl's parser) and a library validation error
alike.
"""

import os
import sys
from typing import Callable, List, Optional

from absl import flags

__all__ = ["first_line", "one_line_flags_parser", "usage_exit"]


def _prog(prog: Optional[str], argv0: str) -> str:
  return prog if prog is not None else os.path.basename(argv0)


def first_line(error: Exception) -> str:
  """The first line of `error`'s message (its type name when empty)."""
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def one_line_flags_parser(prog: Optional[str] = None
                          ) -> Callable[[List[str]], List[str]]:
  """absl's flag parser for ``app.run(flags_parser=...)``: a bad flag prints
  ``<prog>: <error>`` and exits 2 (`prog` defaults to argv[0]'s basename)."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{_prog(prog, argv[0])}: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
  return parse


def usage_exit(error: Exception, prog: Optional[str] = None) -> None:
  """A validation error: one line on stderr, exit status 2 (no traceback)."""
  print(f"{_prog(prog, sys.argv[0])}: {first_line(error)}", file=sys.stderr,
        flush=True)
  sys.exit(2)
