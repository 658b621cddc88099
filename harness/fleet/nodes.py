"""Joining a Ray cluster as a driver, and the registry of its fitbench agent nodes."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from harness.fleet import FleetError, require_ray
from harness.fleet.progress import NAMESPACE
from harness.fleet.resources import AgentNode, parse_nodes


def connect(address: str) -> Any:
    """ray.init against ``address`` (``ray://HEAD:10001``, ``HEAD:6379`` or ``auto``); one-line errors."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if not address:
        raise FleetError("no Ray cluster given: pass --address ray://HEAD:10001 (or auto inside the cluster), "
                         "or set RAY_ADDRESS")
    _probe(address)
    # Quiet: the user reads fitbench's progress, not Ray's start-up chatter.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False,
                     configure_logging=True)
            return ray
        except Exception as exc:  # ConnectionError, RuntimeError, grpc errors: all mean "no cluster there"
            # Something listens (the probe said so): a Ray Client server that is slow to start its
            # per-client server answers "Initialization failure from server"; seen on a busy CI box.
            if attempt < CONNECT_ATTEMPTS:
                _quietly_shutdown(ray)
                time.sleep(2.0 * attempt)
                continue
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise FleetError(f"cannot join the Ray cluster at {address} ({attempt} attempts): {first}; start one "
                             "with `fitbench fleet agent --head` and pass its address") from None
    return ray


CONNECT_ATTEMPTS = 3


def _quietly_shutdown(ray: Any) -> None:
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - a half-made connection may not even shut down cleanly
        pass


PROBE_TIMEOUT_S = 5.0


def _probe(address: str) -> None:
    """Fail in seconds on an address nobody listens at: Ray itself retries a dead GCS for minutes."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise FleetError(f"--address {address!r}: write it as ray://HOST:PORT, HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise FleetError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start one with "
                         "`fitbench fleet agent --head` and pass its address") from None


def agent_nodes(ray: Any) -> list[AgentNode]:
    """Every node of the cluster that runs a fitbench agent, live ones first."""
    return parse_nodes(ray.nodes())
