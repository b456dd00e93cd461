"""Pins the wire contract of the vendored kubelet plugin APIs (proto/ -> driver/_proto).

The kubelet only sees bytes and method paths, so both are checked against upstream facts
(k8s.io/kubelet/pkg/apis/{pluginregistration/v1,dra/v1,dra/v1beta1,dra-health/v1alpha1,
dra-health/v1}/api.proto): expected encodings are built by hand from upstream field numbers
and wire types with the small encoder below, which does not use the protobuf runtime, and the
method paths are checked both in the descriptors and on a real gRPC server.
"""

from collections.abc import Callable, Iterator
from concurrent import futures
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import Message

# All five in one process: distinct descriptor file names keep the default pool from clashing.
from driver._proto.dra_v1 import api_pb2 as dra_v1
from driver._proto.dra_v1 import api_pb2_grpc as dra_v1_grpc
from driver._proto.dra_v1beta1 import api_pb2 as dra_v1beta1
from driver._proto.dra_v1beta1 import api_pb2_grpc as dra_v1beta1_grpc
from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver._proto.drahealth_v1 import api_pb2_grpc as health_v1_grpc
from driver._proto.drahealth_v1alpha1 import api_pb2 as health_v1alpha1
from driver._proto.drahealth_v1alpha1 import api_pb2_grpc as health_v1alpha1_grpc
from driver._proto.pluginregistration_v1 import api_pb2 as reg_v1
from driver._proto.pluginregistration_v1 import api_pb2_grpc as reg_v1_grpc

# --- hand encoder (protobuf encoding spec: key = field_number << 3 | wire_type) -------------

VARINT = 0  # bool, enum, int64
LEN = 2  # string, bytes, embedded message, map entry, (non-packed) repeated string


def varint(n: int) -> bytes:
    """Base-128 varint, low group first; negative int64 goes out as 64-bit two's complement."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field: key, varint length, payload."""
    data = payload.encode() if isinstance(payload, str) else payload
    return key(field, LEN) + varint(len(data)) + data


def vi(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def assert_wire(msg: Message, expected: bytes) -> None:
    """Both directions: our encoding is exactly `expected`, and `expected` decodes to `msg`."""
    assert msg.SerializeToString(deterministic=True) == expected
    assert type(msg).FromString(expected) == msg


def test_hand_encoder_matches_spec_examples() -> None:
    assert varint(1) == b"\x01"
    assert varint(150) == b"\x96\x01"  # the spec's own example
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    assert key(1, LEN) == b"\x0a"
    assert key(2, VARINT) == b"\x10"
    assert key(5, LEN) == b"\x2a"


# --- schema: message set, field names and numbers exactly as upstream ------------------------

REGISTRATION_FIELDS = {
    "InfoRequest": {},
    "PluginInfo": {"type": 1, "name": 2, "endpoint": 3, "supported_versions": 4},
    "RegistrationStatus": {"plugin_registered": 1, "error": 2},
    "RegistrationStatusResponse": {},
}
DRA_V1BETA1_FIELDS = {
    "NodePrepareResourcesRequest": {"claims": 1},
    "NodePrepareResourcesResponse": {"claims": 1},
    "NodePrepareResourceResponse": {"devices": 1, "error": 2},
    "Device": {"request_names": 1, "pool_name": 2, "device_name": 3, "cdi_device_ids": 4},
    "NodeUnprepareResourcesRequest": {"claims": 1},
    "NodeUnprepareResourcesResponse": {"claims": 1},
    "NodeUnprepareResourceResponse": {"error": 1},
    "Claim": {"namespace": 1, "uid": 2, "name": 3},
}
DRA_V1_FIELDS = {
    **DRA_V1BETA1_FIELDS,
    "Device": {**DRA_V1BETA1_FIELDS["Device"], "share_id": 5},
}
HEALTH_FIELDS = {
    "NodeWatchResourcesRequest": {},
    "DeviceIdentifier": {"pool_name": 1, "device_name": 2},
    "DeviceHealth": {
        "device": 1,
        "health": 2,
        "last_updated_time": 3,
        "health_check_timeout_seconds": 4,
        "message": 5,
    },
    "NodeWatchResourcesResponse": {"devices": 1},
}

FILES = [
    # module, descriptor file name (upstream import path), proto package, fields
    (
        reg_v1,
        "k8s.io/kubelet/pkg/apis/pluginregistration/v1/api.proto",
        "pluginregistration",
        REGISTRATION_FIELDS,
    ),
    (
        dra_v1,
        "k8s.io/kubelet/pkg/apis/dra/v1/api.proto",
        "k8s.io.kubelet.pkg.apis.dra.v1",
        DRA_V1_FIELDS,
    ),
    (
        dra_v1beta1,
        "k8s.io/kubelet/pkg/apis/dra/v1beta1/api.proto",
        "k8s.io.kubelet.pkg.apis.dra.v1beta1",
        DRA_V1BETA1_FIELDS,
    ),
    (
        health_v1alpha1,
        "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1/api.proto",
        "v1alpha1",
        HEALTH_FIELDS,
    ),
    (health_v1, "k8s.io/kubelet/pkg/apis/dra-health/v1/api.proto", "v1", HEALTH_FIELDS),
]


@pytest.mark.parametrize(
    ("module", "file_name", "package", "fields"),
    FILES,
    ids=[module.__name__.split(".")[-2] for module, *_ in FILES],
)
def test_schema_matches_upstream(
    module: ModuleType, file_name: str, package: str, fields: dict[str, dict[str, int]]
) -> None:
    fd = module.DESCRIPTOR
    assert fd.name == file_name
    assert fd.package == package
    assert descriptor_pool.Default().FindFileByName(file_name) is fd
    assert fd.GetOptions().go_package == file_name.removesuffix("/api.proto")
    messages = fd.message_types_by_name.items()
    assert {name: {f.name: f.number for f in msg.fields} for name, msg in messages} == fields


@pytest.mark.parametrize("module", [health_v1alpha1, health_v1], ids=["v1alpha1", "v1"])
def test_health_enum_is_package_scoped(module: ModuleType) -> None:
    enum = module.DESCRIPTOR.enum_types_by_name["HealthStatus"]
    assert enum.full_name == f"{module.DESCRIPTOR.package}.HealthStatus"
    assert {v.name: v.number for v in enum.values} == {"UNKNOWN": 0, "HEALTHY": 1, "UNHEALTHY": 2}
    assert (module.UNKNOWN, module.HEALTHY, module.UNHEALTHY) == (0, 1, 2)


# --- encodings -------------------------------------------------------------------------------


def test_plugin_info_bytes() -> None:
    msg = reg_v1.PluginInfo(
        type="DRAPlugin",
        name="gpu.example.com",
        endpoint="/var/lib/kubelet/plugins/gpu.example.com/dra.sock",
        supported_versions=["v1.DRAPlugin", "v1beta1.DRAPlugin"],
    )
    expected = (
        b"\x0a\x09DRAPlugin"  # field 1 LEN: 1<<3|2 = 0x0a, 9 bytes
        b"\x12\x0fgpu.example.com"  # field 2 LEN: 2<<3|2 = 0x12, 15 bytes
        b"\x1a\x31/var/lib/kubelet/plugins/gpu.example.com/dra.sock"  # 3<<3|2 = 0x1a, 49 bytes
        b"\x22\x0cv1.DRAPlugin"  # field 4 LEN: 4<<3|2 = 0x22, one key per repeated element
        b"\x22\x11v1beta1.DRAPlugin"  # 17 bytes
    )
    assert_wire(msg, expected)


def test_registration_status_bytes() -> None:
    # field 1 bool: 1<<3|0 = 0x08, true = 0x01; field 2 string: 0x12.
    assert_wire(reg_v1.RegistrationStatus(plugin_registered=True), b"\x08\x01")
    assert_wire(
        reg_v1.RegistrationStatus(plugin_registered=False, error="no handler"),
        b"\x12\x0ano handler",  # false is the proto3 default, so it is not sent
    )
    assert_wire(reg_v1.InfoRequest(), b"")
    assert_wire(reg_v1.RegistrationStatusResponse(), b"")


DRA = pytest.mark.parametrize("pb", [dra_v1, dra_v1beta1], ids=["v1", "v1beta1"])

CLAIMS_WIRE = ld(1, ld(1, "default") + ld(2, "uid-1") + ld(3, "claim-a")) + ld(
    1, ld(1, "ml") + ld(2, "uid-2") + ld(3, "claim-b")
)


def two_claims(pb: ModuleType) -> list[Message]:
    return [
        pb.Claim(namespace="default", uid="uid-1", name="claim-a"),
        pb.Claim(namespace="ml", uid="uid-2", name="claim-b"),
    ]


@DRA
def test_prepare_and_unprepare_request_bytes(pb: ModuleType) -> None:
    # claims = 1: one LEN record per Claim{namespace=1, uid=2, name=3}.
    assert CLAIMS_WIRE[:4] == b"\x0a\x19\x0a\x07"  # Claim is 9 + 7 + 9 = 25 bytes; namespace is 7
    assert_wire(pb.NodePrepareResourcesRequest(claims=two_claims(pb)), CLAIMS_WIRE)
    assert_wire(pb.NodeUnprepareResourcesRequest(claims=two_claims(pb)), CLAIMS_WIRE)


DEVICE_V1BETA1_WIRE = (
    ld(1, "gpu")  # request_names
    + ld(2, "node-a")  # pool_name
    + ld(3, "gpu-0")  # device_name
    + ld(4, "k8s.gpu.example.com/gpu=gpu-0")  # cdi_device_ids (repeated: one key each)
    + ld(4, "k8s.gpu.example.com/gpu=common")
)


def device(pb: ModuleType, **extra: str) -> Message:
    return pb.Device(
        request_names=["gpu"],
        pool_name="node-a",
        device_name="gpu-0",
        cdi_device_ids=["k8s.gpu.example.com/gpu=gpu-0", "k8s.gpu.example.com/gpu=common"],
        **extra,
    )


def prepare_response_wire(device_wire: bytes) -> bytes:
    """map<string, NodePrepareResourceResponse> claims = 1 is repeated ClaimsEntry{key=1, value=2}.

    Deterministic serialization sorts map keys, so uid-1 comes before uid-2.
    """
    ok = ld(1, "uid-1") + ld(2, ld(1, device_wire))  # value: devices = 1
    failed = ld(1, "uid-2") + ld(2, ld(2, "not allocated"))  # value: error = 2
    return ld(1, ok) + ld(1, failed)


@DRA
def test_prepare_response_bytes(pb: ModuleType) -> None:
    extra = {"share_id": "share-7"} if pb is dra_v1 else {}
    device_wire = DEVICE_V1BETA1_WIRE + (ld(5, "share-7") if extra else b"")  # 5<<3|2 = 0x2a
    msg = pb.NodePrepareResourcesResponse(
        claims={
            "uid-2": pb.NodePrepareResourceResponse(error="not allocated"),
            "uid-1": pb.NodePrepareResourceResponse(devices=[device(pb, **extra)]),
        }
    )
    assert_wire(msg, prepare_response_wire(device_wire))


def test_v1_share_id_has_explicit_presence() -> None:
    unset = device(dra_v1)
    assert not unset.HasField("share_id")
    assert unset.SerializeToString() == DEVICE_V1BETA1_WIRE

    empty = device(dra_v1, share_id="")
    assert empty.HasField("share_id")
    assert_wire(empty, DEVICE_V1BETA1_WIRE + b"\x2a\x00")  # "" is still sent: key, length 0

    empty.ClearField("share_id")
    assert not empty.HasField("share_id")


def test_v1beta1_device_has_no_share_id() -> None:
    assert "share_id" not in dra_v1beta1.Device.DESCRIPTOR.fields_by_name
    with pytest.raises(ValueError, match="share_id"):
        dra_v1beta1.Device(share_id="x")
    with pytest.raises(ValueError):
        dra_v1beta1.Device().HasField("share_id")


@DRA
def test_unprepare_response_bytes(pb: ModuleType) -> None:
    msg = pb.NodeUnprepareResourcesResponse(
        claims={"uid-2": pb.NodeUnprepareResourceResponse(error="busy"), "uid-1": {}}
    )
    # An empty value is still written as value = 2 with length 0.
    expected = ld(1, ld(1, "uid-1") + ld(2, b"")) + ld(1, ld(1, "uid-2") + ld(2, ld(1, "busy")))
    assert expected[:11] == b"\x0a\x09\x0a\x05uid-1\x12\x00"
    assert_wire(msg, expected)
    # Encoders that omit the empty value (allowed for map entries) decode to the same message.
    assert (
        pb.NodeUnprepareResourcesResponse.FromString(
            ld(1, ld(1, "uid-1")) + ld(1, ld(1, "uid-2") + ld(2, ld(1, "busy")))
        )
        == msg
    )


HEALTH = pytest.mark.parametrize("pb", [health_v1alpha1, health_v1], ids=["v1alpha1", "v1"])


@HEALTH
def test_watch_response_bytes(pb: ModuleType) -> None:
    long_message = "XID 79: GPU has fallen off the bus. " * 5  # 180 chars: 2-byte length
    msg = pb.NodeWatchResourcesResponse(
        devices=[
            pb.DeviceHealth(
                device=pb.DeviceIdentifier(pool_name="node-a", device_name="gpu-0"),
                health=pb.UNHEALTHY,
                last_updated_time=1_767_225_600,
                health_check_timeout_seconds=60,
                message=long_message,
            ),
            pb.DeviceHealth(
                device=pb.DeviceIdentifier(pool_name="node-a", device_name="gpu-1"),
                health=pb.HEALTHY,
                last_updated_time=1_767_225_600,
                health_check_timeout_seconds=-1,
            ),
        ]
    )
    unhealthy = (
        ld(1, ld(1, "node-a") + ld(2, "gpu-0"))  # device: DeviceIdentifier
        + b"\x10\x02"  # health enum, field 2 VARINT: 2<<3|0 = 0x10, UNHEALTHY = 2
        + b"\x18\x80\xf2\xd6\xca\x06"  # last_updated_time 3<<3|0 = 0x18; 0x6955B900 in 7-bit groups
        + b"\x20\x3c"  # health_check_timeout_seconds 4<<3|0 = 0x20, 60
        + b"\x2a\xb4\x01"
        + long_message.encode()  # message 5<<3|2 = 0x2a, 180 = 0xb4 0x01
    )
    healthy = (
        ld(1, ld(1, "node-a") + ld(2, "gpu-1"))
        + vi(2, 1)
        + vi(3, 1_767_225_600)
        + b"\x20"
        + b"\xff" * 9
        + b"\x01"  # int64 (not sint64): -1 takes 10 bytes
    )
    assert vi(3, 1_767_225_600) == b"\x18\x80\xf2\xd6\xca\x06"
    assert_wire(msg, ld(1, unhealthy) + ld(1, healthy))  # devices = 1
    assert_wire(pb.DeviceHealth(health=pb.UNKNOWN), b"")  # UNKNOWN = 0 is the default
    assert_wire(pb.NodeWatchResourcesRequest(), b"")


# --- gRPC method paths -----------------------------------------------------------------------

UNARY_PATHS = {
    "/pluginregistration.Registration/GetInfo",
    "/pluginregistration.Registration/NotifyRegistrationStatus",
    "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
    "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
    "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
    "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources",
}
SERVER_STREAMING_PATHS = {
    "/v1alpha1.DRAResourceHealth/NodeWatchResources",
    "/v1.DRAResourceHealth/NodeWatchResources",
}


def test_descriptor_method_paths() -> None:
    unary, streaming = set(), set()
    for module, *_ in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert not method.client_streaming
                path = f"/{service.full_name}/{method.name}"
                (streaming if method.server_streaming else unary).add(path)
    assert unary == UNARY_PATHS
    assert streaming == SERVER_STREAMING_PATHS


class Registration(reg_v1_grpc.RegistrationServicer):
    def GetInfo(self, request: Any, context: Any) -> Any:
        return reg_v1.PluginInfo(name="GetInfo")

    def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
        assert request.plugin_registered
        return reg_v1.RegistrationStatusResponse()


def dra_servicer(pb: ModuleType, pb_grpc: ModuleType) -> Any:
    """Answers with the serving package's name, so a test sees which version got the call."""
    package = pb.DESCRIPTOR.package

    class DRAPlugin(pb_grpc.DRAPluginServicer):
        def NodePrepareResources(self, request: Any, context: Any) -> Any:
            answer = pb.NodePrepareResourceResponse(error=package)
            return pb.NodePrepareResourcesResponse(claims={c.uid: answer for c in request.claims})

        def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
            answer = pb.NodeUnprepareResourceResponse(error=package)
            return pb.NodeUnprepareResourcesResponse(claims={c.uid: answer for c in request.claims})

    return DRAPlugin()


def health_servicer(pb: ModuleType, pb_grpc: ModuleType) -> Any:
    package = pb.DESCRIPTOR.package

    class DRAResourceHealth(pb_grpc.DRAResourceHealthServicer):
        def NodeWatchResources(self, request: Any, context: Any) -> Iterator[Any]:
            device = pb.DeviceIdentifier(pool_name=package)
            yield pb.NodeWatchResourcesResponse(devices=[pb.DeviceHealth(device=device)])

    return DRAResourceHealth()


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """All services on one server over a unix socket, registered via the generated helpers."""
    socket = tmp_path_factory.mktemp("grpc") / "dra.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reg_v1_grpc.add_RegistrationServicer_to_server(Registration(), server)
    dra_v1_grpc.add_DRAPluginServicer_to_server(dra_servicer(dra_v1, dra_v1_grpc), server)
    dra_v1beta1_grpc.add_DRAPluginServicer_to_server(
        dra_servicer(dra_v1beta1, dra_v1beta1_grpc), server
    )
    health_v1alpha1_grpc.add_DRAResourceHealthServicer_to_server(
        health_servicer(health_v1alpha1, health_v1alpha1_grpc), server
    )
    health_v1_grpc.add_DRAResourceHealthServicer_to_server(
        health_servicer(health_v1, health_v1_grpc), server
    )
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    with grpc.insecure_channel(f"unix://{socket}") as ch:
        yield ch
    server.stop(grace=None)


CLAIM_REQUEST = ld(1, ld(1, "default") + ld(2, "uid-1") + ld(3, "claim-a"))


def claim_error(pb: ModuleType, response_type: str) -> Callable[[bytes], str]:
    """Decodes a (Un)prepare response and returns claim uid-1's error, i.e. the serving package."""
    return lambda raw: getattr(pb, response_type).FromString(raw).claims["uid-1"].error


UNARY_CALLS = [
    (
        "/pluginregistration.Registration/GetInfo",
        b"",
        lambda raw: reg_v1.PluginInfo.FromString(raw).name,
        "GetInfo",
    ),
    (
        "/pluginregistration.Registration/NotifyRegistrationStatus",
        b"\x08\x01",
        lambda raw: raw,
        b"",
    ),
    (
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
        CLAIM_REQUEST,
        claim_error(dra_v1, "NodePrepareResourcesResponse"),
        "k8s.io.kubelet.pkg.apis.dra.v1",
    ),
    (
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
        CLAIM_REQUEST,
        claim_error(dra_v1, "NodeUnprepareResourcesResponse"),
        "k8s.io.kubelet.pkg.apis.dra.v1",
    ),
    (
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
        CLAIM_REQUEST,
        claim_error(dra_v1beta1, "NodePrepareResourcesResponse"),
        "k8s.io.kubelet.pkg.apis.dra.v1beta1",
    ),
    (
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources",
        CLAIM_REQUEST,
        claim_error(dra_v1beta1, "NodeUnprepareResourcesResponse"),
        "k8s.io.kubelet.pkg.apis.dra.v1beta1",
    ),
]


def test_call_table_covers_every_unary_path() -> None:
    assert {path for path, *_ in UNARY_CALLS} == UNARY_PATHS


@pytest.mark.parametrize(
    ("path", "request_bytes", "decode", "want"), UNARY_CALLS, ids=[c[0] for c in UNARY_CALLS]
)
def test_server_answers_unary_path(
    channel: grpc.Channel,
    path: str,
    request_bytes: bytes,
    decode: Callable[[bytes], object],
    want: object,
) -> None:
    # Raw bytes in and out: no generated stub is involved on the client side.
    call = channel.unary_unary(path)
    assert decode(call(request_bytes, timeout=5)) == want


@pytest.mark.parametrize("path", sorted(SERVER_STREAMING_PATHS))
def test_server_answers_health_stream(channel: grpc.Channel, path: str) -> None:
    package = path.split(".")[0].removeprefix("/")
    responses = list(channel.unary_stream(path)(b"", timeout=5))
    assert len(responses) == 1
    decoded = health_v1.NodeWatchResourcesResponse.FromString(responses[0])
    assert decoded.devices[0].device.pool_name == package


@pytest.mark.parametrize(
    "path",
    [
        "/v1.DRAPlugin/NodePrepareResources",  # the advertised short name is not a path
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResource",
        "/Registration/GetInfo",
        "/k8s.io.kubelet.pkg.apis.dra-health.v1.DRAResourceHealth/NodeWatchResources",
    ],
)
def test_server_rejects_near_miss_paths(channel: grpc.Channel, path: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(path)(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
