"""Settings every tier shares."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def driver_logging_restored() -> Iterator[None]:
    """A command run in-process (`main(["plugin", ...])`) points the `driver` loggers at
    the sys.stderr of its test, which pytest closes afterwards: later tests that log
    through the driver (an in-process publisher) would write to a closed stream."""
    logger = logging.getLogger("driver")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
