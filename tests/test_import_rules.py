"""The import-direction rule: a module imports only from layers below it (see docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "mergesmith"

# Lower number = lower layer. A module may import from its own layer or any lower one.
LAYERS = {
    "_util": 0,
    "errors": 0,
    "config": 1,
    "methods": 1,
    "io": 1,
    "models": 2,
    "tokenizer": 3,
    "plan": 4,
    "options": 4,
    "engine": 5,
    "api": 6,
    "testing": 7,
    "tools": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}


def top_part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def test_no_upward_imports():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        mine = LAYERS[top_part(mod) if len(rel.parts) > 1 else "__init__"]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("mergesmith.") and LAYERS[top_part(name)] > mine:
                    bad.append(f"{mod} imports {name}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


# the fused CPU kernels, and the code that calls them, may also use numba (with its llvmlite) and numpy
KERNEL_MODULES = {"numba_kernels.py", "task_vector_fast.py"}


def test_methods_import_only_torch_and_leaf_helpers():
    base = ("torch", "mergesmith.methods", "mergesmith.errors", "mergesmith._util", "__future__")
    stdlib = set(sys.stdlib_module_names)
    for path in (PKG / "methods").glob("*.py"):
        allowed = base + (("numba", "llvmlite", "numpy") if path.name in KERNEL_MODULES else ())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert name.startswith(allowed) or name.split(".")[0] in stdlib, f"{path.name} imports {name}"


def test_cli_help_does_not_import_torch():
    code = "import sys; from mergesmith.cli.main import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loading_every_method_imports_neither_numba_nor_torch():
    code = (
        "import sys; from mergesmith.methods import registry; [registry.get(n) for n in registry.names()]; "
        "print('numba' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
