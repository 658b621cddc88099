"""``fitbench fleet agent``: make this machine a Ray node that advertises what fitbench needs.

The agent is an ordinary ``ray start`` with fitbench's custom resources
(see ``resources``): its machine class (from the fingerprint, or given),
the runtimes installed here, its RAM and one case slot. Ray then runs the
case tasks; nothing of fitbench stays resident between cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.fleet import FleetError, require_ray
from harness.fleet.remote import MODELS_DIR_ENV
from harness.fleet.resources import agent_resources
from runners.base import get_runner_class, registered_runners


def installed_runtimes() -> list[str]:
    """Registered runtimes that are available on this machine."""
    found = []
    for name in sorted(registered_runners()):
        try:
            if get_runner_class(name).available().available:
                found.append(name)
        except Exception:  # a broken third-party runner is simply not offered
            continue
    return found


@dataclass
class AgentPlan:
    command: list[str]
    resources: dict[str, float]
    env: dict[str, str]


def plan(head: bool, address: str | None, port: int, client_port: int, machine_class: str, runtimes: list[str],
         ram_bytes: int, num_cpus: int | None, object_store_bytes: int, models_dir: Path | None,
         temp_dir: Path | None, block: bool) -> AgentPlan:
    try:
        resources = agent_resources(machine_class, runtimes, ram_bytes)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    ray_bin = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if ray_bin is None:
        require_ray()  # says how to install it
        raise FleetError("the `ray` command is not on PATH; reinstall with: pip install 'fitbench[fleet]'")
    cmd = [ray_bin, "start"]
    if head:
        cmd += ["--head", f"--port={port}", f"--ray-client-server-port={client_port}", "--include-dashboard=false"]
    else:
        if not address:
            raise FleetError("give --address HEAD:PORT of the cluster to join, or --head to start one")
        cmd += [f"--address={address}"]
    cmd += [f"--resources={json.dumps(resources, sort_keys=True)}", f"--object-store-memory={object_store_bytes}",
            "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += [f"--num-cpus={num_cpus}"]
    if temp_dir is not None:
        cmd += [f"--temp-dir={temp_dir}"]
    if block:
        cmd += ["--block"]
    # Ray starts its workers at niceness 15; a case (the worker's child) must run at the user's priority.
    env = {"RAY_worker_niceness": "0"}
    if models_dir is not None:
        env[MODELS_DIR_ENV] = str(models_dir.resolve())  # the node's case tasks inherit it from the raylet
    return AgentPlan(cmd, resources, env)


def start(p: AgentPlan) -> int:
    """Run ``ray start``; its own output says where the node joined."""
    return subprocess.call(p.command, env={**os.environ, **p.env})
