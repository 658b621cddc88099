"""Submits a fleet run's cases to the cluster, gathers rows as each case finishes, handles loss.

Guarantees (the dataset's ``done`` set enforces the last one):
- a task whose node or process dies is retried by Ray (``max_retries``) on
  another node of the same class; when no retry is left, or no node of the
  class stays alive for ``lost_grace_s``, a case that had started becomes one
  ``lost`` row, and cases that never started are left for ``--resume``;
- each (machine class, case) is written at most once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness import rows
from harness.artifact import ArtifactInfo
from harness.fleet import progress as progress_mod
from harness.fleet.dataset import FleetDataset
from harness.fleet.nodes import agent_nodes
from harness.fleet.placement import Placement, Refusal
from harness.fleet.remote import task_body
from harness.measure.machine import Machine
from harness.suite import ArtifactHashes

TICK_S = 1.0  # how long one wait for finished cases blocks
CHECK_NODES_S = 5.0  # how often the driver looks for classes that lost all their nodes
DRAIN_S = 60.0  # after Ctrl-C, how long interrupted cases get to send their rows
INTERRUPTED = "the run was interrupted"


@dataclass
class CaseOutcome:
    placement: Placement
    status: str
    error: str | None
    node_id: str | None
    hostname: str | None
    rows: list[dict[str, Any]]
    wall_s: float | None = None
    written: bool = True


@dataclass
class FleetSummary:
    outcomes: list[CaseOutcome] = field(default_factory=list)
    not_run: list[tuple[Placement, str]] = field(default_factory=list)
    interrupted: bool = False


class FleetInterrupted(Exception):
    """Ctrl-C / SIGTERM during a fleet run; what finished is written."""


def write_refusals(dataset: FleetDataset, refusals: list[Refusal], artifacts: dict[Path, ArtifactInfo],
                   nodes_ram: dict[str, int], run_id: str, hashes: ArtifactHashes) -> int:
    """Rows for (case, class) pairs no node could run, as a local run writes them for this machine."""
    written = 0
    for r in refusals:
        if dataset.is_done(r.machine_class, r.case.key):
            continue
        row = failure_row(r.case, r.machine_class, artifacts[r.case.artifact], nodes_ram.get(r.machine_class),
                          run_id, r.status, r.error, hashes)
        written += dataset.add(r.machine_class, "unplaced", [row], {})
    return written


def failure_row(case: Any, machine_class: str, info: ArtifactInfo, ram_bytes: int | None, run_id: str, status: str,
                error: str, hashes: ArtifactHashes, node_id: str | None = None) -> dict[str, Any]:
    """A row the driver writes itself for a case no node reported on; machine facts beyond the class are unknown."""
    machine = Machine(machine_id=None, machine_class=machine_class, cpu_model=None, cpu_arch=None, cpu_flags=[],
                      cpu_cores=None, cpu_threads=None, ram_bytes=ram_bytes, os=None, python_version=None,
                      fitbench_version=None)
    return rows.failure_row(case, machine, run_id, status, error, artifact=info, sha256=hashes.get(info.path),
                            fleet_node_id=node_id)


class FleetDriver:
    def __init__(self, ray: Any, dataset: FleetDataset, run_id: str, artifacts: dict[Path, ArtifactInfo],
                 force: bool = False, max_retries: int = 2, lost_grace_s: float = 60.0,
                 on_case_end: Callable[[CaseOutcome], None] = lambda o: None,
                 on_tick: Callable[[dict[str, Any]], None] = lambda s: None) -> None:
        self.ray, self.dataset, self.run_id, self.artifacts = ray, dataset, run_id, artifacts
        self.force, self.max_retries, self.lost_grace_s = force, max_retries, lost_grace_s
        self.on_case_end, self.on_tick = on_case_end, on_tick
        self.hashes = ArtifactHashes()
        self.progress: Any = None
        self.summary = FleetSummary()
        self.pending: dict[Any, Placement] = {}
        self.cancelled: dict[Any, str] = {}  # ref -> why the driver cancelled it
        self.class_gone_since: dict[str, float] = {}
        self.ram: dict[str, int] = {}

    def run(self, placements: list[Placement], run_info: dict[str, Any]) -> FleetSummary:
        ray = self.ray
        self.progress = progress_mod.start(ray, self.run_id, run_info)
        task = ray.remote(task_body)
        for p in placements:
            ref = task.options(num_cpus=0, resources=p.resources, max_retries=self.max_retries,
                               retry_exceptions=False, name=f"fitbench {p.machine_class} {p.case.label}"
                               ).remote(p.case, p.machine_class, self.run_id, self.force, self.progress)
            self.pending[ref] = p
        next_check = 0.0
        try:
            while self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=TICK_S)
                for ref in ready:
                    self._finish(ref)
                if time.monotonic() >= next_check:
                    self._check_classes()
                    next_check = time.monotonic() + CHECK_NODES_S
                self.on_tick(self._snapshot())
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self._drain()
        return self.summary

    def _snapshot(self) -> dict[str, Any]:
        try:
            return self.ray.get(self.progress.snapshot.remote(), timeout=5)
        except Exception:
            return {}

    def _finish(self, ref: Any) -> None:
        ray = self.ray
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError

        p = self.pending.pop(ref)
        why_cancelled = self.cancelled.pop(ref, None)
        try:
            out = ray.get(ref)
        except TaskCancelledError:
            if why_cancelled == INTERRUPTED and self._was_started(p):
                self._lost(p, "stopped by the user (Ctrl-C / SIGTERM) while the case ran", status="interrupted")
            elif why_cancelled and why_cancelled != INTERRUPTED and self._was_started(p):
                self._lost(p, f"the node running this case died and {why_cancelled}")
            else:
                self.summary.not_run.append((p, why_cancelled or "cancelled"))
            return
        except RayTaskError as exc:  # fitbench's own task code failed: a bug, recorded as one crashed case
            self._lost(p, f"fitbench's case task failed: {_first_line(exc)}", status="crashed")
            return
        except RayError as exc:  # the node or the task's process died and Ray had no retry left
            self._lost(p, f"lost after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}: "
                          f"{type(exc).__name__}: {_first_line(exc)}")
            return
        node = out["node_id"][:12]
        written = self.dataset.add(p.machine_class, node, out["rows"], out["timeline"])
        self._record(CaseOutcome(p, out["status"], out["error"], out["node_id"], out["hostname"], out["rows"],
                                 out["wall_s"], written))

    def _was_started(self, p: Placement) -> bool:
        try:
            return bool(self.ray.get(self.progress.was_started.remote(p.machine_class, p.case.key), timeout=10))
        except Exception:
            return True  # unknown: a lost row (retried on resume) is safer than silence

    def _lost(self, p: Placement, error: str, status: str = "lost") -> None:
        row = failure_row(p.case, p.machine_class, self.artifacts[p.case.artifact], self.ram.get(p.machine_class),
                          self.run_id, status, error, self.hashes)
        written = self.dataset.add(p.machine_class, "lost", [row], {})
        self._record(CaseOutcome(p, status, error, None, None, [row], None, written))

    def _record(self, outcome: CaseOutcome) -> None:
        try:
            self.progress.case_finished.remote(outcome.node_id, outcome.placement.machine_class, outcome.status)
        except Exception:
            pass
        self.summary.outcomes.append(outcome)
        self.on_case_end(outcome)

    def _check_classes(self) -> None:
        """Cancel the cases of a class whose every node is gone for longer than the grace period."""
        nodes = agent_nodes(self.ray)
        live = {n.machine_class for n in nodes if n.alive}
        for n in nodes:
            self.ram[n.machine_class] = max(self.ram.get(n.machine_class, 0), n.ram_bytes)
        now = time.monotonic()
        waiting = {p.machine_class for ref, p in self.pending.items() if ref not in self.cancelled}
        for cls in waiting:
            if cls in live:
                self.class_gone_since.pop(cls, None)
                continue
            since = self.class_gone_since.setdefault(cls, now)
            if now - since < self.lost_grace_s:
                continue
            reason = f"no node of class {cls} was alive for {self.lost_grace_s:g} s to run it"
            for ref, p in self.pending.items():
                if p.machine_class == cls and ref not in self.cancelled:
                    self.cancelled[ref] = reason
                    self.ray.cancel(ref, force=True)

    def _drain(self) -> None:
        """Ctrl-C: ask every task to stop (a running case writes an ``interrupted`` row), then collect."""
        for ref in self.pending:
            self.cancelled.setdefault(ref, INTERRUPTED)
            try:
                self.ray.cancel(ref, force=False)
            except Exception:
                pass
        deadline = time.monotonic() + DRAIN_S
        while self.pending and time.monotonic() < deadline:
            ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=1.0)
            for ref in ready:
                self._finish(ref)
        for ref, p in list(self.pending.items()):
            self.summary.not_run.append((p, INTERRUPTED))
            self.ray.cancel(ref, force=True)
        self.pending.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
