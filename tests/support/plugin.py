"""Helpers for the kubelet plugin tests: claims as the API server returns them, a kubelet-like
gRPC client over the plugin's unix sockets, MIG-enabled mock profiles, and CDI validation
against the official schema."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT7

from driver._proto.dra_v1 import api_pb2 as dra_v1
from driver._proto.dra_v1 import api_pb2_grpc as dra_v1_grpc
from driver._proto.dra_v1beta1 import api_pb2 as dra_v1beta1
from driver._proto.dra_v1beta1 import api_pb2_grpc as dra_v1beta1_grpc
from driver._proto.pluginregistration_v1 import api_pb2 as reg_v1
from driver._proto.pluginregistration_v1 import api_pb2_grpc as reg_v1_grpc
from driver.devcluster.node import PluginFolders
from driver.nvml.profile import PROFILES_DIR
from driver.plugin import cdi, checkpoint
from driver.plugin.checkpoint import ClaimRecord
from driver.plugin.sockets import grpc_address
from tests.support.forkserver import ForkServer

DRIVER = "gpu.dra.dev"
NODE = "node-a"
SCHEMA_DIR = Path(__file__).parents[1] / "fixtures" / "cdi-schema"


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def new_uid() -> str:
    return str(uuid.uuid4())


def result(device: str, request: str = "gpu", pool: str = NODE, driver: str = DRIVER,
           admin: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"request": request, "driver": driver, "pool": pool,
                             "device": device}
    if admin:
        entry["adminAccess"] = True
    return entry


def opaque(parameters: Any, requests: Sequence[str] = (), source: str = "FromClaim",
           driver: str = DRIVER) -> dict[str, Any]:
    return {"source": source, "requests": list(requests),
            "opaque": {"driver": driver, "parameters": parameters}}


def gpu_config(**sharing: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "GpuConfig"}
    if sharing:
        config["sharing"] = sharing
    return config


@dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    uid: str


def claim_object(claim: Claim, results: Sequence[dict[str, Any]],
                 configs: Sequence[dict[str, Any]] = (), allocated: bool = True
                 ) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": claim.name, "namespace": claim.namespace, "uid": claim.uid},
        "spec": {"devices": {"requests": [{"name": r["request"].split("/")[0]}
                                          for r in results]}},
        "status": {}}
    if allocated:
        obj["status"]["allocation"] = {"devices": {"results": list(results),
                                                   "config": list(configs)}}
    return obj


def write_claim(local_dir: Path, claim: Claim, results: Sequence[dict[str, Any]],
                configs: Sequence[dict[str, Any]] = (), allocated: bool = True,
                uid: str | None = None) -> Claim:
    """Write the claim as `--local-dir` reads it; `uid` overrides the stored UID."""
    obj = claim_object(claim, results, configs, allocated)
    if uid is not None:
        obj["metadata"]["uid"] = uid
    path = local_dir / "resourceclaims" / claim.namespace / f"{claim.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj))
    return claim


def make_claim(local_dir: Path, results: Sequence[dict[str, Any]],
               configs: Sequence[dict[str, Any]] = (), namespace: str = "ns") -> Claim:
    uid = new_uid()
    return write_claim(local_dir, Claim(namespace, f"claim-{uid[:8]}", uid), results, configs)


def mig_profile(path: Path, base: str = "dgx-h100", gpus: Sequence[int] = (0, 1),
                faults: dict[int, dict[str, str]] | None = None) -> Path:
    """A shipped profile with MIG mode on (and no MIG devices yet) on some GPUs, and NVML
    failures injected by GPU index (function name -> NVML_ERROR_* without the prefix)."""
    data = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    data = json.loads(json.dumps(data))  # YAML aliases share objects: unshare them
    for index in gpus:
        data["gpus"][index]["mig"] = {"enabled": True}
    for index, injected in (faults or {}).items():
        data["gpus"][index]["faults"] = injected
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass(frozen=True)
class Answer:
    devices: tuple[dict[str, Any], ...] = ()
    error: str = ""


class Kubelet:
    """What the kubelet does over the plugin's sockets, with its 45 s deadline."""

    def __init__(self, dra_socket: Path, registration_socket: Path) -> None:
        self.dra_channel = grpc.insecure_channel(grpc_address(dra_socket))
        self.reg_channel = grpc.insecure_channel(grpc_address(registration_socket))
        self.v1 = dra_v1_grpc.DRAPluginStub(self.dra_channel)
        self.v1beta1 = dra_v1beta1_grpc.DRAPluginStub(self.dra_channel)

    def close(self) -> None:
        self.dra_channel.close()
        self.reg_channel.close()

    def get_info(self, timeout: float = 1.0, wait_for_ready: bool = False) -> Any:
        return reg_v1_grpc.RegistrationStub(self.reg_channel).GetInfo(
            reg_v1.InfoRequest(), timeout=timeout, wait_for_ready=wait_for_ready)

    def _method(self, method: str, claims: Sequence[Claim], version: str) -> tuple[Any, Any]:
        pb = dra_v1 if version == "v1" else dra_v1beta1
        stub = self.v1 if version == "v1" else self.v1beta1
        request_type = getattr(pb, f"{method}Request")
        request = request_type(claims=[pb.Claim(namespace=c.namespace, name=c.name, uid=c.uid)
                                       for c in claims])
        return getattr(stub, method), request

    def _call(self, method: str, claims: Sequence[Claim], version: str) -> Any:
        call, request = self._method(method, claims, version)
        return call(request, timeout=45)

    def send(self, method: str, claims: Sequence[Claim], version: str = "v1") -> Any:
        """Start the call without waiting: a future of its response (or its RpcError)."""
        call, request = self._method(method, claims, version)
        return call.future(request, timeout=45)

    def prepare(self, claims: Sequence[Claim], version: str = "v1") -> dict[str, Answer]:
        response = self._call("NodePrepareResources", claims, version)
        return {uid: Answer(tuple(
            {"requestNames": list(d.request_names), "pool": d.pool_name,
             "device": d.device_name, "cdiDeviceIDs": list(d.cdi_device_ids)}
            for d in entry.devices), entry.error) for uid, entry in response.claims.items()}

    def unprepare(self, claims: Sequence[Claim], version: str = "v1") -> dict[str, str]:
        response = self._call("NodeUnprepareResources", claims, version)
        return {uid: entry.error for uid, entry in response.claims.items()}


def wait_for_socket(path: Path, timeout: float = 60.0,
                    alive: Callable[[], bool] = lambda: True) -> None:
    """Until the plugin made its socket at `path`; at once if `alive()` says it exited.
    The timeout is generous: with an API server the plugin publishes its slices first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive():
            raise AssertionError(f"the plugin exited before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.02)


def inode(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (a socket bound again is another), None if none is."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _registry() -> Registry:
    defs = json.loads((SCHEMA_DIR / "defs.json").read_text())
    return Registry().with_resource("defs.json", DRAFT7.create_resource(defs))


def cdi_problems(spec: dict[str, Any]) -> list[str]:
    """Everything wrong with a CDI spec: the official JSON schema, then our checks of the
    rules the schema lacks."""
    schema = json.loads((SCHEMA_DIR / "schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema, registry=_registry())
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(spec)]
    return problems + cdi.spec_problems(spec)


def cdi_specs(cdi_root: Path) -> dict[str, dict[str, Any]]:
    """The claim specs of our driver in a CDI directory, by claim UID."""
    return {uid: json.loads(path.read_text())
            for uid, path in cdi.claim_specs(cdi_root, DRIVER).items()}


PROC_DEVICES = "Character devices:\n  1 mem\n195 nvidia-frontend\n238 nvidia-uvm\n" \
               "241 nvidia-caps\n\nBlock devices:\n  8 sd\n"


@dataclass(frozen=True)
class Node(PluginFolders):
    """One node's directories under a short temp root: the plugin's (`PluginFolders`, as
    the e2e tier and `demo --cluster` lay them out) and the in-process tests' own (the
    local slice directory, the registry, the boot id)."""

    @property
    def local(self) -> Path:
        return self.root / "local"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def boot_id(self) -> Path:
        return self.root / "boot_id"

    @property
    def dra_socket(self) -> Path:
        return self.plugin_dir / "dra.sock"

    @property
    def registration_socket(self) -> Path:
        return self.registry / f"{DRIVER}-reg.sock"

    def prepare_dirs(self) -> None:
        self.local.mkdir(exist_ok=True)
        if not self.boot_id.exists():
            self.boot_id.write_text(new_uid() + "\n")
        (self.root / "proc-devices").write_text(PROC_DEVICES)

    def options(self, **overrides: Any) -> Any:
        from driver.plugin.daemon import PluginOptions

        self.prepare_dirs()
        fields: dict[str, Any] = dict(
            driver=DRIVER, node=NODE, registry_dir=self.registry, plugin_dir=self.plugin_dir,
            cdi_root=self.cdi_root, local_dir=self.local, boot_id_path=self.boot_id,
            proc_devices=self.root / "proc-devices")
        fields.update(overrides)
        return PluginOptions(**fields)

    def cli_args(self, profile: str, *extra: str, node_name: str = NODE,
                 kubeconfig: Path | None = None) -> list[str]:
        """Claims and slices in the local directory, or on `kubeconfig`'s API server."""
        self.prepare_dirs()
        source = ["--local-dir", str(self.local)] if kubeconfig is None else \
            ["--kubeconfig", str(kubeconfig)]
        return ["plugin", "--mock", profile, "--node-name", node_name, *source,
                "--kubelet-registry-dir", str(self.registry),
                "--plugin-data-dir", str(self.plugin_dir), "--cdi-root", str(self.cdi_root),
                "--health-port", "0", "--metrics-port", "0", *extra]

    def slices(self) -> list[dict[str, Any]]:
        return [yaml.safe_load(p.read_text())
                for p in sorted((self.local / "resourceslices").glob("*.yaml"))]

    def records(self) -> dict[str, ClaimRecord]:
        """The checkpoint's records (its journal applied), by claim UID; none without one."""
        loaded = checkpoint.load(self.checkpoint)
        return {} if loaded is None else loaded.claims


@dataclass
class Running:
    """A plugin started in this process, and a kubelet client of its sockets."""

    plugin: Any
    kubelet: Kubelet
    provider: Any
    stopped: bool = False

    def stop(self, grace: float = 5.0) -> None:
        if not self.stopped:
            self.stopped = True
            self.kubelet.close()
            self.plugin.stop(grace)


Start = Callable[..., Running]


@contextmanager
def plugins(node: Node) -> Iterator[Start]:
    """Start plugins on `node` (profile, claim source and PluginOptions overrides); all are
    stopped at the end."""
    from driver.nvml.mock import mock_provider
    from driver.plugin.daemon import Plugin

    started: list[Running] = []

    def start(profile: str = "dgx-h100", claims: Any = None, mock_state: Path | None = None,
              **overrides: Any) -> Running:
        provider = mock_provider(profile, mock_state)
        plugin = Plugin(node.options(**overrides), provider, claims=claims)
        plugin.start()
        running = Running(plugin, Kubelet(plugin.options.dra_socket,
                                          plugin.options.registration_socket), provider)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


class Daemon:
    """`gpu-dra <args>` in a child process (spawned, or forked by a fork server for a fast
    start), and a kubelet client of its sockets (named after `pod_uid` when given, as in
    a rolling update)."""

    def __init__(self, node: Node, args: list[str], forks: ForkServer | None = None,
                 pod_uid: str | None = None, log_name: str = "plugin.log") -> None:
        self.node = node
        self.log = node.root / log_name
        options = node.options(pod_uid=pod_uid)
        self.dra_socket, self.registration_socket = options.dra_socket, \
            options.registration_socket
        if pod_uid is not None:
            args = [*args, "--pod-uid", pod_uid]
        self.registration_socket.unlink(missing_ok=True)  # a killed plugin's
        log = self.log
        if forks is not None:
            self.pid = forks.run(args, log)
            self._wait: Callable[[], int] = lambda: forks.wait(self.pid, 30)
            self._alive: Callable[[], bool] = lambda: forks.running(self.pid)
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "driver.cli", *args],
                                        stdout=out, stderr=subprocess.STDOUT)
            self.pid = proc.pid
            self._wait = lambda: proc.wait(30)
            self._alive = lambda: proc.poll() is None
        try:
            wait_for_socket(self.registration_socket, alive=self._alive)
        except AssertionError:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"the plugin did not start:\n{self.output()}") from None
        self.kubelet = Kubelet(self.dra_socket, self.registration_socket)
        self.kubelet.get_info(timeout=10, wait_for_ready=True)  # the file precedes listen()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def send(self, sig: int) -> int:
        """Send `sig`; the exit code once the process has ended (see `wait`)."""
        os.kill(self.pid, sig)
        return self.wait()

    def wait(self) -> int:
        """The exit code once the process has ended; a timeout error if it still runs 30 s
        on."""
        return self._wait()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        try:
            return self.send(sig)
        finally:
            if hasattr(self, "kubelet"):
                self.kubelet.close()


def live_mig(mock_state: Path) -> dict[str, list[tuple[int, int, int]]]:
    """The mock GPUs' MIG state as the hardware holds it: GPU UUID -> (GI profile id,
    placement start, number of compute instances) of each GPU instance; GPUs without any
    are left out."""
    if not mock_state.exists():
        return {}
    gpus = json.loads(mock_state.read_text())["gpus"]
    return {uuid: [(gi["profileId"], gi["start"], len(gi["computeInstances"])) for gi in gis]
            for uuid, gis in gpus.items() if gis}
