"""Start `gpu-dra` processes fast: a server process imports the driver once, then forks a
child per request that runs `driver.cli.main.main(argv)`.

Each child is a real, separate process (its own pid, sockets and files) that a test can
SIGKILL; only the interpreter start and the imports (about a second on the CI box) are
shared. The server dies with the test process and each child with the server, so a test
run killed midway leaves no plugin running. The server itself creates no threads or gRPC
objects before forking.

Protocol on stdin/stdout, one line each: `run {"log": FILE, "argv": [...]}` -> `pid <pid>`;
`wait <pid>` -> `exit <code>` (negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from driver.devcluster.controlplane import die_with_parent


def _serve() -> None:
    import driver.cli.main
    import driver.plugin.daemon
    import driver.resourceslice.dirpublisher  # the local-directory publisher
    import driver.resourceslice.publish  # the ResourceSlice publisher, with the Kubernetes client

    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "run":
            request = json.loads(rest)
            pid = os.fork()
            if pid == 0:
                die_with_parent()  # a test run killed midway leaves no plugin running
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = 1
                try:
                    code = driver.cli.main.main(request["argv"])
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif command == "wait":
            _, status = os.waitpid(int(rest), 0)
            print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.forkserver"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).parents[2],
                                     preexec_fn=die_with_parent)

    def _ask(self, line: str, answer: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        assert reply and reply[0] == answer, f"fork server answered {reply!r} to {line!r}"
        return int(reply[1])

    def run(self, argv: list[str], log: Path) -> int:
        """Start `gpu-dra <argv>` with stdout and stderr appended to `log`; its pid."""
        return self._ask(f"run {json.dumps({'log': str(log), 'argv': argv})}", "pid")

    @staticmethod
    def running(pid: int) -> bool:
        """Whether the child has not ended (an ended one stays a zombie until `wait`)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def wait(self, pid: int, timeout: float | None = None) -> int:
        """Its exit code once it has ended (negative: the signal that killed it);
        TimeoutError if it still runs `timeout` seconds on (then it is killed)."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.running(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    self._ask(f"wait {pid}", "exit")
                    raise TimeoutError(f"process {pid} still ran {timeout:g} s on")
                time.sleep(0.01)
        return self._ask(f"wait {pid}", "exit")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


if __name__ == "__main__":
    _serve()
