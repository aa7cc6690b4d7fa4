"""The Bazel BUILD files cover the source tree (checked textually, no Bazel needed).

Fails when a module under dpquant_tf/ has no py_library, a test file under
tests/ no py_test, a script under examples/ or tools/ no py_binary, or when a
target's in-repo imports are not reachable through its deps (Bazel would then
run it without the imported file and fail with an ImportError). BUILD files are
Starlark, which for the rules used here parses as Python; each rule call is read
with `ast`. Rerun `python tools/sync_build.py` to fix a failure (docs/BAZEL.md).
"""

import ast
import os
import re
from typing import Dict, List, Set

import pytest

# The real checkout (under Bazel this file is a runfiles symlink into it).
_REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_ROOTS = ("dpquant_tf", "tests", "examples", "tools")
_RULES = ("py_library", "py_test", "py_binary")
_SIZES = ("small", "medium", "large", "enormous")
_RUNNER = "//tests:pytest_main.py"


def _py_files() -> List[str]:
  out = []
  for root in _ROOTS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(_REPO, root)):
      dirnames[:] = [d for d in dirnames
                     if d != "__pycache__" and not d.startswith(".")]
      for name in filenames:
        if name.endswith(".py"):
          out.append(os.path.relpath(os.path.join(dirpath, name), _REPO)
                     .replace(os.sep, "/"))
  return sorted(out)


class _Target:

  def __init__(self, kind: str, package: str, attrs: Dict[str, object]):
    self.kind = kind
    self.package = package
    self.attrs = attrs
    self.name = attrs["name"]
    self.label = f"//{package}:{self.name}"

  def _resolve(self, label: str) -> str:
    """Absolute label of a label or a file label written in this package."""
    if label.startswith(":"):
      return f"//{self.package}{label}"
    if label.startswith("//") and ":" not in label:
      return f"{label}:{label.rsplit('/', 1)[-1]}"
    if not label.startswith("//"):
      return f"//{self.package}:{label}"
    return label

  @property
  def srcs(self) -> List[str]:
    """Repository-relative paths of the source files."""
    out = []
    for src in self.attrs.get("srcs", []):
      package, _, name = self._resolve(src)[2:].partition(":")
      out.append(f"{package}/{name}" if package else name)
    return out

  @property
  def deps(self) -> List[str]:
    return [self._resolve(d) for d in self.attrs.get("deps", [])]


def _parse_build(path: str) -> List[_Target]:
  package = os.path.dirname(os.path.relpath(path, _REPO)).replace(os.sep, "/")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  targets = []
  for node in tree.body:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)):
      continue
    if node.value.func.id not in _RULES:
      continue
    attrs = {}
    for keyword in node.value.keywords:
      try:
        attrs[keyword.arg] = ast.literal_eval(keyword.value)
      except ValueError:  # glob(), select(): not used in this repository.
        attrs[keyword.arg] = ast.unparse(keyword.value)
    targets.append(_Target(node.value.func.id, package, attrs))
  return targets


@pytest.fixture(scope="module")
def targets() -> Dict[str, _Target]:
  found = {}
  for dirpath, dirnames, filenames in os.walk(_REPO):
    rel = os.path.relpath(dirpath, _REPO)
    dirnames[:] = [d for d in dirnames if not d.startswith((".", "bazel-"))
                   and d not in ("__pycache__", "third_party", "build", "dist")]
    if rel.split(os.sep)[0] in (".venv",):
      continue
    if "BUILD" in filenames:
      for target in _parse_build(os.path.join(dirpath, "BUILD")):
        assert target.label not in found, f"duplicate target {target.label}"
        found[target.label] = target
  return found


def _owners(targets: Dict[str, _Target], path: str, kinds=_RULES) -> List[_Target]:
  return [t for t in targets.values() if t.kind in kinds and path in t.srcs]


def _has_main_guard(path: str) -> bool:
  with open(os.path.join(_REPO, path), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
             for n in tree.body)


def test_every_python_folder_has_a_build_file():
  folders = {os.path.dirname(p) for p in _py_files()}
  missing = sorted(f for f in folders
                   if not os.path.exists(os.path.join(_REPO, f, "BUILD")))
  assert not missing, f"folders without a BUILD file: {missing}"


def test_every_library_module_has_its_own_py_library(targets):
  problems = []
  for path in _py_files():
    if not path.startswith("dpquant_tf/"):
      continue
    owners = _owners(targets, path, ("py_library",))
    if len(owners) != 1 or len(owners[0].srcs) != 1:
      problems.append(f"{path}: {[o.label for o in owners]}")
    elif owners[0].package != os.path.dirname(path):
      problems.append(f"{path}: its py_library is in another package")
  assert not problems, ("modules without exactly one single-file py_library:\n"
                        + "\n".join(problems))


def test_every_test_file_has_its_py_test(targets):
  problems = []
  for path in _py_files():
    base = os.path.basename(path)
    if not (path.startswith("tests/") and base.startswith("test_")):
      continue
    tests = [t for t in _owners(targets, path, ("py_test",))
             if t.name == base[:-3]]
    if len(tests) != 1:
      problems.append(f"{path}: no py_test named {base[:-3]!r} with it in srcs")
      continue
    test = tests[0]
    if test._resolve(test.attrs.get("main", "")) != _RUNNER:
      problems.append(f"{test.label}: main is not {_RUNNER}")
    if test.attrs.get("args") != [f"$(rootpath {base})"]:
      problems.append(f"{test.label}: args do not name its file")
    if test.attrs.get("size") not in _SIZES:
      problems.append(f"{test.label}: size not set")
    if not test.attrs.get("tags"):
      problems.append(f"{test.label}: no tags")
  assert not problems, "\n".join(problems)


def test_every_test_support_file_is_in_some_target(targets):
  missing = [p for p in _py_files()
             if p.startswith("tests/") and not _owners(targets, p)]
  assert not missing, f"test files no target includes: {missing}"


@pytest.mark.parametrize("root", ["examples", "tools"])
def test_every_script_has_a_py_binary_and_every_module_a_target(targets, root):
  problems = []
  for path in _py_files():
    if not path.startswith(root + "/"):
      continue
    if _has_main_guard(path):
      name = os.path.basename(path)[:-3]
      binaries = [t for t in _owners(targets, path, ("py_binary",))
                  if t.name == name and t.package == os.path.dirname(path)]
      if not binaries:
        problems.append(f"{path}: no py_binary //{os.path.dirname(path)}:{name}")
    elif not _owners(targets, path):
      problems.append(f"{path}: in no target")
  assert not problems, "\n".join(problems)


def _module_map() -> Dict[str, str]:
  out = {}
  for path in _py_files():
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imported_files(path: str, modules: Dict[str, str]) -> Set[str]:
  """In-repo files that `path` imports (longest known module prefix)."""
  with open(os.path.join(_REPO, path), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  package = os.path.dirname(path).replace("/", ".")
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names.update(f"{base}.{a.name}" for a in node.names)
  siblings = {os.path.basename(p)[:-3]: p for p in modules.values()
              if os.path.dirname(p) == os.path.dirname(path)}
  found = set()
  for name in names:
    parts = name.split(".")
    if parts[0] in siblings and parts[0] not in _ROOTS:  # script-dir import
      found.add(siblings[parts[0]])
      continue
    for end in range(len(parts), 0, -1):
      if ".".join(parts[:end]) in modules:
        found.add(modules[".".join(parts[:end])])
        break
  found.discard(path)
  return found


def _ancestor_inits(path: str, files: Set[str]) -> Set[str]:
  parts = path.split("/")[:-1]
  inits = {"/".join(parts[:i] + ["__init__.py"]) for i in range(1, len(parts) + 1)}
  return {p for p in inits if p in files and p != path}


def test_in_repo_imports_are_reachable_through_deps(targets):
  modules = _module_map()
  files = set(modules.values())
  closures: Dict[str, Set[str]] = {}

  def closure(label: str) -> Set[str]:
    if label not in closures:
      closures[label] = set()  # cycles are Bazel's to report
      target = targets.get(label)
      if target is None:
        return closures[label]
      result = set(target.srcs)
      for dep in target.deps:
        result |= closure(dep)
      closures[label] = result
    return closures[label]

  problems = []
  for target in targets.values():
    available = closure(target.label)
    for src in target.srcs:
      if not src.endswith(".py") or src not in files:
        continue
      needed = _imported_files(src, modules)
      if target.kind != "py_library" or not src.startswith("dpquant_tf/"):
        # Binaries and tests also need every package __init__ Python runs.
        needed |= {i for n in needed for i in _ancestor_inits(n, files)}
        needed |= _ancestor_inits(src, files)
      else:
        needed -= _ancestor_inits(src, files)  # would be a dependency cycle
      missing = sorted(needed - available)
      if missing:
        problems.append(f"{target.label} ({src}) imports {missing}")
  assert not problems, ("imports not reachable through deps (run "
                        "tools/sync_build.py):\n" + "\n".join(problems))


def test_deps_name_existing_targets(targets):
  problems = [f"{t.label} -> {d}" for t in targets.values() for d in t.deps
              if d.startswith("//") and d not in targets]
  assert not problems, "deps on unknown targets:\n" + "\n".join(problems)


def test_workspace_is_offline_and_has_the_three_stubs():
  with open(os.path.join(_REPO, "WORKSPACE"), encoding="utf-8") as f:
    workspace = f.read()
  for name in ("rules_cc", "rules_java", "remote_coverage_tools"):
    assert re.search(rf'local_repository\(\s*name = "{name}"', workspace), name
    assert os.path.isdir(os.path.join(_REPO, "third_party", name)), name
  for fetching in ("http_archive", "git_repository", "http_file", "maybe("):
    assert fetching not in workspace


def test_no_absolute_paths_in_committed_bazel_files():
  paths = ["WORKSPACE", ".bazelrc", "third_party/python/venv_python.sh"]
  for dirpath, dirnames, filenames in os.walk(_REPO):
    dirnames[:] = [d for d in dirnames if not d.startswith((".", "bazel-"))]
    paths += [os.path.relpath(os.path.join(dirpath, f), _REPO)
              for f in filenames if f == "BUILD"]
  offenders = []
  for path in paths:
    with open(os.path.join(_REPO, path), encoding="utf-8") as f:
      text = f.read()
    if re.search(r"(?<![\w.$])/(work|home|root|usr/local|opt)/", text):
      offenders.append(path)
  assert not offenders, f"absolute paths in {offenders}"


def test_virtualenv_is_not_scanned_by_bazel():
  with open(os.path.join(_REPO, ".bazelignore"), encoding="utf-8") as f:
    assert ".venv" in f.read().split()
