"""The architecture the privacy review asked for, checked on the source tree.

"One privacy core" (issue 11): one noise function, one event builder, one
generator factory, one layer classifier, and imports that run one way. These
tests read the code (AST, no imports), so they fail as soon as a second place
draws noise, builds a Gaussian event or makes a generator, or an import goes
the wrong way.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "dpquant_tf"


def _py_files(*dirs):
  for d in dirs:
    yield from sorted((ROOT / d).rglob("*.py"))


def _rel(path):
  return path.relative_to(ROOT).as_posix()


def _tree(path):
  return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(path):
  """Dotted names a file imports (``from a.b import c`` gives a.b and a.b.c)."""
  out = set()
  for node in ast.walk(_tree(path)):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      out.update(f"{node.module}.{alias.name}" for alias in node.names)
  return out


def _calls_named(path, name):
  """Line numbers of calls ``x.name(...)`` or ``name(...)`` in a file."""
  lines = []
  for node in ast.walk(_tree(path)):
    if isinstance(node, ast.Call):
      func = node.func
      called = (func.attr if isinstance(func, ast.Attribute) else
                func.id if isinstance(func, ast.Name) else None)
      if called == name:
        lines.append(node.lineno)
  return lines


def _where_called(name, dirs=("dpquant_tf", "examples", "tools")):
  return {_rel(p): _calls_named(p, name) for p in _py_files(*dirs)
          if _calls_named(p, name)}


@pytest.mark.parametrize("name, allowed", [
    ("GaussianDpEvent", {"dpquant_tf/privacy/_events.py"}),
    ("PoissonSampledDpEvent", {"dpquant_tf/privacy/_events.py"}),
    ("normal", {"dpquant_tf/privacy/_mechanisms.py"}),
    ("from_non_deterministic_state", {"dpquant_tf/privacy/_random.py"}),
    ("from_seed", {"dpquant_tf/privacy/_random.py"}),
])
def test_one_place_for_each_privacy_step(name, allowed):
  where = _where_called(name)
  assert set(where) <= allowed, (
      f"{name}(...) is called outside {sorted(allowed)}: {where}")
  assert where, f"expected {name}(...) in {sorted(allowed)}"


def test_one_layer_classifier():
  defined = [_rel(p) for p in _py_files("dpquant_tf")
             for node in ast.walk(_tree(p))
             if isinstance(node, ast.ClassDef) and node.name == "LayerKind"]
  assert len(defined) == 1, defined


def test_privacy_imports_no_private_module_of_another_subpackage():
  bad = {}
  for path in _py_files("dpquant_tf/privacy"):
    for mod in _imported_modules(path):
      parts = mod.split(".")
      if (len(parts) >= 3 and parts[0] == "dpquant_tf" and
          parts[1] != "privacy" and parts[2].startswith("_")):
        bad.setdefault(_rel(path), []).append(mod)
  assert not bad, bad


def test_library_imports_neither_examples_nor_tools():
  bad = {_rel(p): sorted(m for m in _imported_modules(p)
                         if m.split(".")[0] in ("examples", "tools"))
         for p in _py_files("dpquant_tf")}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, bad


def test_examples_do_not_import_tools():
  bad = {_rel(p): sorted(m for m in _imported_modules(p)
                         if m.split(".")[0] == "tools")
         for p in _py_files("examples")}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, bad


def test_library_ships_no_test_or_research_modules():
  names = {p.name for p in _py_files("dpquant_tf")}
  leftovers = names & {"_prototype.py", "_cluster.py", "_traffic.py",
                       "_packing.py"}
  assert not leftovers, leftovers


def test_checker_sees_a_violation(tmp_path, monkeypatch):
  """The AST helpers find what they are meant to find (no vacuous pass)."""
  src = tmp_path / "m.py"
  src.write_text("import tools.x\nfrom dpquant_tf.distribute import _y\n"
                 "g.normal([1])\nGaussianDpEvent(1.0)\n")
  assert _calls_named(src, "normal") == [3]
  assert _calls_named(src, "GaussianDpEvent") == [4]
  assert {"tools.x", "dpquant_tf.distribute._y"} <= _imported_modules(src)
