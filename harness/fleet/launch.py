"""``fitbench fleet run`` from a checked scenario to a finished dataset: connect, place, resume, drive.

The command line (harness/cli/fleet.py) only parses options and prints; this
module ties the pieces together so the same run is scriptable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.artifact import ArtifactInfo
from harness.estimate import EstimateError, estimate_case
from harness.fleet import FleetError
from harness.fleet.dataset import MANIFEST, FleetDataset, latest_dataset
from harness.fleet.driver import CaseOutcome, FleetDriver, FleetSummary, write_refusals
from harness.fleet.nodes import agent_nodes, connect
from harness.fleet.placement import Placement, Refusal, choose_classes, place
from harness.fleet.resources import AgentNode
from harness.resume import RunLock
from harness.scenario import Case, Scenario
from harness.suite import new_run_id


@dataclass
class FleetPlan:
    ray: Any
    nodes: list[AgentNode]
    classes: list[str]
    placements: list[Placement]
    refusals: list[Refusal]


def estimate_bytes(artifacts: dict[Path, ArtifactInfo]) -> Callable[[Case], int | None]:
    """The case's estimated peak memory, or None when the estimator does not know the artifact."""

    def guess(case: Case) -> int | None:
        try:
            return estimate_case(case, artifacts[case.artifact]).total_bytes
        except (EstimateError, KeyError, ZeroDivisionError):
            return None

    return guess


def plan(address: str, cases: list[Case], artifacts: dict[Path, ArtifactInfo], machines: list[str] | None,
         force: bool) -> FleetPlan:
    ray = connect(address)
    nodes = agent_nodes(ray)
    if not any(n.alive for n in nodes):
        raise FleetError(f"the Ray cluster at {address} has no live fitbench agent; on each machine run "
                         "`fitbench fleet agent --address HEAD:6379` (or `--head` on the first)")
    try:
        classes = choose_classes(nodes, machines)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    placements, refusals = place(cases, classes, nodes, estimate_bytes(artifacts), force)
    return FleetPlan(ray, nodes, classes, placements, refusals)


def run(sc: Scenario, cases: list[Case], artifacts: dict[Path, ArtifactInfo], p: FleetPlan, output_dir: Path,
        address: str, resume: bool, force: bool, max_retries: int, lost_grace_s: float,
        on_start: Callable[[FleetDataset, list[Placement], int], None] = lambda ds, todo, refused: None,
        on_case_end: Callable[[CaseOutcome], None] = lambda o: None,
        on_tick: Callable[[dict], None] = lambda s: None) -> tuple[FleetDataset, FleetSummary]:
    previous = latest_dataset(output_dir, sc.name) if resume else None
    if previous is not None:
        lock = RunLock(previous / MANIFEST)
        with lock:
            dataset = FleetDataset.resume(previous, cases, p.classes)
            return dataset, _drive(sc, artifacts, p, dataset, dataset.manifest["run_id"], force, max_retries,
                                   lost_grace_s, on_start, on_case_end, on_tick)
    run_id = new_run_id()
    dataset = FleetDataset.create(output_dir, sc.name, run_id, {
        "source": sc.source, "address": address, "machine_classes": p.classes,
        "nodes": [{"node_id": n.node_id, "machine_class": n.machine_class, "runtimes": list(n.runtimes),
                   "ram_bytes": n.ram_bytes, "alive": n.alive} for n in p.nodes]})
    with RunLock(dataset.root / MANIFEST):
        return dataset, _drive(sc, artifacts, p, dataset, run_id, force, max_retries, lost_grace_s, on_start,
                               on_case_end, on_tick)


def _drive(sc: Scenario, artifacts: dict[Path, ArtifactInfo], p: FleetPlan, dataset: FleetDataset, run_id: str,
           force: bool, max_retries: int, lost_grace_s: float, on_start: Callable, on_case_end: Callable,
           on_tick: Callable) -> FleetSummary:
    driver = FleetDriver(p.ray, dataset, run_id, artifacts, force, max_retries, lost_grace_s, on_case_end, on_tick)
    ram = {n.machine_class: n.ram_bytes for n in p.nodes if n.alive}
    driver.ram.update(ram)
    refused = write_refusals(dataset, p.refusals, artifacts, ram, run_id, driver.hashes)
    todo = [pl for pl in p.placements if not dataset.is_done(*pl.key)]
    on_start(dataset, todo, refused)
    info = {"run_id": run_id, "scenario": sc.name, "classes": p.classes, "total": len(todo),
            "dataset": str(dataset.root)}
    return driver.run(todo, info)
