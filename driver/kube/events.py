"""Events on a Node: what `kubectl describe node` and `kubectl get events` show an admin
about a node-level problem that does not stop the driver.

Best effort: an event that cannot be posted is logged and dropped, never raised, so a
node's start-up never waits on or fails for one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from driver.kube.api import api_request

# Node events live in the default namespace, as the kubelet's own.
NAMESPACE = "default"
TIMEOUT = 5.0  # seconds

log = logging.getLogger(__name__)


def node_event(node: str, reason: str, message: str, component: str,
               now: datetime) -> dict[str, Any]:
    """A core/v1 Warning Event about `node`. The involved object's uid is the node's name,
    as the kubelet writes it and `kubectl describe node` looks it up."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{node}.", "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "reason": reason, "message": message, "type": "Warning",
        "source": {"component": component, "host": node},
        "reportingComponent": component, "reportingInstance": node,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def post_node_event(api: Any, node: str, reason: str, message: str, component: str) -> None:
    """Create the event; a failure is logged, not raised."""
    body = node_event(node, reason, message, component, datetime.now(UTC))
    try:
        result = api_request(api, "POST", f"/api/v1/namespaces/{NAMESPACE}/events", body,
                             timeout=TIMEOUT)
        result.expect(201)
    except Exception as err:  # any failure at all: the event is only advice
        log.warning("could not post the %s event on node %s: %s", reason, node, err)
