"""``fitbench compare`` and ``fitbench report``: read result files back.

DuckDB (compare) and pandas/matplotlib (report) are imported inside the commands, so the
rest of the command line, ``fitbench run`` above all, never loads them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape

from harness.cli.options import LazyChoice, UsageError
from harness.cli.present import Column, Markup, make_console, make_printer, mib, print_json


def _by_columns():
    from harness.analyse.compare import BY_COLUMNS

    return BY_COLUMNS


@click.command("compare")
@click.argument("baseline")
@click.argument("candidates", nargs=-1)
@click.option("--threshold", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="percent a significant change must exceed to count as a regression")
@click.option("--fail-on-regression", "fail_pct", type=float, is_flag=False, flag_value=-1.0,
              default=None, metavar="[PCT]",
              help="exit 1 on any significant regression beyond PCT percent (default: --threshold)")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--all", "show_all", is_flag=True, help="show every metric, not only changes beyond noise")
@click.option("--by", "by", type=LazyChoice(_by_columns),
              help="cross-machine view: split all the given results (e.g. a fleet dataset) by this column, "
                   "show every case side by side per value, and compare each value with the first")
@click.option("--baseline", "by_baseline", metavar="VALUE", help="with --by: the value the others are compared with")
def compare_cmd(baseline: str, candidates: tuple[str, ...], threshold: float, fail_pct: float | None, fmt: str,
                show_all: bool, by: str | None, by_baseline: str | None) -> None:
    """Compare result files: BASELINE against each CANDIDATE (files, globs or folders).

    Cases match on artifact, runtime, options (thread counts excepted), context, prompt and
    generation lengths and the budget asked for. Per-repetition figures (speed, TTFT) are tested
    for significance over the repetitions (Welch's t-test, 95%); per-case figures (peak memory,
    quality) are taken once per case and tested over cases only where each side has several,
    else shown as one figure. Fit-class changes are always shown.

    With --by machine_class, every argument is read together (a fleet dataset folder, or the
    results of several machines) and split into one side per machine class: "Mac vs GPU PC".
    """
    from harness.analyse.compare import compare, cross_table, split_by, to_json
    from harness.results import expand_result_files

    if by is None and not candidates:
        raise UsageError("compare needs a BASELINE and at least one CANDIDATE, or --by machine_class to compare "
                         "the machine classes inside the results (e.g. a fleet dataset)")
    if by_baseline is not None and by is None:
        raise UsageError("--baseline VALUE goes with --by COLUMN")
    if fail_pct == -1.0:  # given without a value
        fail_pct = threshold
    elif fail_pct is not None and fail_pct < 0:
        raise UsageError(f"--fail-on-regression takes a percentage of at least 0, got {fail_pct:g}")
    if fail_pct is not None:
        threshold = fail_pct
    matrix = None
    if by is not None:
        sides = split_by(expand_result_files([baseline, *candidates]), by, by_baseline)
        matrix = cross_table(sides)
        comparisons = [compare(sides[0], other, threshold) for other in sides[1:]]
    else:
        base = _side(baseline)
        seen, comparisons = [base.files], []
        for c in candidates:
            side = _side(c)
            if side.files in seen:  # `compare results/*.parquet`: a timeline companion stands for its file
                continue
            seen.append(side.files)
            comparisons.append(compare(base, side, threshold))
        if not comparisons:
            raise UsageError("nothing to compare: every CANDIDATE names the baseline's own result files")
    if fmt == "json":
        text = to_json(comparisons, threshold)
        if matrix is None:
            click.echo(text)
        else:  # with --by: one object, the matrix plus the pairwise comparisons
            print_json({"by": by, "sides": matrix[0], "matrix": matrix[1], "comparisons": json.loads(text)})
    else:
        console = make_console()
        if matrix is not None:
            _print_matrix(console, by, *matrix, fmt)
        for cmp in comparisons:
            _print_comparison(console, cmp, fmt, show_all, threshold)
    regressions = sum(len(c.regressions(threshold)) for c in comparisons)
    if fail_pct is not None and regressions:
        make_console(stderr=True).print(f"fitbench: {regressions} significant regression(s) beyond {threshold:g}%")
        sys.exit(1)


def _side(pattern: str):
    from harness.analyse.compare import Side
    from harness.results import TIMELINE_SUFFIX, expand_result_files

    files = expand_result_files([pattern])
    return Side(str(files[0]) if pattern.endswith(TIMELINE_SUFFIX) else pattern, files)


def _print_matrix(console, by: str, labels: list[str], rows: list[dict], fmt: str) -> None:
    """Cases down, one column per machine class: fit class, decode tok/s, TTFT and peak memory side by side."""

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

    columns = [Column("case"), *[Column(label.removeprefix(f"{by}="), get=lambda r, lb=label: cell(r[lb]))
                                 for label in labels]]
    title = f"by {by}" if fmt == "markdown" else f"by {by}: fit class, decode, TTFT, peak RSS (medians)"
    p = make_printer(fmt, console)
    p.header(columns, None if fmt == "csv" else title)
    for r in rows:
        p.row(r)
    p.footer()
    if fmt == "markdown":
        click.echo()


VERDICT_STYLES = {"REGRESSION": "bold red", "WORSE FIT": "bold red", "better": "green"}


def _print_comparison(console, cmp, fmt: str, show_all: bool, threshold: float) -> None:
    from harness.analyse.compare import table_rows

    rows = [r for r, raw in zip(table_rows(cmp), cmp.rows, strict=True)
            if show_all or raw["kind"] == "fit" or raw.get("notable", True)]  # compare decides what is notable
    header = f"{cmp.baseline.label} -> {cmp.candidate.label}"
    lines = [f"note: {n}" for n in cmp.notes]
    if cmp.unmatched_baseline:
        lines.append(f"only in baseline ({len(cmp.unmatched_baseline)}): " + "; ".join(cmp.unmatched_baseline[:10]))
    if cmp.unmatched_candidate:
        lines.append(f"only in candidate ({len(cmp.unmatched_candidate)}): "
                     + "; ".join(cmp.unmatched_candidate[:10]))
    regressions = cmp.regressions(threshold)
    summary = (f"{len({r['case'] for r in cmp.rows})} matched case(s); {len(regressions)} regression(s) beyond "
               f"{threshold:g}%" + ("" if show_all else "; changes within noise hidden (--all shows them)"))
    columns = [Column("case"), Column("metric"), Column("baseline", right=True), Column("candidate", right=True),
               Column("change", right=True), Column("n", right=True), Column("verdict")]
    p = make_printer(fmt, console)
    if fmt == "csv":
        p.header(columns)
    elif fmt == "markdown":
        click.echo("\n".join([f"### {header}", "", *[f"- {line}" for line in lines], f"- {summary}", ""]))
        p.header(columns)
    else:
        for line in lines:
            console.print(Markup(f"[yellow]{escape(line)}[/]"))
        if not rows:
            console.print(f"{header}: {summary}")
            return
        p.header(columns, header)
    for r in rows:
        p.row(r, VERDICT_STYLES.get(r["verdict"]))
    p.footer(summary if fmt == "table" else None)


@click.command("report")
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("results/report.html"),
              show_default=True, help="the HTML file to write (self-contained: opens offline)")
@click.option("--png", "png_dir", type=click.Path(path_type=Path), help="also write each plot as a PNG here")
@click.option("--case", help="whose timeline to plot: index, case key or part of a label (default: largest peak)")
def report_cmd(results: tuple[str, ...], out: Path, png_dir: Path | None, case: str | None) -> None:
    """Plots and tables from RESULTS (files, globs or folders) as one HTML file."""
    from harness.analyse.report import build
    from harness.results import expand_result_files

    plots = build(expand_result_files(results), out, png_dir, case)
    make_console().print(f"report: {out} ({len(plots)} plots)" + (f"; PNGs in {png_dir}" if png_dir else ""),
                         markup=False)
