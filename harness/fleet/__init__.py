"""Benchmark a fleet: one scenario across many machines on Ray.

Ray is an optional extra (``fitbench[fleet]``) and only this package imports
it, lazily, through :func:`require_ray`; the rest of fitbench never does.

Modules, one job each:
- ``resources``: the Ray custom resources an agent node advertises, and
  reading them back (pure, no Ray);
- ``agent``: ``fitbench fleet agent``, which starts a Ray node with them;
- ``nodes``: the registry of live agent nodes in a cluster;
- ``placement``: which (case, machine class) pairs can run where (pure);
- ``remote``: the Ray task that runs one case through ``suite.run_case``;
- ``progress``: a named actor holding per-node progress for ``fleet status``;
- ``dataset``: the Parquet dataset partitioned by machine class, and resume;
- ``driver``: submits, gathers, retries and records a fleet run;
- ``status``: the nodes-and-progress table.
"""

from __future__ import annotations

from types import ModuleType

from harness.errors import FitbenchError

INSTALL_HINT = "pip install 'fitbench[fleet]'"


class FleetError(FitbenchError):
    """An expected fleet failure (no Ray, no cluster, no agents): one line, exit 2."""


def require_ray() -> ModuleType:
    """Import Ray on first use, with a one-line error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise FleetError(f"fleet runs need Ray, which is not installed; install it with: {INSTALL_HINT}") from None
    return ray
