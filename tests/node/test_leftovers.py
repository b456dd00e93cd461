"""A node tier run killed before its stop (SIGKILL of pytest: its holder, kubelet and
containerd die with it, but the shims and containers are nobody's children) is cleaned up
by the next start, from the state file the killed run left."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.realnode import (
    CGROUPS,
    clean_leftovers,
    kubelet_cgroups,
    make_cgroups,
    pids_in_mount_ns,
    remove_cgroups,
)


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, cgroups)")
def test_a_killed_run_is_cleaned_up_by_the_next_start(tmp_path: Path) -> None:
    root = "gpu-dra-node-killed"  # not the running tier's (CGROUP_ROOT): no collision
    try:
        # What the killed run left: a shim (in the node's mount namespace), a container
        # (its own mount namespace, in the node's cgroups), the scratch folder and an empty
        # mount point it had made.
        shim = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep",
                                 "600"])
        wait = time.monotonic() + 5
        while os.stat(f"/proc/{shim.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            assert time.monotonic() < wait, "unshare did not enter a mount namespace"
            time.sleep(0.01)
        mount_ns = os.stat(f"/proc/{shim.pid}/ns/mnt").st_ino
        make_cgroups(root)
        pod = CGROUPS / "pids" / root / "pod-left"
        pod.mkdir()
        container = subprocess.Popen(["sleep", "600"])
        (pod / "cgroup.procs").write_text(str(container.pid))
        scratch = tmp_path / "gpu-dra-node-killed"
        (scratch / "kubelet").mkdir(parents=True)
        made = tmp_path / "made" / "mount-point"
        made.mkdir(parents=True)
        state = tmp_path / "state.json"
        state.write_text(json.dumps({"holder": 0, "mount_ns": mount_ns, "cgroup_root": root,
                                     "scratch": str(scratch),
                                     "made_dirs": [str(made.parent), str(made)]}))

        clean_leftovers(state)

        for proc in (shim, container):
            proc.wait(timeout=5)  # killed: wait() reaps it
        assert not pids_in_mount_ns(mount_ns)
        assert not kubelet_cgroups(root), f"cgroups left: {kubelet_cgroups(root)}"
        assert not scratch.exists() and not made.parent.exists()
        assert not state.exists()
    finally:
        for proc in locals().get("shim"), locals().get("container"):
            if isinstance(proc, subprocess.Popen) and _alive(proc):
                proc.kill()
                proc.wait()
        remove_cgroups(kubelet_cgroups(root))
