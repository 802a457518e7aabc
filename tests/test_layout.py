"""The codebase's shape, checked: the library never imports the layers above it (experiments,
benchmarks, converters, tests), its sub-packages import only downwards, and no function in the
library or the converters runs past 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARY = REPO_ROOT / "nexvitad_jax"
# Each module's layer (the longest matching prefix); a module may import its own layer or lower ones.
LAYERS = {
    "nexvitad_jax.errors": 0, "nexvitad_jax.identity": 0, "nexvitad_jax.io": 0, "nexvitad_jax.configs": 0,
    "nexvitad_jax.compilation": 0, "nexvitad_jax.distributed": 0, "nexvitad_jax.sharding": 0, "nexvitad_jax": 0,
    "nexvitad_jax.lock": 0, "nexvitad_jax.signals": 0, "nexvitad_jax.deploy": 0,
    "nexvitad_jax.config": 1, "nexvitad_jax.metrics": 1, "nexvitad_jax.data": 1, "nexvitad_jax.models": 1,
    "nexvitad_jax.train": 2, "nexvitad_jax.inference": 2, "nexvitad_jax.report": 2, "nexvitad_jax.peers": 2, "nexvitad_jax.report_html": 2,
    "nexvitad_jax.run": 3, "nexvitad_jax.cli": 4,
}
OUTSIDE = ("experiments", "benchmarks", "converters", "tests")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


LIBRARY_FILES = sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_library_imports_point_down(path):
    own = _module_name(path)
    for line, module in _imports(path):
        top = module.split(".")[0]
        assert top not in OUTSIDE, f"{own}:{line} imports {module}: the library never imports {top}/"
        if top == "nexvitad_jax" and module != own and not module.startswith(own + "."):
            assert _layer(module) <= _layer(own), f"{own}:{line} imports {module}, a layer above it"


def test_functions_fit_on_a_screen():
    too_long = []
    for path in [*LIBRARY_FILES, *sorted((REPO_ROOT / "converters").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)
