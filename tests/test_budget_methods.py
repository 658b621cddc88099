"""How a budget is made where cgroup v2 is not the answer: v1, a systemd --user scope, or none with a reason."""

from __future__ import annotations

import subprocess

import pytest

from harness.measure.budget import CgroupBudget, NoBudget, SystemdScopeBudget, open_budget, systemd_user_scope
from tests.fake_cgroupfs import CgroupV1Kernel, CgroupV2Kernel

LIMIT = 200 << 20
NO_SYSTEMD = lambda: "systemd-run --user: Failed to connect to bus"  # noqa: E731


def test_v1_limits_memory_and_memory_plus_swap(tmp_path):
    kernel = CgroupV1Kernel(tmp_path)
    b = open_budget(LIMIT, tmp_path, proc_cgroup=kernel.proc_cgroup, pid=1, files=kernel, systemd=NO_SYSTEMD)
    assert isinstance(b, CgroupBudget) and b.method == "cgroup-v1" and b.note is None
    assert b.path.parent == kernel.own
    assert (b.path / "memory.limit_in_bytes").read_text() == f"{LIMIT}\n"
    assert (b.path / "memory.memsw.limit_in_bytes").read_text() == f"{LIMIT}\n"
    (b.path / "memory.max_usage_in_bytes").write_text(f"{LIMIT - 4096}\n")
    (b.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert b.peak_bytes() == LIMIT - 4096 and b.oom_killed()
    b.close()
    assert not b.path.exists()


def test_v1_without_swap_accounting_limits_memory_only(tmp_path):
    kernel = CgroupV1Kernel(tmp_path, swap_accounting=False)
    b = open_budget(LIMIT, tmp_path, proc_cgroup=kernel.proc_cgroup, pid=1, files=kernel, systemd=NO_SYSTEMD)
    assert b.method == "cgroup-v1" and not (b.path / "memory.memsw.limit_in_bytes").exists()


def test_hybrid_layout_falls_from_v1_to_the_unified_hierarchy(tmp_path):
    """As on this VM: v1 controllers beside a v2 tree at /sys/fs/cgroup/unified, here with memory on v2."""
    kernel = CgroupV2Kernel(tmp_path / "unified")
    kernel.place("/app", 7)
    b = open_budget(LIMIT, tmp_path, proc_cgroup="4:memory:/app\n" + kernel.proc_cgroup(7), pid=7, files=kernel,
                    systemd=NO_SYSTEMD)  # no v1 memory mount under tmp_path: v1 is skipped
    assert b.method == "cgroup-v2" and b.path.parent == tmp_path / "unified" / "app"


def test_nothing_mounted_falls_to_none_with_every_reason(tmp_path):
    b = open_budget(LIMIT, tmp_path, proc_cgroup="0::/\n", pid=1, systemd=NO_SYSTEMD)
    assert isinstance(b, NoBudget) and b.method == "none" and not b.enforced
    assert b.note == "no cgroup memory controller is mounted; systemd-run --user: Failed to connect to bus"
    b.add(1)
    assert not b.oom_killed() and b.peak_bytes() is None
    b.close()


class FakeSystemd:
    """Records the commands a scope budget runs and answers like a user systemd would."""

    def __init__(self, rc: int = 0, result: str = "success") -> None:
        self.calls: list[list[str]] = []
        self.rc, self.result = rc, result

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        out = self.result if "--property=Result" in argv else ""
        err = "" if self.rc == 0 else "Call failed: Access denied"
        return subprocess.CompletedProcess(argv, self.rc, out + "\n", err)


def scope_budget(tmp_path, run, in_scope=True):
    b = SystemdScopeBudget(LIMIT, tmp_path, note="cgroup-v2: not ours", run=run,
                           proc_cgroup=lambda pid: None)
    scope = tmp_path / "user.slice" / "user@1000.service" / b.unit
    scope.mkdir(parents=True)
    (scope / "memory.max").write_text(f"{LIMIT}\n")
    if in_scope:
        b.proc_cgroup = lambda pid: f"0::/user.slice/user@1000.service/{b.unit}\n"
    return b, scope


def test_systemd_run_command_puts_the_worker_in_a_scope_without_swap(tmp_path):
    b = SystemdScopeBudget(LIMIT, tmp_path)
    argv = b.command(["python", "-m", "harness.worker"])
    assert argv == ["systemd-run", "--user", "--scope", "--quiet", f"--unit={b.unit}",
                    "-p", f"MemoryMax={LIMIT}", "-p", "MemorySwapMax=0", "--", "python", "-m", "harness.worker"]


def test_a_started_worker_is_adopted_by_the_scope(tmp_path):
    run = FakeSystemd()
    b, scope = scope_budget(tmp_path, run)
    b.add(4243)
    assert run.calls[0] == ["busctl", "--user", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                            "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))", b.unit,
                            "fail", "3", "PIDs", "au", "1", "4243", "MemoryMax", "t", str(LIMIT),
                            "MemorySwapMax", "t", "0", "0"]
    assert b.method == "systemd-scope" and b.enforced and b.path == scope


def test_a_worker_launched_through_systemd_run_is_not_adopted_again(tmp_path):
    run = FakeSystemd()
    b, scope = scope_budget(tmp_path, run)
    b.command(["worker"])
    b.add(4243)
    assert run.calls == [] and b.path == scope and b.enforced


def test_a_refused_scope_reports_none_and_why(tmp_path):
    b, _ = scope_budget(tmp_path, FakeSystemd(rc=1))
    b.add(4243)
    assert b.method == "none" and not b.enforced
    assert b.note == f"systemd-scope: could not start {b.unit}: Call failed: Access denied; cgroup-v2: not ours"


def test_a_scope_without_the_limit_reports_none(tmp_path):
    b, scope = scope_budget(tmp_path, FakeSystemd())
    (scope / "memory.max").write_text("max\n")  # the user manager has no memory controller
    b.add(4243)
    assert b.method == "none" and "memory.max max" in b.note


def test_oom_is_read_from_the_unit_once_its_cgroup_is_gone_and_close_cleans_up(tmp_path):
    run = FakeSystemd(result="oom-kill")
    b, scope = scope_budget(tmp_path, run)
    b.add(4243)
    (scope / "memory.max").unlink()
    scope.rmdir()
    assert b.oom_killed()
    b.close()
    assert run.calls[-2:] == [["systemctl", "--user", "--quiet", "stop", b.unit],
                              ["systemctl", "--user", "--quiet", "reset-failed", b.unit]]


def test_a_real_user_scope_enforces_its_limit():
    why_not = systemd_user_scope()
    if why_not is not None:
        pytest.skip(f"no usable user systemd here ({why_not})")
    b = SystemdScopeBudget(64 << 20)
    done = subprocess.run(b.command(["sh", "-c", "cat /proc/self/cgroup"]), capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and b.unit in done.stdout
    b.close()
