"""The package's import graph has no cycle, lazy imports inside functions included.

A function-level import only postpones a cycle to the first call: evaluate.py once imported
select_device from train.py inside evaluate_run while train.py imported evaluate.py at the
top. So every ``tinylm`` import counts here, wherever it is written; only imports under
``if TYPE_CHECKING:`` (never executed) are left out.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "tinylm"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def _imports(nodes):
    """Every Import/ImportFrom among nodes and inside them, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _type_checking_only(node):
            yield from _imports(node.orelse)
        else:
            yield from _imports(ast.iter_child_nodes(node))


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _imports([ast.parse(path.read_text(), str(path))]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # "from tinylm import checkpoint" imports the submodule tinylm.checkpoint
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        # Importing a.b.c first runs a/__init__ and a/b/__init__: those are edges too, except
        # into a package that holds the importing module (it is already being initialised).
        ancestors = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        targets += [a for a in ancestors if not name.startswith(a + ".") and a != name]
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {name: imported_modules(path, name, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # "open": on the current path; "done": fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "tinylm.train" in graph and "tinylm.config" in graph["tinylm.train"]  # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_lazy_import_cycle_is_found(tmp_path):
    package = tmp_path / "tinylm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from tinylm.b import g\n")
    (package / "b.py").write_text("def g():\n    from tinylm import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tinylm import a\n")
    graph = import_graph(package)
    assert graph["tinylm.c"] == set()  # only for type checkers: never runs
    assert find_cycle(graph) == ["tinylm.a", "tinylm.b", "tinylm.a"]


def test_a_cycle_through_a_packages_init_is_found(tmp_path):
    package = tmp_path / "tinylm"
    (package / "p").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "p" / "__init__.py").write_text("from tinylm.p.a import f\n")  # importing p.b runs this
    (package / "p" / "a.py").write_text("from tinylm.x import g\n\ndef f(): ...\n")
    (package / "p" / "b.py").write_text("def h(): ...\n")
    (package / "x.py").write_text("from tinylm.p.b import h\n\ndef g(): ...\n")
    assert find_cycle(import_graph(package)) == ["tinylm.p", "tinylm.p.a", "tinylm.x", "tinylm.p"]
