"""No import cycle inside `lra/` or `attention/` (issue 36): every module's imports, module-level and deferred ones
alike (an import moved into a function still is a cycle, only a hidden one), walked with `ast` from the source."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("lra", "attention")


def _modules(package: str) -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
  """module -> the modules of `packages` it imports (`from pkg import sub` names the submodule when `sub` is one)."""
  modules = {}
  for package in packages:
    modules.update(_modules(package))
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package
          anchor = name.split(".") if is_package else name.split(".")[:-1]
          anchor = anchor[:len(anchor) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      for target in targets:
        while target and target not in modules:  # `import a.b.c` of a non-module attribute: its nearest module
          target = target.rpartition(".")[0]
        if target and target != name:
          graph[name].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as a list of modules (first == last), or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_in_lra_or_attention():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle_when_there_is_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
  graph = import_graph()
  assert "attention.base" in graph["attention.catalog"]  # the one direction: the registry's catalog -> base
  assert not {"attention.catalog", "attention.registry"} & graph["attention.base"]
  for upper, lower in (("attention.builders", "attention.gate"), ("attention.gate", "attention.specs"),
                       ("attention.specs", "attention.catalog")):  # builders -> gate -> specs -> catalog
    assert lower in graph[upper] and upper not in graph[lower], (upper, lower)
  assert "lra.training.pretrain" in graph["lra.training.trainer"]  # the phases: trainer -> pretrain
  assert "lra.training.trainer" not in graph["lra.training.pretrain"]
