"""Running one of the repository's Go build scripts (scripts/lib/go-build.sh) from a test."""

from __future__ import annotations

import subprocess
from pathlib import Path

NO_GO = 3  # the build scripts' exit code: not cached and Go is not on PATH


def built_binary(script: Path) -> Path | None:
    """The binary `script` prints on its last line: cached (also on a machine without Go),
    else built now; None when it is not cached and Go is missing."""
    built = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                           check=False, timeout=1800)
    if built.returncode == NO_GO:
        return None
    if built.returncode != 0:
        raise RuntimeError(f"{script} failed: {built.stderr.strip()}")
    return Path(built.stdout.strip().splitlines()[-1])
