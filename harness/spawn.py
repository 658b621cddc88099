"""The parent's handle on a case worker: start ``python -m harness.worker`` and talk to it.

Runs in the measuring parent. Messages are ``harness.protocol`` dataclasses,
one JSON line each way. The parent never spins: ``poll`` blocks in ``select`` until a message
arrives or the timeout passes.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil

from harness.protocol import Exit, Message, WorkerSpec, decode, encode

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
        self.ru_maxrss: int | None = None

    def start(self, spec: WorkerSpec) -> None:
        """Hand the worker its case; until then it has loaded nothing (so it can join a cgroup first)."""
        self.send(replace(spec, sys_path=[p for p in sys.path if p and Path(p).is_dir()]))

    def send(self, message: Message) -> None:
        try:
            self._ctl.write(encode(message))
            self._ctl.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker is gone; its exit status tells why

    def poll(self, timeout: float) -> Message | None:
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
        return decode(line)

    def _reap(self, block: bool) -> bool:
        """Reap the worker with wait4, keeping its rusage: ru_maxrss is the kernel's peak RSS
        of the whole process lifetime, the figure /usr/bin/time -v reports."""
        if self.proc.returncode is not None:
            return True
        try:
            pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return self.proc.poll() is not None
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.ru_maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return True

    def is_alive(self) -> bool:
        return not self._reap(block=False)

    @property
    def exitcode(self) -> int | None:
        return self.proc.returncode

    def join(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while not self._reap(block=False):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return self.proc.returncode

    def finish(self, graceful: bool) -> None:
        """Let a finished worker exit; kill a hung or interrupted one with its whole process tree."""
        if graceful and self.is_alive():
            self.send(Exit())
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
