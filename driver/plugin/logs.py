"""Logging for the daemon: text or JSON lines, and the claim UID on every line about a claim.

The claim being worked on lives in a context variable, so every log call made while a claim
is prepared (in this module's callers or deeper, in MIG or CDI code) carries its UID
without passing it around.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

LogFormat = Literal["text", "json"]

_CLAIM: ContextVar[str] = ContextVar("claim_uid", default="")


@contextlib.contextmanager
def claim_context(uid: str) -> Iterator[None]:
    """Log lines inside carry `claim=<uid>`."""
    token = _CLAIM.set(uid)
    try:
        yield
    finally:
        _CLAIM.reset(token)


def _claim_of(record: logging.LogRecord) -> str:
    """The claim UID `_ClaimFilter` (or a caller's `extra`) put on the record."""
    return str(record.__dict__.get("claim") or "")


class _ClaimFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.setdefault("claim", _CLAIM.get())
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        claim = f" claim={uid}" if (uid := _claim_of(record)) else ""
        line = (f"{stamp}.{int(record.msecs):03d}Z {record.levelname[0]} "
                f"{record.name}: {record.getMessage()}{claim}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if claim := _claim_of(record):
            entry["claim"] = claim
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def verbosity_level(verbosity: int) -> int:
    """klog-style -v: 0 info and up, 1 and more adds debug lines."""
    return logging.DEBUG if verbosity > 0 else logging.INFO


def setup_logging(fmt: LogFormat, verbosity: int) -> None:
    """Route the `driver` loggers to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(_ClaimFilter())
    root = logging.getLogger("driver")
    root.handlers[:] = [handler]
    root.setLevel(verbosity_level(verbosity))
    root.propagate = False
