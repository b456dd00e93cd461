"""A throwaway Kubernetes control plane on loopback: etcd, kube-apiserver and, on request,
kube-scheduler and kube-controller-manager, built from pinned upstream sources.

The e2e tests and ``gpu-dra demo --cluster`` use it to prove the driver against the real
API server, scheduler and ResourceClaim controller rather than against fakes. There is no
kubelet: :class:`FakeNodeKeeper` keeps Node objects Ready so the scheduler places pods.

Binaries are looked up in the envtest layout (``etcd``, ``kube-apiserver``, ... directly in
one folder): ``$KUBEBUILDER_ASSETS`` first, then the cache folder that
``tests/e2e/control-plane/build.sh`` fills, ``${GPU_DRA_CACHE:-~/.cache/gpu-dra}/k8s-<v>/``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from driver.errors import DevClusterError
from driver.kube.api import api_client, api_request

__all__ = [
    "ALL_BINARIES",
    "CONTROL_PLANE_SRC",
    "CORE_BINARIES",
    "DEFAULT_CONTROLLERS",
    "DEFAULT_NODE_CAPACITY",
    "DRA_FEATURE_GATES",
    "STOP_SIGNALS",
    "AssetsUnavailable",
    "ClusterConfig",
    "ComponentError",
    "FakeNodeKeeper",
    "LocalCluster",
    "Versions",
    "build_assets",
    "cache_dir",
    "ensure_assets",
    "find_assets",
    "free_port",
    "iter_log_tails",
    "pinned_versions",
    "run_build_script",
    "spawn_logged",
    "stop_group",
    "stop_signals_held",
]

SOURCE_ROOT = Path(os.environ.get("GPU_DRA_SOURCE") or Path(__file__).resolve().parents[2])
"""The source checkout whose Go build scripts (``tests/e2e/control-plane``,
``tests/e2e/kubelet-standin``) build the binaries: ``$GPU_DRA_SOURCE``, else the checkout
this package runs from (an editable install); a wheel has none."""
CONTROL_PLANE_SRC = SOURCE_ROOT / "tests" / "e2e" / "control-plane"
"""Where build.sh and versions.env live."""

CORE_BINARIES: tuple[str, ...] = ("etcd", "kube-apiserver")
ALL_BINARIES: tuple[str, ...] = (*CORE_BINARIES, "kube-scheduler", "kube-controller-manager")

# DRA gates of 1.37 that are settable (not locked to their default): the beta ones plus
# GA-but-unlocked ones. Locked gates (DynamicResourceAllocation, DRAPrioritizedList,
# DRAAdminAccess, DRAExtendedResource, DRAResourceClaimDeviceStatus) are on by default
# and only warn when set, so they are left out.
DRA_FEATURE_GATES: Mapping[str, bool] = {
    "DRAPartitionableDevices": True,
    "DRAConsumableCapacity": True,
    "DRAFractionalCapacityRange": True,
    "DRADeviceTaints": True,
    "DRADeviceTaintRules": True,
    "DRADeviceBindingConditions": True,
    "DRAResourceClaimGranularStatusAuthorization": True,
    "DRASchedulerFilterTimeout": True,
}

# What DRA needs from kube-controller-manager, and no node-lifecycle-controller: it would
# taint and evict from fake nodes that have no kubelet.
DEFAULT_CONTROLLERS: tuple[str, ...] = (
    "resourceclaim-controller",
    "device-taint-eviction-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "namespace-controller",
)

_SERVICE_CIDR = "10.0.0.0/24"
_PR_SET_PDEATHSIG = 1


class AssetsUnavailable(DevClusterError, RuntimeError):
    """The control-plane binaries are neither present nor buildable here."""


class ComponentError(DevClusterError, RuntimeError):
    """A control-plane process exited early or did not become ready in time."""

    def __init__(self, component: str, message: str, log_tail: str = "") -> None:
        tail = f"\n--- {component} log tail ---\n{log_tail}" if log_tail else ""
        super().__init__(f"{component}: {message}{tail}")
        self.component = component
        self.log_tail = log_tail


# --- binaries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Versions:
    """The pinned versions, read from ``versions.env`` (the only place they are written)."""

    kubernetes: str
    etcd: str


def pinned_versions(src: Path = CONTROL_PLANE_SRC) -> Versions | None:
    """Read ``versions.env``; None outside a source checkout."""
    try:
        text = (src / "versions.env").read_text()
    except FileNotFoundError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return Versions(kubernetes=values["K8S_VERSION"], etcd=values["ETCD_VERSION"])


def cache_dir(versions: Versions | None = None) -> Path | None:
    """The folder build.sh fills for the pinned Kubernetes version."""
    versions = versions or pinned_versions()
    if versions is None:
        return None
    root = Path(os.environ.get("GPU_DRA_CACHE") or Path.home() / ".cache" / "gpu-dra")
    return root / f"k8s-{versions.kubernetes}"


def _has(folder: Path, names: Sequence[str]) -> bool:
    return all(os.access(folder / n, os.X_OK) and (folder / n).is_file() for n in names)


def find_assets(need: Sequence[str] = ALL_BINARIES) -> Path | None:
    """First folder holding all of ``need``: ``$KUBEBUILDER_ASSETS``, then the cache.

    envtest's own downloads hold only etcd, kube-apiserver and kubectl, so callers that
    can live without the scheduler ask for :data:`CORE_BINARIES`.
    """
    candidates: list[Path] = []
    if env := os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(env).expanduser())
    if (cached := cache_dir()) is not None:
        candidates.append(cached)
    return next((c for c in candidates if _has(c, need)), None)


def run_build_script(script: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Run a build script that prints its output folder last on stdout and its progress
    on stderr; relays each progress line and returns the folder.

    The build runs in its own session: an interrupt (KeyboardInterrupt from a signal
    handler) stops the script and every compiler it started before propagating, where a
    terminal's Ctrl-C alone would have reached only its foreground group.
    Raises AssetsUnavailable with the log's tail when the script fails.
    """
    tail: list[str] = []
    proc: subprocess.Popen[str] | None = None
    try:
        with stop_signals_held():
            proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    start_new_session=True, preexec_fn=_unblock_stop_signals)
        assert proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr

        def relay() -> None:
            for line in stderr:
                tail.append(line)
                del tail[:-40]
                if progress is not None:
                    progress(line.rstrip("\n"))

        relay_thread = threading.Thread(target=relay, name=f"build-{script.parent.name}",
                                        daemon=True)
        relay_thread.start()
        out = proc.stdout.read()
        rc = proc.wait()
        relay_thread.join()
    except BaseException:
        if proc is not None:
            stop_group(proc, grace=5.0)
        raise
    if rc != 0 or not out.split():
        raise AssetsUnavailable(f"{script} failed (exit {rc}):\n{''.join(tail)}")
    return Path(out.split()[-1])


def build_assets(progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the pinned binaries with build.sh; returns the cache folder.

    A cold build takes about 8 minutes on 2 cores; ``progress`` gets each status line.
    """
    script = CONTROL_PLANE_SRC / "build.sh"
    if not script.is_file():
        raise AssetsUnavailable(f"{script} not found: build from a source checkout")
    if shutil.which("go") is None:
        raise AssetsUnavailable("Go is not installed: cannot build the control plane")
    return run_build_script(script, progress)


def ensure_assets(
    progress: Callable[[str], None] | None = None, need: Sequence[str] = ALL_BINARIES
) -> Path:
    """Find the binaries, else build them when Go is available, else raise."""
    found = find_assets(need)
    if found is not None:
        return found
    if progress is not None:
        progress("control-plane binaries not found: building them from the Go module proxy")
    return build_assets(progress)


# --- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    client_cert: Path
    client_key: Path
    sa_key: Path
    sa_pub: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _save_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _save_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7)))


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          k: ec.EllipticCurvePrivateKey, subject: x509.Name, usage: x509.ObjectIdentifier,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(k.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _client_certificate(ca_cert: Path, ca_key: Path, folder: Path, cn: str,
                       org: str | None = None) -> tuple[Path, Path]:
    """A client certificate of the cluster CA for user ``cn`` in group ``org`` (a kubelet's
    is ``system:node:<name>`` in ``system:nodes``): its certificate and key files."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    k = _new_key()
    cert = _leaf(ca, signer, k, _name(cn, org), ExtendedKeyUsageOID.CLIENT_AUTH)
    folder.mkdir(parents=True, exist_ok=True)
    stem = cn.replace(":", "-")
    return _save_cert(cert, folder / f"{stem}.crt"), _save_key(k, folder / f"{stem}.key")


def _write_pki(folder: Path) -> _Pki:
    """A fresh CA, a loopback serving cert, an admin client cert and a SA signing key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_name = _name("gpu-dra-local-ca")
    ca = (
        _validity(x509.CertificateBuilder())
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    serving_key = _new_key()
    sans: list[x509.GeneralName] = [
        x509.DNSName(n)
        for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
    ]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(str(next(ipaddress.ip_network(_SERVICE_CIDR).hosts())))),
    ]
    serving = _leaf(ca, ca_key, serving_key, _name("kube-apiserver"),
                    ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key = _new_key()
    # system:masters: the admin identity every component and test uses.
    client = _leaf(ca, ca_key, client_key, _name("gpu-dra-admin", "system:masters"),
                   ExtendedKeyUsageOID.CLIENT_AUTH)
    sa_key = _new_key()
    sa_pub = folder / "sa.pub"
    sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return _Pki(
        ca_cert=_save_cert(ca, folder / "ca.crt"),
        ca_key=_save_key(ca_key, folder / "ca.key"),
        serving_cert=_save_cert(serving, folder / "serving.crt"),
        serving_key=_save_key(serving_key, folder / "serving.key"),
        client_cert=_save_cert(client, folder / "admin.crt"),
        client_key=_save_key(client_key, folder / "admin.key"),
        sa_key=_save_key(sa_key, folder / "sa.key"),
        sa_pub=sa_pub,
    )


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (a start retries if it was taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


try:  # loaded now: dlopen() between fork and exec could deadlock
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM stay pending in this thread until the block ends, then arrive.

    Start a child and record it inside one: a handler that raises KeyboardInterrupt (the
    demo's) landing in between would leave a child that no stop() knows. A handler run
    for a signal that another thread took must check this thread's mask itself (see
    driver/demo/cluster.py).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _unblock_stop_signals() -> None:
    """preexec_fn: a child must not inherit the mask of :func:`stop_signals_held`, or it
    would ignore the SIGTERM that stops it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that spawned it dies, even if
    that is by SIGKILL, so an interrupted test run leaves no control plane behind."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child_of_dying_parent() -> None:
    _unblock_stop_signals()
    die_with_parent()


def spawn_logged(argv: Sequence[str], log: Path, *, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None,
                 dies_with_parent: bool = True) -> subprocess.Popen[bytes]:
    """A child in its own session (:func:`stop_group` takes all it starts) writing
    stdout and stderr to ``log``; with ``dies_with_parent``, SIGKILLed when the spawning
    thread dies. Call it under :func:`stop_signals_held` with the recording of the child."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True,
            preexec_fn=_child_of_dying_parent if dies_with_parent else _unblock_stop_signals)


def stop_group(proc: subprocess.Popen[Any], grace: float) -> int:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL what is left of it
    after ``grace`` seconds, reap; the exit code."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Leftover group members (or a leader that ignored SIGTERM) go unconditionally.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return proc.wait()


@dataclass
class _Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float) -> None:
        stop_group(self.proc, grace)


@dataclass(frozen=True)
class ClusterConfig:
    """How to run the control plane; the defaults are what the e2e tests use."""

    assets: Path
    workdir: Path | None = None
    """Certificates, kubeconfig, etcd data and logs; a temporary folder when None."""
    keep_workdir: bool = False
    feature_gates: Mapping[str, bool] = field(default_factory=lambda: dict(DRA_FEATURE_GATES))
    runtime_config: str = "resource.k8s.io/v1beta1=true,resource.k8s.io/v1beta2=true"
    controllers: tuple[str, ...] = DEFAULT_CONTROLLERS
    ready_timeout: float = 120.0
    stop_grace: float = 10.0
    verbosity: int = 2
    die_with_parent: bool = True
    """Children get SIGKILL when the spawning thread dies, so a killed test run leaks none."""
    extra_apiserver_args: tuple[str, ...] = ()
    bind_address: str = "127.0.0.1"
    """Where kube-apiserver listens; a real node's pods reach it through the Service IP."""
    authorization_modes: tuple[str, ...] = ("RBAC",)
    """("Node", "RBAC") where a real kubelet joins with its own certificate."""


_LIVE: set[LocalCluster] = set()
"""Started, not yet stopped clusters: stopped at interpreter exit at the latest."""


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


class LocalCluster:
    """etcd + kube-apiserver on free loopback ports; scheduler and controller-manager on
    request. A context manager: everything it started is stopped on exit, also on error.

    >>> with LocalCluster(ClusterConfig(assets=ensure_assets())) as c:  # doctest: +SKIP
    ...     c.start_scheduler(); c.start_controller_manager()
    ...     api = c.api_client()
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._own_workdir = config.workdir is None
        self.workdir = config.workdir or Path(tempfile.mkdtemp(prefix="gpu-dra-cluster-"))
        self._components: dict[str, _Component] = {}
        self._ports: dict[str, int] = {}
        """Secure port of each started scheduler or controller-manager."""
        self._pki: _Pki | None = None
        self._lock = threading.Lock()
        self.server = ""
        self.kubeconfig = self.workdir / "kubeconfig"
        self.started_in: float | None = None
        """Seconds from start() to a ready API server."""
        self._apiserver_args: list[str] = []

    # context manager
    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        """Component name -> pid (also its process-group id)."""
        return {n: c.proc.pid for n, c in self._components.items()}

    def exited(self) -> dict[str, int]:
        """Components that exited on their own, with their exit codes (nothing stopped
        them): what a watcher of a long-running cluster reports."""
        with self._lock:
            codes = {n: c.proc.poll() for n, c in self._components.items()}
        return {n: code for n, code in codes.items() if code is not None}

    def log(self, component: str) -> Path:
        """Where ``component`` (e.g. ``kube-scheduler``) writes its output."""
        return self.workdir / f"{component}.log"

    def start(self) -> LocalCluster:
        """Start etcd and kube-apiserver, wait for /readyz, write the kubeconfig."""
        t0 = time.monotonic()
        _LIVE.add(self)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._pki = _write_pki(self.workdir / "pki")
        for attempt in range(3):
            try:
                self._start_etcd_and_apiserver()
                break
            except ComponentError as err:
                # A free port can be taken between choosing and binding it: retry.
                self._stop_components(("kube-apiserver", "etcd"))
                if "address already in use" not in err.log_tail or attempt == 2:
                    raise
        self._write_kubeconfig()
        self.started_in = time.monotonic() - t0
        return self

    def _start_etcd_and_apiserver(self) -> None:
        assert self._pki is not None
        pki, cfg = self._pki, self.config
        client_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        data = self.workdir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        etcd = self._spawn("etcd", [
            "--name=default",
            f"--data-dir={data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync",  # throwaway data: durability costs seconds per test
            "--log-level=warn",
        ])
        self._wait_ready(etcd, f"{etcd_url}/health", expect=b"true")

        self.server = f"https://127.0.0.1:{api_port}"
        gates = ",".join(f"{k}={str(v).lower()}" for k, v in cfg.feature_gates.items())
        args = [
            f"--bind-address={cfg.bind_address}",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--etcd-servers={etcd_url}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={_SERVICE_CIDR}",
            f"--authorization-mode={','.join(cfg.authorization_modes)}",
            "--allow-privileged=true",
            # Loopback may not be an Endpoints address; nothing in-cluster needs it.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--v={cfg.verbosity}",
        ]
        if gates:
            args.append(f"--feature-gates={gates}")
        if cfg.runtime_config:
            args.append(f"--runtime-config={cfg.runtime_config}")
        args += cfg.extra_apiserver_args
        self._apiserver_args = args
        apiserver = self._spawn("kube-apiserver", args)
        self._wait_ready(apiserver, f"{self.server}/readyz", expect=b"ok", client_cert=True)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (etcd keeps the data): an outage for clients to ride out."""
        self._stop_components(("kube-apiserver",))

    def start_apiserver(self) -> None:
        """Start kube-apiserver again after :meth:`stop_apiserver`: same port, flags, data."""
        assert self._apiserver_args, "start() the cluster first"
        apiserver = self._spawn("kube-apiserver", self._apiserver_args)
        self._wait_ready(apiserver, f"{self.server}/readyz", expect=b"ok", client_cert=True)

    def start_scheduler(self, extra: Sequence[str] = ()) -> None:
        """kube-scheduler with the DRA gates; no leader election (one instance); ``extra``
        flags such as ``--kube-api-qps`` (benchmarks lift the client's rate limit)."""
        self._start_component("kube-scheduler", list(extra), "/readyz")

    def start_controller_manager(self, controllers: Sequence[str] | None = None,
                                 extra: Sequence[str] = ()) -> None:
        """kube-controller-manager running only ``controllers`` (default: the DRA ones),
        with ``extra`` flags."""
        wanted = ",".join(controllers or self.config.controllers)
        self._start_component(
            "kube-controller-manager",
            [f"--controllers={wanted}", "--use-service-account-credentials=false", *extra],
            "/healthz",
        )

    def _start_component(self, name: str, extra: list[str], ready_path: str) -> None:
        with self._lock:
            if name in self._components and self._components[name].proc.poll() is None:
                return
        assert self._pki is not None, "start() the cluster first"
        gates = ",".join(f"{k}={str(v).lower()}" for k, v in self.config.feature_gates.items())
        for attempt in range(3):
            port = free_port()
            args = [
                f"--kubeconfig={self.kubeconfig}",
                # No --authentication/authorization-kubeconfig: only /healthz and /readyz
                # are ever asked for, and those are always allowed.
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={self._pki.serving_cert}",
                f"--tls-private-key-file={self._pki.serving_key}",
                f"--v={self.config.verbosity}",
                *extra,
            ]
            if gates:
                args.append(f"--feature-gates={gates}")
            comp = self._spawn(name, args)
            try:
                self._wait_ready(comp, f"https://127.0.0.1:{port}{ready_path}", expect=b"ok")
                self._ports[name] = port
                return
            except ComponentError as err:
                self._stop_components((name,))
                if "address already in use" not in err.log_tail or attempt == 2:
                    raise

    def metrics(self, component: str) -> str:
        """``component``'s Prometheus text, from /metrics on its secure port: start it with
        ``--authorization-always-allow-paths`` naming /metrics (no delegated authorization
        is configured)."""
        url = f"https://127.0.0.1:{self._ports[component]}/metrics"
        with urllib.request.urlopen(url, timeout=10, context=self._ssl_context(False)) as resp:
            return str(resp.read().decode())

    def _spawn(self, name: str, args: list[str]) -> _Component:
        binary = self.config.assets / name
        if not _has(self.config.assets, [name]):
            raise AssetsUnavailable(f"{binary} is missing")
        log_path = self.log(name)
        with stop_signals_held():
            proc = spawn_logged([str(binary), *args], log_path, cwd=self.workdir,
                                dies_with_parent=self.config.die_with_parent)
            comp = _Component(name, proc, log_path)
            with self._lock:
                self._components[name] = comp
        return comp

    def _ssl_context(self, client_cert: bool) -> ssl.SSLContext:
        assert self._pki is not None
        ctx = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        if client_cert:
            ctx.load_cert_chain(str(self._pki.client_cert), str(self._pki.client_key))
        return ctx

    def _wait_ready(
        self, comp: _Component, url: str, expect: bytes, client_cert: bool = False
    ) -> None:
        """Poll ``url`` until it answers 200 with ``expect``; fail fast if the process dies."""
        ctx = self._ssl_context(client_cert) if url.startswith("https") else None
        deadline = time.monotonic() + self.config.ready_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if (rc := comp.proc.poll()) is not None:
                raise ComponentError(comp.name, f"exited with code {rc}", comp.tail())
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                    body = resp.read()
                    if resp.status == 200 and expect in body:
                        return
                    last = f"HTTP {resp.status}: {body[:200]!r}"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {err.read()[:300]!r}"
            except OSError as err:
                last = str(err)
            time.sleep(0.2)
        raise ComponentError(
            comp.name, f"not ready after {self.config.ready_timeout:.0f}s ({last})", comp.tail()
        )

    def _write_kubeconfig(self) -> None:
        assert self._pki is not None
        self.write_kubeconfig(self.kubeconfig, "gpu-dra-admin", self._pki.client_cert,
                              self._pki.client_key)

    def write_kubeconfig(self, path: Path, user: str, cert: Path, key: Path) -> Path:
        """A kubeconfig for this cluster that authenticates with a client certificate."""
        assert self._pki is not None, "start() the cluster first"

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "gpu-dra-local", "cluster": {
                "server": self.server,
                "certificate-authority-data": b64(self._pki.ca_cert),
            }}],
            "users": [{"name": user, "user": {
                "client-certificate-data": b64(cert),
                "client-key-data": b64(key),
            }}],
            "contexts": [{"name": "gpu-dra-local", "context": {
                "cluster": "gpu-dra-local", "user": user,
            }}],
            "current-context": "gpu-dra-local",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    @property
    def ca_certificate(self) -> Path:
        assert self._pki is not None, "start() the cluster first"
        return self._pki.ca_cert

    @property
    def admin_certificate(self) -> tuple[Path, Path]:
        """The admin (system:masters) client certificate and key."""
        assert self._pki is not None, "start() the cluster first"
        return self._pki.client_cert, self._pki.client_key

    def issue_client_certificate(self, cn: str, org: str | None = None) -> tuple[Path, Path]:
        """A client certificate of this cluster's CA for user ``cn`` in group ``org``."""
        assert self._pki is not None, "start() the cluster first"
        return _client_certificate(self._pki.ca_cert, self._pki.ca_key,
                                  self.workdir / "pki", cn, org)

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for the admin user (one per thread)."""
        return api_client(self.kubeconfig)

    def server_version(self) -> str:
        """``gitVersion`` from /version, e.g. ``v1.37.2``."""
        with urllib.request.urlopen(
            f"{self.server}/version", timeout=5, context=self._ssl_context(True)
        ) as resp:
            return str(json.load(resp)["gitVersion"])

    def _stop_components(self, names: Sequence[str]) -> None:
        for name in names:
            with self._lock:
                comp = self._components.pop(name, None)
            if comp is not None:
                comp.stop(self.config.stop_grace)

    def stop(self) -> None:
        """Stop every component (dependents first) and remove the workdir. Idempotent."""
        self._stop_components(
            ("kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd")
        )
        self._stop_components(list(self._components))
        _LIVE.discard(self)
        if self._own_workdir and not self.config.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --- fake nodes ------------------------------------------------------------------------------

_LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


def _now(micro: bool = False) -> str:
    t = dt.datetime.now(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


DEFAULT_NODE_CAPACITY: Mapping[str, str] = {"cpu": "32", "memory": "256Gi", "pods": "110"}


class FakeNodeKeeper:
    """Node objects with capacity and a Ready condition, heartbeated like a kubelet would
    (Ready condition and kube-node-lease Lease), so the scheduler places pods on them.

    Without a node-lifecycle-controller nothing would mark them NotReady anyway; the
    heartbeat keeps them looking alive to anything (or anyone) that checks.
    """

    def __init__(self, api_client: Any, interval: float = 10.0) -> None:
        self._api = api_client
        self._interval = interval
        self._nodes: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        """Completed heartbeat rounds of the background thread."""
        self.errors: list[str] = []
        """Heartbeat failures (the keeper never raises from its thread)."""

    def __enter__(self) -> FakeNodeKeeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes)

    def add(
        self,
        name: str,
        capacity: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        taints: Sequence[Mapping[str, str]] = (),
    ) -> dict[str, Any]:
        """Create the Node (Ready, with ``capacity`` allocatable) and keep it fresh.

        The TaintNodesByCondition admission plugin gives every new Node the
        ``node.kubernetes.io/not-ready`` taint, which the node-lifecycle-controller would
        lift once the node reports Ready; that controller does not run here (it would
        evict from kubelet-less nodes), so the keeper sets ``taints`` itself.
        """
        cap = dict(capacity or DEFAULT_NODE_CAPACITY)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    **(labels or {}),
                },
            },
            "spec": {},
            "status": {
                "capacity": cap,
                "allocatable": cap,
                "conditions": self._conditions(),
                "nodeInfo": {
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "kubeletVersion": "fake",
                    "machineID": name, "systemUUID": name, "bootID": name,
                    "kernelVersion": "", "osImage": "fake", "containerRuntimeVersion": "",
                    "kubeProxyVersion": "",
                },
            },
        }
        api_request(self._api, "POST", "/api/v1/nodes", node).expect(201)
        created = api_request(
            self._api, "PATCH", f"/api/v1/nodes/{name}",
            {"spec": {"taints": [dict(t) for t in taints] or None}},
            content_type="application/merge-patch+json",
        ).expect(200)
        self._heartbeat(name)
        with self._lock:
            self._nodes.add(name)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fake-node-keeper", daemon=True
                )
                self._thread.start()
        return dict(created)

    def remove(self, name: str) -> None:
        """Stop heartbeating ``name`` and delete its Node and Lease."""
        with self._lock:
            self._nodes.discard(name)
        for path in (f"/api/v1/nodes/{name}", f"{_LEASES}/{name}"):
            api_request(self._api, "DELETE", path).expect(200, 202, 404)

    def stop(self) -> None:
        """Stop the heartbeat thread (the Nodes stay)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + 5)

    @staticmethod
    def _conditions() -> list[dict[str, str]]:
        now = _now()
        return [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "fake node kept Ready by gpu-dra FakeNodeKeeper",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }]

    def _heartbeat(self, name: str) -> None:
        api_request(
            self._api, "PATCH", f"/api/v1/nodes/{name}/status",
            {"status": {"conditions": self._conditions()}},
            content_type="application/strategic-merge-patch+json",
        ).expect(200)
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now(True)}
        renewed = api_request(
            self._api, "PATCH", f"{_LEASES}/{name}", {"spec": spec},
            content_type="application/merge-patch+json",
        )
        if renewed.status == 404:
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": name}, "spec": spec}
            api_request(self._api, "POST", _LEASES, lease).expect(201)
        else:
            renewed.expect(200)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for name in self.nodes:
                try:
                    self._heartbeat(name)
                except Exception as err:  # keep beating the others; the run may be ending
                    self.errors.append(f"{name}: {err}")
                    del self.errors[:-20]
            self.beats += 1


def iter_log_tails(cluster: LocalCluster, lines: int = 40) -> Iterator[tuple[str, str]]:
    """(component, last log lines) for each component log, for failure reports."""
    for name in ALL_BINARIES:
        path = cluster.log(name)
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            yield name, "\n".join(text)
