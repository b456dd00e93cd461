"""The GPUs a plugin leaves alone: `--exclude-gpus` and, in a cluster, the Node annotation
`<driver>/exclude-gpus` (same syntax), merged. The annotation is read at start and on every
re-discovery (timer, SIGHUP), so an admin can hand a GPU to a device plugin, or take it
back, without restarting the plugin.

At start the Node is read until `start_timeout` (it may not exist yet, the API server may
not answer yet, as the publisher waits for them); one still unread, or an annotation that
does not parse, stops the plugin (`NodeExclusionError`): publishing before knowing what to
leave alone could hand a GPU to two drivers. Later the last annotation read stays in force,
and the failure is logged; an annotation that does not parse is also reported (a Node
event) once until it changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from driver.inventory.exclude import Exclusion, ExclusionError, parse_exclusion
from driver.kube.api import api_request

log = logging.getLogger(__name__)
TIMEOUT = 10.0  # seconds for the Node GET
RETRY_S = 0.5  # between tries at start




class NodeExclusionError(Exception):
    """The Node's annotation could not be read or names something other than GPUs."""


class _Unreadable(NodeExclusionError):
    """The Node could not be read: another try may do."""


def annotation_key(driver: str) -> str:
    return f"{driver}/exclude-gpus"


def read_annotation(api: Any, node: str, driver: str) -> Exclusion:
    """The exclusion the Node's annotation gives (none when it is absent)."""
    key = annotation_key(driver)
    try:
        body = api_request(api, "GET", f"/api/v1/nodes/{node}", timeout=TIMEOUT).expect(200)
    except Exception as err:  # the API server's answer, or none
        raise _Unreadable(f"cannot read Node {node} for its annotation {key}: {err}"
                          ) from None
    raw = (body.get("metadata", {}).get("annotations") or {}).get(key, "")
    try:
        return parse_exclusion(raw)
    except ExclusionError as err:
        raise NodeExclusionError(f"Node {node} annotation {key}={raw!r}: {err}") from None


class NodeExclusion:
    """The flag's exclusion merged with the annotation's; `current` reads the annotation
    again, keeping the last good one when it cannot (after the first read)."""

    def __init__(self, flag: Exclusion, api: Any, node: str, driver: str,
                 start_timeout: float = 20.0,
                 report: Callable[[str], None] = lambda message: None) -> None:
        self._flag = flag
        self._report = report
        self._reported = ""
        self._api = api
        self._node = node
        self._driver = driver
        self._start_timeout = start_timeout
        self._annotated: Exclusion | None = None  # None: not read yet

    def current(self) -> Exclusion:
        if self._api is None:
            return self._flag
        try:
            annotated = self._first() if self._annotated is None else \
                read_annotation(self._api, self._node, self._driver)
        except NodeExclusionError as err:
            if self._annotated is None:
                raise
            message = f"{err}; the GPUs it excluded before stay excluded"
            log.error("%s", message)
            if str(err) != self._reported and not isinstance(err, _Unreadable):
                self._reported = str(err)
                self._report(message)
            return self._flag | self._annotated
        self._reported = ""
        if annotated != self._annotated:
            log.info("Node annotation %s: %s", annotation_key(self._driver),
                     ", ".join(annotated.entries) or "none")
        self._annotated = annotated
        return self._flag | annotated

    def _first(self) -> Exclusion:
        """The first read, tried again until the start timeout while the Node is unread."""
        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                return read_annotation(self._api, self._node, self._driver)
            except _Unreadable as err:
                if time.monotonic() + RETRY_S > deadline:
                    raise
                log.info("%s; trying again", err)
                time.sleep(RETRY_S)
