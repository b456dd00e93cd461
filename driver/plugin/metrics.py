"""Prometheus metrics of the kubelet plugin, in a registry of its own (no process-global
state, so tests and several plugins in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "gpu_dra"
# From a no-op call (~1 ms) to the kubelet's 45 s limit; MIG creation takes about a second.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 20.0, 45.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.claims = Counter(f"{PREFIX}_claims_total", "Claims handled, by operation "
                              "(prepare|unprepare) and result (success|error).",
                              ["operation", "result"], registry=r)
        self.errors = Counter(f"{PREFIX}_claim_errors_total", "Claims that failed, by "
                              "operation and reason (not_found, uid_mismatch, in_use, ...).",
                              ["operation", "reason"], registry=r)
        self.latency = Histogram(f"{PREFIX}_call_duration_seconds", "Duration of one kubelet "
                                 "call (NodePrepareResources|NodeUnprepareResources).",
                                 ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.claim_latency = Histogram(f"{PREFIX}_claim_duration_seconds", "Duration of "
                                       "preparing or unpreparing one claim.", ["operation"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.prepared = Gauge(f"{PREFIX}_prepared_claims", "Claims prepared on this node.",
                              registry=r)
        self.published = Gauge(f"{PREFIX}_published_devices", "Devices in the ResourceSlices "
                               "this node publishes.", registry=r)
        self.slice_writes = Counter(f"{PREFIX}_resourceslice_writes_total", "ResourceSlices "
                                    "created, updated or deleted: at start and when GPU "
                                    "health changes.",
                                    registry=r)
        self.cdi_hook = Gauge(f"{PREFIX}_cdi_hook_available", "1 when nvidia-cdi-hook was "
                              "found and CDI specs carry its hooks (links such as libcuda.so, "
                              "ldcache update, CUDA compat); 0 when containers get the "
                              "driver's files without them.", registry=r)
        self.gpu_health = Gauge(f"{PREFIX}_gpu_health", "1 while a watched GPU is healthy, "
                                "0 while it is unhealthy or not monitored.", ["gpu", "uuid"],
                                registry=r)
        self.xid_events = Counter(f"{PREFIX}_xid_events", "XID events NVML reported, by GPU "
                                  "minor and XID.", ["gpu", "xid"], registry=r)
        self.health_transitions = Counter(f"{PREFIX}_health_transitions", "GPU health "
                                          "conditions set or cleared, by GPU minor, kind "
                                          "(xid, gpu-lost, ...) and change (set|cleared).",
                                          ["gpu", "kind", "change"], registry=r)
        self.rediscoveries = Counter(f"{PREFIX}_rediscoveries", "Re-discovery passes, by "
                                     "result: changed (the slices follow), unchanged "
                                     "(nothing written), failed (NVML; nothing changed).",
                                     ["result"], registry=r)
        self.mps_daemons = Gauge(f"{PREFIX}_mps_daemons", "MPS control daemons of prepared "
                                 "claims, by state at the last check: running, failed "
                                 "(found dead and could not be started again).", ["state"],
                                 registry=r)
        self.mps_restarts = Counter(f"{PREFIX}_mps_daemon_restarts_total", "MPS control "
                                    "daemons found dead and started again with their "
                                    "claim's limits.", registry=r)

        self.claim_status_writes = Counter(
            f"{PREFIX}_claim_status_writes_total", "Writes of ResourceClaim status.devices, "
            "by result: success, error (retried with backoff), refused (the API server "
            "refused it for good: the claim is gone, replaced or deallocated, or RBAC).",
            ["result"], registry=r)

    def claim_done(self, operation: str, error_reason: str | None) -> None:
        self.claims.labels(operation, "error" if error_reason else "success").inc()
        if error_reason:
            self.errors.labels(operation, error_reason).inc()

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics over HTTP on a daemon thread."""
        start_http_server(port, addr=address, registry=self.registry)
