"""The modes of the directories and sockets the plugin creates, set explicitly so that no
umask decides them (under umask 000 they would be open to every user on the node).

What only the root kubelet and the plugin use (the plugin data dir with the checkpoint, the
lock and the DRA socket; the registration dir and socket) is private; the CDI dir is read by
the container runtime and other CDI tools, so it is world-readable. Files written through
`atomicfile` are 0600 whatever the umask (created as mkstemp does).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
SHARED_DIR = 0o755
SOCKET = 0o600  # connecting needs write permission: only root's kubelet and the probe dial


def make_dir(path: Path, mode: int) -> None:
    """Create `path` and its missing parents with `mode` exactly (whoever must reach `path`
    must traverse them); a directory that exists is not ours and keeps its mode."""
    if path.is_dir():
        return
    make_dir(path.parent, mode)
    try:
        os.mkdir(path, mode)  # never more open than `mode`, even for an instant
    except FileExistsError:
        if path.is_dir():
            return  # another process made it: its mode is its own
        raise
    os.chmod(path, mode)  # the umask may have taken bits away
