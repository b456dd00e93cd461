"""MPS per claim in a cluster: the claim's control daemon runs in a Pod of its own.

In a cluster the plugin is a DaemonSet container, and a process it starts dies with that
container (a crash, a restart, a rolling update). So, as NVIDIA's driver does, each MPS
claim gets a Pod, created by the plugin in its own namespace (POD_NAMESPACE) on its node
(`nodeName`), running the driver's image (GPU_DRA_IMAGE): `gpu-dra mps-daemon` (`serve`)
starts the driver root's `nvidia-cuda-mps-control -f` with the claim's environment from
its `claim.json`, tells it the limits once it answers, writes `ready` in the claim's
directory, and exits when the daemon does: 0 only after a `quit` of the plugin's (which
writes `stopping` in the claim's directory first), 1 otherwise. So, with restartPolicy
OnFailure, the kubelet starts again, limits included, a daemon that died and one that a
workload told `quit` through the pipe (any client can), while the plugin's own `quit`
leaves the container down until the plugin deletes the pod (a pod being deleted is never
started again). Its liveness probe (`probe`) asks the daemon through the pipe with a
timeout, so a daemon alive but not answering is killed and started again by the kubelet
too (with OnFailure, whatever it exits). Each start is counted in the claim's `starts`,
and the plugin writes in `starts-seen` the count it has accounted for (its own start, or
a restart it reported): a restart is one count more, whenever the plugin looks (right
after prepare, or after its own restart), where a new pid was seen only by a plugin that
had seen the old one. A pod that ended anyway (evicted: Failed) is replaced by the
plugin's next check, and reported as a restart too.

The Pod mounts the claim's directory (under the plugin data dir, a hostPath) at the same
path, so the pipe directory the claim's containers mount and the plugin's control client
use is the daemon's; the claim's `shm/` at /dev/shm (no mount namespace of our making);
the driver root where the plugin sees it. It is privileged (the GPUs' device nodes, as
NVIDIA's) and in the host's PID namespace (as NVIDIA's: MPS identifies its clients, which
run in other pods, by process id). Its owner is the Node, not the ResourceClaim: an owner
in another namespace is taken as absent by the garbage collector, which would delete the
Pod at once; a Node's deletion takes its daemons with it, and a claim's Pod is deleted by
unprepare, or by the next start when no prepared claim explains it.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.atomicfile import write_atomically
from driver.kube.api import ApiError, api_request
from driver.kube.names import is_uuid
from driver.nvml import Provider
from driver.plugin.driverfiles import nvml_library
from driver.plugin.mps import (
    CONTROL,
    NO_POD_SETTINGS,
    PID_FILE,
    ClaimMps,
    MpsDaemons,
    MpsFailure,
    control_in,
)
from driver.safeload import LoadError

log = logging.getLogger(__name__)

READY = "ready"  # in the claim's directory: its daemon answers and was told its limits
STARTS = "starts"  # in the claim's directory: how many times a pod's container started it
SEEN = "starts-seen"  # in the claim's directory: the starts the plugin has accounted for
STOPPING = "stopping"  # in the claim's directory: the next `quit` is the plugin's
PROBE_TIMEOUT = 5.0  # the liveness probe's wait for the daemon's answer
POD_START_TIMEOUT = 30.0  # a new pod: scheduling is skipped, the image is on the node
COMPONENT = "mps-daemon"
CLAIM_LABEL = "claim-uid"  # `<driver>/claim-uid`


@dataclass(frozen=True)
class PodSettings:
    """Where the claims' daemon pods run and what they mount. `driver_root`: the driver
    root as the plugin sees it (the daemon's pod mounts `host_driver_root` there)."""

    driver: str
    namespace: str
    node: str
    image: str
    driver_root: Path
    host_driver_root: Path

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/component={COMPONENT},app.kubernetes.io/managed-by=" \
               f"{self.driver}"


def pod_name(uid: str) -> str:
    return f"mps-{uid}"


def pod_spec(settings: PodSettings, node_uid: str, claim_dir: Path, claim: ClaimMps
             ) -> dict[str, Any]:
    """The Pod that runs the daemon of the claim whose directory is `claim_dir`."""
    s = settings
    uid = claim_dir.name
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name(uid), "namespace": s.namespace,
            "labels": {"app.kubernetes.io/component": COMPONENT,
                       "app.kubernetes.io/managed-by": s.driver,
                       f"{s.driver}/{CLAIM_LABEL}": uid},
            "annotations": {f"{s.driver}/claim": f"{claim.claim.namespace}/{claim.claim.name}"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": s.node,
                                 "uid": node_uid}]},
        "spec": {
            "nodeName": s.node,
            "restartPolicy": "OnFailure",
            "hostPID": True,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 10,
            "tolerations": [{"operator": "Exists"}],  # as the plugin's DaemonSet
            "containers": [{
                "name": COMPONENT, "image": s.image, "imagePullPolicy": "IfNotPresent",
                "command": ["gpu-dra", "mps-daemon", "--claim-dir", str(claim_dir),
                            "--driver-root", str(s.driver_root)],
                "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}],
                # it answers within PROBE_TIMEOUT; the kubelet's timeout is a backstop
                "livenessProbe": {
                    "exec": {"command": ["gpu-dra", "mps-daemon", "--probe", "--claim-dir",
                                         str(claim_dir), "--driver-root",
                                         str(s.driver_root)]},
                    "initialDelaySeconds": 5, "periodSeconds": 10,
                    "timeoutSeconds": 2 * int(PROBE_TIMEOUT), "failureThreshold": 3},
                "securityContext": {"privileged": True},
                "volumeMounts": [
                    {"name": "claim", "mountPath": str(claim_dir)},
                    {"name": "driver-root", "mountPath": str(s.driver_root),
                     "readOnly": True},
                    {"name": "shm", "mountPath": "/dev/shm"}]}],
            "volumes": [
                {"name": "claim", "hostPath": {"path": str(claim_dir), "type": "Directory"}},
                {"name": "driver-root", "hostPath": {"path": str(s.host_driver_root),
                                                     "type": "Directory"}},
                {"name": "shm", "hostPath": {"path": str(claim_dir / "shm"),
                                             "type": "Directory"}}]}}


class MpsPods(MpsDaemons):
    """`MpsDaemons` whose daemons run in pods (`pod_spec`): compute modes, claim.json,
    the limits' client and the directory as in local mode; the process is the pod's."""

    def __init__(self, root: Path, control: Path | None, nvml_library: Path | None,
                 nvml: Any, settings: PodSettings, api: Any) -> None:
        super().__init__(root, control, nvml_library, nvml)
        self.settings = settings
        self.api = api
        self._node_uid: str | None = None

    def running(self, uid: str) -> int | None:
        """The daemon's pid (as its pid file says, in the host's PID namespace) if it was
        told its limits and answers."""
        if not (self.directory(uid) / READY).exists():
            return None
        try:
            self.ask(uid, "get_server_list")
            return int((self.pipe(uid) / PID_FILE).read_text().strip())
        except (MpsFailure, OSError, ValueError):
            return None

    def ensure(self, uid: str) -> tuple[int, bool]:
        """The daemon's pid, and whether its pod's container started it again since the
        plugin last accounted for its starts. One that does not answer while its pod
        lives is the kubelet's to start again: MpsFailure at once (it is reported down
        meanwhile); a pod that is gone or ended is created again (`_run`)."""
        starts = _count(self.directory(uid) / STARTS)  # read first: a later one counts next
        if (pid := self.running(uid)) is not None:
            self.hold_exclusive(uid)
            restarted = starts > _count(self.directory(uid) / SEEN)
            if restarted:
                write_atomically(self.directory(uid) / SEEN, str(starts).encode(),
                                 durable=False)
            return pid, restarted
        pod = self._get(uid)
        if pod is not None and not _ended(pod):
            raise MpsFailure(f"MPS of claim {uid}: its daemon does not answer, and its pod "
                             f"{self.settings.namespace}/{pod_name(uid)} "
                             f"({pod['status'].get('phase', 'Pending')}) has not started "
                             f"it again yet")
        return super().ensure(uid)

    def _kill_daemon(self, uid: str) -> None:
        """Nothing: the pod's process is the kubelet's to restart, and `_run` replaces a
        pod that ended."""

    def _run(self, uid: str, claim: ClaimMps) -> int:
        """Create the claim's pod (adopting one there, replacing one that ended), wait
        until its daemon was told its limits and answers, and account for its starts."""
        pod = self._get(uid)
        if pod is not None and _ended(pod):
            self._delete(uid)
            pod = None
        if pod is None:
            body = pod_spec(self.settings, self._node(), self.directory(uid), claim)
            self._call("POST", f"/api/v1/namespaces/{self.settings.namespace}/pods",
                       body, 201, 409)
        deadline = time.monotonic() + POD_START_TIMEOUT
        while True:
            starts = _count(self.directory(uid) / STARTS)
            if (pid := self.running(uid)) is not None:
                break
            if time.monotonic() > deadline:
                pod = self._get(uid) or {"status": {}}
                raise MpsFailure(f"pod {self.settings.namespace}/{pod_name(uid)}: its "
                                 f"{CONTROL} did not answer within {POD_START_TIMEOUT:g} s "
                                 f"(phase {pod['status'].get('phase', 'gone')})")
            time.sleep(0.05)
        write_atomically(self.directory(uid) / SEEN, str(starts).encode(), durable=False)
        log.info("MPS daemon of claim %s runs in pod %s/%s (%s)", uid,
                 self.settings.namespace, pod_name(uid),
                 "; ".join(claim.limits.commands()) or "no limits")
        return pid

    def _stop_daemon(self, uid: str) -> list[str]:
        """`quit` the daemon if it answers (`stopping` first: its pod's container exits 0
        and stays down), then delete the pod."""
        if self.running(uid) is not None:
            try:
                write_atomically(self.directory(uid) / STOPPING, b"", durable=False)
                self.ask(uid, "quit")
            except (MpsFailure, OSError) as err:
                log.warning("%s; deleting its pod", err)
        try:
            self._delete(uid)
        except MpsFailure as err:
            return [str(err)]
        return []

    def leftovers(self) -> set[str]:
        """Directories, and the daemon pods on this node (adopted at start, or deleted
        when no prepared claim explains them); the directories alone while the API server
        does not answer (a later start sweeps the pods)."""
        try:
            pods = self._call("GET", f"/api/v1/namespaces/{self.settings.namespace}/pods",
                              None, 200, query={"labelSelector": self.settings.selector,
                                                "fieldSelector": f"spec.nodeName="
                                                                 f"{self.settings.node}"})
        except MpsFailure as err:
            log.warning("cannot list the MPS daemons' pods: %s", err)
            return super().leftovers()
        uids = {p["metadata"].get("labels", {}).get(f"{self.settings.driver}/{CLAIM_LABEL}")
                for p in pods["items"]}
        return super().leftovers() | {u for u in uids if is_uuid(u)}

    # -- API -----------------------------------------------------------------------------

    def _path(self, uid: str) -> str:
        return f"/api/v1/namespaces/{self.settings.namespace}/pods/{pod_name(uid)}"

    def _call(self, method: str, path: str, body: Any, *codes: int,
              query: dict[str, str] | None = None) -> Any:
        try:
            return api_request(self.api, method, path, body, query=query).expect(*codes)
        except (ApiError, OSError, ValueError) as err:
            raise MpsFailure(f"MPS daemon pod: {err}") from None
        except Exception as err:  # the client's own errors (urllib3: connection refused)
            raise MpsFailure(f"MPS daemon pod: {method} {path}: {err}") from None

    def _get(self, uid: str) -> dict[str, Any] | None:
        pod = self._call("GET", self._path(uid), None, 200, 404)
        return pod if pod.get("kind") == "Pod" else None

    def _delete(self, uid: str) -> None:
        """Delete the pod at once (its daemon was told `quit`, or is not answering) and
        wait until the API server has let it go."""
        self._call("DELETE", self._path(uid), {"gracePeriodSeconds": 0}, 200, 202, 404)
        deadline = time.monotonic() + POD_START_TIMEOUT
        while self._get(uid) is not None:
            if time.monotonic() > deadline:
                raise MpsFailure(f"pod {self.settings.namespace}/{pod_name(uid)} is not "
                                 f"gone {POD_START_TIMEOUT:g} s after its deletion")
            time.sleep(0.05)

    def _node(self) -> str:
        if self._node_uid is None:
            node = self._call("GET", f"/api/v1/nodes/{self.settings.node}", None, 200)
            self._node_uid = str(node["metadata"]["uid"])
        return self._node_uid


def _count(path: Path) -> int:
    """A count in the claim's directory (`starts`, `starts-seen`); 0 where there is none."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _ended(pod: dict[str, Any]) -> bool:
    """Its containers will not run again: it succeeded, failed or is being deleted."""
    return pod["status"].get("phase") in ("Succeeded", "Failed") or \
        bool(pod["metadata"].get("deletionTimestamp"))


def daemons(root: Path, provider: Provider, driver_root: Path, mock_root: bool,
            local: bool, pods: PodSettings | None, api: Any) -> MpsDaemons:
    """The claims' MPS daemons: processes in local mode, pods in a cluster (`pods`: where;
    None: MPS claims are refused). The driver root's nvidia-cuda-mps-control, as
    `sharing.timeslicer` picks nvidia-smi: with a mock NVML the mock driver root's
    stand-in (`mock_root`) or another root's (a test's), never the host's own / (whose
    daemon would serve real GPUs, not the mock's): MPS claims are refused there."""
    control, library = control_in(driver_root), nvml_library(driver_root)
    if provider.name.startswith("mock:") and not mock_root and \
            driver_root.resolve() == Path("/"):
        return MpsDaemons(root, control, library, provider.nvml, (
            "MPS with a mock NVML needs a driver root of stand-in tools (--driver-root, or "
            "none for the mock's): the host's nvidia-cuda-mps-control serves real GPUs"))
    if local:
        return MpsDaemons(root, control, library, provider.nvml)
    if pods is None:
        return MpsDaemons(root, control, library, provider.nvml, NO_POD_SETTINGS)
    return MpsPods(root, control, library, provider.nvml, pods, api)


def serve(claim_dir: Path, driver_root: Path) -> int:
    """`gpu-dra mps-daemon`: the claim's control daemon in the foreground, told the
    limits of its claim.json once it answers (then `ready` is written); its exit status
    (1 if it could not be started or told its limits: the kubelet starts it again)."""
    uid = claim_dir.name
    daemons = _in_pod(claim_dir, driver_root)
    (claim_dir / READY).unlink(missing_ok=True)
    try:
        write_atomically(claim_dir / STARTS, str(_count(claim_dir / STARTS) + 1).encode(),
                         durable=False)
        claim = ClaimMps.load(claim_dir)
        if daemons.control is None or daemons.nvml_library is None:
            raise MpsFailure(f"{CONTROL} or libnvidia-ml.so.1 is not under {driver_root}")
        (daemons.pipe(uid) / PID_FILE).unlink(missing_ok=True)  # a dead daemon's
        env = daemons.environment(uid, [d.cuda_uuid for d in claim.devices])
        child = subprocess.Popen([str(daemons.control), "-f"], env=env,
                                 stdin=subprocess.DEVNULL)
    except (MpsFailure, LoadError, KeyError, TypeError, ValueError, OSError) as err:
        log.error("MPS daemon of claim %s: %s", uid, err)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        _tell_limits(daemons, uid, child, claim.limits.commands())
        write_atomically(claim_dir / READY, b"", durable=False)
    except (MpsFailure, OSError) as err:
        log.error("MPS daemon of claim %s: %s; stopping it", uid, err)
        child.kill()
        child.wait()
        return 1
    log.info("MPS daemon %d of claim %s serves %s (%s)", child.pid, uid,
             ",".join(d.cuda_uuid for d in claim.devices),
             "; ".join(claim.limits.commands()) or "no limits")
    status = child.wait()
    if (claim_dir / STOPPING).exists():
        return 0
    log.error("MPS daemon of claim %s exited %d, not stopped by the plugin (a `quit` through "
              "the pipe, a crash): the kubelet starts it again", uid, status)
    return 1


def _in_pod(claim_dir: Path, driver_root: Path) -> MpsDaemons:
    """The claims' daemons as the pod's commands see them: the driver root's tools, no NVML
    (the plugin alone sets compute modes)."""
    return MpsDaemons(claim_dir.parent, control_in(driver_root), nvml_library(driver_root),
                      nvml=None)


def probe(claim_dir: Path, driver_root: Path, timeout: float) -> int:
    """`gpu-dra mps-daemon --probe`, the daemon pod's liveness probe: 0 if the claim's
    daemon answers `get_server_list` through its pipe within `timeout` seconds, 1 if it
    does not (hung, or absent: the control client starts no daemon)."""
    try:
        _in_pod(claim_dir, driver_root).ask(claim_dir.name, "get_server_list", timeout)
    except (MpsFailure, ValueError) as err:
        print(f"MPS daemon of claim {claim_dir.name}: {err}", file=sys.stderr)
        return 1
    return 0


def _tell_limits(daemons: MpsDaemons, uid: str, child: subprocess.Popen[bytes],
                 commands: Sequence[str]) -> None:
    deadline = time.monotonic() + POD_START_TIMEOUT
    while True:
        if child.poll() is not None:
            raise MpsFailure(f"{CONTROL} -f exited {child.returncode} before it answered")
        try:
            daemons.ask(uid, "get_server_list")
            break
        except MpsFailure:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if commands:
        daemons.ask(uid, "\n".join(commands))
