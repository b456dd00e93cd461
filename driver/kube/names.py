"""Kubernetes' name rules (apimachinery's validation), each matched against the whole
value: a pattern ending in `$` would also accept a trailing newline, which would then reach
file names, CDI device ids and checkpoint keys."""

from __future__ import annotations

import re

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

LABEL_MAX = 63
SUBDOMAIN_MAX = 253


def is_label(value: object, limit: int = LABEL_MAX) -> bool:
    """A DNS label (RFC 1123): a namespace, a request or pool segment name."""
    return isinstance(value, str) and len(value) <= limit and bool(_LABEL.fullmatch(value))


def is_subdomain(value: object, limit: int = SUBDOMAIN_MAX) -> bool:
    """A DNS subdomain (RFC 1123): an object name, a driver name, an attribute domain."""
    return isinstance(value, str) and len(value) <= limit and bool(_SUBDOMAIN.fullmatch(value))


def is_uuid(value: object) -> bool:
    """An object UID as the API server makes them: a lowercase UUID."""
    return isinstance(value, str) and bool(_UUID.fullmatch(value))


def is_c_identifier(value: object) -> bool:
    """An attribute or capacity name after the domain."""
    return isinstance(value, str) and bool(_C_IDENTIFIER.fullmatch(value))
