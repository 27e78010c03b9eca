"""The import graph between driftloop's packages (parsed from the sources, nothing imported).

Workers talk only through Kafka topics and the stores: streams/, serving/, drift/ and retrain/ never import
each other. core/ is the base and imports no other package; registry/ builds on core/ only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "app", "registry", "streams", "features", "serving", "drift", "retrain", "bench", "examples")
WORKERS = ("streams", "serving", "drift", "retrain")


def _target(name: str) -> str | None:
    """The driftloop package an absolute module name belongs to."""
    parts = name.split(".")
    return parts[1] if parts[0] == "driftloop" and len(parts) > 1 and parts[1] in PACKAGES else None


def imports_of(f: Path, folder: Path) -> set[tuple[str, int]]:
    """(package, line) of every driftloop package a file of the package ``folder`` imports, at any depth
    (function-level included), by ``import``, ``from ... import`` (relative too) or
    ``importlib.import_module("driftloop....")``."""
    package = folder.name
    depth = len(f.relative_to(folder).parts)  # 1 for a module at the package's top
    out = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level >= depth + 1:  # above the package: ``from ..x import`` names a sibling package
                    base = (node.module or "").split(".")
                    names = [f"driftloop.{'.'.join(base)}"] if node.module else \
                        [f"driftloop.{a.name}" for a in node.names]
                else:
                    names = [f"driftloop.{package}"]
            elif node.module == "driftloop":
                names = [f"driftloop.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        out |= {(t, node.lineno) for n in names if (t := _target(n)) is not None}  # type: ignore[attr-defined]
    return out


def graph() -> dict[str, list[str]]:
    """package → ["<file>:<line> -> <package>", ...] for imports of other packages."""
    out: dict[str, list[str]] = {p: [] for p in PACKAGES}
    for p in PACKAGES:
        for f in sorted((ROOT / p).rglob("*.py")):
            for target, line in sorted(imports_of(f, ROOT / p)):
                if target != p:
                    out[p].append(f"{f.relative_to(ROOT)}:{line} -> {target}")
    return out


@pytest.fixture(scope="module")
def edges() -> dict[str, list[str]]:
    return graph()


def _to(edges: dict[str, list[str]], src: str, targets: set[str]) -> list[str]:
    return [e for e in edges[src] if e.rsplit(" -> ", 1)[1] in targets]


def test_the_parser_sees_imports(edges: dict[str, list[str]], tmp_path: Path) -> None:
    assert _to(edges, "app", {"core"}) and _to(edges, "registry", {"core"})  # known edges are found
    pkg = tmp_path / "serving"
    (pkg / "sub").mkdir(parents=True)
    f = pkg / "sub" / "m.py"
    f.write_text("import driftloop.streams.app\nfrom driftloop import drift\nfrom ...core import kafka\n"
                 "from . import sibling\ndef g():\n    from driftloop.retrain.trainers import x\n"
                 "    importlib.import_module('driftloop.registry.versions')\n")
    assert {t for t, _ in imports_of(f, pkg)} == {"streams", "drift", "core", "serving", "retrain", "registry"}


@pytest.mark.parametrize("worker", WORKERS)
def test_workers_never_import_each_other(edges: dict[str, list[str]], worker: str) -> None:
    bad = _to(edges, worker, set(WORKERS) - {worker})
    assert not bad, "\n".join(bad)


def test_core_imports_no_other_package(edges: dict[str, list[str]]) -> None:
    bad = _to(edges, "core", {"app", "streams", "serving", "drift", "retrain", "registry", "features", "bench"})
    assert not bad, "\n".join(bad)


def test_registry_builds_on_core_only(edges: dict[str, list[str]]) -> None:
    bad = [e for e in edges["registry"] if not e.endswith(" -> core")]
    assert not bad, "\n".join(bad)
