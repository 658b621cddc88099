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
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness import machine as machine_mod
from harness.fleet import FleetError
from harness.fit import THRESHOLD_HELP, Thresholds, case_verdict, parse_size
from harness.metrics import summarize
from harness.preflight import OutputError, check_output_dir, check_scenario
from harness.results import ResultsError, ResultWriter, read_results
from harness.scenario import ScenarioError, load_scenario, parse_contexts
from harness.artifact import ArtifactError, inspect_artifact
from harness.compare import BY_COLUMNS, CompareError, Side, compare, cross_table, expand, split_by, table_rows, to_json
from harness.report import ReportError, build
from harness.catalog import DEFAULT_CATALOG, CatalogError, load_catalog, options_label, query, save_catalog, update_catalog
from harness.estimate import EstimateError, estimate
from harness.fitsearch import search, workflow_at
from harness.workflow import Workflow, WorkflowError, parse_workflow_option
from harness.resume import RunLock, latest_results, load_for_resume
from harness.scenario import parse_scenario
from harness.suite import ArtifactHashes, CaseResult, SuiteInterrupted, new_run_id, record, run_case, run_suite
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


def scenario_overrides(command):
    """The options `run` and `fleet run` share to override what a scenario file says."""
    for option in reversed([
        click.option("--repetitions", "-r", type=click.IntRange(min=1), help="override the scenario's repetitions"),
        click.option("--contexts", "-c", help="override the scenario's contexts, e.g. 512,2048"),
        click.option("--gen-tokens", "-n", type=click.IntRange(min=2), help="override tokens generated per repetition"),
        click.option("--timeout", type=click.FloatRange(min=1), help="override seconds allowed per case"),
    ]):
        command = option(command)
    return command


@cli.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="folder for the results files")
@scenario_overrides
@click.option("--budget", help="memory the cases may use, e.g. 8GiB; enforced with a cgroup where possible")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="override a fit threshold, e.g. --threshold min_decode_tok_s=20 (see `fitbench thresholds`)")
@click.option("--resume", is_flag=True,
              help="continue the latest run of this scenario in OUTPUT: skip finished cases, rerun the rest")
@click.option("--force", is_flag=True, help="run cases even when their estimated memory is far above what is free")
def run(scenario: Path, output_dir: Path, repetitions: int | None, contexts: str | None,
        gen_tokens: int | None, timeout: float | None, budget: str | None, thresholds: tuple[str, ...],
        resume: bool, force: bool) -> None:
    """Run SCENARIO (a YAML file) and write results to OUTPUT."""
    sc = _with_overrides(load_scenario(scenario), repetitions, contexts, gen_tokens, timeout, budget, thresholds)
    artifacts = check_scenario(sc)
    out = check_output_dir(output_dir)
    cases = sc.cases()
    if not cases:
        fail(f"{scenario}: the scenario expands to no cases; check contexts and prompt_tokens")

    run_id = new_run_id()
    previous = latest_results(out, sc.name) if resume else None
    writer = ResultWriter(previous or out / f"{sc.name}-{run_id}.parquet")
    with RunLock(writer.results_path):
        todo = cases
        if previous is not None:
            run_id, kept, timeline, done = load_for_resume(previous, cases)
            writer.keep(kept, timeline)
            todo = [c for c in cases if c.key not in done]
            console.print(f"resuming {previous.name}: {len(cases) - len(todo)} of {len(cases)} case(s) already done")
        elif resume:
            console.print(f"nothing to resume in {out} for scenario {sc.name}; starting a new run")
        _run_cases(sc, todo, len(cases), artifacts, writer, run_id, force)


def _with_overrides(sc, repetitions: int | None, contexts: str | None, gen_tokens: int | None,
                    timeout: float | None, budget: str | None, thresholds: tuple[str, ...]):
    """The scenario with the command line's overrides applied (shared by run and fleet run)."""
    overrides: dict = {}
    if budget:
        overrides["budgets"] = [_size_option("--budget", budget)]
    if thresholds:
        overrides["thresholds"] = _threshold_options(sc.thresholds, thresholds)
    if repetitions:
        overrides["repetitions"] = repetitions
    if contexts:
        try:
            overrides["contexts"] = parse_contexts(contexts)
        except ValueError as exc:
            fail(str(exc))
    if gen_tokens:
        if sc.workflows:
            fail("--gen-tokens: this scenario runs a workflow, which sets its own reply_tokens; change it there")
        overrides["gen_tokens"] = gen_tokens
    if timeout:
        overrides["timeout"] = timeout
    return replace(sc, **overrides)


def _run_cases(sc, cases: list, total: int, artifacts: dict, writer: ResultWriter, run_id: str, force: bool) -> None:
    mach = machine_mod.fingerprint()
    console.print(f"[bold]fitbench[/] {sc.name}: {len(cases)} case(s) to run on {mach.machine_class} "
                  f"({mach.cpu_model}), results -> {writer.results_path}")

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    results: list[CaseResult] = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
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
        progress.console.print(_case_line(result, total))

    interrupted = False
    with progress:
        try:
            run_suite(cases, artifacts, mach, writer, run_id, on_progress=on_progress, on_case_end=on_case_end,
                      force=force, on_note=lambda text: progress.console.print(text))
        except (SuiteInterrupted, KeyboardInterrupt):
            interrupted = True
    _summary_table(results)
    console.print(f"results: {writer.results_path}\ntimeline: {writer.timeline_path}")
    if interrupted:
        err_console.print(f"fitbench: interrupted after {len(results)} of {len(cases)} case(s); results so far are "
                          f"saved; continue with: fitbench run {sc.source} -o {writer.results_path.parent} --resume")
        sys.exit(EXIT_INTERRUPTED)


@cli.command()
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
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE", help="runner option, e.g. --option flash_attn=true")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE", help="override a fit threshold")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="seconds per probe")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--workflow", "workflow_text", metavar="chat:TURNS|document:QUESTIONS|SCENARIO",
              help="probe with a multi-turn session filling each context (replies of --gen-tokens), or the first "
                   "workflow of a scenario file; the verdict is the worst turn's")
def fit(artifact: Path, runtime: str | None, budget: str | None, fill: float, gen_tokens: int, repetitions: int,
        min_context: int, max_context: int | None, step: int, options: tuple[str, ...], thresholds: tuple[str, ...],
        timeout: float, output_dir: Path, workflow_text: str | None) -> None:
    """Find the largest context at which ARTIFACT still fits (and where it turns tight, slow, spill, no_fit)."""
    try:
        info = inspect_artifact(artifact)
    except ArtifactError as exc:
        fail(str(exc))
    runtime = runtime or FORMAT_RUNTIMES.get(info.format)
    limit = min(max_context or info.context_length or 8192, info.context_length or max_context or 8192)
    base = {
        "name": f"fit-{artifact.stem}".replace(".", "_"),
        "models": [{"artifact": str(artifact.resolve()), "runtime": runtime, "label": artifact.stem,
                    "options": _option_values(options)}],
        "contexts": [min(min_context, limit)], "fill": fill, "gen_tokens": gen_tokens, "repetitions": repetitions,
        "warmup": 1, "timeout": timeout,
    }
    if budget:
        base["budget"] = _size_option("--budget", budget)
    sc = parse_scenario(base, source="fitbench fit")
    budget_bytes = sc.budgets[0]
    if thresholds:
        sc = replace(sc, thresholds=_threshold_options(sc.thresholds, thresholds))
    wf = _workflow_option(workflow_text, gen_tokens) if workflow_text else None
    if wf is not None:
        try:
            workflow_at(wf, min(min_context, limit), fill)  # the smallest probe must hold the session
        except ValueError as exc:
            fail(f"--workflow: {exc}")
        sc = replace(sc, name=f"{sc.name}-{wf.kind}{wf.turns}")
    artifacts = check_scenario(sc)
    out = check_output_dir(output_dir)
    run_id = new_run_id()
    writer = ResultWriter(out / f"{sc.name}-{run_id}.parquet")
    mach = machine_mod.fingerprint()
    budget_text = f"{budget_bytes / 2**20:,.0f} MiB budget" if budget_bytes else f"{mib(mach.ram_bytes)} MiB RAM"
    probe_text = f"a {wf.kind} session of {wf.turns} turns filling {fill:.0%}" if wf else f"filled {fill:.0%}"
    console.print(f"[bold]fitbench fit[/] {artifact.name} in {runtime} on {mach.machine_class}, {budget_text}, "
                  f"contexts {min(min_context, limit):,}..{limit:,} {probe_text}; results -> {writer.results_path}")
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    hashes = ArtifactHashes()
    count = 0

    def probe(n_ctx: int) -> tuple[str | None, str]:
        nonlocal count
        probe_sc = replace(sc, contexts=[n_ctx])
        if wf is not None:
            probe_sc = replace(probe_sc, workflows=[workflow_at(wf, n_ctx, fill)])
        case = replace(probe_sc.cases()[0], index=count)
        count += 1
        with console.status(f"probing context {n_ctx:,} ({case.label})"):
            try:
                result = run_case(case, artifacts[case.artifact], mach, run_id, hashes)
            except SuiteInterrupted as stop:
                record(writer, stop.args[0], run_id)
                raise
        record(writer, result, run_id)
        cls, reason = case_verdict(result.rows)
        console.print(f"  ctx {n_ctx:>6,}: {FIT_STYLE.get(cls or '', '{}').format(cls or 'no verdict')} - {reason}")
        return cls, reason

    try:
        found = search(probe, min(min_context, limit), limit, step)
    except (SuiteInterrupted, KeyboardInterrupt):
        err_console.print("fitbench: interrupted; the probes so far are saved")
        sys.exit(EXIT_INTERRUPTED)
    console.print(f"[bold]{artifact.name}[/]: {found.summary()}")
    console.print(f"results: {writer.results_path}")


FORMAT_RUNTIMES = {"gguf": "llama.cpp", "hf": "torch", "onnx": "onnxruntime", "mlx": "mlx"}


def _workflow_option(text: str, reply_tokens: int) -> Workflow:
    """``chat:10``, ``document:5``, or a scenario file whose (first) workflow gives the shape."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        sc = load_scenario(path)
        if not sc.workflows:
            fail(f"--workflow {text}: the scenario has no 'workflow:'; add one or write chat:10")
        return sc.workflows[0]
    try:
        return parse_workflow_option(text, reply_tokens)
    except WorkflowError as exc:
        fail(str(exc))
        raise


@cli.group()
def catalog() -> None:
    """The catalog of artifacts and measured fits (catalog.yaml)."""


CATALOG_OPTION = click.option("--catalog", "catalog_path", type=click.Path(path_type=Path), default=DEFAULT_CATALOG,
                              show_default=True, envvar="FITBENCH_CATALOG", help="catalog file")


def _read_result_files(patterns: tuple[str, ...]) -> list[tuple[str, list[dict]]]:
    try:
        paths = expand(list(patterns))
    except CompareError as exc:
        fail(str(exc))
    return [(str(path), read_results(path).to_pylist()) for path in paths]


@catalog.command("update")
@click.argument("results", nargs=-1, required=True)
@CATALOG_OPTION
def catalog_update(results: tuple[str, ...], catalog_path: Path) -> None:
    """Fold measured fits from RESULTS (Parquet files, globs or folders) into the catalog."""
    cat = load_catalog(catalog_path)
    tables = _read_result_files(results)
    counts = update_catalog(cat, tables)
    save_catalog(cat)
    console.print(f"{catalog_path}: {counts['added']} added, {counts['updated']} updated, "
                  f"{counts['unchanged']} already there, {counts['skipped']} without a verdict "
                  f"(from {len(tables)} file(s)); {len(cat.artifacts)} artifact(s), {len(cat.fits)} fit(s)")


@catalog.command("pull")
@click.argument("url")
@CATALOG_OPTION
@click.option("--machine-class", help="only fits for this machine class (default: every class)")
@click.option("--retries", type=click.IntRange(1, 20), default=4, show_default=True, help="attempts before giving up")
def catalog_pull(url: str, catalog_path: Path, machine_class: str | None, retries: int) -> None:
    """Merge community fits from an upstream at URL into the catalog, marked as community-measured.

    Local measurements are never overwritten: community entries carry options 'community',
    their sample and machine counts, and are replaced by the next pull.
    """
    from harness.community import merge_community
    from harness.contribute import ContributeError, Retry, fetch_fits

    cat = load_catalog(catalog_path)
    try:
        data = fetch_fits(url, Retry(attempts=retries), lambda msg: err_console.print(f"fitbench: {msg}"),
                          machine_class=machine_class)
    except ContributeError as exc:
        fail(str(exc))
    counts = merge_community(cat, data, url)
    save_catalog(cat)
    console.print(f"{catalog_path}: community fits from {url}: {counts['added']} added, {counts['updated']} updated, "
                  f"{counts['unchanged']} unchanged, {counts['skipped']} malformed skipped; "
                  f"{counts['local_alongside']} sit next to local measurements, which are kept as they are")


@catalog.command("show")
@CATALOG_OPTION
@click.option("--machine-class", help="default: this machine's class; 'all' for every class")
@click.option("--context", type=click.IntRange(min=1), help="what fits at this context (the smallest measured at or above it)")
@click.option("--budget", help="judge the measured peaks against this memory size, e.g. 8GiB")
def catalog_show(catalog_path: Path, machine_class: str | None, context: int | None, budget: str | None) -> None:
    """What fits on this machine (class), at what context, how fast."""
    cat = load_catalog(catalog_path)
    if not cat.fits:
        fail(f"{catalog_path} has no measured fits yet; run `fitbench catalog update results/` first")
    mc = None if machine_class == "all" else machine_class or machine_mod.fingerprint().machine_class
    budget_bytes = _size_option("--budget", budget) if budget else None
    rows = query(cat, mc, context, budget_bytes)
    if not rows:
        fail(f"no fits measured for machine class {mc!r}" + (f" at context {context} or more" if context else "")
             + f"; classes in the catalog: {', '.join(sorted({f['machine_class'] for f in cat.fits}))}")
    title = f"catalog: {mc or 'all machine classes'}" + (f", context >= {context:,}" if context else "")
    table = Table(title=title + (f", judged against {budget}" if budget else ""))
    cols = ["artifact", *(["machine"] if mc is None else []), "runtime", "options", "n_ctx", "prompt", "budget MiB",
            "fit", *(["at budget"] if budget else []), "peak MiB", "tg tok/s", "TTFT s",
            *(["PPL", "KL", "top-1", "tasks"] if any("quality_text" in f for f in rows) else []), "runs"]
    for col in cols:
        table.add_column(col, no_wrap=col not in ("artifact",))
    for f in rows:
        fit_cls = f["fit_class"]
        table.add_row(f["artifact"], *([f["machine_class"]] if mc is None else []), f["runtime"],
                      options_label(f.get("options")), f"{f['n_ctx']:,}", _prompt_label(f),
                      mib(f.get("budget_bytes")) if f.get("budget_bytes") else "RAM",
                      FIT_STYLE.get(fit_cls, "{}").format(fit_cls),
                      *([FIT_STYLE.get(f["budget_verdict"], "{}").format(f["budget_verdict"])] if budget else []),
                      mib(f.get("peak_rss_bytes")), _fmt(f.get("decode_tok_s"), "{:,.1f}"),
                      _fmt(f.get("ttft_s"), "{:,.2f}"),
                      *([_fmt(f.get("quality_ppl"), "{:,.2f}"), _fmt(f.get("quality_kl"), "{:.4f}"),
                         _fmt(f.get("quality_top1"), "{:.1%}"), _fmt(f.get("task_pass_rate"), "{:.0%}")]
                        if "PPL" in cols else []),
                      str(f.get("count", 1)))
    console.print(table)


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


@cli.command("compare")
@click.argument("baseline")
@click.argument("candidates", nargs=-1)
@click.option("--threshold", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="percent a significant change must exceed to count as a regression")
@click.option("--fail-on-regression", "fail_pct", type=float, is_flag=False, flag_value=-1.0,
              default=None, metavar="[PCT]",
              help="exit 1 on any significant regression beyond PCT percent (default: --threshold)")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--all", "show_all", is_flag=True, help="show every metric, not only changes beyond noise")
@click.option("--by", "by", type=click.Choice(list(BY_COLUMNS)),
              help="cross-machine view: split all the given results (e.g. a fleet dataset) by this column, "
                   "show every case side by side per value, and compare each value with the first")
@click.option("--baseline", "by_baseline", metavar="VALUE", help="with --by: the value the others are compared with")
def compare_cmd(baseline: str, candidates: tuple[str, ...], threshold: float, fail_pct: float | None, fmt: str,
                show_all: bool, by: str | None, by_baseline: str | None) -> None:
    """Compare result files: BASELINE against each CANDIDATE (files, globs or folders).

    Cases match on artifact, runtime, options (thread counts excepted), context, prompt and
    generation lengths and budget. Changes are tested for significance over the repetitions
    (Welch's t-test, 95%); fit-class changes are always shown.

    With --by machine_class, every argument is read together (a fleet dataset folder, or the
    results of several machines) and split into one side per machine class: "Mac vs GPU PC".
    """
    if by is None and not candidates:
        fail("compare needs a BASELINE and at least one CANDIDATE, or --by machine_class to compare the "
             "machine classes inside the results (e.g. a fleet dataset)")
    if by_baseline is not None and by is None:
        fail("--baseline VALUE goes with --by COLUMN")
    if fail_pct == -1.0:  # given without a value
        fail_pct = threshold
    elif fail_pct is not None and fail_pct < 0:
        fail(f"--fail-on-regression takes a percentage of at least 0, got {fail_pct:g}")
    if fail_pct is not None:
        threshold = fail_pct
    matrix = None
    try:
        if by is not None:
            sides = split_by(expand([baseline, *candidates]), by, by_baseline)
            matrix = cross_table(sides)
            comparisons = [compare(sides[0], other, threshold) for other in sides[1:]]
        else:
            base = Side(baseline, expand([baseline]))
            comparisons = [compare(base, Side(c, expand([c])), threshold) for c in candidates]
    except CompareError as exc:
        fail(str(exc))
    if fmt == "json":
        text = to_json(comparisons, threshold)
        if matrix is not None:  # with --by: one object, the matrix plus the pairwise comparisons
            text = json.dumps({"by": by, "sides": matrix[0], "matrix": matrix[1],
                               "comparisons": json.loads(text)}, indent=2, default=str)
        click.echo(text)
    else:
        if matrix is not None:
            _print_matrix(by, *matrix, fmt)
        for cmp in comparisons:
            _print_comparison(cmp, fmt, show_all, threshold)
    regressions = sum(len(c.regressions(threshold)) for c in comparisons)
    if fail_pct is not None and regressions:
        err_console.print(f"fitbench: {regressions} significant regression(s) beyond {threshold:g}%")
        sys.exit(1)


def _print_matrix(by: str, labels: list[str], rows: list[dict], fmt: str) -> None:
    """Cases down, one column per machine class: fit class, decode tok/s, TTFT and peak memory side by side."""
    values = [label.removeprefix(f"{by}=") for label in labels]

    def cell(m: dict | None) -> str:
        if m is None:
            return "not measured"
        parts = [m["fit"] or "-"]
        if m["decode_tok_s"] is not None:
            parts.append(f"{m['decode_tok_s']:,.1f} tok/s")
        if m["ttft_s"] is not None:
            parts.append(f"TTFT {m['ttft_s']:,.2f} s")
        if m["peak_rss_bytes"] is not None:
            parts.append(f"{mib(m['peak_rss_bytes'])} MiB")
        return ", ".join(parts)

    header = ["case", *values]
    body = [[r["case"], *[cell(r[label]) for label in labels]] for r in rows]
    if fmt == "csv":
        import csv

        out = csv.writer(sys.stdout)
        out.writerow(header)
        out.writerows(body)
        return
    if fmt == "markdown":
        lines = [f"### by {by}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        click.echo("\n".join(lines) + "\n")
        return
    table = Table(title=f"by {by}: fit class, decode, TTFT, peak RSS (medians)")
    for col in header:
        table.add_column(col)
    for b in body:
        table.add_row(*b)
    console.print(table)


def _print_comparison(cmp, fmt: str, show_all: bool, threshold: float) -> None:
    rows = [r for r, raw in zip(table_rows(cmp), cmp.rows)
            if show_all or raw["kind"] == "fit" or raw.get("significant") or raw.get("significant") is None]
    header = f"{cmp.baseline.label} -> {cmp.candidate.label}"
    lines = [f"note: {n}" for n in cmp.notes]
    if cmp.unmatched_baseline:
        lines.append(f"only in baseline ({len(cmp.unmatched_baseline)}): " + "; ".join(cmp.unmatched_baseline[:10]))
    if cmp.unmatched_candidate:
        lines.append(f"only in candidate ({len(cmp.unmatched_candidate)}): " + "; ".join(cmp.unmatched_candidate[:10]))
    regressions = cmp.regressions(threshold)
    summary = (f"{len({r['case'] for r in cmp.rows})} matched case(s); {len(regressions)} regression(s) beyond "
               f"{threshold:g}%" + ("" if show_all else "; changes within noise hidden (--all shows them)"))
    cols = ["case", "metric", "baseline", "candidate", "change", "n", "verdict"]
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
        return
    if fmt == "markdown":
        out = [f"### {header}", "", *[f"- {line}" for line in lines], f"- {summary}", "",
               "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
        click.echo("\n".join(out))
        return
    table = Table(title=header, caption=summary)
    for col in cols:
        table.add_column(col, justify="right" if col in ("baseline", "candidate", "change", "n") else "left")
    for r in rows:
        style = "bold red" if r["verdict"] in ("REGRESSION", "WORSE FIT") else "green" if r["verdict"] == "better" else None
        table.add_row(*[r[c] for c in cols], style=style)
    for line in lines:
        console.print(f"[yellow]{line}[/]")
    if rows:
        console.print(table)
    else:
        console.print(f"{header}: {summary}")


@cli.command("report")
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("results/report.html"),
              show_default=True, help="the HTML file to write (self-contained: opens offline)")
@click.option("--png", "png_dir", type=click.Path(path_type=Path), help="also write each plot as a PNG here")
@click.option("--case", help="whose timeline to plot: index, case key or part of a label (default: largest peak)")
def report_cmd(results: tuple[str, ...], out: Path, png_dir: Path | None, case: str | None) -> None:
    """Plots and tables from RESULTS (files, globs or folders) as one HTML file."""
    try:
        paths = expand(list(results))
        plots = build(paths, out, png_dir, case)
    except (CompareError, ReportError) as exc:
        fail(str(exc))
    console.print(f"report: {out} ({len(plots)} plots)" + (f"; PNGs in {png_dir}" if png_dir else ""))


@cli.command("estimate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--context", "-c", "contexts", required=True, help="context length(s), e.g. 2048 or 512,2048,8192")
@click.option("--runtime", help="default: the one for the artifact's format")
@click.option("--kv-type", default="f16", show_default=True, help="KV cache element type")
@click.option("--flash-attn", is_flag=True, help="flash attention (no materialised score matrix)")
@click.option("--fill", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="filled fraction of the context")
@click.option("--budget", help="judge the estimate against this memory size (default: this machine's RAM)")
@click.option("--results", "result_files", multiple=True, help="result files to compare the estimate with (globs, folders)")
def estimate_cmd(artifact: Path, contexts: str, runtime: str | None, kv_type: str, flash_attn: bool, fill: float,
                 budget: str | None, result_files: tuple[str, ...]) -> None:
    """Predict peak memory and the memory verdict from ARTIFACT's metadata; compare with measurements."""
    try:
        info = inspect_artifact(artifact)
        n_ctxs = parse_contexts(contexts)
    except (ArtifactError, ValueError) as exc:
        fail(str(exc))
    runtime = runtime or FORMAT_RUNTIMES.get(info.format, "llama.cpp")
    budget_bytes = _size_option("--budget", budget) if budget else machine_mod.fingerprint().ram_bytes
    measured: dict[int, int] = {}
    if result_files:
        for _, rows in _read_result_files(result_files):
            for row in rows:
                if (row.get("artifact_name") == info.name and row.get("runtime") == runtime and row.get("peak_rss_bytes")
                        and row.get("status") == "ok" and (row.get("fill") is None or abs(row["fill"] - fill) < 1e-6)):
                    measured[row["n_ctx"]] = max(measured.get(row["n_ctx"], 0), row["peak_rss_bytes"])
    table = Table(title=f"estimate: {info.name} in {runtime}, KV {kv_type}{', flash attention' if flash_attn else ''}, "
                        f"{fill:.0%} filled, budget {mib(budget_bytes)} MiB")
    for col in ("n_ctx", "weights MiB", "KV MiB", "compute MiB", "overhead MiB", "total MiB", "verdict", "measured MiB",
                "error"):
        table.add_column(col, justify="right")
    th = Thresholds()
    for n in n_ctxs:
        try:
            e = estimate(info, n, runtime, kv_type, flash_attn, fill=fill)
        except EstimateError as exc:
            fail(str(exc))
        verdict = "no_fit" if e.total_bytes > budget_bytes else "tight" if e.total_bytes > (1 - th.headroom) * budget_bytes else "fits"
        m = measured.get(n)
        table.add_row(f"{n:,}", mib(e.weights_bytes), mib(e.kv_bytes), mib(e.compute_bytes), mib(e.overhead_bytes),
                      mib(e.total_bytes), FIT_STYLE[verdict].format(verdict), mib(m) if m else "-",
                      f"{(e.total_bytes - m) / m:+.1%}" if m else "-")
    console.print(table)


def _prompt_label(fit: dict) -> str:
    """Prompt tokens of a catalog fit; a workflow's shape, e.g. '2288 (chat, 10 turns)'."""
    text = str(fit.get("prompt_tokens") or "-")
    try:
        wf = json.loads(fit["workflow"]) if fit.get("workflow") else None
    except (TypeError, ValueError):
        wf = None
    if isinstance(wf, dict):
        text += f" ({wf.get('kind')}, {wf.get('turns') or wf.get('questions')} turns)"
    return text
@cli.command("contribute")
@click.argument("results", nargs=-1, required=True)
@click.option("--to", "url", envvar="FITBENCH_UPSTREAM", metavar="URL",
              help="upstream to send to, e.g. http://127.0.0.1:8765 (env FITBENCH_UPSTREAM)")
@click.option("--out", "out", type=click.Path(path_type=Path), help="also write the bundle here (.tar.gz), "
              "for offline or pull-request submission")
@click.option("--dry-run", is_flag=True, help="show what would be sent and stop: nothing is written or sent")
@click.option("--yes", "-y", is_flag=True, help="consent without the prompt (for scripts)")
@click.option("--token", envvar="FITBENCH_TOKEN", help="submitter token (env FITBENCH_TOKEN; default: the one "
              "stored for this upstream, or a new one asked from it)")
@click.option("--retries", type=click.IntRange(1, 20), default=5, show_default=True, help="upload attempts")
def contribute_cmd(results: tuple[str, ...], url: str | None, out: Path | None, dry_run: bool, yes: bool,
                   token: str | None, retries: int) -> None:
    """Send RESULTS (result files, globs, folders or saved bundles) upstream, anonymised.

    Host and user names, paths and serials are stripped; machine class, a re-hashed
    machine id, runtime versions, artifact sha256 and the raw timelines are kept so the
    upstream can check and recompute the figures. Shows what will be sent and asks first.
    """
    from harness import bundle as bundle_mod
    from harness.contribute import ContributeError, Retry, build, parse_token, send, stored_token, summary

    paths: list[Path] = []
    try:
        for item in results:
            paths += [Path(item)] if item.endswith(".tar.gz") else expand([item])
        built = build(paths)
    except (CompareError, ContributeError, bundle_mod.BundleError) as exc:
        fail(str(exc))
    for line in summary(built):
        console.print(line, markup=False, highlight=False)
    if dry_run:
        console.print("dry run: nothing written, nothing sent")
        return
    if not url and not out:
        fail("say where the bundle goes: --to URL (or set FITBENCH_UPSTREAM) and/or --out bundle.tar.gz")
    if not yes:
        if not sys.stdin.isatty():
            fail("no terminal to ask for consent: read the summary above and pass --yes to send it")
        if not click.confirm(f"send these {len(built.doc['rows'])} row(s)" + (f" to {url}" if url else "")
                             + (f" and write {out}" if out else "") + "?", default=False):
            err_console.print("fitbench: nothing sent")
            sys.exit(1)
    say = lambda msg: err_console.print(f"fitbench: {msg}")  # noqa: E731
    retry = Retry(attempts=retries)
    doc = built.doc
    try:
        known = token or (stored_token(url) if url else None)
        if out:
            if known and not doc.get("signature"):
                doc = bundle_mod.sign(doc, *parse_token(known))
            bundle_mod.write_bundle_file(doc, out)
            console.print(f"bundle written: {out}" + ("" if known else " (unsigned: it is signed when sent)"))
        if url:
            answer = send(doc, url, token, retry, say)
    except ContributeError as exc:
        saved = out if out and out.exists() else _save_unsent(doc, paths[0], built.content_hash)
        fail(f"{exc}; the bundle is saved as {saved}: send it later with fitbench contribute {saved} --to URL")
    if url:
        what = "already there (nothing added)" if answer.get("duplicate") else \
            f"{answer.get('new_rows')} new row(s), {answer.get('duplicate_rows')} already there"
        console.print(f"sent to {url}: bundle {built.content_hash[:16]}: {what}")


def _save_unsent(doc: dict, near: Path, digest: str) -> Path:
    from harness import bundle as bundle_mod

    for folder in (near.parent, Path.cwd()):
        try:
            return bundle_mod.write_bundle_file(doc, folder / f"contribute-{digest[:12]}.tar.gz")
        except OSError:
            continue
    return Path("(could not be saved: no writable folder)")


@cli.group()
def upstream() -> None:
    """The reference upstream service that collects contributed measurements."""


@upstream.command("serve")
@click.option("--db", "db", type=click.Path(path_type=Path), default=Path("upstream.sqlite"), show_default=True,
              help="SQLite database (created if missing)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--max-body-mib", type=click.FloatRange(min=0.01), default=16, show_default=True,
              help="largest request body accepted")
@click.option("--tokens-per-minute", type=click.FloatRange(min=0.01), default=10, show_default=True,
              help="tokens one address may be issued")
@click.option("--bundles-per-minute", type=click.FloatRange(min=0.01), default=120, show_default=True,
              help="bundles one token may submit")
@click.option("--requests-per-minute", type=click.FloatRange(min=0.01), default=1200, show_default=True,
              help="submissions and queries one address may make")
def upstream_serve(db: Path, host: str, port: int, max_body_mib: float, tokens_per_minute: float,
                   bundles_per_minute: float, requests_per_minute: float) -> None:
    """Accept contribution bundles and serve aggregated community fits (GET /v1/fits) as JSON."""
    try:
        import uvicorn

        from harness.upstream.app import Config, create_app
        from harness.upstream.ratelimit import Limit
    except ImportError as exc:
        fail(f"the upstream server needs its extra ({exc.name} is missing): pip install 'fitbench[upstream]'")
    try:
        app = create_app(Config(db=db, max_body=int(max_body_mib * 2**20),
                                token_limit=Limit(tokens_per_minute, max(1, int(tokens_per_minute // 2))),
                                bundle_limit=Limit(bundles_per_minute, max(1, int(bundles_per_minute // 2))),
                                request_limit=Limit(requests_per_minute, max(1, int(requests_per_minute // 2)))))
    except Exception as exc:  # sqlite3.Error, OSError: an unusable database file
        fail(f"{db}: cannot open the database: {exc}")
    import socket

    try:  # a taken port is the user's to fix: say so in one line rather than in uvicorn's log
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host")
    console.print(f"fitbench upstream on http://{host}:{port} (database {db}); Ctrl-C stops it")
    uvicorn.run(app, host=host, port=port, log_level="info")


def _option_values(items: tuple[str, ...]) -> dict:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--option {item!r}: write it as NAME=VALUE, e.g. n_threads=4")
        values[name.strip()] = yaml.safe_load(value) if value else None
    return values


def _size_option(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        fail(f"{name}: {exc}")
        raise  # unreachable: fail() raises


def _threshold_options(base: Thresholds, items: tuple[str, ...]) -> Thresholds:
    values: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected NAME=VALUE")
            values[name.strip()] = float(value)
        except ValueError:
            fail(f"--threshold {item!r}: write it as NAME=NUMBER, e.g. min_decode_tok_s=20")
    try:
        return base.merged(values)
    except ValueError as exc:
        fail(f"--threshold: {exc}")
        raise


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _case_line(r: CaseResult, total: int) -> str:
    head = f"[{r.case.index + 1}/{total}] {r.case.model_label} {r.case.label}"
    fit = case_verdict(r.rows)[0]
    if r.status != "ok":
        return f"{head}: [red]{r.status}[/] (fit: {fit or 'no verdict'}) {r.error}"
    ok_rows = [row for row in r.rows if row["status"] == "ok" and row.get("turn") is None]
    ttft = summarize([row["ttft_s"] for row in ok_rows])
    dec = summarize([row["decode_tok_s"] for row in ok_rows])
    first = ok_rows[0]
    gpu = ""  # GPU cases: the process's GPU memory (NVML) and the allocator's peak, where known
    if first.get("gpu_proc_peak_bytes") is not None:
        gpu = f", GPU {mib(first.get('gpu_proc_peak_bytes'))} MiB (allocator {mib(first.get('runtime_peak_bytes'))})"
    elif first.get("runtime_peak_bytes") is not None:  # e.g. MLX on a CPU: its allocator, no GPU
        gpu = f", allocator peak {mib(first['runtime_peak_bytes'])} MiB"
    if first.get("offload_host_bytes"):
        gpu += f", {mib(first['offload_host_bytes'])} MiB of weights on the host"
    return (f"{head}: [green]ok[/] {FIT_STYLE.get(fit, '{}').format(fit)} · TTFT {ttft.median * 1000:,.0f} ms, decode {dec.median:,.1f} tok/s, "
            f"peak RSS {mib(r.peak_rss)} MiB (VmHWM {mib(r.vmhwm)}){gpu}, {r.wall_s:.1f} s{_quality_text(first)}")


def _quality_text(row: dict) -> str:
    """' · PPL 14.2, KL 0.012, top-1 96%, tasks 4/5' for a case with a quality probe."""
    parts = []
    if row.get("quality_ppl") is not None:
        parts.append(f"PPL {row['quality_ppl']:,.2f}")
    if row.get("quality_kl_mean") is not None:
        parts.append(f"KL {row['quality_kl_mean']:.4f}, top-1 {row['quality_top1_agree']:.1%}")
    if row.get("task_count"):
        parts.append(f"tasks {row['task_passed']}/{row['task_count']}")
    if row.get("quality_error"):
        parts.append(f"[yellow]quality: {row['quality_error']}[/]")
    return (" · " + ", ".join(parts)) if parts else ""


FIT_STYLE = {"fits": "[green]{}[/]", "tight": "[yellow]{}[/]", "degraded": "[yellow]{}[/]", "slow": "[yellow]{}[/]", "offload": "[magenta]{}[/]",
             "spill": "[red]{}[/]", "no_fit": "[bold red]{}[/]"}


def _quality_table(results: list[CaseResult]) -> None:
    """One line per artifact/runtime/options with a quality probe: quality next to memory and speed."""
    seen: dict[str, tuple[CaseResult, dict]] = {}
    for r in results:
        ok_rows = [row for row in r.rows if row["status"] == "ok"]
        if ok_rows and ok_rows[0].get("quality_text_id") and r.case.quality_group not in seen:
            seen[r.case.quality_group] = (r, ok_rows[0])
    if not seen:
        return
    ref = next((row.get("quality_reference") for _, row in seen.values() if row.get("quality_reference")), None)
    table = Table(title="quality" + (f" (KL and top-1 vs {ref})" if ref else ""))
    for col in ("model", "runtime", "size MiB", "peak MiB", "tg tok/s", "PPL", "PPL/ref", "KL", "KL p99", "top-1",
                "tasks", "fit"):
        table.add_column(col, justify="left" if col in ("model", "runtime", "fit") else "right", no_wrap=True)
    for r, row in seen.values():
        dec = summarize([x["decode_tok_s"] for x in r.rows if x["status"] == "ok"])
        fit = case_verdict(r.rows)[0] or "-"
        table.add_row(r.case.model_label, r.case.runtime, mib(row.get("artifact_size_bytes")), mib(r.peak_rss),
                      "-" if dec is None else f"{dec.median:,.1f}", _fmt(row.get("quality_ppl"), "{:,.3f}"),
                      _fmt(row.get("quality_ppl_ratio"), "{:.3f}"), _fmt(row.get("quality_kl_mean"), "{:.4f}"),
                      _fmt(row.get("quality_kl_p99"), "{:.3f}"), _fmt(row.get("quality_top1_agree"), "{:.1%}"),
                      f"{row['task_passed']}/{row['task_count']}" if row.get("task_count") else "-",
                      FIT_STYLE.get(fit, "{}").format(fit))
    console.print(table)
    text = next(row for _, row in seen.values())
    console.print(f"evaluation text: {text.get('quality_text_id')} sha256 {str(text.get('quality_text_sha256'))[:12]}…"
                  f", window {text.get('quality_window')} tokens; KL over the reference's top-{text.get('quality_top_k')}"
                  " tokens + a tail bucket (a lower bound)")


def _summary_table(results: list[CaseResult]) -> None:
    """Medians per case; like llama-bench's markdown, the model column only when it varies."""
    if not results:
        return
    show_model = len({r.case.model_label for r in results}) > 1
    table = Table(title="fitbench summary (medians over repetitions)")
    headers = ["#", *(["model"] if show_model else []), "case", "status", "fit", "TTFT ms", "pp tok/s", "tg tok/s",
               "peak MiB", "HWM MiB", "read MiB"]
    for col in headers:
        table.add_column(col, justify="left" if col in ("model", "case", "status", "fit") else "right", no_wrap=True)
    for r in results:
        ok_rows = [row for row in r.rows if row["status"] == "ok" and row.get("turn") is None]

        def med(key: str, scale: float = 1.0, fmt: str = "{:,.1f}") -> str:
            s = summarize([row[key] for row in ok_rows])
            return "-" if s is None else fmt.format(s.median * scale)

        dec = summarize([row["decode_tok_s"] for row in ok_rows])
        decode = "-" if dec is None else f"{dec.median:,.1f}±{dec.stdev:,.1f}"
        status = "[green]ok[/]" if r.status == "ok" else f"[red]{r.status}[/]"
        read = mib(max(row["read_bytes"] or 0 for row in ok_rows)) if ok_rows else "-"
        fit = case_verdict(r.rows)[0] or "-"
        table.add_row(str(r.case.index + 1), *([r.case.model_label] if show_model else []), r.case.label, status,
                      FIT_STYLE.get(fit, "{}").format(fit), med("ttft_s", 1000, "{:,.0f}"), med("prefill_tok_s"),
                      decode, mib(r.peak_rss), mib(r.vmhwm), read)
    console.print(table)
    _quality_table(results)
    if show_model is False:
        console.print(f"model: {results[0].case.model_label} ({results[0].case.runtime})")


@cli.command()
def thresholds() -> None:
    """Show the fit thresholds, their defaults and meaning."""
    table = Table(title="fit thresholds (override in a scenario's thresholds: or with --threshold NAME=VALUE)")
    for col in ("name", "default", "meaning"):
        table.add_column(col)
    defaults = Thresholds()
    for name, text in THRESHOLD_HELP.items():
        value = getattr(defaults, name)
        shown = "off" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:g}"
        table.add_row(name, shown, text)
    console.print(table)


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
                         "install": avail.install, "notes": avail.notes})
        except Exception as exc:  # a broken third-party runner must not hide the others
            rows.append({"runtime": name, "formats": [], "available": False, "version": None, "devices": [],
                         "reason": f"runner failed to load: {exc}", "install": None, "notes": None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="fitbench runners")
    for col in ("runtime", "formats", "available", "version", "devices", "notes / how to install / why not"):
        table.add_column(col)
    for r in rows:
        note = (r["notes"] or "") if r["available"] else f"{r['reason']}; {r['install'] or ''}".strip("; ")
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


@cli.group()
def models() -> None:
    """Sample artifacts for every runtime, made locally from the bundled GGUF."""


@models.command("prepare-sample")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="where the sample GGUF is and the artifacts go")
@click.option("--only", help="comma-separated steps to make (default: all)")
@click.option("--force", is_flag=True, help="remake artifacts that already exist")
@click.option("--skip-missing", is_flag=True,
              help="pass over steps whose converter is not installed instead of failing (what `make` uses)")
def models_prepare_sample(models_dir: Path, only: str | None, force: bool, skip_missing: bool) -> None:
    """Make the HF safetensors, ONNX and MLX variants of the sample model (cached, idempotent)."""
    from harness import samples

    wanted = [s.strip() for s in only.split(",") if s.strip()] if only else None
    try:
        made = samples.prepare(models_dir, wanted, force, progress=lambda msg: err_console.print(msg),
                               skip_missing=skip_missing)
    except samples.SampleError as exc:
        raise FitbenchError(str(exc)) from exc
    for name, path in made.items():
        console.print(f"{name}\t{path}")


@cli.group()
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
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE", help="override a fit threshold")
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

    sc = _with_overrides(load_scenario(scenario), repetitions, contexts, gen_tokens, timeout, budget, thresholds)
    artifacts = check_scenario(sc, require_runtimes=False)
    out = check_output_dir(output_dir)
    cases = sc.cases()
    if not cases:
        fail(f"{scenario}: the scenario expands to no cases; check contexts and prompt_tokens")
    if not address:
        fail("no Ray cluster given: pass --address ray://HEAD:10001 (or auto inside the cluster), or set RAY_ADDRESS")
    wanted = [m.strip() for m in machines.split(",") if m.strip()] if machines else None
    p = launch.plan(address, cases, artifacts, wanted, force)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("submitting", total=None)
    state = {"total": 0, "done": 0}

    def on_start(dataset, todo, refused) -> None:
        state["total"] = len(todo)
        progress.update(task, total=len(todo))
        if dataset.manifest.get("resumed"):
            console.print(f"resuming {dataset.root.name}: {len(dataset.done)} case run(s) already done")
        elif resume:
            console.print(f"nothing to resume in {out} for scenario {sc.name}; starting a new fleet run")
        console.print(f"[bold]fitbench fleet[/] {sc.name}: {len(todo)} case run(s) on "
                      f"{', '.join(p.classes)} ({sum(n.alive for n in p.nodes)} node(s)); "
                      f"{refused} refused; dataset -> {dataset.root}")

    def on_case_end(o) -> None:
        state["done"] += 1
        progress.advance(task)
        progress.console.print(_fleet_case_line(o, state["done"], state["total"]))

    def on_tick(snapshot: dict) -> None:
        busy = [f"{n['machine_class']}: {n['case']} · {n['phase']}" for n in snapshot.get("nodes", []) if n.get("case")]
        progress.update(task, description="; ".join(busy)[:160] or "waiting for nodes")

    try:
        with progress:
            dataset, summary = launch.run(sc, cases, artifacts, p, out, address, resume, force, max_retries,
                                          lost_grace_s, on_start, on_case_end, on_tick)
    finally:
        p.ray.shutdown()
    _fleet_summary(dataset, summary, p.classes)
    if summary.interrupted:
        err_console.print(f"fitbench: interrupted; finished cases are saved; continue with: fitbench fleet run "
                          f"{sc.source} --address {address} -o {out} --resume")
        sys.exit(EXIT_INTERRUPTED)
    lost = [o for o in summary.outcomes if o.status == "lost" and o.written]
    if summary.not_run or lost:
        reasons = sorted({why for _, why in summary.not_run})
        err_console.print(f"fitbench: {len(lost)} case run(s) lost with their node, {len(summary.not_run)} not run"
                          + (f" ({'; '.join(reasons)})" if reasons else "") + "; start their agents again and "
                          f"continue with: fitbench fleet run {sc.source} --address {address} -o {out} --resume")
        sys.exit(1)


def _fleet_case_line(o, done: int, total: int) -> str:
    p = o.placement
    where = f"{p.machine_class}" + (f" @ {o.hostname} ({o.node_id[:12]})" if o.node_id else "")
    head = f"[{done}/{total}] {where} {p.case.model_label} {p.case.label}"
    if not o.written:
        return f"{head}: [yellow]duplicate result ignored[/]"
    if o.status != "ok":
        return f"{head}: [red]{o.status}[/] {o.error}"
    ok_rows = [r for r in o.rows if r["status"] == "ok"]
    dec = summarize([r["decode_tok_s"] for r in ok_rows])
    peak = max((r.get("peak_rss_bytes") or 0) for r in ok_rows) if ok_rows else None
    fit = case_verdict(o.rows)[0]
    return (f"{head}: [green]ok[/] {FIT_STYLE.get(fit, '{}').format(fit)} · decode "
            f"{dec.median if dec else float('nan'):,.1f} tok/s, peak RSS {mib(peak)} MiB, {o.wall_s or 0:.1f} s")


def _fleet_summary(dataset, summary, classes: list[str]) -> None:
    table = Table(title=f"fleet run {dataset.root.name}")
    for col in ("machine class", "ok", "failed", "lost", "not run"):
        table.add_column(col, justify="left" if col == "machine class" else "right")
    for cls in classes:
        mine = [o for o in summary.outcomes if o.placement.machine_class == cls and o.written]
        table.add_row(cls, str(sum(o.status == "ok" for o in mine)),
                      str(sum(o.status not in ("ok", "lost") for o in mine)), str(sum(o.status == "lost" for o in mine)),
                      str(sum(p.machine_class == cls for p, _ in summary.not_run)))
    console.print(table)
    console.print(f"dataset: {dataset.root} (partitioned by machine_class)\n"
                  f"compare the machines: fitbench compare {dataset.root} --by machine_class")


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
        fail("no Ray cluster given: pass --address ray://HEAD:10001 (or auto inside the cluster), or set RAY_ADDRESS")
    ray = connect(address)
    try:
        snap = status_mod.collect(ray)
        if as_json:
            click.echo(json.dumps(snap, indent=2, default=str))
            return
        if watch and console.is_terminal:
            from rich.live import Live

            with Live(_status_table(snap, status_mod), console=console, refresh_per_second=2) as live:
                try:
                    while True:
                        time.sleep(watch)
                        live.update(_status_table(status_mod.collect(ray), status_mod))
                except KeyboardInterrupt:
                    return
        while True:
            _print_status(snap, status_mod)
            if not watch:
                return
            try:
                time.sleep(watch)
            except KeyboardInterrupt:
                return
            snap = status_mod.collect(ray)
    finally:
        ray.shutdown()


def _status_table(snap: dict, status_mod) -> Table:
    rows = status_mod.rows(snap)
    table = Table(title="fitbench fleet", caption="\n".join(status_mod.run_lines(snap)))
    for col in ("node", "address", "state", "class", "runtimes", "RAM GiB", "done", "failed", "running"):
        table.add_column(col, justify="right" if col in ("RAM GiB", "done", "failed") else "left")
    for r in rows:
        table.add_row(*[r[c] for c in ("node", "address", "state", "class", "runtimes", "RAM GiB", "done", "failed",
                                        "running")], style=None if r["state"] == "alive" else "dim")
    return table


def _print_status(snap: dict, status_mod) -> None:
    rows = status_mod.rows(snap)
    if not rows:
        console.print("no fitbench agent in this cluster; start one with `fitbench fleet agent --address HEAD:6379`")
    elif console.is_terminal:
        console.print(_status_table(snap, status_mod))
    else:  # logs and pipes get a plain, tab-separated table
        cols = list(rows[0])
        click.echo("\t".join(cols))
        for r in rows:
            click.echo("\t".join(r[c] for c in cols))
    for line in status_mod.run_lines(snap):
        click.echo(line)


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

    if head == bool(address):
        fail("give exactly one of --head (start the cluster here) or --address HEAD:6379 (join it)")
    m = machine_mod.fingerprint() if not (machine_class and ram) else None
    offered = [r.strip() for r in runtimes.split(",") if r.strip()] if runtimes else agent.installed_runtimes()
    if not offered:
        fail("no runtime is installed here, so this node could run no case; install one (see `fitbench runners`) "
             "or name them with --runtimes")
    if models_dir is not None and not models_dir.is_dir():
        fail(f"--models-dir {models_dir} is not a folder")
    p = agent.plan(head, address, port, client_port, machine_class or m.machine_class, offered,
                   _size_option("--ram", ram) if ram else m.ram_bytes, num_cpus,
                   _size_option("--object-store-memory", object_store_memory), models_dir, temp_dir, block)
    console.print(f"fleet agent: class {machine_class or m.machine_class}, runtimes {', '.join(offered)}, "
                  f"resources {json.dumps(p.resources, sort_keys=True)}")
    if dry_run:
        click.echo(" ".join(shlex.quote(c) for c in p.command))
        return
    code = agent.start(p)
    if code != 0:
        fail(f"`ray start` failed (exit {code}); see its output above")
    if not block:
        console.print("agent started; stop it with `ray stop` on this machine")


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
    except (FitbenchError, ScenarioError, OutputError, ResultsError, CatalogError, FleetError) as exc:
        click.echo(f"fitbench: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
