"""The Kubernetes named formats of CEL (k8s.io/apiserver pkg/cel/library/format.go):
`format.dns1123Label()` and the others, `format.named(name)`, and a format's
`validate(text)`, whose error messages follow apimachinery's validation."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1123_SUBDOMAIN = re.compile(_LABEL + r"(\." + _LABEL + r")*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_UUID = re.compile(r"(?i)[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|"
                     r"[A-Za-z0-9+/]{4})")
_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))")

Validate = Callable[[str], list[str]]


def _pattern(rx: re.Pattern[str], limit: int, what: str) -> Validate:
    def validate(text: str) -> list[str]:
        errors = []
        if len(text) > limit:
            errors.append(f"must be no more than {limit} characters")
        if not rx.fullmatch(text):
            errors.append(f"a valid {what} is required")
        return errors
    return validate


def _prefix(validate: Validate) -> Validate:
    """apimachinery's maskTrailingDash: a generated name's prefix may end with '-'."""
    def check(text: str) -> list[str]:
        return validate(text[:-1] + "a" if len(text) > 1 and text.endswith("-") else text)
    return check


_dns1123_label = _pattern(_DNS1123_LABEL, 63, "DNS-1123 label")
_dns1123_subdomain = _pattern(_DNS1123_SUBDOMAIN, 253, "DNS-1123 subdomain")
_dns1035_label = _pattern(_DNS1035_LABEL, 63, "DNS-1035 label")


def _qualified_name(text: str) -> list[str]:
    parts = text.split("/")
    if len(parts) > 2:
        return ["a qualified name must consist of a name and an optional prefix"]
    errors = []
    if len(parts) == 2:
        prefix, text = parts
        if not prefix:
            errors.append("prefix part must be non-empty")
        else:
            errors += [f"prefix part {e}" for e in _dns1123_subdomain(prefix)]
    if not text:
        errors.append("name part must be non-empty")
    elif len(text) > 63:
        errors.append("name part must be no more than 63 characters")
    if text and not _QUALIFIED_NAME.fullmatch(text):
        errors.append("name part must consist of alphanumeric characters, '-', '_' or '.'")
    return errors


def _label_value(text: str) -> list[str]:
    return _pattern(_LABEL_VALUE, 63, "label value")(text)


def _date(text: str) -> bool:
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _datetime(text: str) -> list[str]:
    """kube-openapi's strfmt IsDateTime."""
    parts = text.lower().split("t")
    found = _TIME.match(parts[1]) if len(text) >= 4 and len(parts) >= 2 else None
    ok = (found is not None and _date(parts[0]) and found[1] <= "23" and found[2] <= "59"
          and found[3] <= "59")
    return [] if ok else ["invalid datetime"]


def formats(uri: Validate) -> dict[str, Validate]:
    """The named formats; `uri` is Go's url.ParseRequestURI as a validation."""
    return {
        "dns1123Label": _dns1123_label, "dns1123Subdomain": _dns1123_subdomain,
        "dns1035Label": _dns1035_label, "qualifiedName": _qualified_name,
        "dns1123LabelPrefix": _prefix(_dns1123_label),
        "dns1123SubdomainPrefix": _prefix(_dns1123_subdomain),
        "dns1035LabelPrefix": _prefix(_dns1035_label), "labelValue": _label_value,
        "uri": uri,
        "uuid": lambda t: [] if _UUID.fullmatch(t) else ["does not match the UUID format"],
        "byte": lambda t: [] if _BASE64.fullmatch(t) else ["invalid base64"],
        "date": lambda t: [] if _date(t) else ["invalid date"],
        "datetime": _datetime,
    }
