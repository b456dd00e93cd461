"""Builds the Cython allocation core into the `driver` package.

Everything else about the package lives in pyproject.toml; this file exists only
because extension modules still need setup.py.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("driver._native", ["native/_native.pyx"]),
    Extension("driver._alloc", ["native/_alloc.pyx"]),
]

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
    ),
)
