"""``fitbench fleet status``: nodes, their classes and runtimes, and each node's progress in running fleet runs."""

from __future__ import annotations

import time
from typing import Any

from harness.fleet import progress as progress_mod
from harness.fleet.nodes import agent_nodes


def collect(ray: Any) -> dict[str, Any]:
    """One snapshot of the cluster: its agent nodes and every fleet run in progress."""
    nodes = agent_nodes(ray)
    runs = []
    for handle in progress_mod.running(ray):
        try:
            runs.append(ray.get(handle.snapshot.remote(), timeout=10))
        except Exception:
            continue  # a run that ended while we asked
    return {"nodes": [n.__dict__ | {"short_id": n.short_id} for n in nodes], "runs": runs, "at": time.time()}


def rows(snapshot: dict[str, Any]) -> list[dict[str, str]]:
    """One row per agent node, with its progress in the running fleet runs (if any)."""
    progress: dict[str, dict[str, Any]] = {}
    for run in snapshot["runs"]:
        for node in run["nodes"]:
            mine = progress.setdefault(node["node_id"], {"done": 0, "failed": 0, "case": None, "run": None})
            mine["done"] += node["done"]
            mine["failed"] += node["failed"]
            if node.get("case"):
                rep = (f" {node['repetition']}/{node['repetitions']}" if node.get("phase") == "generating"
                       and node.get("repetitions") else "")
                rss = f", RSS {node['rss'] / 2**20:,.0f} MiB" if node.get("rss") else ""
                since = f", {snapshot['at'] - node['since']:,.0f} s" if node.get("since") else ""
                mine["case"] = f"{node['case']} · {node['phase']}{rep}{rss}{since}"
                mine["run"] = run["run"].get("run_id")
    out = []
    for n in snapshot["nodes"]:
        p = progress.get(n["node_id"], {})
        out.append({"node": n["short_id"], "address": n["address"], "state": "alive" if n["alive"] else "dead",
                    "class": n["machine_class"], "runtimes": ",".join(n["runtimes"]) or "-",
                    "RAM GiB": f"{n['ram_bytes'] / 2**30:,.0f}", "done": str(p.get("done", 0)),
                    "failed": str(p.get("failed", 0)), "running": p.get("case") or "idle"})
    return out


def run_lines(snapshot: dict[str, Any]) -> list[str]:
    lines = []
    for run in snapshot["runs"]:
        r = run["run"]
        done = sum(n["done"] + n["failed"] for n in run["nodes"])
        lines.append(f"fleet run {r.get('run_id')} ({r.get('scenario')}): {done}/{r.get('total', '?')} case(s) "
                     f"finished on {', '.join(r.get('classes', []))}, started "
                     f"{time.strftime('%H:%M:%S', time.localtime(r.get('started', 0)))}, writing {r.get('dataset')}")
    return lines or ["no fleet run in progress"]
