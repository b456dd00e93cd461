"""Stand-ins of `nvidia-cuda-mps-control` and `nvidia-cuda-mps-server` for the mock driver
root, so the plugin's MPS path runs, and CI checks what each claim's daemon was told,
with no GPU.

Interface (what the plugin may rely on; the real tools' behavior where NVIDIA's MPS
documentation says, marked "stand-in" where it does not):

- Binaries: `<root>/usr/local/nvidia/bin/nvidia-cuda-mps-control` and
  `.../nvidia-cuda-mps-server` of the mock driver root (`driver.plugin.mockroot`), where
  driver-file discovery finds them: `#!/bin/sh` scripts that exec
  `python3 -m driver.nvml.mpsstandin control|server` with the interpreter that laid the
  root out (so they run on the host and in the driver's image, not in a workload's
  container, nor chrooted into the root).
- Environment: `CUDA_MPS_PIPE_DIRECTORY` (default /tmp/nvidia-mps),
  `CUDA_MPS_LOG_DIRECTORY` (default /var/log/nvidia-mps), `CUDA_VISIBLE_DEVICES` (read by
  the daemon at start: it orders the devices that `DEV` indexes).
- `nvidia-cuda-mps-control -d`: starts the control daemon in the background (double fork
  and setsid: it outlives the command, its caller and their process group) and exits 0
  once the daemon's socket accepts and its pid file is written; 1, with a message, when a
  daemon already answers on that pipe directory. `-f`: the daemon in the foreground.
- The daemon listens on the unix socket `$CUDA_MPS_PIPE_DIRECTORY/control` (stand-in: the
  real one uses named pipes and sockets there), writes its pid to
  `$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid`, and appends to
  `$CUDA_MPS_LOG_DIRECTORY/control.log` its start, every command (`Cmd:<command>`), its
  reply and its exit, each line `[YYYY-MM-DD HH:MM:SS.mmm Control <pid>] <text>` as the
  real log. `quit` and SIGTERM remove the socket and the pid file, then it exits (the
  reply to `quit` comes after the removal). It idles in a blocking accept; a client gone
  before its reply (killed at its timeout) does not stop it.
- `nvidia-cuda-mps-control` (no option): reads commands from stdin, one a line, sends
  each to the daemon and prints its reply (nothing for a reply that is empty); exit 0
  when every command was accepted, 1 when one was refused (its error printed), and 1 with
  "Cannot find MPS control daemon process" on stderr when no daemon answers.
- Commands: `set_default_active_thread_percentage N` (0 < N <= 100; replies N as
  `25.0`), `get_default_active_thread_percentage` (`100.0` until set),
  `set_default_device_pinned_mem_limit DEV VALUE` (VALUE: digits then M or G, `2G`;
  replies nothing), `get_default_device_pinned_mem_limit DEV` (the VALUE set, nothing
  when unset; stand-in), `get_server_list` (nothing: the stand-in starts no server),
  `quit`. DEV is an index into the daemon's CUDA_VISIBLE_DEVICES when that is set.
- `nvidia-cuda-mps-server`: started only by a control daemon; the stand-in exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TextIO

from driver.atomicfile import folder_locked

PIPE_DEFAULT, LOG_DEFAULT = "/tmp/nvidia-mps", "/var/log/nvidia-mps"
SOCKET, PID_FILE, LOG_FILE = "control", "nvidia-cuda-mps-control.pid", "control.log"
NO_DAEMON = "Cannot find MPS control daemon process"
ALREADY_RUNNING = "An instance of this daemon is already running"
_MEM_LIMIT = re.compile(r"[0-9]+[MG]")


def pipe_dir() -> Path:
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or PIPE_DEFAULT)


def log_dir() -> Path:
    return Path(os.environ.get("CUDA_MPS_LOG_DIRECTORY") or LOG_DEFAULT)


class Refused(Exception):
    """A command the daemon does not accept; its message is the reply."""


@dataclass
class Daemon:
    """What the control daemon was told: the state its `get_*` commands answer."""

    visible: tuple[str, ...]  # CUDA_VISIBLE_DEVICES at start; empty: not set
    thread_percentage: float = 100.0
    pinned: dict[int, str] = field(default_factory=dict)

    def run(self, line: str) -> str:
        """The reply to one command line; Refused when it is not accepted."""
        name, *args = line.split()
        if name == "get_server_list" and not args:
            return ""
        if name == "get_default_active_thread_percentage" and not args:
            return f"{self.thread_percentage:.1f}"
        if name == "set_default_active_thread_percentage" and len(args) == 1:
            try:
                value = float(args[0])
            except ValueError:
                value = -1.0
            if not 0 < value <= 100:
                raise Refused(f"Invalid active thread percentage {args[0]!r}: 0 < N <= 100")
            self.thread_percentage = value
            return f"{value:.1f}"
        if name == "set_default_device_pinned_mem_limit" and len(args) == 2:
            if not _MEM_LIMIT.fullmatch(args[1]):
                raise Refused(f"Invalid memory limit {args[1]!r}: digits then M or G")
            self.pinned[self._device(args[0])] = args[1]
            return ""
        if name == "get_default_device_pinned_mem_limit" and len(args) == 1:
            return self.pinned.get(self._device(args[0]), "")
        raise Refused(f"Invalid command: {line}")

    def _device(self, text: str) -> int:
        if not text.isdigit() or (self.visible and int(text) >= len(self.visible)):
            raise Refused(f"Invalid device {text!r}"
                          + (f": {len(self.visible)} visible" if self.visible else ""))
        return int(text)


class _Log:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file = (folder / LOG_FILE).open("a", encoding="utf-8")

    def __call__(self, text: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        for line in text.splitlines() or [""]:
            self._file.write(f"[{stamp}.{int(now % 1 * 1000):03d} Control {os.getpid()}] "
                             f"{line}\n")
        self._file.flush()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _listen(pipes: Path, log: _Log) -> socket.socket:
    """The daemon's listening socket; SystemExit(1) when a daemon already answers there.
    A socket file nobody answers on (a daemon killed with SIGKILL) is replaced."""
    path = pipes / SOCKET
    if _answers(path):
        log(ALREADY_RUNNING)
        print(ALREADY_RUNNING, file=sys.stderr)
        raise SystemExit(1)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    return server


def start(foreground: bool) -> int:
    """`nvidia-cuda-mps-control -d` (0 once the daemon answers) or `-f` (never returns)."""
    pipes = pipe_dir()
    pipes.mkdir(parents=True, exist_ok=True)
    log = _Log(log_dir())
    with folder_locked(pipes):
        server = _listen(pipes, log)
        if foreground:
            _write_pid(pipes)
        else:
            ready_r, ready_w = os.pipe()
            if os.fork() > 0:  # the caller: back once the daemon has written its pid file
                os.close(ready_w)
                server.close()
                with os.fdopen(ready_r, "rb") as ready:
                    return 0 if ready.read() == b"ok" else 1
    if not foreground:
        os.close(ready_r)
        os.setsid()  # its own session and process group: a kill of the caller's spares it
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the caller's pipes would stay open, and their reader waiting
            os.dup2(null, fd)
        os.close(null)
        _write_pid(pipes)
        os.write(ready_w, b"ok")
        os.close(ready_w)
    _serve(server, pipes, log)


def _write_pid(pipes: Path) -> None:
    tmp = pipes / f".{PID_FILE}.{os.getpid()}"
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pipes / PID_FILE)


def _serve(server: socket.socket, pipes: Path, log: _Log) -> NoReturn:
    """Answer clients, one at a time, until `quit` or SIGTERM."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    daemon = Daemon(tuple(v for v in visible.split(",") if v))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: _exit(server, pipes, log, "Exit (SIGTERM)"))
    log(f"Starting control daemon using socket {pipes / SOCKET}")
    log(f"CUDA_VISIBLE_DEVICES={visible or '(unset)'}")
    while True:
        conn, _ = server.accept()  # blocking: no CPU while idle
        try:
            with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
                log("NEW UI")
                for line in stream:
                    if _answer(daemon, line.strip(), stream, server, pipes, log):
                        break
        except (BrokenPipeError, ConnectionResetError):
            pass  # a client gone before its reply (one killed at its timeout)
        log("UI closed")


def _answer(daemon: Daemon, line: str, stream: TextIO, server: socket.socket, pipes: Path,
            log: _Log) -> bool:
    """Run one command and send its reply; True when the client is done with (quit)."""
    if not line:
        return False
    log(f"Cmd:{line}")
    if line == "quit":
        _remove(server, pipes)
        log("Exit")
        _reply(stream, True, "")
        os._exit(0)
    try:
        ok, out = True, daemon.run(line)
    except Refused as err:
        ok, out = False, str(err)
    if out:
        log(out)
    return not _reply(stream, ok, out)


def _reply(stream: TextIO, ok: bool, out: str) -> bool:
    """Send one reply; False when the client has gone."""
    try:
        stream.write(json.dumps({"ok": ok, "out": out}) + "\n")
        stream.flush()
    except OSError:
        return False
    return True


def _remove(server: socket.socket, pipes: Path) -> None:
    server.close()
    for name in (SOCKET, PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (pipes / name).unlink()


def _exit(server: socket.socket, pipes: Path, log: _Log, why: str) -> NoReturn:
    _remove(server, pipes)
    log(why)
    os._exit(0)


def client(commands: TextIO) -> int:
    """`nvidia-cuda-mps-control`: each command of `commands` to the daemon, its reply out."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(pipe_dir() / SOCKET))
    except OSError:
        print(NO_DAEMON, file=sys.stderr)
        return 1
    status = 0
    with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
        for line in commands:
            if not line.strip():
                continue
            stream.write(line.strip() + "\n")
            stream.flush()
            answer = stream.readline()
            if not answer:  # the daemon went away
                print(NO_DAEMON, file=sys.stderr)
                return 1
            reply = json.loads(answer)
            if reply["out"]:
                print(reply["out"], flush=True)
            status = status or (0 if reply["ok"] else 1)
    return status


def main(argv: list[str]) -> int:
    """`control [-d|-f]` or `server`, as the mock driver root's scripts call it."""
    match argv:
        case ["control"]:
            return client(sys.stdin)
        case ["control", "-d" | "-f" as option]:
            return start(foreground=option == "-f")
        case ["server", *_]:
            print("nvidia-cuda-mps-server: the gpu-dra mock driver root's stand-in; servers "
                  "are started by nvidia-cuda-mps-control, and the stand-in starts none",
                  file=sys.stderr)
            return 1
    print(f"usage: nvidia-cuda-mps-control [-d | -f] (got {' '.join(argv[1:])!r})",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
