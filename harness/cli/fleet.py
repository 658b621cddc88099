"""``fitbench fleet run|status|agent``: one scenario across the machines of a Ray cluster.

Ray (and everything of harness.fleet that needs it) is imported inside the commands.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from harness.cli.options import (
    EXIT_INTERRUPTED,
    THRESHOLD_OPTION,
    UsageError,
    no_cases,
    scenario_overrides,
    sigterm_as_interrupt,
    size_option,
    with_overrides,
)
from harness.cli.present import (
    Markup,
    fleet_case_line,
    fleet_summary,
    make_console,
    print_json,
    print_status,
    status_table,
)

NO_ADDRESS = "no Ray cluster given: pass --address ray://HEAD:10001 (or auto inside the cluster), or set RAY_ADDRESS"


@click.group()
def fleet() -> None:
    """One scenario across many machines on a Ray cluster, gathered into one dataset (needs fitbench[fleet]).

    On every machine: `fitbench fleet agent` (the first with --head). Then, from anywhere:
    `fitbench fleet run SCENARIO --address ray://HEAD:10001`, and `fitbench fleet status` to watch.
    """


ADDRESS_OPTION = click.option("--address", envvar="RAY_ADDRESS", show_envvar=True,
                              help="the Ray cluster: ray://HEAD:10001, HEAD:6379, or auto inside the cluster")


@fleet.command("run")
@click.argument("scenario", type=click.Path(path_type=Path))
@ADDRESS_OPTION
@click.option("--machines", help="comma-separated machine classes to run on (default: every class with a live agent)")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="folder the run's dataset folder goes in")
@scenario_overrides
@click.option("--budget", help="memory the cases may use on each node, e.g. 8GiB")
@THRESHOLD_OPTION
@click.option("--resume", is_flag=True, help="continue the latest fleet run of this scenario in OUTPUT")
@click.option("--force", is_flag=True, help="run cases even where their estimated memory is above a node's RAM")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="times Ray reruns a case whose node or task process died")
@click.option("--lost-grace", "lost_grace_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="seconds to wait for a machine class that lost all its nodes before giving up its cases")
def fleet_run(scenario: Path, address: str | None, machines: str | None, output_dir: Path, repetitions: int | None,
              contexts: str | None, gen_tokens: int | None, timeout: float | None, budget: str | None,
              thresholds: tuple[str, ...], resume: bool, force: bool, max_retries: int, lost_grace_s: float) -> None:
    """Run SCENARIO once per machine class of the cluster; results stream into one dataset in OUTPUT."""
    from harness.fleet import launch
    from harness.preflight import check_output_dir, check_scenario
    from harness.scenario import load_scenario

    sc = with_overrides(load_scenario(scenario), repetitions, contexts, gen_tokens, timeout, budget, thresholds)
    artifacts = check_scenario(sc, require_runtimes=False)
    out = check_output_dir(output_dir)
    cases = sc.cases()
    if not cases:
        raise no_cases(scenario)
    if not address:
        raise UsageError(NO_ADDRESS)
    console, err = make_console(), make_console(stderr=True)
    wanted = [m.strip() for m in machines.split(",") if m.strip()] if machines else None
    p = launch.plan(address, cases, artifacts, wanted, force)
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("submitting", total=None)
    state = {"total": 0, "done": 0}

    def on_start(dataset, todo, refused) -> None:
        state["total"] = len(todo)
        progress.update(task, total=len(todo))
        if dataset.manifest.get("resumed"):
            console.print(f"resuming {dataset.root.name}: {len(dataset.done)} case run(s) already done")
        elif resume:
            console.print(f"nothing to resume in {out} for scenario {sc.name}; starting a new fleet run")
        console.print(Markup("[bold]fitbench fleet[/] " + escape(
            f"{sc.name}: {len(todo)} case run(s) on {', '.join(p.classes)} ({sum(n.alive for n in p.nodes)} "
            f"node(s)); {refused} refused; dataset -> {dataset.root}")))

    def on_case_end(o) -> None:
        state["done"] += 1
        progress.advance(task)
        progress.console.print(fleet_case_line(o, state["done"], state["total"]))

    def on_tick(snapshot: dict) -> None:
        busy = [f"{n['machine_class']}: {n['case']} · {n['phase']}" for n in snapshot.get("nodes", []) if n.get("case")]
        progress.update(task, description="; ".join(busy)[:160] or "waiting for nodes")

    try:
        with progress:
            dataset, summary = launch.run(sc, cases, artifacts, p, out, address, resume, force, max_retries,
                                          lost_grace_s, on_start, on_case_end, on_tick)
    finally:
        p.ray.shutdown()
    fleet_summary(console, dataset, summary, p.classes)
    if summary.interrupted:
        err.print(f"fitbench: interrupted; finished cases are saved; continue with: fitbench fleet run "
                  f"{sc.source} --address {address} -o {out} --resume")
        sys.exit(EXIT_INTERRUPTED)
    lost = [o for o in summary.outcomes if o.status == "lost" and o.written]
    if summary.not_run or lost:
        reasons = sorted({why for _, why in summary.not_run})
        err.print(f"fitbench: {len(lost)} case run(s) lost with their node, {len(summary.not_run)} not run"
                  + (f" ({'; '.join(reasons)})" if reasons else "") + "; start their agents again and "
                  f"continue with: fitbench fleet run {sc.source} --address {address} -o {out} --resume")
        sys.exit(1)


@fleet.command("status")
@ADDRESS_OPTION
@click.option("--watch", type=click.FloatRange(min=0.5), metavar="SECONDS",
              help="refresh every SECONDS (a live table on a terminal) until Ctrl-C")
@click.option("--json", "as_json", is_flag=True, help="print one JSON snapshot instead of a table")
def fleet_status(address: str | None, watch: float | None, as_json: bool) -> None:
    """The cluster's fitbench agents: machine class, runtimes, RAM, and each node's progress."""
    import time

    from harness.fleet import status as status_mod
    from harness.fleet.nodes import connect

    if not address:
        raise UsageError(NO_ADDRESS)
    console = make_console()
    ray = connect(address)
    try:
        snap = status_mod.collect(ray)
        if as_json:
            print_json(snap)
            return
        if watch and console.is_terminal:
            from rich.live import Live

            with Live(status_table(snap, status_mod), console=console, refresh_per_second=2) as live:
                try:
                    while True:
                        time.sleep(watch)
                        live.update(status_table(status_mod.collect(ray), status_mod))
                except KeyboardInterrupt:
                    return
        while True:
            print_status(console, snap, status_mod)
            if not watch:
                return
            try:
                time.sleep(watch)
            except KeyboardInterrupt:
                return
            snap = status_mod.collect(ray)
    finally:
        ray.shutdown()


@fleet.command("agent")
@click.option("--head", is_flag=True, help="start a new cluster here (the first machine)")
@click.option("--address", help="join the cluster whose head is at HEAD:6379")
@click.option("--port", type=int, default=6379, show_default=True, help="with --head: the cluster port")
@click.option("--client-port", type=int, default=10001, show_default=True,
              help="with --head: the Ray Client port that `fleet run --address ray://HEAD:PORT` uses")
@click.option("--machine-class", help="class to advertise (default: this machine's, see `fitbench machine`)")
@click.option("--runtimes", help="comma-separated runtimes to offer (default: every runtime installed here)")
@click.option("--ram", help="memory to advertise for placement, e.g. 16GiB (default: this machine's RAM)")
@click.option("--num-cpus", type=click.IntRange(min=0), help="CPUs Ray may use here (cases take none: one slot per node)")
@click.option("--object-store-memory", default="256MiB", show_default=True,
              help="Ray's shared-memory store here; fitbench moves only rows through it")
@click.option("--models-dir", type=click.Path(path_type=Path, file_okay=False),
              help="where this node keeps artifacts, found by file name when the scenario's path is not here")
@click.option("--temp-dir", type=click.Path(path_type=Path, file_okay=False), help="Ray's temp dir on this node")
@click.option("--block", is_flag=True, help="stay in the foreground until Ctrl-C (for systemd or a terminal)")
@click.option("--dry-run", is_flag=True, help="print the `ray start` command and the resources; start nothing")
def fleet_agent(head: bool, address: str | None, port: int, client_port: int, machine_class: str | None,
                runtimes: str | None, ram: str | None, num_cpus: int | None, object_store_memory: str,
                models_dir: Path | None, temp_dir: Path | None, block: bool, dry_run: bool) -> None:
    """Make this machine a fleet node: start Ray here advertising its machine class, runtimes, RAM and one case slot."""
    import shlex

    from harness.fleet import agent
    from harness.measure import machine as machine_mod

    if head == bool(address):
        raise UsageError("give exactly one of --head (start the cluster here) or --address HEAD:6379 (join it)")
    m = machine_mod.fingerprint() if not (machine_class and ram) else None
    offered = [r.strip() for r in runtimes.split(",") if r.strip()] if runtimes else agent.installed_runtimes()
    if not offered:
        raise UsageError("no runtime is installed here, so this node could run no case; install one (see "
                         "`fitbench runners`) or name them with --runtimes")
    if models_dir is not None and not models_dir.is_dir():
        raise UsageError(f"--models-dir {models_dir} is not a folder")
    p = agent.plan(head, address, port, client_port, machine_class or m.machine_class, offered,
                   size_option("--ram", ram) if ram else m.ram_bytes, num_cpus,
                   size_option("--object-store-memory", object_store_memory), models_dir, temp_dir, block)
    console = make_console()
    console.print(f"fleet agent: class {machine_class or m.machine_class}, runtimes {', '.join(offered)}, "
                  f"resources {json.dumps(p.resources, sort_keys=True)}", markup=False)
    if dry_run:
        click.echo(" ".join(shlex.quote(c) for c in p.command))
        return
    code = agent.start(p)
    if code != 0:
        raise UsageError(f"`ray start` failed (exit {code}); see its output above")
    if not block:
        console.print("agent started; stop it with `ray stop` on this machine")
