"""The code map in `driver/__init__.py` holds: each package imports only the packages
listed for it, at module level or inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import driver

ROOT = Path(driver.__file__).parent
BASE = {"errors", "atomicfile", "safeload", "gcpause"}
ALLOWED: dict[str, set[str]] = {
    "nvml": BASE,
    "kube": BASE | {"_kubeproto"},
    "inventory": BASE | {"nvml", "_native"},
    "health": BASE | {"inventory"},
    "resourceslice": BASE | {"inventory", "health", "nvml", "kube"},
    "allocator": BASE | {"kube", "_alloc"},
    "plugin": BASE | {"inventory", "health", "resourceslice", "allocator", "nvml", "kube",
                      "_proto"},
    "devcluster": BASE | {"kube"},
    "demo": BASE | {"nvml", "kube", "inventory", "health", "resourceslice", "allocator",
                    "plugin", "devcluster", "_proto"},
    "cli": BASE | {"nvml", "kube", "inventory", "health", "resourceslice", "allocator",
                   "plugin", "devcluster", "demo"},
}


def imported_packages(path: Path) -> set[str]:
    """The driver packages (first name under `driver.`) that a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "driver" else \
                [f"driver.{alias.name}" for alias in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("driver.")}
    return found


def test_every_package_is_on_the_map() -> None:
    packages = {p.name for p in ROOT.iterdir()
                if p.is_dir() and (p / "__init__.py").exists() and p.name != "_proto"}
    assert packages == set(ALLOWED)


def test_packages_import_only_what_the_map_allows() -> None:
    wrong = {}
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            extra = imported_packages(path) - allowed - {package}
            if extra:
                wrong[str(path.relative_to(ROOT))] = sorted(extra)
    assert wrong == {}


def test_the_shared_modules_import_no_package() -> None:
    for name in BASE:
        assert imported_packages(ROOT / f"{name}.py") <= BASE
