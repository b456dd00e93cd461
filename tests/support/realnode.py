"""A real Kubernetes node on this machine, for the node tier (tests/node): containerd, runc
and a kubelet built from the pinned sources, joined to a LocalCluster as a Node with its
own client certificate (Node authorizer and NodeRestriction on).

Isolation. One holder process (`unshare`) owns a network namespace and a mount namespace;
containerd, the kubelet and everything they start run inside both (`nsenter`). The control
plane and the test process's main thread join the network namespace only: the API server
must reach the kubelet on 10250, and the pods reach the API server through the
`kubernetes` Service IP, which a DNAT rule in the namespace sends to it (what kube-proxy
would do for that one Service). In the mount namespace the kubelet's and containerd's
usual paths (/var/lib/kubelet, /run/containerd, /var/run/cdi, ...) are bind mounts of
folders in the tier's scratch folder: the chart runs with its default paths, and every
mount the node makes (overlays, shm, pod volumes, the kubelet's root) lives in that
namespace and goes with it. The host keeps only what the kubelet makes in the cgroup
hierarchies (removed at stop) and the empty mount points it needed (made only where
missing, removed at stop). One node at a time on the host, whatever cache a run uses: a
lock in /var/tmp/gpu-dra-node-tier; a run killed before its stop is cleaned up by the next
start, from the state file it left there.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from driver.devcluster.controlplane import (
    DEFAULT_CONTROLLERS,
    DRA_FEATURE_GATES,
    ClusterConfig,
    LocalCluster,
    die_with_parent,
    spawn_logged,
    stop_group,
    stop_signals_held,
)
from driver.kube.api import api_request
from tests.support.apiserver import wait_for

REPO = Path(__file__).resolve().parents[2]
NODE_BUILD = REPO / "tests" / "node" / "tools" / "build.sh"
# Host-wide, whatever cache a run uses: the node's paths and cgroups are the host's.
TIER_DIR = Path("/var/tmp/gpu-dra-node-tier")
LOCK_FILE = TIER_DIR / "lock"
STATE_FILE = TIER_DIR / "state.json"

NODE_NAME = "gpu-dra-node"
NODE_LABELS = {"nvidia.com/gpu.present": "true"}
# A veth pair with both ends in the namespace gives the node an address (the kernel here
# has no dummy links and the kubelet refuses a loopback node IP).
NODE_IP, PEER_IP = "10.244.255.1", "10.244.255.2"
POD_SUBNET, POD_GATEWAY = "10.88.0.0/16", "10.88.0.1"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: the first address of the Service range
NODE_CONTROLLERS = (*DEFAULT_CONTROLLERS, "node-lifecycle-controller",
                    "root-ca-certificate-publisher-controller", "daemonset-controller",
                    "pod-garbage-collector-controller")
# Host path -> folder of the scratch dir mounted there inside the node's mount namespace.
BINDS: Mapping[str, str] = {
    "/var/lib/kubelet": "kubelet",
    "/var/lib/containerd": "containerd-root",
    "/run/containerd": "containerd-state",
    "/run/cdi": "cdi",
    "/etc/cdi": "etc-cdi",
    "/var/log/pods": "log-pods",
    "/var/log/containers": "log-containers",
    "/var/lib/cni": "cni-state",
    "/etc/cni/net.d": "cni-conf",
    "/usr/libexec/kubernetes": "kubelet-exec",
}
_CLONE_NEWNET = 0x40000000


class NodeTierError(RuntimeError):
    """The node could not be started or cleaned up; the message says which part."""


@dataclass(frozen=True)
class NodeAssets:
    """What tests/node/build.sh leaves in its cache folder."""

    folder: Path

    def __getitem__(self, name: str) -> Path:
        path = self.folder / name
        if not path.exists():
            raise NodeTierError(f"{path} is missing: run {NODE_BUILD}")
        return path

    @property
    def images(self) -> list[Path]:
        return sorted((self.folder / "images").glob("*.tar"))


def find_assets() -> NodeAssets | None:
    """``$GPU_DRA_NODE_ASSETS``, else the build cache when complete."""
    if folder := os.environ.get("GPU_DRA_NODE_ASSETS"):
        return NodeAssets(Path(folder))
    if not NODE_BUILD.is_file():
        return None
    result = subprocess.run(["bash", str(NODE_BUILD), "--print"], capture_output=True,
                            text=True, check=False)
    lines = result.stdout.split()
    return NodeAssets(Path(lines[-1])) if result.returncode == 0 and lines else None


# --- namespaces -------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ns_inode(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def pids_in_mount_ns(inode: int) -> list[int]:
    """Every process whose mount namespace is ``inode``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "ns" / "mnt").stat().st_ino == inode:
                    found.append(int(entry.name))
    return found


def kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Namespaces:
    """The holder process and its network and mount namespaces."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.made_dirs: list[str] = []
        self._holder: subprocess.Popen[bytes] | None = None
        self._home_fd: int | None = None

    @property
    def pid(self) -> int:
        assert self._holder is not None, "start() first"
        return self._holder.pid

    @property
    def mount_ns(self) -> int:
        return _ns_inode(self.pid, "mnt")

    def start(self) -> None:
        for target, name in BINDS.items():
            (self.scratch / name).mkdir(parents=True, exist_ok=True)
            self.made_dirs += _make_mount_point(Path(target))
        script = ["set -e", "mount --make-rslave /", "mount --make-rshared /"]
        script += [f"mount --bind {self.scratch / name} {target}" for target, name in BINDS.items()]
        script += [
            "ip link set lo up",
            "ip link add gdn0 type veth peer name gdn1",
            f"ip addr add {NODE_IP}/24 dev gdn0",
            f"ip addr add {PEER_IP}/24 dev gdn1",
            "ip link set gdn0 up", "ip link set gdn1 up",
            f"ip route add default via {PEER_IP}",
            "echo ready", "read -r _ || true",  # until the test closes stdin (or dies)
        ]
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "unchanged", "sh", "-c",
             "\n".join(script)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=die_with_parent)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"ready":
            _, err = self._holder.communicate(timeout=10)
            raise NodeTierError(f"namespace setup failed: {err.decode(errors='replace')}")

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside both namespaces."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--net", "--", *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, check=check,
                              timeout=60)

    def enter_network(self) -> None:
        """Move this thread (the main one: tests, helm, the control plane it starts) into
        the node's network namespace."""
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    def leave_network(self) -> None:
        if self._home_fd is not None:
            _setns(self._home_fd)
            os.close(self._home_fd)
            self._home_fd = None

    def stop(self) -> None:
        """Kill everything in the mount namespace (shims and containers are not our
        children), then the holder: the namespaces and their mounts go with it."""
        self.leave_network()
        if self._holder is None:
            return
        with contextlib.suppress(OSError):
            inode = self.mount_ns
            kill_all([p for p in pids_in_mount_ns(inode) if p != self.pid])
        kill_all(pids_in_cgroups(kubelet_cgroups()))
        assert self._holder.stdin is not None
        with contextlib.suppress(OSError):
            self._holder.stdin.close()
        try:
            self._holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._holder.kill()
            self._holder.wait()
        self._holder = None
        remove_mount_points(self.made_dirs)


def _make_mount_point(path: Path) -> list[str]:
    """Create ``path`` where missing; the folders created, outermost first."""
    made: list[str] = []
    for parent in (*reversed(path.parents), path):
        if not parent.exists():
            parent.mkdir()
            made.append(str(parent))
    return made


def remove_mount_points(made: Sequence[str]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(path)


# --- cgroups ----------------------------------------------------------------------------------

CGROUPS = Path("/sys/fs/cgroup")
CGROUP_ROOT = "gpu-dra-node"
"""The kubelet's --cgroup-root: its pods' cgroups live under a name of the tier's own in
every hierarchy, never in a `kubepods` a kubelet of the host may have."""


def kubelet_cgroups(root: str = CGROUP_ROOT) -> list[Path]:
    """The node's cgroup trees, one per hierarchy."""
    return sorted(CGROUPS.glob(f"*/{root}")) + sorted(CGROUPS.glob(root))


def make_cgroups(root: str = CGROUP_ROOT) -> None:
    """The cgroup root in every hierarchy (the kubelet wants it to exist); a v1 cpuset
    starts with no CPUs or memory nodes, so it takes its parent's."""
    for hierarchy in [CGROUPS, *sorted(CGROUPS.iterdir())]:
        if not (hierarchy / "cgroup.procs").exists():  # not a hierarchy (v1: a tmpfs)
            continue
        folder = hierarchy / root
        folder.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (hierarchy / name).exists():
                (folder / name).write_text((hierarchy / name).read_text())


def pids_in_cgroups(roots: Sequence[Path]) -> list[int]:
    """Every process in the trees: containers have mount namespaces of their own, but the
    kubelet's cgroups hold them all."""
    pids: set[int] = set()
    for root in roots:
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(line) for line in procs.read_text().split())
    return sorted(pids)


def remove_cgroups(roots: Sequence[Path]) -> list[str]:
    """rmdir each tree bottom-up (a cgroup folder is removed with rmdir once empty of
    processes and children); what could not be removed."""
    left = []
    for root in roots:
        below = sorted((p for p in root.rglob("*") if p.is_dir()),
                       key=lambda p: len(p.parts), reverse=True)
        for folder in [*below, root]:
            for _ in range(20):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                left.append(str(folder))
    return left


# --- configuration ----------------------------------------------------------------------------


def containerd_config(assets: NodeAssets) -> str:
    """containerd 2.x (config version 3), real-node.md's settings: its usual paths (bind
    mounts here), CDI on, no negative oom_score_adj (root lacks CAP_SYS_RESOURCE here),
    cgroupfs, CNI bridge from the cache, the pause image named as containerd expects."""
    return f"""version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.k8s.io/pause:3.10.2"

[plugins."io.containerd.cri.v1.runtime"]
  enable_cdi = true
  cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{assets['bin/runc']}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{assets['cni/bin']}"]
    conf_dir = "/etc/cni/net.d"
"""


def cni_config() -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "gpu-dra-node",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET,
                                                         "gateway": POD_GATEWAY}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"},
        ],
    }


def kubelet_config(ca: Path, gates: Mapping[str, bool]) -> dict[str, Any]:
    """real-node.md's kubelet settings; authn by client certificate of the cluster CA and
    authz by the API server (webhook), as on a production node."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "failCgroupV1": False,  # 1.35+ refuses cgroup v1 unless told
        "failSwapOn": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "imageServiceEndpoint": "unix:///run/containerd/containerd.sock",
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "Webhook"},
        # The disk and memory are shared with the developer's machine: evict late, never
        # collect the imported images (there is no registry to pull them again).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "featureGates": dict(gates),
    }


# --- the node ---------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds, for docs/benchmarks.md."""

    control_plane: float = 0.0
    containerd: float = 0.0
    images: float = 0.0
    kubelet_to_ready: float = 0.0


class RealNode:
    """The node: start() brings up everything, stop() removes it all (also after a failed
    start); a context manager."""

    def __init__(self, assets: NodeAssets, control_plane_assets: Path) -> None:
        self.assets = assets
        self.cp_assets = control_plane_assets
        self.timings = Timings()
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-dra-node-", dir="/var/tmp"))
        self.ns = Namespaces(self.scratch)
        self.cluster: LocalCluster | None = None
        self._lock: IO[str] | None = None
        self._containerd: subprocess.Popen[bytes] | None = None
        self._kubelet: subprocess.Popen[bytes] | None = None
        self.api: Any = None

    def __enter__(self) -> RealNode:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # paths the tests read, as the host sees them
    def host_path(self, node_path: str) -> Path:
        """Where a path of the node (e.g. /var/run/cdi/x.json) is on the host."""
        path = Path(node_path.replace("/var/run/", "/run/", 1))
        for target, name in BINDS.items():
            if path == Path(target) or path.is_relative_to(target):
                return self.scratch / name / path.relative_to(target)
        return path

    def log(self, name: str) -> Path:
        return self.scratch / f"{name}.log"

    # --- start / stop -------------------------------------------------------------------
    def start(self) -> RealNode:
        self._lock = take_tier_lock()
        clean_leftovers()
        self.ns.start()
        self._save_state()
        make_cgroups()
        self.ns.enter_network()
        t0 = time.monotonic()
        self.cluster = LocalCluster(ClusterConfig(
            assets=self.cp_assets, workdir=self.scratch / "cluster",
            controllers=NODE_CONTROLLERS, bind_address="0.0.0.0",
            authorization_modes=("Node", "RBAC"),
            extra_apiserver_args=self._apiserver_args()))
        self.cluster.start()
        self.cluster.start_scheduler()
        self.cluster.start_controller_manager()
        self.api = self.cluster.api_client()
        self._service_route()
        self.timings.control_plane = time.monotonic() - t0
        self._start_containerd()
        self._import_images()
        self.start_kubelet()
        return self

    def _apiserver_args(self) -> tuple[str, ...]:
        pki = self.scratch / "cluster" / "pki"
        return ("--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={pki / 'admin.crt'}",
                f"--kubelet-client-key={pki / 'admin.key'}",
                "--kubelet-preferred-address-types=InternalIP")

    def _service_route(self) -> None:
        """Pods reach the API server at the `kubernetes` Service (what kube-proxy does)."""
        assert self.cluster is not None
        port = self.cluster.server.rsplit(":", 1)[1]
        for chain in ("PREROUTING", "OUTPUT"):
            self.ns.run("iptables", "-t", "nat", "-A", chain, "-d", f"{SERVICE_IP}/32", "-p",
                        "tcp", "--dport", "443", "-j", "DNAT", "--to-destination",
                        f"{NODE_IP}:{port}")

    def _save_state(self) -> None:
        STATE_FILE.write_text(json.dumps({
            "holder": self.ns.pid, "mount_ns": self.ns.mount_ns, "cgroup_root": CGROUP_ROOT,
            "scratch": str(self.scratch), "made_dirs": self.ns.made_dirs}))

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        with stop_signals_held():
            return spawn_logged(self.ns.argv(argv), self.log(name), cwd=self.scratch,
                                env=env)

    def _start_containerd(self) -> None:
        t0 = time.monotonic()
        config = self.scratch / "containerd.toml"
        config.write_text(containerd_config(self.assets))
        (self.scratch / BINDS["/etc/cni/net.d"] / "10-gpu-dra.conflist").write_text(
            json.dumps(cni_config()))
        env = {**os.environ, "PATH": f"{self.assets['bin']}:{os.environ.get('PATH', '')}"}
        self._containerd = self._spawn(
            "containerd", [str(self.assets["bin/containerd"]), "--config", str(config)], env)
        sock = self.host_path("/run/containerd/containerd.sock")
        wait_for(lambda: sock.exists() or self._exited(self._containerd, "containerd"),
                 "containerd's socket", timeout=30)
        self.timings.containerd = time.monotonic() - t0

    def _exited(self, proc: subprocess.Popen[bytes] | None, name: str) -> bool:
        if proc is not None and proc.poll() is not None:
            raise NodeTierError(f"{name} exited with {proc.returncode}: "
                                f"{self.log(name).read_text(errors='replace')[-3000:]}")
        return False

    def ctr(self, *args: str) -> str:
        sock = self.host_path("/run/containerd/containerd.sock")
        result = subprocess.run([str(self.assets["bin/ctr"]), "--address", str(sock), "-n",
                                 "k8s.io", *args], capture_output=True, text=True,
                                check=False, timeout=300)
        if result.returncode != 0:
            raise NodeTierError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def _import_images(self) -> None:
        t0 = time.monotonic()
        for archive in self.assets.images:
            self.ctr("images", "import", "--no-unpack", str(archive))
        self.timings.images = time.monotonic() - t0

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def start_kubelet(self) -> None:
        assert self.cluster is not None
        t0 = time.monotonic()
        folder = self.scratch / "kubelet-config"
        folder.mkdir(exist_ok=True)
        cert, key = self.cluster.issue_client_certificate(f"system:node:{NODE_NAME}",
                                                          "system:nodes")
        kubeconfig = self.cluster.write_kubeconfig(folder / "kubeconfig",
                                                   f"system:node:{NODE_NAME}", cert, key)
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(self.cluster.ca_certificate,
                                                        DRA_FEATURE_GATES)))
        labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
        self._kubelet = self._spawn("kubelet", [
            str(self.assets["bin/kubelet"]), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            f"--node-labels={labels}", "--v=2", "--vmodule=dra_plugin_manager=3"])
        wait_for(lambda: self.node_ready() or self._exited(self._kubelet, "kubelet"),
                 f"Node {NODE_NAME} Ready", timeout=120, interval=0.1)
        self.timings.kubelet_to_ready = time.monotonic() - t0

    def stop_kubelet(self) -> None:
        if self._kubelet is not None:
            stop_group(self._kubelet, 10)
            self._kubelet = None

    def restart_kubelet(self) -> None:
        self.stop_kubelet()
        self.start_kubelet()

    def node_ready(self) -> bool:
        result = api_request(self.api, "GET", f"/api/v1/nodes/{NODE_NAME}")
        if result.status != 200:
            return False
        conditions = result.expect(200)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def kubelet_metrics(self) -> str:
        """The kubelet's /metrics, through the API server's node proxy."""
        result = api_request(self.api, "GET", f"/api/v1/nodes/{NODE_NAME}/proxy/metrics")
        return str(result.expect(200))

    def stop(self) -> None:
        """Everything down and away: pods, kubelet, containerd, shims and containers, the
        control plane, the namespaces, cgroups, mount points, the scratch folder. Raises
        (after cleaning what it could) when something is left behind."""
        problems: list[str] = []
        if self.api is not None:
            _delete_all_pods(self.api)
        self.stop_kubelet()
        if self._containerd is not None:
            stop_group(self._containerd, 10)
            self._containerd = None
        if self.api is not None:
            self.api.close()
            self.api = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        inode = None
        with contextlib.suppress(AssertionError, OSError):
            inode = self.ns.mount_ns
        self.ns.stop()
        if inode is not None and (left := pids_in_mount_ns(inode)):
            problems.append(f"processes left in the node's mount namespace: {left}")
        if left := pids_in_cgroups(kubelet_cgroups()):
            problems.append(f"processes left in the kubelet's cgroups: {left}")
        problems += [f"cgroup left: {c}" for c in remove_cgroups(kubelet_cgroups())]
        problems += [f"mount left on the host: {m}" for m in host_mounts(self.scratch)]
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.scratch.exists():
            problems.append(f"scratch folder left: {self.scratch}")
        with contextlib.suppress(FileNotFoundError):
            STATE_FILE.unlink()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if problems:
            raise NodeTierError("; ".join(problems))


def _delete_all_pods(api: Any) -> None:
    """DaemonSets, then pods, so the kubelet unprepares their claims and stops their
    containers (what is left after a minute is killed anyway)."""
    with contextlib.suppress(Exception):
        for kind, path in (("daemonsets", "/apis/apps/v1"), ("pods", "/api/v1")):
            for item in api_request(api, "GET", f"{path}/{kind}").expect(200)["items"]:
                meta = item["metadata"]
                api_request(api, "DELETE",
                            f"{path}/namespaces/{meta['namespace']}/{kind}/{meta['name']}",
                            {"gracePeriodSeconds": 5})
        wait_for(lambda: not api_request(api, "GET", "/api/v1/pods").expect(200)["items"],
                 "all pods gone", timeout=60)


def host_mounts(scratch: Path) -> list[str]:
    """Mounts of this process's namespace that come from the node: none may be left."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [m for m in points if m.startswith(str(scratch)) or m in BINDS
            or m.startswith(("/var/lib/kubelet/", "/run/containerd/"))]


def take_tier_lock() -> IO[str]:
    """The host-wide node tier lock, held until the returned file is closed."""
    TIER_DIR.mkdir(parents=True, exist_ok=True)
    lock = LOCK_FILE.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def clean_leftovers(state_file: Path = STATE_FILE) -> None:
    """What a run killed before its stop left (its holder died with it; shims, containers
    and the mount namespace they keep alive did not): their processes, the cgroups, the
    scratch folder, the mount points. Call it holding the tier lock."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return
    cgroups = kubelet_cgroups(state.get("cgroup_root", CGROUP_ROOT))
    kill_all(pids_in_mount_ns(int(state["mount_ns"])))
    kill_all(pids_in_cgroups(cgroups))
    remove_cgroups(cgroups)
    shutil.rmtree(state["scratch"], ignore_errors=True)
    remove_mount_points(state["made_dirs"])
    state_file.unlink()
