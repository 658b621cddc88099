"""Which (case, machine class) pairs a fleet run submits, and why the others are refused.

A fleet run measures every case once per machine class: nodes of one class
are interchangeable and share that class's cases. A pair is placed only when
some live node of the class has the case's runtime and enough RAM for the
case's estimated peak; otherwise it becomes a row saying why (``unavailable``
or ``skipped``), exactly like a local run would write. Pure logic: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from harness.fleet.resources import AgentNode, case_resources
from harness.scenario import Case


@dataclass(frozen=True)
class Placement:
    case: Case
    machine_class: str
    resources: dict[str, float]

    @property
    def key(self) -> tuple[str, str]:
        return (self.machine_class, self.case.key)


@dataclass(frozen=True)
class Refusal:
    case: Case
    machine_class: str
    status: str  # unavailable | skipped
    error: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.machine_class, self.case.key)


def choose_classes(nodes: list[AgentNode], wanted: list[str] | None) -> list[str]:
    """The machine classes to run on: all with a live agent, or the wanted ones (each must have one)."""
    live = sorted({n.machine_class for n in nodes if n.alive})
    if not wanted:
        return live
    missing = [c for c in wanted if c not in live]
    if missing:
        raise ValueError(f"no live fitbench agent of machine class {', '.join(missing)}; "
                         f"classes in the cluster: {', '.join(live) or 'none'}")
    return list(dict.fromkeys(wanted))


def place(cases: list[Case], classes: list[str], nodes: list[AgentNode],
          estimate_bytes: Callable[[Case], int | None], force: bool = False) -> tuple[list[Placement], list[Refusal]]:
    placements: list[Placement] = []
    refusals: list[Refusal] = []
    for cls in classes:
        members = [n for n in nodes if n.alive and n.machine_class == cls]
        runtimes = {r for n in members for r in n.runtimes}
        for case in cases:
            with_runtime = [n for n in members if case.runtime in n.runtimes]
            if not with_runtime:
                refusals.append(Refusal(case, cls, "unavailable",
                                        f"no {cls} node offers runtime {case.runtime!r} (they offer: "
                                        f"{', '.join(sorted(runtimes)) or 'none'}); install it there and restart its agent"))
                continue
            guess = estimate_bytes(case)
            ram = max(n.ram_bytes for n in with_runtime)
            if guess and guess > ram and not force:
                refusals.append(Refusal(case, cls, "skipped",
                                        f"skipped: estimated peak {guess / 2**30:,.1f} GiB is above the "
                                        f"{ram / 2**30:,.1f} GiB of RAM of every {cls} node; pass --force to run it anyway"))
                continue
            # With --force an over-large estimate is not requested, or Ray could never place it.
            request = guess if guess and guess <= ram else None
            placements.append(Placement(case, cls, case_resources(cls, case.runtime, request)))
    return placements, refusals
