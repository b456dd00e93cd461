"""A stand-in driver root whose nvidia-smi loads libnvidia-ml.so.1 as the real one must: a
C program linked against a stub NVML library (SONAME libnvidia-ml.so.1, no rpath), so the
dynamic loader itself looks the library up, and the program fails to start (exit 127,
"error while loading shared libraries") unless the environment it is run with leads the
loader to the root's library. It records each call, through the stub, in
`nvidia-smi.log` next to itself (its arguments, tab-separated, one call a line) and its
environment in `nvidia-smi.env` (the last call's, one variable a line); it answers
`compute-policy -i UUID --set-timeslice N` with exit 0 and anything else with exit 2.

Built with the machine's gcc once per test session (`build`), laid out per test (`lay_out`).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

VERSION = "580.159.04"
LIB_DIR = "usr/lib/x86_64-linux-gnu"  # where distributions put the driver's libraries
BIN_DIR = "usr/bin"

STUB = r"""
#include <stdio.h>
#include <string.h>
/* What the stand-in calls in "NVML": proof the loader found this library. */
int standin_record(int argc, char **argv, char **env) {
    char path[4096];
    const char *slash = strrchr(argv[0], '/');
    int dir = slash ? (int)(slash - argv[0]) : 1;
    snprintf(path, sizeof path, "%.*s/nvidia-smi.log", dir, slash ? argv[0] : ".");
    FILE *log = fopen(path, "a");
    if (!log) return 1;
    for (int i = 1; i < argc; i++) fprintf(log, i > 1 ? "\t%s" : "%s", argv[i]);
    fputc('\n', log);
    fclose(log);
    snprintf(path, sizeof path, "%.*s/nvidia-smi.env", dir, slash ? argv[0] : ".");
    FILE *out = fopen(path, "w");
    if (!out) return 1;
    for (char **e = env; *e; e++) fprintf(out, "%s\n", *e);
    fclose(out);
    return 0;
}
"""

MAIN = r"""
#include <string.h>
int standin_record(int argc, char **argv, char **env);
int main(int argc, char **argv, char **env) {
    if (standin_record(argc, argv, env)) return 3;
    if (argc == 6 && !strcmp(argv[1], "compute-policy") && !strcmp(argv[2], "-i") &&
        !strcmp(argv[4], "--set-timeslice") && strlen(argv[5]) == 1 &&
        argv[5][0] >= '0' && argv[5][0] <= '3') return 0;
    return 2;
}
"""


@dataclass(frozen=True)
class Built:
    library: Path  # libnvidia-ml.so.<VERSION>
    program: Path  # nvidia-smi


def build(folder: Path) -> Built:
    """Compile the stub library and the program into `folder`."""
    (folder / "stub.c").write_text(STUB)
    (folder / "main.c").write_text(MAIN)
    library = folder / f"libnvidia-ml.so.{VERSION}"
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1", "-o",
                    str(library), str(folder / "stub.c")], check=True)
    (folder / "libnvidia-ml.so.1").symlink_to(library.name)
    program = folder / "nvidia-smi"
    subprocess.run(["gcc", "-o", str(program), str(folder / "main.c"), f"-L{folder}",
                    "-l:libnvidia-ml.so.1"], check=True)
    return Built(library, program)


def lay_out(built: Built, root: Path) -> Path:
    """A driver root with the library in LIB_DIR (its SONAME link beside it) and nvidia-smi
    in BIN_DIR; the root."""
    (root / LIB_DIR).mkdir(parents=True)
    (root / BIN_DIR).mkdir(parents=True)
    shutil.copy2(built.library, root / LIB_DIR / built.library.name)
    (root / LIB_DIR / "libnvidia-ml.so.1").symlink_to(built.library.name)
    shutil.copy2(built.program, root / BIN_DIR / "nvidia-smi")
    return root


def calls(root: Path) -> list[list[str]]:
    """The stand-in's calls so far, each its arguments."""
    log = root / BIN_DIR / "nvidia-smi.log"
    return [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []


def environment(root: Path) -> dict[str, str]:
    """The environment of the stand-in's last call."""
    lines = (root / BIN_DIR / "nvidia-smi.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)
