"""``fitbench run`` and ``fitbench fit``: measure cases and write result files.

This process is the measuring parent, so it imports no runtime, no DuckDB, pandas or
matplotlib: each case runs in its own worker process, which imports its runtime itself.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from harness.artifact import inspect_artifact
from harness.cli.fitpredicted import CalibrationFailed, answer_lines, duration, predicted_fit
from harness.cli.options import (
    COOLDOWN_OPTION,
    EXIT_INTERRUPTED,
    FORMAT_RUNTIMES,
    THRESHOLD_OPTION,
    UsageError,
    no_cases,
    option_values,
    scenario_overrides,
    sigterm_as_interrupt,
    size_option,
    threshold_options,
    with_overrides,
)
from harness.cli.present import Markup, case_line, fit_markup, make_console, mib, summary_table
from harness.fit import case_serving, case_verdict
from harness.fitsearch import search, workflow_at
from harness.measure import machine as machine_mod
from harness.preflight import check_output_dir, check_scenario
from harness.results import ResultWriter
from harness.resume import RunLock, latest_results, load_for_resume
from harness.scenario import MAX_PARALLEL, load_scenario, parse_scenario
from harness.suite import ArtifactHashes, CaseResult, SuiteInterrupted, new_run_id, record, run_case, run_suite
from harness.workflow import Workflow, parse_workflow_option


def keep_pandas_out() -> None:
    """pyarrow imports pandas (~40 MiB, a CPU-second on a small box) into this measuring parent the first
    time it builds an array from Python values, only to ask whether they are pandas objects; they never
    are. One refused import answers "no" for good; a later ``to_pandas()`` still imports it (pyarrow
    tries again when it really needs pandas)."""
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    refuse = _RefusePandas()
    sys.meta_path.insert(0, refuse)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(refuse)


class _RefusePandas:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            raise ImportError("not in the measuring parent")
        return None


@click.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="folder for the results files")
@scenario_overrides
@click.option("--budget", help="memory the cases may use, e.g. 8GiB; enforced with a cgroup where possible")
@THRESHOLD_OPTION
@click.option("--resume", is_flag=True,
              help="continue the latest run of this scenario in OUTPUT: skip finished cases, rerun the rest")
@click.option("--force", is_flag=True, help="run cases even when their estimated memory is far above what is free")
@COOLDOWN_OPTION
def run(scenario: Path, output_dir: Path, repetitions: int | None, contexts: str | None,
        gen_tokens: int | None, timeout: float | None, budget: str | None, thresholds: tuple[str, ...],
        resume: bool, force: bool, cooldown: float | None) -> None:
    """Run SCENARIO (a YAML file) and write results to OUTPUT.

    SCENARIO may be an artifact instead (a .gguf file or a model folder): then it runs llama-bench's default
    test, a 512-token prompt and 128 generated tokens, at the model's trained context capped at 4096, with the
    runtime its format implies (the options above override these; `fitbench bench` sweeps more).
    """
    keep_pandas_out()
    if scenario.suffix == ".gguf" or scenario.is_dir():
        from harness.benchsweep import default_scenario

        base = default_scenario(scenario)
    else:
        base = load_scenario(scenario)
    sc = with_overrides(base, repetitions, contexts, gen_tokens, timeout, budget, thresholds)
    if cooldown is not None:
        sc = replace(sc, cooldown_s=cooldown)
    artifacts = check_scenario(sc)
    out = check_output_dir(output_dir)
    cases = sc.cases()
    if not cases:
        raise no_cases(scenario)

    console = make_console()
    run_id = new_run_id()
    previous = latest_results(out, sc.name) if resume else None
    writer = ResultWriter(previous or out / f"{sc.name}-{run_id}.parquet")
    with RunLock(writer.results_path):
        todo = cases
        if previous is not None:
            run_id, kept, timeline, done = load_for_resume(previous, cases)
            writer.keep(kept, timeline)
            todo = [c for c in cases if c.key not in done]
            console.print(f"resuming {previous.name}: {len(cases) - len(todo)} of {len(cases)} case(s) "
                          "already done")
        elif resume:
            console.print(f"nothing to resume in {out} for scenario {sc.name}; starting a new run")
        _run_cases(console, sc, todo, len(cases), artifacts, writer, run_id, force)


def _run_cases(console, sc, cases: list, total: int, artifacts: dict, writer: ResultWriter, run_id: str,
               force: bool) -> None:
    mach = machine_mod.fingerprint()
    console.print(Markup("[bold]fitbench[/] " + escape(f"{sc.name}: {len(cases)} case(s) to run on {mach.machine_class} "
                                                        f"({mach.cpu_model}), results -> {writer.results_path}")))

    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    results: list[CaseResult] = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("starting", total=len(cases))

    def on_progress(case, p) -> None:
        rep = f" {p.repetition}/{case.repetitions}" if p.phase == "generating" else ""
        if case.workflow is not None and p.phase == "generating":
            rep += f" · turn {p.extra.get('turn', 0) % case.workflow.turns + 1}/{case.workflow.turns}"
        progress.update(task, description=(
            f"case {case.index + 1}/{total} {case.model_label} {case.label} · {p.phase}{rep} · "
            f"RSS {mib(p.rss)} MiB (peak {mib(p.peak_rss)})"))

    def on_case_end(result: CaseResult) -> None:
        results.append(result)
        progress.advance(task)
        progress.console.print(case_line(result, total))

    interrupted = False
    with progress:
        try:
            run_suite(cases, artifacts, mach, writer, run_id, on_progress=on_progress, on_case_end=on_case_end,
                      force=force, on_note=lambda text: progress.console.print(text))
        except (SuiteInterrupted, KeyboardInterrupt):
            interrupted = True
    summary_table(console, results)
    console.print(f"results: {writer.results_path}\ntimeline: {writer.timeline_path}")
    if interrupted:
        make_console(stderr=True).print(
            f"fitbench: interrupted after {len(results)} of {len(cases)} case(s); results so far are saved; "
            f"continue with: fitbench run {sc.source} -o {writer.results_path.parent} --resume")
        sys.exit(EXIT_INTERRUPTED)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runtime", help="runner to use (default: the one for the artifact's format, e.g. llama.cpp for GGUF)")
@click.option("--budget", help="memory budget, e.g. 8GiB (default: this machine's RAM)")
@click.option("--fill", type=click.FloatRange(0, 0.95), default=0.9, show_default=True,
              help="fraction of each probed context the prompt fills")
@click.option("--gen-tokens", "-n", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--min-context", type=click.IntRange(min=64), default=512, show_default=True)
@click.option("--max-context", type=click.IntRange(min=64), help="default: the model's trained context")
@click.option("--step", type=click.IntRange(min=16), default=256, show_default=True, help="bisection grid in tokens")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE",
              help="runner option, e.g. --option flash_attn=true")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE", help="override a fit threshold")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="seconds per probe")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True)
@click.option("--workflow", "workflow_text", metavar="chat:TURNS|document:QUESTIONS|SCENARIO",
              help="probe with a multi-turn session filling each context (replies of --gen-tokens), or the first "
                   "workflow of a scenario file; the verdict is the worst turn's (always --method search)")
@click.option("--users", "users_text", metavar="LIST",
              help="parallel sessions, e.g. 1,2,4: the largest context per user count, each probe judged by the "
                   "serving verdict (docs/concurrency.md); a count's search stops at the previous count's answer "
                   "(always --method search)")
@click.option("--method", type=click.Choice(["predict", "search"]), default="predict", show_default=True,
              help="predict: three short calibration cases predict every context, full runs confirm only the "
                   "boundaries; search: a full run at every probed context (doubling, then bisection)")
@click.option("--confirm", "confirm_what", type=click.Choice(["max-fit", "all", "none"]), default="max-fit",
              show_default=True,
              help="with --method predict: which predicted boundaries full runs confirm: the max fit context, "
                   "every class's (tight, slow and spill too), or none (the answer from three short cases)")
def fit(artifact: Path, runtime: str | None, budget: str | None, fill: float, gen_tokens: int, repetitions: int,
        min_context: int, max_context: int | None, step: int, options: tuple[str, ...], thresholds: tuple[str, ...],
        timeout: float, output_dir: Path, workflow_text: str | None, users_text: str | None, method: str,
        confirm_what: str) -> None:
    """Find the largest context at which ARTIFACT still fits, and the largest that is tight, slow or spills.

    By default the memory and speed of every context are predicted from three short calibration cases, and
    full runs confirm only the boundaries; the answer prints both the prediction and the measurement.
    With --users, the largest context per user count: "fits 4 users at context C".
    """
    keep_pandas_out()
    info = inspect_artifact(artifact)
    runtime = runtime or FORMAT_RUNTIMES.get(info.format)
    limit = min(max_context or info.context_length or 8192, info.context_length or max_context or 8192)
    smallest = min(min_context, limit)
    base = {
        "name": f"fit-{artifact.stem}".replace(".", "_"),
        "models": [{"artifact": str(artifact.resolve()), "runtime": runtime, "label": artifact.stem,
                    "options": option_values(options)}],
        "contexts": [smallest], "fill": fill, "gen_tokens": gen_tokens, "repetitions": repetitions,
        "warmup": 1, "timeout": timeout,
    }
    if budget:
        base["budget"] = size_option("--budget", budget)
    sc = parse_scenario(base, source="fitbench fit")
    budget_bytes = sc.budgets[0]
    if thresholds:
        sc = replace(sc, thresholds=threshold_options(sc.thresholds, thresholds))
    wf = _workflow_option(workflow_text, gen_tokens) if workflow_text else None
    users = _users_option(users_text) if users_text else [1]
    if wf is not None and users != [1]:
        raise UsageError("--users and --workflow: parallel sessions are single-prompt sessions; use one of them")
    if wf is not None:
        try:
            workflow_at(wf, smallest, fill)  # the smallest probe must hold the session
        except ValueError as exc:
            raise UsageError(f"--workflow: {exc}") from None
        sc = replace(sc, name=f"{sc.name}-{wf.kind}{wf.turns}")
    artifacts = check_scenario(sc)
    out = check_output_dir(output_dir)
    console = make_console()
    run_id = new_run_id()
    writer = ResultWriter(out / f"{sc.name}-{run_id}.parquet")
    mach = machine_mod.fingerprint()
    budget_text = f"{budget_bytes / 2**20:,.0f} MiB budget" if budget_bytes else f"{mib(mach.ram_bytes)} MiB RAM"
    probe_text = f"a {wf.kind} session of {wf.turns} turns filling {fill:.0%}" if wf else f"filled {fill:.0%}"
    console.print(Markup("[bold]fitbench fit[/] " + escape(
        f"{artifact.name} in {runtime} on {mach.machine_class}, {budget_text}, contexts {smallest:,}..{limit:,} "
        f"{probe_text}; results -> {writer.results_path}")))
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    hashes = ArtifactHashes()
    count = 0

    n_users = 1

    def run_one(case) -> tuple[list[dict], float]:
        nonlocal count
        case = replace(case, index=count)
        count += 1
        with console.status(escape(f"running {case.label}")):
            try:
                result = run_case(case, artifacts[case.artifact], mach, run_id, hashes)
            except SuiteInterrupted as stop:
                record(writer, stop.args[0], run_id)
                raise
        record(writer, result, run_id)
        return result.rows, result.wall_s

    def probe(n_ctx: int) -> tuple[str | None, str]:
        probe_sc = replace(sc, contexts=[n_ctx])
        if wf is not None:
            probe_sc = replace(probe_sc, workflows=[workflow_at(wf, n_ctx, fill)])
        rows, _ = run_one(replace(probe_sc.cases()[0], parallel=n_users))
        cls, reason = users_verdict(rows, n_users)
        console.print(Markup(f"  ctx {n_ctx:>6,}: {fit_markup(cls)} - {escape(reason)}"))
        return cls, reason

    started = time.perf_counter()
    answer, answers = None, []
    try:
        if method == "predict" and wf is None and users == [1]:
            try:
                answer = predicted_fit(console, sc.cases()[0], run_one, limit, smallest, step,
                                       budget_bytes or mach.ram_bytes, confirm_what)
            except CalibrationFailed as exc:
                make_console(stderr=True).print(f"fitbench fit: {exc}; searching with full runs instead")
        if answer is None:
            ceiling = limit
            for n_users in users:
                if len(users) > 1:
                    console.print(f"{n_users} user{'s' if n_users != 1 else ''}:")
                found = search(probe, min(smallest, ceiling), ceiling, step)
                answers.append((n_users, found))
                if found.max_fit is None:
                    break  # more users cannot fit where fewer did not
                ceiling = found.max_fit  # more users never fit a larger context
    except (SuiteInterrupted, KeyboardInterrupt):
        make_console(stderr=True).print("fitbench: interrupted; the probes so far are saved")
        sys.exit(EXIT_INTERRUPTED)
    if answer is not None:
        for line in answer_lines(answer):
            console.print(line)
        console.print(f"{count} case(s) run ({len(answer.calibration)} short calibration, "
                      f"{len(answer.points)} full) for {len(answer.predicted)} contexts predicted, "
                      f"in {duration(time.perf_counter() - started)}")
        console.print(Markup(f"[bold]{escape(artifact.name)}[/]: {escape(answer.summary())}"))
    else:
        console.print(f"{count} full case(s) run in {duration(time.perf_counter() - started)}")
        for n_users, found in answers:
            who = f" with {n_users} user{'s' if n_users != 1 else ''}" if users != [1] else ""
            console.print(Markup(f"[bold]{escape(artifact.name)}[/]{escape(who)}: {escape(found.summary())}"))
    console.print(f"results: {writer.results_path}")


def users_verdict(rows: list[dict], n_users: int) -> tuple[str | None, str]:
    """A probe's class: the case's fit class; with parallel sessions, a case that fits in memory but
    misses the serving targets (p90 TTFT, tok/s per user) is ``slow``, with the serving reason."""
    cls, reason = case_verdict(rows)
    if n_users <= 1:
        return cls, reason
    serves, serving_reason = case_serving(rows)
    if serves is False and cls in ("fits", "tight"):
        return "slow", serving_reason
    return cls, serving_reason or reason


def _users_option(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        raise UsageError(f"--users {text!r}: give comma-separated user counts like 1,2,4") from None
    if not values or values[0] < 1 or values[-1] > MAX_PARALLEL:
        raise UsageError(f"--users {text!r}: user counts go from 1 to {MAX_PARALLEL}")
    return values


def _workflow_option(text: str, reply_tokens: int) -> Workflow:
    """``chat:10``, ``document:5``, or a scenario file whose (first) workflow gives the shape."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        sc = load_scenario(path)
        if not sc.workflows:
            raise UsageError(f"--workflow {text}: the scenario has no 'workflow:'; add one or write chat:10")
        return sc.workflows[0]
    return parse_workflow_option(text, reply_tokens)  # a WorkflowError says what is wrong
