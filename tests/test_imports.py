"""The distill package's import graph: no circles, and no function-local import that could hide one.

Each module is parsed with ``ast`` (nothing is imported), relative imports are
resolved, and an edge goes from a module to every distill module it imports at
module level. Imports inside functions are listed separately: they are allowed
only where :data:`LAZY_IMPORTS` says why.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"

# module -> why its function-local imports of distill modules are there. Not for hiding a circle.
LAZY_IMPORTS = {
    # Each command imports its stage when it runs, so `distill --help` and a mistyped flag
    # answer without loading torch.
    "distill.cli": "startup speed of the command line",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The distill modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    out = [f"{stem}.{a.name}" for a in node.names if f"{stem}.{a.name}" in known]  # from pkg import submodule
    if stem in known:
        out.append(stem)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-local edges) between distill modules."""
    modules = _modules()
    known = set(modules)
    top: dict[str, set[str]] = {m: set() for m in modules}
    local: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            for target in _targets(node, name, is_package, known):
                if name.startswith(target + "."):
                    continue  # a module's own packages are loaded before it: not an edge
                (local if id(node) in in_function else top)[name].add(target)
    return top, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_resolver_sees_the_imports_it_should():
    top, _ = _graph()
    # Spot checks of each import form, so an empty graph cannot pass the tests below.
    assert "distill.errors" in top["distill.io"]  # from .errors import ...
    assert "distill.formats.share" in top["distill.formats"]  # package __init__: from .share import ...
    assert "distill.data" in top["distill.formats.common"]  # from ..data import ...
    assert "distill.formats.share_schema" in top["distill.formats.share"]  # from . import share_schema as S


def test_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_distill_package_has_no_import_circle():
    top, local = _graph()
    both = {m: top[m] | local[m] for m in top}  # a lazy import must not close a circle either
    assert _cycle(both) is None, f"import circle: {' -> '.join(_cycle(both))}"


def test_no_function_local_import_of_a_distill_module_outside_the_allow_list():
    _, local = _graph()
    offenders = {m: sorted(t) for m, t in local.items() if t and m not in LAZY_IMPORTS}
    assert not offenders, f"function-local imports of distill modules (move them to the top): {offenders}"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def test_the_walls_of_docs_style_hold():
    """A share and an audit need neither the distiller nor the buffer (STYLE.md, 'walls worth keeping')."""
    top, _ = _graph()
    method = {m for m in top if m == "distill.buffer" or m.startswith("distill.mtt")}
    readers = [m for m in top if m.startswith(("distill.formats", "distill.privacy"))]
    # The review page reads a run folder and a share through formats/ only (issue 26).
    readers += ["distill.evaluate", "distill.export", "distill.runshare", "distill.metrics", "distill.report"]
    for m in readers:
        assert not (_reachable(top, m) & method), f"{m} reaches {sorted(_reachable(top, m) & method)}"


def test_the_share_schema_imports_no_training_code():
    """The recipe in a share is data; distill.train interprets it (TrainRecipe.following)."""
    top, _ = _graph()
    training = {"distill.train", "distill.augment", "distill.batched", "distill.dp"}
    for m in [m for m in top if m.startswith("distill.formats")]:
        assert not (_reachable(top, m) & training), f"{m} reaches {sorted(_reachable(top, m) & training)}"
