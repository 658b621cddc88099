"""The ``fitbench`` command line.

Expected failures (bad scenario, missing artifact, runtime not installed,
unwritable output) print one line ``fitbench: error: ...`` and exit 2.
Only bugs in fitbench itself may show a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness import machine as machine_mod
from harness.metrics import summarize
from harness.preflight import OutputError, check_output_dir, check_scenario
from harness.results import ResultsError, ResultWriter
from harness.scenario import ScenarioError, load_scenario, parse_contexts
from harness.suite import CaseResult, SuiteInterrupted, new_run_id, run_suite
from runners.base import get_runner_class, registered_runners

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Logs and CI captures are not terminals; rich would wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


class FitbenchError(Exception):
    """An expected failure: shown as one line, exit code 2."""


def fail(message: str) -> None:
    raise FitbenchError(message)


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fitbench")
def cli() -> None:
    """fitbench: measure whether a local model really fits this machine.

    Runs real generations at configured context lengths in isolated
    processes, samples memory and paging while they run, and writes Parquet
    results with a versioned schema.
    """


@cli.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="folder for the results files")
@click.option("--repetitions", "-r", type=click.IntRange(min=1), help="override the scenario's repetitions")
@click.option("--contexts", "-c", help="override the scenario's contexts, e.g. 512,2048")
@click.option("--gen-tokens", "-n", type=click.IntRange(min=2), help="override tokens generated per repetition")
@click.option("--timeout", type=click.FloatRange(min=1), help="override seconds allowed per case")
def run(scenario: Path, output_dir: Path, repetitions: int | None, contexts: str | None,
        gen_tokens: int | None, timeout: float | None) -> None:
    """Run SCENARIO (a YAML file) and write results to OUTPUT."""
    sc = load_scenario(scenario)
    overrides = {}
    if repetitions:
        overrides["repetitions"] = repetitions
    if contexts:
        try:
            overrides["contexts"] = parse_contexts(contexts)
        except ValueError as exc:
            fail(str(exc))
    if gen_tokens:
        overrides["gen_tokens"] = gen_tokens
    if timeout:
        overrides["timeout"] = timeout
    sc = replace(sc, **overrides)
    artifacts = check_scenario(sc)
    out = check_output_dir(output_dir)
    cases = sc.cases()
    if not cases:
        fail(f"{scenario}: the scenario expands to no cases; check contexts and prompt_tokens")

    run_id = new_run_id()
    writer = ResultWriter(out / f"{sc.name}-{run_id}.parquet")
    mach = machine_mod.fingerprint()
    console.print(f"[bold]fitbench[/] {sc.name}: {len(cases)} case(s) on {mach.machine_class} "
                  f"({mach.cpu_model}), results -> {writer.results_path}")

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    results: list[CaseResult] = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("starting", total=len(cases))

    def on_progress(case, p) -> None:
        rep = f" {p.repetition}/{case.repetitions}" if p.phase == "generating" else ""
        progress.update(task, description=(
            f"case {case.index + 1}/{len(cases)} {case.model_label} {case.label} · {p.phase}{rep} · "
            f"RSS {mib(p.rss)} MiB (peak {mib(p.peak_rss)})"))

    def on_case_end(result: CaseResult) -> None:
        results.append(result)
        progress.advance(task)
        progress.console.print(_case_line(result, len(cases)))

    interrupted = False
    with progress:
        try:
            run_suite(cases, artifacts, mach, writer, run_id, on_progress=on_progress, on_case_end=on_case_end)
        except (SuiteInterrupted, KeyboardInterrupt):
            interrupted = True
    _summary_table(results)
    console.print(f"results: {writer.results_path}\ntimeline: {writer.timeline_path}")
    if interrupted:
        err_console.print(f"fitbench: interrupted after {len(results)} of {len(cases)} case(s); results so far are saved")
        sys.exit(EXIT_INTERRUPTED)


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _case_line(r: CaseResult, total: int) -> str:
    head = f"[{r.case.index + 1}/{total}] {r.case.model_label} {r.case.label}"
    if r.status != "ok":
        return f"{head}: [red]{r.status}[/] {r.error}"
    ok_rows = [row for row in r.rows if row["status"] == "ok"]
    ttft = summarize([row["ttft_s"] for row in ok_rows])
    dec = summarize([row["decode_tok_s"] for row in ok_rows])
    return (f"{head}: [green]ok[/] TTFT {ttft.median * 1000:,.0f} ms, decode {dec.median:,.1f} tok/s, "
            f"peak RSS {mib(r.peak_rss)} MiB (VmHWM {mib(r.vmhwm)}), {r.wall_s:.1f} s")


def _summary_table(results: list[CaseResult]) -> None:
    """Medians per case; like llama-bench's markdown, the model column only when it varies."""
    if not results:
        return
    show_model = len({r.case.model_label for r in results}) > 1
    table = Table(title="fitbench summary (medians over repetitions)")
    headers = ["#", *(["model"] if show_model else []), "case", "status", "TTFT ms", "pp tok/s", "tg tok/s",
               "peak MiB", "HWM MiB", "maj flt"]
    for col in headers:
        table.add_column(col, justify="left" if col in ("model", "case", "status") else "right", no_wrap=True)
    for r in results:
        ok_rows = [row for row in r.rows if row["status"] == "ok"]

        def med(key: str, scale: float = 1.0, fmt: str = "{:,.1f}") -> str:
            s = summarize([row[key] for row in ok_rows])
            return "-" if s is None else fmt.format(s.median * scale)

        dec = summarize([row["decode_tok_s"] for row in ok_rows])
        decode = "-" if dec is None else f"{dec.median:,.1f}±{dec.stdev:,.1f}"
        status = "[green]ok[/]" if r.status == "ok" else f"[red]{r.status}[/]"
        faults = str(sum(row["major_faults"] or 0 for row in ok_rows)) if ok_rows else "-"
        table.add_row(str(r.case.index + 1), *([r.case.model_label] if show_model else []), r.case.label, status,
                      med("ttft_s", 1000, "{:,.0f}"), med("prefill_tok_s"), decode, mib(r.peak_rss), mib(r.vmhwm),
                      faults)
    console.print(table)
    if show_model is False:
        console.print(f"model: {results[0].case.model_label} ({results[0].case.runtime})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def runners(as_json: bool) -> None:
    """List runtimes: installed or not, versions, devices, and how to install the missing ones."""
    rows = []
    for name in sorted(registered_runners()):
        try:
            cls = get_runner_class(name)
            avail = cls.available()
            rows.append({"runtime": name, "formats": sorted(cls.formats), "available": avail.available,
                         "version": avail.version, "devices": avail.devices, "reason": avail.reason,
                         "install": avail.install})
        except Exception as exc:  # a broken third-party runner must not hide the others
            rows.append({"runtime": name, "formats": [], "available": False, "version": None, "devices": [],
                         "reason": f"runner failed to load: {exc}", "install": None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="fitbench runners")
    for col in ("runtime", "formats", "available", "version", "devices", "how to install / why not"):
        table.add_column(col)
    for r in rows:
        note = "" if r["available"] else f"{r['reason']}; {r['install'] or ''}".strip("; ")
        table.add_row(r["runtime"], ",".join(r["formats"]), "[green]yes[/]" if r["available"] else "[red]no[/]",
                      r["version"] or "-", ",".join(r["devices"]) or "-", note)
    console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def machine(as_json: bool) -> None:
    """Show this machine's fingerprint, id and class as recorded in results."""
    m = machine_mod.fingerprint()
    data = m.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(title="this machine", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in data.items():
        if key == "ram_bytes":
            value = f"{value / 2**30:.1f} GiB"
        elif key == "gpus":
            value = ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB, driver {g['driver']})" for g in value) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        table.add_row(key, str(value))
    console.print(table)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("fitbench: aborted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        # click's own usage errors: keep them to one line too
        click.echo(f"fitbench: error: {exc.format_message()} (see fitbench --help)", err=True)
        sys.exit(exc.exit_code)
    except (FitbenchError, ScenarioError, OutputError, ResultsError) as exc:
        click.echo(f"fitbench: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
