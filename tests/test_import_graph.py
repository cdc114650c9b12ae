"""The package's import rules (ARCHITECTURE.md), read from the source: no import circles between vramkit's
modules, and only `vramkit.comfy` imports ComfyUI.

Only module-level imports count (those run when a module is imported; an import inside a function runs
later, which is how `vramkit.comfy` reaches ComfyUI lazily). Imports under ``if TYPE_CHECKING:`` are skipped:
they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "comfy_nodes" / "vramkit"
#: Top-level names of ComfyUI's own modules (what a ComfyUI checkout puts on sys.path).
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_api", "nodes", "folder_paths", "server", "execution")


def _module_name(path: Path) -> str:
    parts = ["vramkit", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: at top level, or inside top-level if/try/with
    blocks (but not under ``if TYPE_CHECKING``), never inside a function or class body."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names of the modules an import statement imports (``from X import y`` counts X, and X.y
    where that is a module: the caller keeps only names that are modules of the package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package's modules it imports at module level, module -> external top-level names)."""
    files = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        deps: set[str] = set()
        outside: set[str] = set()
        for node in _module_level_imports(tree):
            for target in _imported(name, _is_package(path), node):
                if target == "vramkit" or target.startswith("vramkit."):
                    # Importing a.b.c imports a and a.b first: count each package on the way, except the
                    # module's own packages (always initialized before it: `from . import x` is no circle).
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):
                        candidate = ".".join(parts[:i])
                        if candidate in files and candidate != name and not name.startswith(candidate + "."):
                            deps.add(candidate)
                elif isinstance(node, ast.Import) or node.level == 0:
                    outside.add(target.split(".")[0])
        edges[name] = deps
        external[name] = outside
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a module importing itself), each as
    one circle through it, found with Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(_circle_through(sorted(component), edges))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return components


def _circle_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One import circle inside a strongly connected component, as a path back to its start."""
    members = set(component)
    start = component[0]
    path = [start]
    seen = {start}
    while True:
        nxt = sorted(w for w in edges[path[-1]] if w in members)
        back = [w for w in nxt if w in seen]
        if back:
            return [*path[path.index(back[0]):], back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


def test_the_walk_finds_the_package() -> None:
    edges, _external = _graph()
    for name in ("vramkit", "vramkit.quant", "vramkit.quant.api", "vramkit.attention.api", "vramkit.comfy.nodes",
                 "vramkit.comfy.attention_override", "vramkit.cli", "vramkit.plan", "vramkit.io"):
        assert name in edges
    assert "vramkit.quant.api" in edges["vramkit.quant"]
    assert "vramkit.attention.api" in edges["vramkit.comfy.attention_override"]


def test_the_circle_finder_names_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_cycles(edges)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    edges, _external = _graph()
    circles = _cycles(edges)
    assert not circles, "import circles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("comfyui_module", COMFYUI_MODULES)
def test_only_vramkit_comfy_imports_comfyui(comfyui_module: str) -> None:
    _edges, external = _graph()
    offenders = sorted(name for name, names in external.items() if comfyui_module in names
                       and not (name == "vramkit.comfy" or name.startswith("vramkit.comfy.")))
    assert not offenders, f"{comfyui_module} imported at module level outside vramkit.comfy: {offenders}"


def test_vramkit_comfy_imports_comfyui_lazily_too() -> None:
    # `import vramkit.comfy` must work without ComfyUI: ComfyUI is imported inside functions only.
    _edges, external = _graph()
    offenders = sorted(name for name, names in external.items() if name.startswith("vramkit.comfy")
                       and names & set(COMFYUI_MODULES))
    assert not offenders, f"ComfyUI imported at module level in {offenders}"
