"""The Ray custom resources a fitbench agent node advertises, and reading them back.

A node is an agent when it has ``fitbench_slot``. Its machine class and
runtimes are resources named ``fitbench_class:<class>`` and
``fitbench_runtime:<name>`` (amount 1), its RAM is ``fitbench_ram_mib``.
A case task requests one slot (a node has exactly one, so it never runs two
cases at once and they never disturb each other's measurements), its class,
its runtime and its estimated memory, so Ray itself only places it on a node
that can run it. Pure functions: no Ray import here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

SLOT = "fitbench_slot"
CLASS_PREFIX = "fitbench_class:"
RUNTIME_PREFIX = "fitbench_runtime:"
RAM_MIB = "fitbench_ram_mib"

# What a class or runtime name may contain so it stays one Ray resource name.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}$")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r} must be letters, digits and . _ : + - (at most 100 characters)")
    return name


def agent_resources(machine_class: str, runtimes: list[str], ram_bytes: int) -> dict[str, float]:
    """What ``ray start --resources`` gets on an agent node."""
    resources: dict[str, float] = {SLOT: 1, CLASS_PREFIX + check_name("machine class", machine_class): 1,
                                   RAM_MIB: max(1, ram_bytes // 2**20)}
    for runtime in runtimes:
        resources[RUNTIME_PREFIX + check_name("runtime", runtime)] = 1
    return resources


def case_resources(machine_class: str, runtime: str, estimate_bytes: int | None) -> dict[str, float]:
    """What one case task requests: a whole slot, its class and runtime, and its estimated memory."""
    wanted: dict[str, float] = {SLOT: 1, CLASS_PREFIX + machine_class: 1, RUNTIME_PREFIX + runtime: 1}
    if estimate_bytes:
        wanted[RAM_MIB] = math.ceil(estimate_bytes / 2**20)
    return wanted


@dataclass(frozen=True)
class AgentNode:
    """One live (or dead) node of the cluster that runs a fitbench agent."""

    node_id: str
    address: str
    hostname: str
    alive: bool
    machine_class: str
    runtimes: tuple[str, ...]
    ram_bytes: int
    slots: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def short_id(self) -> str:
        return self.node_id[:12]


def parse_node(info: dict) -> AgentNode | None:
    """An entry of ``ray.nodes()`` -> the agent it describes, or None for a node that is no agent."""
    res = info.get("Resources") or {}
    if SLOT not in res:
        return None
    classes = sorted(k[len(CLASS_PREFIX):] for k in res if k.startswith(CLASS_PREFIX))
    runtimes = tuple(sorted(k[len(RUNTIME_PREFIX):] for k in res if k.startswith(RUNTIME_PREFIX)))
    return AgentNode(
        node_id=str(info.get("NodeID", "")), address=f"{info.get('NodeManagerAddress', '?')}:{info.get('NodeManagerPort', '?')}",
        hostname=str(info.get("NodeManagerHostname", "")), alive=bool(info.get("Alive", False)),
        machine_class=classes[0] if classes else "unknown", runtimes=runtimes,
        ram_bytes=int(res.get(RAM_MIB, 0)) * 2**20, slots=int(res.get(SLOT, 0)),
    )


def parse_nodes(infos: list[dict]) -> list[AgentNode]:
    nodes = [n for n in (parse_node(i) for i in infos) if n is not None]
    return sorted(nodes, key=lambda n: (not n.alive, n.machine_class, n.node_id))
