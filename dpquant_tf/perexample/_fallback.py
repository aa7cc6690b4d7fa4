"""Which variables a run sent down the jacobian path (the slow fallback).

The per-example path logs one warning per trace that falls back to the
jacobian for some variables (``absl`` logging, "jacobian fallback for ...").
:class:`FallbackWatch` collects those warnings while it is active, so a run
can report positively that every trainable variable took the fast path.
"""

import logging
from typing import List

__all__ = ["FallbackWatch"]


class FallbackWatch(logging.Handler):
  """Context manager collecting the "jacobian fallback" warnings.

  Example:
    >>> with FallbackWatch() as watch:
    ...   pass   # model.fit(...)
    >>> watch.messages   # empty: no variable fell back to the jacobian
    []
  """

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: List[str] = []

  def emit(self, record):
    message = record.getMessage()
    if "jacobian fallback" in message:
      self.messages.append(message)

  def __enter__(self):
    logging.getLogger("absl").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("absl").removeHandler(self)
    return False
