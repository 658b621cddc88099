"""Start a case worker (``python -m harness.worker``) and talk to it over pipes.

The parent never spins: ``poll`` blocks in ``select`` until a message
arrives or the timeout passes.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

EXIT_GRACE_S = 10.0


class WorkerProcess:
    def __init__(self, log_path: Path) -> None:
        msg_r, msg_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.worker", "--msg-fd", str(msg_w), "--ctl-fd", str(ctl_r)],
                pass_fds=(msg_w, ctl_r), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=os.getcwd(),
            )
        os.close(msg_w)
        os.close(ctl_r)
        self._msg_fd = msg_r
        self._ctl = os.fdopen(ctl_w, "w", buffering=1)
        self._buffer = b""
        self._eof = False
        self.pid = self.proc.pid

    def start(self, spec: dict[str, Any]) -> None:
        """Hand the worker its case; until then it has loaded nothing (so it can join a cgroup first)."""
        self.send({**spec, "sys_path": [p for p in sys.path if p and Path(p).is_dir()]})

    def send(self, message: Any) -> None:
        try:
            self._ctl.write(json.dumps(message) + "\n")
            self._ctl.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker is gone; its exit status tells why

    def poll(self, timeout: float) -> Any | None:
        """The next message, or None if none came within ``timeout``; raises EOFError when the pipe closes."""
        while b"\n" not in self._buffer:
            if self._eof:
                raise EOFError
            ready, _, _ = select.select([self._msg_fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._msg_fd, 1 << 16)
            if not chunk:
                self._eof = True
                if not self._buffer:
                    raise EOFError
                continue
            self._buffer += chunk
            timeout = 5.0  # the rest of a half-read line follows at once
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.proc.returncode

    def join(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def finish(self, graceful: bool) -> None:
        """Let a finished worker exit; kill a hung or interrupted one with its whole process tree."""
        if graceful and self.is_alive():
            self.send("exit")
            self.join(EXIT_GRACE_S)
        if self.is_alive():
            kill_tree(self.pid)
            self.join(EXIT_GRACE_S)
        for closer in (self._ctl.close, lambda: os.close(self._msg_fd)):
            try:
                closer()
            except OSError:
                pass


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, so no orphan keeps memory or CPU."""
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=EXIT_GRACE_S)
