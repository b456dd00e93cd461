"""Builds the native parts into the `driver` package: the Cython allocation kernel, and
the allocator's Python modules compiled by mypyc from their type hints (the per-call path
of an allocation, and explain's per-device work on a large cluster, run as C; the same
files run interpreted where they are not built).

Everything else about the package lives in pyproject.toml; this file exists only
because extension modules still need setup.py.
"""

from pathlib import Path

from Cython.Build import cythonize
from mypyc.build import mypycify
from setuptools import Extension, setup

extensions = [
    Extension("driver._native", ["native/_native.pyx"]),
    Extension("driver._alloc", ["native/_alloc.pyx"]),
    Extension("driver._kubeproto", ["native/_kubeproto.pyx"]),
]
compiled = sorted(str(p) for p in Path("driver/allocator").glob("*.py") if p.name != "__init__.py")

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
    # mypy's default checks, not the project's strict ones (scripts/check runs those), and
    # without the stubs of the dependencies, which an isolated build does not install.
    + mypycify(["--config-file=/dev/null", "--ignore-missing-imports", *compiled],
               opt_level="3", group_name="driver_allocator"),
)
