"""The layers import one way (README, "Architecture"); `make lint` runs this file.

    sandtrace (the entry point) -> collector -> probes, tail, detect -> api
                                -> service   -> tail, detect          -> api
    collector, service, tail -> fleet (NATS names, connection, streams) -> api

Every `import` and `from ... import` in a layer's modules, at any depth (lazy imports in
functions count too), must name the layer itself, a layer it may use, or something outside
sandtrace. api is the contract every process shares and does no I/O of its own.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAY_IMPORT: dict[str, set[str]] = {
    "api": set(),
    "probes": {"api"},
    "detect": {"api"},
    "fleet": {"api"},
    "tail": {"api", "fleet"},
    "collector": {"api", "probes", "detect", "tail", "fleet"},
    "service": {"api", "detect", "tail", "fleet"},
    "sandtrace": {"api", "probes", "collector", "detect", "service", "tail", "fleet"},
}
LAYERS = set(MAY_IMPORT)
# Modules whose presence in api would mean it does I/O or serves something itself.
NOT_IN_API = {"asyncio", "aiohttp", "socket", "subprocess", "structlog", "bcc", "pyroute2"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "<relative>"))
    return found


def violations(layer: str, root: Path = ROOT) -> list[str]:
    allowed = MAY_IMPORT[layer] | {layer}
    bad = []
    for path in sorted((root / layer).rglob("*.py")):
        for line, module in imports(path):
            where = f"{path.relative_to(root)}:{line}"
            if module == "<relative>":
                bad.append(f"{where}: relative import (write the layer's name)")
            elif module in LAYERS and module not in allowed:
                bad.append(f"{where}: {layer} imports {module}")
            elif layer == "api" and module in NOT_IN_API:
                bad.append(f"{where}: api imports {module} (api does no I/O)")
    return bad


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    assert (ROOT / layer / "__init__.py").exists()
    assert violations(layer) == []


def test_every_package_is_a_known_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == LAYERS


def test_the_check_catches_an_import_against_the_direction(tmp_path: Path) -> None:
    for layer in ("api", "detect"):
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "api" / "bad.py").write_text("def f():\n    from detect import engine\n")
    (tmp_path / "detect" / "ok.py").write_text("import api.events\nfrom . import x\n")
    assert violations("api", tmp_path) == ["api/bad.py:2: api imports detect"]
    assert violations("detect", tmp_path) == [
        "detect/ok.py:2: relative import (write the layer's name)"
    ]


def test_every_python_package_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (the data directories bpf/ and rules/ are
    mapped into them); a package missing there would be missing from an install."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for layer in LAYERS
        for p in (ROOT / layer).rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
