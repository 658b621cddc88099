"""cgroup v2 budgets against a simulated cgroupfs that enforces the no-internal-process rule."""

from __future__ import annotations

import errno

import pytest

from harness.measure import budget as budget_module
from harness.measure.budget import PARENT_LEAF, CgroupBudget, NoBudget, open_budget, release_delegations
from tests.fake_cgroupfs import CgroupV2Kernel

ME, WORKER, SHELL = 4242, 4243, 17
LIMIT = 200 << 20
NO_SYSTEMD = lambda: "systemd-run --user: Failed to connect to bus"  # noqa: E731


@pytest.fixture(autouse=True)
def _own_delegations(monkeypatch):
    monkeypatch.setattr(budget_module, "_DELEGATED", [])  # never undo a test's tree at interpreter exit


@pytest.fixture
def kernel(tmp_path):
    k = CgroupV2Kernel(tmp_path / "cgroup")
    k.place("/system.slice/fitbench.service", ME)
    return k


def budget_in(kernel: CgroupV2Kernel, pid: int = ME, limit: int = LIMIT, systemd=NO_SYSTEMD):
    return open_budget(limit, kernel.root, proc_cgroup=kernel.proc_cgroup(pid), pid=pid, files=kernel,
                       systemd=systemd)


def test_the_naive_order_is_refused_while_fitbench_sits_in_its_cgroup(kernel):
    own = kernel.cgroup_of(ME)
    with pytest.raises(OSError) as refused:
        kernel.write(own / "cgroup.subtree_control", "+memory")
    assert refused.value.errno == errno.EBUSY
    assert kernel.words(own / "cgroup.subtree_control") == []


def test_delegation_moves_fitbench_to_a_leaf_and_limits_a_sibling_case(kernel):
    own = kernel.cgroup_of(ME)
    b = budget_in(kernel)
    assert isinstance(b, CgroupBudget) and b.method == "cgroup-v2" and b.enforced and b.note is None
    assert kernel.cgroup_of(ME) == own / PARENT_LEAF
    assert kernel.words(own / "cgroup.subtree_control") == ["memory"]
    assert b.path.parent == own and b.path.name.startswith("fitbench-case-")
    assert (b.path / "memory.max").read_text() == f"{LIMIT}\n"
    assert (b.path / "memory.swap.max").read_text() == "0\n"
    # the order that works: leaf first, fitbench into it, then the controller, then the case
    ops = [op.split()[0] + " " + op.split()[1].rsplit("/", 1)[-1] for op in kernel.log]
    assert ops[:4] == [f"mkdir {PARENT_LEAF}", "write cgroup.procs", "write cgroup.subtree_control",
                       f"mkdir {b.path.name}"]


def test_the_worker_joins_the_case_and_oom_and_peak_are_read_from_it(kernel):
    b = budget_in(kernel)
    kernel.place(kernel.cgroup_of(ME).relative_to(kernel.root).as_posix(), WORKER)  # born next to its parent
    b.add(WORKER)
    assert kernel.cgroup_of(WORKER) == b.path
    assert not b.oom_killed() and b.peak_bytes() == 0
    (b.path / "memory.peak").write_text(f"{150 << 20}\n")
    (b.path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert b.oom_killed() and b.peak_bytes() == 150 << 20


def test_close_removes_the_case_cgroup(kernel):
    b = budget_in(kernel)
    kernel.place(kernel.cgroup_of(ME).relative_to(kernel.root).as_posix(), WORKER)
    b.add(WORKER)
    kernel.exit(WORKER)
    b.close()
    assert not b.path.exists()


def test_close_kills_a_leftover_process_to_remove_the_case(kernel):
    b = budget_in(kernel)
    kernel.place(kernel.cgroup_of(ME).relative_to(kernel.root).as_posix(), WORKER)
    b.add(WORKER)
    b.close()  # the worker's child lingers: cgroup.kill, then rmdir
    assert not b.path.exists()
    assert any(op.endswith("cgroup.kill 1") for op in kernel.log)


def test_a_second_budget_reuses_the_delegation_and_is_a_sibling(kernel):
    own = kernel.cgroup_of(ME)
    first = budget_in(kernel)
    second = budget_in(kernel)  # /proc/self/cgroup now names the leaf
    assert second.method == "cgroup-v2" and second.path.parent == own and second.path != first.path
    assert kernel.cgroup_of(ME) == own / PARENT_LEAF
    assert sum(op.startswith(f"mkdir /system.slice/fitbench.service/{PARENT_LEAF}") for op in kernel.log) == 1


def test_release_puts_the_cgroup_back_once_no_case_is_left(kernel):
    own = kernel.cgroup_of(ME)
    b = budget_in(kernel)
    release_delegations()  # a case still exists: nothing is undone
    assert kernel.words(own / "cgroup.subtree_control") == ["memory"]
    budget_module._DELEGATED.append((own, own / PARENT_LEAF, ME, kernel))
    b.close()
    release_delegations()
    assert kernel.words(own / "cgroup.subtree_control") == []
    assert kernel.cgroup_of(ME) == own and not (own / PARENT_LEAF).exists()


def test_another_process_in_the_cgroup_blocks_delegation_and_is_left_alone(kernel):
    own = kernel.place("/system.slice/fitbench.service", SHELL)
    b = budget_in(kernel)
    assert isinstance(b, NoBudget) and b.method == "none" and not b.enforced
    assert "1 other process(es) share" in b.note and "Failed to connect to bus" in b.note
    assert kernel.cgroup_of(SHELL) == own and kernel.cgroup_of(ME) == own  # fitbench moved back
    assert not (own / PARENT_LEAF).exists() and kernel.words(own / "cgroup.subtree_control") == []


def test_in_the_root_cgroup_the_controller_is_enabled_in_place(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cgroup")
    kernel.place("/", ME)
    b = budget_in(kernel)
    assert b.method == "cgroup-v2" and b.path.parent == kernel.root
    assert kernel.cgroup_of(ME) == kernel.root and not (kernel.root / PARENT_LEAF).exists()


def test_a_namespace_root_is_not_exempt_so_fitbench_moves_to_a_leaf(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cgroup", true_root=False)  # a container's cgroup namespace
    kernel.place("/", ME)
    b = budget_in(kernel)
    assert b.method == "cgroup-v2" and kernel.cgroup_of(ME) == kernel.root / PARENT_LEAF


def test_no_memory_controller_says_so(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cgroup", controllers="cpu pids")
    kernel.place("/app", ME)
    b = budget_in(kernel)
    assert b.method == "none" and "memory controller is not available" in b.note
    assert kernel.log == []  # nothing was touched


def test_a_cgroup_that_is_not_ours_to_write_says_so(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cgroup")
    kernel.place("/user.slice/session-3.scope", ME)
    kernel.writable = False  # not root, not delegated
    b = budget_in(kernel)
    assert b.method == "none" and "needs root or a delegated cgroup" in b.note
    assert kernel.cgroup_of(ME).name == "session-3.scope"


def test_without_swap_accounting_the_budget_holds_and_the_note_says_swap_is_free(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cgroup", swap=False)
    kernel.place("/app", ME)
    b = budget_in(kernel)
    assert b.method == "cgroup-v2" and (b.path / "memory.max").read_text() == f"{LIMIT}\n"
    assert "swap not limited" in b.note


def test_the_systemd_scope_is_the_fallback_and_keeps_the_reason(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cgroup")
    kernel.place("/user.slice/session-3.scope", ME)
    kernel.writable = False
    b = budget_in(kernel, systemd=lambda: None)
    assert b.method == "systemd-scope" and b.enforced and "needs root or a delegated cgroup" in b.note
    assert b.unit.startswith("fitbench-case-") and b.unit.endswith(".scope")
