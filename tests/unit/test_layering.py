"""The package's layers, checked from the source of every module (no list of modules to keep).

core (the method) < io (storage, decoding) < steps (the method on stored data) < distributed (Ray);
telemetry beside them; cli and report on top. The method core runs in a notebook or any Ray
worker: it imports neither Ray, click nor fsspec. Nothing imports the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ray_inspect"
SUBPACKAGES = ("core", "io", "steps", "distributed", "telemetry")
TOP_LEVEL = {"__init__": "api", "config": "foundation", "records": "foundation", "partitions": "foundation",
             "report": "report", "cli": "cli"}
ALLOWED = {                      # layer -> ray_inspect layers it may import
    "foundation": {"foundation"},
    "core": {"foundation", "core"},
    "io": {"foundation", "core", "io"},
    "steps": {"foundation", "core", "io", "steps"},
    "telemetry": {"foundation", "telemetry"},
    "distributed": {"foundation", "core", "io", "steps", "telemetry", "distributed"},
    "report": {"foundation", "core", "io", "steps", "report"},
    "api": {"foundation", "core", "io", "steps"},
    "cli": {"foundation", "core", "io", "steps", "telemetry", "distributed", "report", "api", "cli"},
}
FORBIDDEN = {                    # layer -> third-party packages it must not import
    "foundation": {"ray", "click", "fsspec", "torch"},
    "core": {"ray", "click", "fsspec", "s3fs", "zarr"},
    "io": {"ray", "click"},
    "steps": {"ray", "click"},
    "telemetry": {"ray", "click"},
    "report": {"ray", "click"},
    "api": {"ray", "click"},
}


def layer_of(module: str) -> str:
    """``ray_inspect.core.ssim`` -> ``core``; top-level modules by name."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUBPACKAGES):
        assert parts[1] in SUBPACKAGES, f"{module}: not in one of the subpackages {SUBPACKAGES}"
        return parts[1]
    name = parts[1] if len(parts) > 1 else "__init__"
    if name.startswith("__") and name != "__init__":
        return "foundation"          # the package's own metadata (__version__), defined with no import
    assert name in TOP_LEVEL, f"{module}: a new top-level module needs a layer (TOP_LEVEL in this test)"
    return TOP_LEVEL[name]


def modules() -> dict[str, str]:
    """Every module of the package: dotted name -> source."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package and len(parts) > 1 else parts)
        out[name + (".__init__" if is_package and len(parts) > 1 else "")] = path.read_text()
    return out


def _submodule(name: str) -> str:
    """``from ray_inspect import name``: a module or subpackage, or else a name of the package's API."""
    is_module = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
    return f"ray_inspect.{name}" if is_module or name.startswith("__") else "ray_inspect"


def imports(module: str, source: str) -> set[str]:
    """Absolute names of everything ``source`` imports, at any depth (function bodies included)."""
    package = module.rsplit(".", 1)[0] if "." in module else module
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(_submodule(a.name) if base == "ray_inspect" else base for a in node.names)
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """One line per import that crosses the layers the wrong way."""
    out = []
    for module, source in sources.items():
        layer = layer_of(module.removesuffix(".__init__"))
        for name in sorted(imports(module, source)):
            top = name.split(".")[0]
            if top == "ray_inspect":
                target = layer_of(name) if name != "ray_inspect" else "api"
                if target not in ALLOWED[layer]:
                    out.append(f"{module} ({layer}) imports {name} ({target})")
            elif top in FORBIDDEN.get(layer, ()):
                out.append(f"{module} ({layer}) imports {name}")
    return out


def test_every_module_respects_its_layer():
    found = modules()
    assert len(found) > 25 and any(m.startswith("ray_inspect.core.") for m in found)
    assert violations(found) == []


@pytest.mark.parametrize("module, source, culprit", [
    ("ray_inspect.core.new_filter", "import ray\n", "imports ray"),
    ("ray_inspect.core.new_filter", "def f():\n    from ray.util import queue\n", "imports ray.util"),
    ("ray_inspect.core.new_filter", "from ray_inspect.io import storage\n", "imports ray_inspect.io (io)"),
    ("ray_inspect.core.new_filter", "from ..io.images import decode\n", "ray_inspect.io.images (io)"),
    ("ray_inspect.io.new_format", "import click\n", "imports click"),
    ("ray_inspect.steps.new_step", "from ray_inspect.distributed.scan import scan\n", "(distributed)"),
    ("ray_inspect.distributed.new_pool", "from ray_inspect.cli import main\n", "ray_inspect.cli (cli)"),
    ("ray_inspect.telemetry.new_sink", "from ray_inspect.core import ssim\n", "(core)"),
])
def test_a_new_module_that_breaks_its_layer_is_caught(module, source, culprit):
    """A module added to a subpackage is checked without editing this test."""
    found = violations({**modules(), module: source})
    assert len(found) == 1 and culprit in found[0], found


def test_core_runs_without_ray_click_or_fsspec_at_import_time():
    """What the interpreter really loads: the core (with its foundation) pulls in none of them."""
    core = sorted(m for m in modules() if layer_of(m.removesuffix(".__init__")) in ("core", "foundation"))
    code = ("import sys\n" + "".join(f"import {m.removesuffix('.__init__')}\n" for m in core) +
            "bad = [m for m in ('ray', 'click', 'fsspec') if m in sys.modules]\nassert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_no_layer_below_the_ray_wiring_loads_ray_or_click():
    below = sorted(m for m in modules()
                   if layer_of(m.removesuffix(".__init__")) in ("core", "io", "steps", "telemetry", "report"))
    code = ("import sys\n" + "".join(f"import {m.removesuffix('.__init__')}\n" for m in below) +
            "bad = [m for m in ('ray', 'click') if m in sys.modules]\nassert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
