"""gpu-dra-driver: a Kubernetes DRA node driver for NVIDIA GPUs.

The code map, one package per concern; a package imports only those listed for it (the
arrows point down the data flow), and `tests/unit/test_layers.py` checks it.

- `nvml`: the NVML providers: the real library (`real`, nvidia-ml-py) or a mock machine
  (`mock`) from a profile (`profile`: schema and loading) that obeys NVML's MIG rules
  (`miglayout`) and fails on demand (`faults`: what `gpu-dra mock inject` records); GPU
  health as either reports it (`events`: event sets, liveness, the recovery action).
  Imports nothing of the driver but `errors`, `atomicfile` and `safeload`.
- `kube`: Kubernetes helpers with no driver knowledge: the API client, quantities,
  semantic versions, ResourceSlice lists read as Kubernetes protobuf (`protolist`, with
  the native walker `driver._kubeproto`), a list's pages read by a forked child
  (`forkedlist`). Imports only `errors`, `gcpause` and `atomicfile`.
- `inventory`: what a node has: the device model, discovery through a provider, NVLink
  and PCIe topology (with the native clique partition), the table/JSON view. Imports `nvml`.
- `health`: GPU health, pure: observations (XIDs, ECC errors, liveness checks, the
  admin's overrides) folded into each GPU's conditions by the recovery rules, XIDs
  classified, conditions as device taints, and when to write them. Imports `inventory`.
- `resourceslice`: an inventory, with its GPUs' health as taints, as ResourceSlices
  (`build`, pure), the writes that make the published pool match (`plan`, pure), and the
  publishers to a directory (`dirpublisher`) or the API server (`publish`), with their
  errors (`errors`). Imports `inventory`, `health`, `nvml`, `kube`.
- `allocator`: the scheduler's allocation over slices, claims and classes: input checks,
  CEL selectors, pools, the ledger of what is taken, the problem model, the pure-Python
  reference and the Cython kernel (`driver._alloc`), the answer and its explanation.
  Imports `kube`.
- `plugin`: the kubelet plugin on a GPU node: the daemon and its gRPC servers and sockets
  (their directories' and files' modes explicit, whatever the umask: `modes`),
  claims and their opaque configs, the prepare/unprepare state machine (records: the
  checkpoint, a snapshot and the journal of the saves since, and the ledger, rebuilt from
  the node's CDI specs when the checkpoint is lost (evidence); effects: MIG, time slicing,
  CDI specs), the node lock, logs, metrics, the health monitor (`monitor`: NVML events
  and checks folded by `health`, its changes published at most once a second and pushed
  to the health streams), and the mock driver root of `--mock` (`mockroot`).
  Imports `inventory`, `health`, `resourceslice`, `allocator`, `nvml`, `kube`.
- `devcluster`: a local control plane and fake GPU nodes with the kubelet stand-in, for
  `demo --cluster` and the tests; never imported by `plugin` (its `cryptography` is the
  `devcluster` extra). Imports `kube`.
- `demo`: `gpu-dra demo`, locally or on a `devcluster`. Imports any of the above.
- `cli`: `gpu-dra`: flag groups (each flag's environment variable validated like the flag)
  and the commands. Imports any of the above.
- `errors` (one base per layer, each with a metrics `reason`), `atomicfile` (temp file,
  fsync, rename) and `safeload` (YAML and JSON from outside, bounded in size, depth and
  alias expansion) and `gcpause` (the cycle collector paused over large decoded
  snapshots) serve every layer; `_proto` is generated gRPC code.

The data flow from NVML to a CDI file: a provider answers `inventory.discovery`, which
builds an `Inventory`; `resourceslice.build` turns it into ResourceSlices that a publisher
writes to the API server; the scheduler allocates a claim from them (as `allocator` does);
the kubelet calls NodePrepareResources on `plugin.servers`; `plugin.state` reads the claim
(`plugin.claims`), checks it against the ledger and records it in the checkpoint
(`plugin.records`), then acts on the devices (`plugin.effects`, through `plugin.mig` and
`plugin.sharing`) and writes the claim's CDI spec (`plugin.cdi`), whose device ids go back
to the kubelet for the container runtime.
"""

__version__ = "0.1.0"
