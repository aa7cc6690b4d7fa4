"""Validation at the public boundary: one module, one message format.

Every check raises ``ValueError`` (or ``TypeError`` for wrong types) with the
message ``Expected <name>=<value!r> to be <what was expected>.`` so that a user
sees the argument, the value received and what was expected. Checks run before
any work or state change. Privacy invariants are never ``assert``-ed: they raise.
"""

import math
import numbers
from typing import Any, Iterable, Optional


def _fail(name: str, value: Any, expectation: str, exc=ValueError):
  raise exc(f"Expected {name}={value!r} to be {expectation}."
            f"{_keras3_hint(value)}")


def _keras3_hint(value: Any) -> str:
  """Names the fix when `value` is a Keras 3 object (dpquant_tf is Keras 2)."""
  module = type(value).__module__ or ""
  if module == "keras" or module.startswith("keras."):
    return (f" It is a Keras 3 object ({type(value).__module__}."
            f"{type(value).__name__}); dpquant_tf needs Keras 2 (tf-keras): "
            "import dpquant_tf first and build it with tf.keras (or "
            "`import tf_keras`), not `import keras`.")
  return ""


def check_type(name: str, value: Any, types, expectation: Optional[str] = None):
  if not isinstance(value, types):
    _fail(name, value, expectation or f"of type {types}", TypeError)
  return value


def check_number(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    _fail(name, value, "a real number", TypeError)
  if not math.isfinite(float(value)):
    _fail(name, value, "finite")
  return float(value)


def check_positive(name: str, value: Any) -> float:
  v = check_number(name, value)
  if not v > 0:
    _fail(name, value, "> 0")
  return v


def check_non_negative(name: str, value: Any) -> float:
  v = check_number(name, value)
  if not v >= 0:
    _fail(name, value, ">= 0")
  return v


def check_probability(name: str, value: Any, *, allow_zero: bool = False) -> float:
  v = check_number(name, value)
  ok = (0 <= v <= 1) if allow_zero else (0 < v <= 1)
  if not ok:
    _fail(name, value, "in [0, 1]" if allow_zero else "in (0, 1]")
  return v


def check_open_unit(name: str, value: Any) -> float:
  v = check_number(name, value)
  if not 0 < v < 1:
    _fail(name, value, "in (0, 1)")
  return v


def check_int(name: str, value: Any, *, low: Optional[int] = None,
              high: Optional[int] = None) -> int:
  """Checks an integer in [low, high] (bounds inclusive, None = unbounded)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    _fail(name, value, "an integer", TypeError)
  v = int(value)
  if (low is not None and v < low) or (high is not None and v > high):
    lo = "-inf" if low is None else str(low)
    hi = "inf" if high is None else str(high)
    _fail(name, value, f"an integer in [{lo}, {hi}]")
  return v


def check_one_of(name: str, value: Any, allowed: Iterable[Any]):
  allowed = list(allowed)
  if value not in allowed:
    _fail(name, value, f"one of {allowed}")
  return value


def check_enum(name: str, value: Any, enum_cls):
  """Accepts a member of `enum_cls` or its (case-insensitive) name or value."""
  if isinstance(value, enum_cls):
    return value
  for member in enum_cls:
    if value == member.value or (isinstance(value, str) and
                                 value.lower() == member.name.lower()):
      return member
  _fail(name, value, f"one of {[m.name.lower() for m in enum_cls]}")


def fail(name: str, value: Any, expectation: str, exc=ValueError):
  """Raises the uniform error for checks that do not fit the helpers above."""
  _fail(name, value, expectation, exc)
