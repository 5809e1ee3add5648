"""The import graph of kedit_pl: imports only point down the layers of docs/architecture.md, and nothing loops.

Every import is read from the source (ast), deferred ones inside functions and `if TYPE_CHECKING:` blocks included,
so a deferred import cannot hide a loop or an upward reach."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kedit_pl"

#: bottom up; a module belongs to the first entry that equals it or is a package above it. Same table as
#: docs/architecture.md (change both together).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "io", "digests", "config", "entry"),                              # 0 leaves
    ("hooks", "weights", "devices", "distributed", "run_folder", "model_folder", "runtime"),  # 1 restore contract, runtime
    ("models", "data", "tokens"),                                                # 2 models, records, token batches
    ("kv", "eval", "locate"),                                                    # 3 shared machinery
    ("methods",),                                                                # 4 one module per method
    ("pipeline", "plan", "api", "patch", "memory_patch", "persist", "sequential_state", "validate"),    # 5 composition
    ("cli", "compare", "head_to_head", "sweep_test", ""),                                    # 6 entry points ("" = kedit_pl/__init__)
]


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def layer_of(module: str) -> int:
    rel = module.split(".", 1)[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        for n in names:
            if rel == n or (n and rel.startswith(n + ".")):
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py (add it there and to docs/architecture.md)")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kedit_pl modules `module` imports anywhere in its source (resolved to the deepest existing module)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for n in names:
            while n not in modules and "." in n:
                n = n.rsplit(".", 1)[0]
            if n in modules and n != module and n.startswith("kedit_pl"):
                found.add(n)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = all_modules(package)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cyc := visit(d)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cyc := visit(m)):
            return cyc
    return None


def test_every_module_has_a_layer():
    for m in all_modules():
        layer_of(m)


def test_imports_only_point_down():
    assert upward_imports(import_graph()) == []


def test_no_import_loops():
    cyc = find_cycle(import_graph())
    assert cyc is None, "import loop: " + " -> ".join(cyc)


def test_the_checker_sees_deferred_loops_and_upward_imports(tmp_path):
    """The checks themselves can fail: a deferred import inside a function that closes a loop, and an import from a
    lower layer to a higher one, are both reported."""
    pkg = tmp_path / "kedit_pl"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "io.py").write_text("def f():\n    from kedit_pl.methods import base\n")
    (pkg / "methods" / "base.py").write_text("from kedit_pl.io import f\nfrom .. import io\n")
    graph = import_graph(pkg)
    assert graph["kedit_pl.io"] == {"kedit_pl.methods.base"}
    assert graph["kedit_pl.methods.base"] == {"kedit_pl.io"}
    assert upward_imports(graph) == ["kedit_pl.io (layer 0) imports kedit_pl.methods.base (layer 4)"]
    assert find_cycle(graph) == ["kedit_pl.io", "kedit_pl.methods.base", "kedit_pl.io"]


@pytest.mark.parametrize("module", ["kedit_pl.weights", "kedit_pl.digests", "kedit_pl.config"])
def test_low_layers_import_alone(module):
    """A low module imports without pulling in anything above its layer (run in a fresh interpreter)."""
    import subprocess
    import sys

    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if m.startswith('kedit_pl.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    loaded = eval(out)
    too_high = [m for m in loaded if layer_of(m) > layer_of(module)]
    assert too_high == []
