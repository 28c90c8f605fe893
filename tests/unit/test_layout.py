"""The top level is the architecture: which package may import which, so that no two depend on each other."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("common", "workers", "engine", "server", "client")
# What each package may import, besides itself and the generated stubs (featurebank.v1): a strict order,
# common <- workers <- engine <- server, and the SDK on common alone. Shared types live in common.
ALLOWED = {
    "common": set(),
    "workers": {"common"},
    "engine": {"common", "workers"},
    "server": {"common", "workers", "engine"},
    "client": {"common"},
}
# The one way back: the CLI's `serve` command starts the server, importing it when run (never at import).
LAZY_EXCEPTIONS = {("client/cli.py", "server")}


def featurebank_imports(path: pathlib.Path):
    """(package, lazy) for each featurebank.<package> import in a file; lazy = inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lazy_nodes = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "featurebank" else [f"featurebank.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "featurebank" and len(parts) > 1:
                yield parts[1], id(node) in lazy_nodes


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_downwards(package):
    """A package imports only the packages below it (common <- workers <- engine <- server; client on common): no cycles."""
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for target, lazy in featurebank_imports(path):
            if target in (package, "v1") or target in ALLOWED[package]:
                continue
            if lazy and (rel, target) in LAZY_EXCEPTIONS:
                continue
            wrong.append(f"{rel} imports featurebank.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_allowed_graph_has_no_cycle():
    """The allowed imports themselves form no cycle (the one lazy exception is the CLI starting the server)."""
    seen: dict[str, int] = {}

    def visit(p: str, stack: tuple[str, ...]) -> None:
        assert p not in stack, f"cycle: {' -> '.join((*stack, p))}"
        for q in ALLOWED[p]:
            visit(q, (*stack, p))

    for p in PACKAGES:
        visit(p, ())
        seen[p] = 1
    assert set(seen) == set(PACKAGES)
