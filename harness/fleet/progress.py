"""Progress of a fleet run per node, held by a named Ray actor that ``fleet status`` reads.

The case tasks tell it when a case starts and which phase it is in; the
driver tells it when a case's rows are written (or lost). The actor lives
as long as the driver (it is not detached), so a finished or killed run
leaves no state behind; the dataset on disk is the record. The class is
plain Python; ``start`` wraps it with ``ray.remote``.
"""

from __future__ import annotations

import time
from typing import Any

NAMESPACE = "fitbench"
ACTOR_PREFIX = "fitbench-progress-"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


class FleetProgress:
    def __init__(self, run: dict[str, Any]) -> None:
        self.run = {**run, "started": time.time()}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.started_keys: set[tuple[str, str]] = set()

    def _node(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"node_id": node_id, "hostname": "", "machine_class": "", "done": 0,
                                               "failed": 0, "case": None, "phase": "idle", "repetition": 0,
                                               "repetitions": 0, "rss": None, "since": None})

    def case_started(self, node_id: str, hostname: str, machine_class: str, case_key: str, label: str,
                     model: str) -> None:
        node = self._node(node_id)
        node.update(hostname=hostname, machine_class=machine_class, case=f"{model} {label}", case_key=case_key,
                    phase="starting", repetition=0, rss=None, since=time.time())
        self.started_keys.add((machine_class, case_key))

    def case_phase(self, node_id: str, phase: str, repetition: int, repetitions: int, rss: int | None) -> None:
        self._node(node_id).update(phase=phase, repetition=repetition, repetitions=repetitions, rss=rss)

    def case_finished(self, node_id: str | None, machine_class: str, status: str) -> None:
        if node_id is None:
            return
        node = self._node(node_id)
        node["machine_class"] = node["machine_class"] or machine_class
        node["done" if status == "ok" else "failed"] += 1
        node.update(case=None, phase="idle", rss=None, since=None)

    def was_started(self, machine_class: str, case_key: str) -> bool:
        return (machine_class, case_key) in self.started_keys

    def set_totals(self, totals: dict[str, Any]) -> None:
        self.run.update(totals)

    def snapshot(self) -> dict[str, Any]:
        return {"run": dict(self.run), "nodes": [dict(n) for n in self.nodes.values()], "now": time.time()}


def start(ray: Any, run_id: str, run: dict[str, Any]) -> Any:
    """The run's progress actor: no CPU, so it never takes a case's place, and on the head node, which
    outlives the agents (an actor on an agent node would die with it and take the run's progress along)."""
    cls = ray.remote(num_cpus=0, max_restarts=0)(FleetProgress)
    return cls.options(name=ACTOR_PREFIX + run_id, namespace=NAMESPACE,
                       resources={HEAD_RESOURCE: 0.001}).remote(run)


def running(ray: Any) -> list[Any]:
    """Handles of the progress actors of the fleet runs in progress on the cluster."""
    from ray.util import list_named_actors

    handles = []
    for entry in list_named_actors(all_namespaces=True):
        name, namespace = (entry["name"], entry.get("namespace")) if isinstance(entry, dict) else (entry, NAMESPACE)
        if name.startswith(ACTOR_PREFIX) and namespace == NAMESPACE:
            try:
                handles.append(ray.get_actor(name, namespace=NAMESPACE))
            except ValueError:
                pass  # the run ended between listing and looking up
    return handles
