"""All of the command line's printing: one Console factory, the row printers, and the run's lines.

Data rows go through a printer with llama-bench's small interface (``header`` once,
``row`` per record as it comes, ``footer`` once) in four formats: ``table`` (rich, for
people), ``markdown`` (pipes, for issues and READMEs), ``csv`` and ``json`` (raw values,
for scripts).

Text from data (labels, paths, machine classes, errors, an upstream's answers) never
reaches rich's markup parser: the Console every command prints through parses markup
only in a ``Markup`` string, which the line builders here make after escaping each piece
of data in it; any other string, and every table cell, title and caption, is shown as
written. A ``[/]`` or ``[bold red]`` in a community machine class is printed, never
interpreted, whoever prints it.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "markdown", "csv", "json")
# Not a terminal (a pipe, a log, CI, pytest): rich would wrap at 80 columns or $COLUMNS and split
# one status line into two. This width is never reached, so nothing is wrapped or cut.
PIPE_WIDTH = 1 << 16

FIT_STYLES = {"fits": "green", "tight": "yellow", "degraded": "yellow", "slow": "yellow", "offload": "magenta",
              "spill": "red", "no_fit": "bold red"}


class Markup(str):
    """Rich markup built by code that escaped every piece of data in it (``markup``, the line builders).
    Anything made from it by string operations is a plain str again, printed as written."""


def markup(template: str, **data: Any) -> Markup:
    """``template`` (code's own markup) with each ``{name}`` filled by the escaped text of ``data[name]``."""
    return Markup(template.format(**{k: escape(str(v)) for k, v in data.items()}))


class DataConsole(Console):
    """A Console that parses markup only in ``Markup`` strings: every other string prints as written."""

    def print(self, *objects: Any, markup: bool | None = None, **kw: Any) -> None:
        texts = [o for o in objects if isinstance(o, str)]
        super().print(*objects, markup=bool(texts) and all(isinstance(o, Markup) for o in texts), **kw)


def make_console(stderr: bool = False) -> Console:
    """The one Console every command prints through (stdout, or stderr for notes and warnings)."""
    stream = sys.stderr if stderr else sys.stdout
    # emoji off: a path or label holding ":smile:" is text, not a picture
    if _isatty(stream):
        return DataConsole(stderr=stderr, emoji=False)
    return DataConsole(stderr=stderr, emoji=False, width=PIPE_WIDTH, soft_wrap=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def fit_style(cls: str | None) -> str | None:
    return FIT_STYLES.get(cls or "")


def fit_markup(cls: str | None, missing: str = "no verdict") -> str:
    """A fit class coloured for an inline line (the class itself is escaped like any data)."""
    style = fit_style(cls)
    text = escape(cls or missing)
    return Markup(f"[{style}]{text}[/]" if style else text)


# --- printers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One column: ``key`` names the raw value (csv/json); ``title`` and ``show`` are what people read."""

    key: str
    title: str | None = None
    show: Callable[[Any], str] | None = None  # raw value -> display text (table, markdown); None -> "-"
    right: bool = False
    style: Callable[[Any], str | None] | None = None  # raw value -> rich style (table only)
    get: Callable[[dict], Any] | None = None  # the raw value derived from the record, when it is not record[key]
    label: Callable[[dict], str] | None = None  # display text that needs the whole record
    wrap: bool = False  # on a narrow terminal this column may wrap (long prose); others never do

    @property
    def heading(self) -> str:
        return self.title or self.key

    def value(self, record: dict) -> Any:
        return self.get(record) if self.get else record.get(self.key)

    def text(self, record: dict) -> str:
        if self.label:
            return self.label(record)
        value = self.value(record)
        if value is None:
            return "-"
        return self.show(value) if self.show else str(value)


class Printer:
    """llama-bench's printer interface: header, then a row per record as it comes, then footer."""

    columns: list[Column]

    def header(self, columns: list[Column], title: str | None = None) -> None:
        self.columns, self.title = list(columns), title

    def row(self, record: dict, style: str | None = None) -> None:
        raise NotImplementedError

    def footer(self, caption: str | None = None) -> None:
        pass


class TablePrinter(Printer):
    """A rich table, printed whole at the footer (a table's widths depend on every row)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or make_console()
        self.rows = 0

    def header(self, columns: list[Column], title: str | None = None) -> None:
        super().header(columns, title)
        self.table = Table(title=Text(title) if title else None)
        for c in self.columns:
            self.table.add_column(Text(c.heading), justify="right" if c.right else "left", no_wrap=not c.wrap)

    def row(self, record: dict, style: str | None = None) -> None:
        cells = [Text(c.text(record), style=(c.style(c.value(record)) if c.style else None) or "")
                 for c in self.columns]
        self.table.add_row(*cells, style=style)
        self.rows += 1

    def footer(self, caption: str | None = None) -> None:
        if caption:
            self.table.caption = Text(caption)
        self.console.print(self.table)


class MarkdownPrinter(Printer):
    """Pipes, like llama-bench's markdown: right-aligned number columns, one line per row as it comes."""

    def header(self, columns: list[Column], title: str | None = None) -> None:
        super().header(columns, title)
        if title:
            click.echo(f"### {title}\n")
        click.echo("| " + " | ".join(_md(c.heading) for c in self.columns) + " |")
        click.echo("|" + "|".join(" ---: " if c.right else " --- " for c in self.columns) + "|")

    def row(self, record: dict, style: str | None = None) -> None:
        click.echo("| " + " | ".join(_md(c.text(record)) for c in self.columns) + " |")

    def footer(self, caption: str | None = None) -> None:
        if caption:
            click.echo(f"\n{caption}")


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


class CsvPrinter(Printer):
    """Raw values under their keys (bytes as bytes, rates unrounded): a spreadsheet does its own formatting."""

    def header(self, columns: list[Column], title: str | None = None) -> None:
        super().header(columns, title)
        self._write([c.key for c in self.columns])

    def row(self, record: dict, style: str | None = None) -> None:
        self._write([_plain(c.value(record)) for c in self.columns])

    def _write(self, cells: list) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        click.echo(buf.getvalue(), nl=False)


def _plain(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return value


class JsonPrinter(Printer):
    """A JSON array of the whole records (every field, raw), written one object per line as rows come."""

    def header(self, columns: list[Column], title: str | None = None) -> None:
        super().header(columns, title)
        self.count = 0
        click.echo("[", nl=False)

    def row(self, record: dict, style: str | None = None) -> None:
        click.echo(("," if self.count else "") + "\n  " + json.dumps(record, default=str), nl=False)
        self.count += 1

    def footer(self, caption: str | None = None) -> None:
        click.echo("\n]")


def make_printer(fmt_name: str, console: Console | None = None) -> Printer:
    if fmt_name == "table":
        return TablePrinter(console)
    return {"markdown": MarkdownPrinter, "csv": CsvPrinter, "json": JsonPrinter}[fmt_name]()


def print_rows(fmt_name: str, columns: list[Column], records: Iterable[dict], title: str | None = None,
               caption: str | None = None, console: Console | None = None,
               row_style: Callable[[dict], str | None] | None = None) -> None:
    p = make_printer(fmt_name, console)
    p.header(columns, title)
    for record in records:
        p.row(record, row_style(record) if row_style else None)
    p.footer(caption)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def number(pattern: str) -> Callable[[Any], str]:
    """A column's ``show`` for a number: ``number("{:,.1f}")``."""
    return lambda v: pattern.format(v)


def fit_column(key: str = "fit_class", title: str = "fit") -> Column:
    return Column(key, title, style=fit_style)


# --- a run's lines --------------------------------------------------------------------------------

def case_line(r, total: int) -> str:
    """One finished case, as rich markup (every piece of data escaped)."""
    from harness.fit import case_verdict
    from harness.metrics import summarize

    head = f"[{r.case.index + 1}/{total}] " + escape(f"{r.case.model_label} {r.case.label}")
    fit = case_verdict(r.rows)[0]
    note = next((row.get("budget_note") for row in r.rows if row.get("budget_method") == "none"
                 and row.get("budget_note")), None)
    if note:  # a budget that was asked for but only judged against: say so, with why
        head += f" [yellow](budget not enforced: {escape(note)})[/]"
    if r.status != "ok":
        return Markup(f"{head}: [red]{escape(r.status)}[/] (fit: {fit_markup(fit)}) {escape(str(r.error or ''))}")
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
    return Markup(f"{head}: [green]ok[/] {fit_markup(fit)} · TTFT {ttft.median * 1000:,.0f} ms, decode "
                  f"{dec.median:,.1f} tok/s, peak RSS {mib(r.peak_rss)} MiB (VmHWM {mib(r.vmhwm)}){gpu}, "
                  f"{r.wall_s:.1f} s{quality_text(first)}{serving_text(r)}")


def serving_text(r) -> str:
    """' · serving: fits 4 users at context 2048: ...' for a case of parallel sessions."""
    from harness.fit import case_serving

    if r.case.parallel <= 1:
        return ""
    fits, reason = case_serving(r.rows)
    return f" · [{'green' if fits else 'yellow'}]serving: {escape(reason)}[/]"


def quality_text(row: dict) -> str:
    """' · PPL 14.2, KL 0.012, top-1 96%, tasks 4/5' for a case with a quality probe."""
    parts = []
    if row.get("quality_ppl") is not None:
        parts.append(f"PPL {row['quality_ppl']:,.2f}")
    if row.get("quality_kl_mean") is not None:
        parts.append(f"KL {row['quality_kl_mean']:.4f}, top-1 {row['quality_top1_agree']:.1%}")
    if row.get("task_count"):
        parts.append(f"tasks {row['task_passed']}/{row['task_count']}")
    if row.get("quality_error"):
        parts.append(f"[yellow]quality: {escape(str(row['quality_error']))}[/]")
    return Markup((" · " + ", ".join(parts)) if parts else "")


def summary_table(console: Console, results: list) -> None:
    """Medians per case; like llama-bench's markdown, the model column only when it varies."""
    from harness.fit import case_verdict
    from harness.metrics import summarize

    if not results:
        return
    show_model = len({r.case.model_label for r in results}) > 1
    records = []
    for r in results:
        ok_rows = [row for row in r.rows if row["status"] == "ok" and row.get("turn") is None]

        def med(key: str, ok_rows: list = ok_rows) -> float | None:
            s = summarize([row[key] for row in ok_rows])
            return None if s is None else s.median

        dec = summarize([row["decode_tok_s"] for row in ok_rows])
        ci = ok_rows[0].get("decode_tok_s_ci95") if ok_rows else None
        records.append({"decode_ci": ci, "roofline": ok_rows[0].get("roofline_efficiency") if ok_rows else None,
                        "index": r.case.index + 1, "model": r.case.model_label, "case": r.case.label,
                        "status": r.status, "fit_class": case_verdict(r.rows)[0], "ttft_s": med("ttft_s"),
                        "prefill_tok_s": med("prefill_tok_s"), "decode": dec, "peak_rss_bytes": r.peak_rss,
                        "vmhwm_bytes": r.vmhwm,
                        "read_bytes": max(row["read_bytes"] or 0 for row in ok_rows) if ok_rows else None})
    columns = [Column("index", "#", right=True), *([Column("model")] if show_model else []), Column("case"),
               Column("status", style=lambda s: "green" if s == "ok" else "red"), fit_column(),
               Column("ttft_s", "TTFT ms", lambda v: f"{v * 1000:,.0f}", right=True),
               Column("prefill_tok_s", "pp tok/s", lambda v: f"{v:,.1f}", right=True),
               Column("decode", "tg tok/s", lambda d: f"{d.median:,.1f}", right=True),
               Column("decode_ci", "±95% CI", lambda v: f"±{v:,.1f}", right=True),
               Column("roofline", "roofline", lambda v: f"{v:.0%}", right=True),
               Column("peak_rss_bytes", "peak MiB", mib, right=True), Column("vmhwm_bytes", "HWM MiB", mib, right=True),
               Column("read_bytes", "read MiB", mib, right=True)]
    print_rows("table", columns, records, title="fitbench summary (medians over repetitions)", console=console)
    serving_table(console, results)
    for line in measurement_warnings(results):
        console.print(line)
    quality_table(console, results)
    if not show_model:
        console.print(f"model: {results[0].case.model_label} ({results[0].case.runtime})")


def measurement_warnings(results: list) -> list[str]:
    """One warning line per case whose figures drifted or ran on a disturbed machine (fit.measurement_flags)."""
    lines = []
    for r in results:
        flagged = [row for row in r.rows if row.get("drift_flag") or row.get("noise_flag")]
        if not flagged:
            continue
        kinds = [k for k, col in (("drift", "drift_flag"), ("noisy", "noise_flag")) if any(x.get(col) for x in flagged)]
        notes = list(dict.fromkeys(n for row in flagged for n in (row.get("measurement_note") or "").split("; ") if n))
        lines.append(Markup(f"[yellow]warning[/]: case {r.case.index + 1} ({escape(r.case.label)}) "
                            f"{'+'.join(kinds)}: " + escape("; ".join(notes[:4]))))
    return lines


def serving_table(console: Console, results: list) -> None:
    """Parallel sessions (docs/concurrency.md): per-user and all-sessions rates, p90 TTFT, KV per session,
    the serving verdict; then the most users served per model and context. Only when a case had N > 1."""
    from harness.fit import case_serving
    from harness.metrics import summarize

    if not any(r.case.parallel > 1 for r in results):
        return
    records = []
    for r in results:
        ok_rows = [row for row in r.rows if row["status"] == "ok" and row.get("turn") is None]

        def med(key: str, ok_rows: list = ok_rows) -> float | None:
            found = summarize([row.get(key) for row in ok_rows])
            return None if found is None else found.median

        fits, reason = case_serving(r.rows)
        records.append({"index": r.case.index + 1, "users": r.case.parallel, "n_ctx": r.case.n_ctx,
                        "ttft_p90_s": med("ttft_p90_s"), "user": med("user_decode_tok_s"),
                        "all": med("aggregate_decode_tok_s"), "kv": med("kv_session_bytes"),
                        "peak_rss_bytes": r.peak_rss, "serving": fits, "reason": reason})
    columns = [Column("index", "#", right=True), Column("users", right=True), Column("n_ctx", "ctx", right=True),
               Column("ttft_p90_s", "p90 TTFT ms", lambda v: f"{v * 1000:,.0f}", right=True),
               Column("user", "tok/s/user", lambda v: f"{v:,.1f}", right=True),
               Column("all", "tok/s all", lambda v: f"{v:,.1f}", right=True),
               Column("kv", "KV/session MiB", lambda v: f"{v / 2**20:,.1f}", right=True),
               Column("peak_rss_bytes", "peak MiB", mib, right=True),
               Column("serving", "serves", lambda v: "yes" if v else "no",
                      style=lambda v: "green" if v else "yellow"),
               Column("reason", "serving verdict", wrap=True)]
    print_rows("table", columns, records, title="serving: parallel sessions (medians over repetitions)",
               console=console)
    for line in serving_answers(results):
        console.print(line)


def serving_answers(results: list) -> list[str]:
    """'model (runtime): fits 4 users at context 2048 (tried 1, 2, 4, 8)' per model, options, context and
    prompt: the most users served with every smaller count tried served too (fit.max_users)."""
    from harness.fit import case_serving, max_users

    groups: dict[tuple, dict[int, bool | None]] = {}
    for r in results:
        key = (r.case.model_label, r.case.runtime, json.dumps(r.case.options, sort_keys=True), r.case.n_ctx,
               r.case.prompt_tokens, r.case.budget_bytes)
        groups.setdefault(key, {})[r.case.parallel] = case_serving(r.rows)[0]
    lines = []
    for (model, runtime, _, n_ctx, _, _), by_users in groups.items():
        if max(by_users) <= 1:
            continue
        best = max_users(by_users)
        answer = (f"fits {best} user{'s' if best != 1 else ''} at context {n_ctx:,}" if best else
                  f"does not fit {min(by_users)} user{'s' if min(by_users) != 1 else ''} at context {n_ctx:,}")
        lines.append(f"{model} ({runtime}): {answer} (tried {', '.join(map(str, sorted(by_users)))})")
    return lines


def quality_table(console: Console, results: list) -> None:
    """One line per artifact/runtime/options with a quality probe: quality next to memory and speed."""
    from harness.fit import case_verdict
    from harness.metrics import summarize

    seen: dict[str, tuple[Any, dict]] = {}
    for r in results:
        ok_rows = [row for row in r.rows if row["status"] == "ok"]
        if ok_rows and ok_rows[0].get("quality_text_id") and r.case.quality_group not in seen:
            seen[r.case.quality_group] = (r, ok_rows[0])
    if not seen:
        return
    ref = next((row.get("quality_reference") for _, row in seen.values() if row.get("quality_reference")), None)
    records = []
    for r, row in seen.values():
        dec = summarize([x["decode_tok_s"] for x in r.rows if x["status"] == "ok"])
        records.append({**row, "model": r.case.model_label, "runtime": r.case.runtime, "peak": r.peak_rss,
                        "decode": None if dec is None else dec.median, "fit_class": case_verdict(r.rows)[0],
                        "tasks": f"{row['task_passed']}/{row['task_count']}" if row.get("task_count") else None})
    columns = [Column("model"), Column("runtime"), Column("artifact_size_bytes", "size MiB", mib, right=True),
               Column("peak", "peak MiB", mib, right=True),
               Column("decode", "tg tok/s", number("{:,.1f}"), right=True),
               Column("quality_ppl", "PPL", number("{:,.3f}"), right=True),
               Column("quality_ppl_ratio", "PPL/ref", number("{:.3f}"), right=True),
               Column("quality_kl_mean", "KL", number("{:.4f}"), right=True),
               Column("quality_kl_p99", "KL p99", number("{:.3f}"), right=True),
               Column("quality_top1_agree", "top-1", number("{:.1%}"), right=True),
               Column("tasks", right=True), fit_column()]
    print_rows("table", columns, records, title="quality" + (f" (KL and top-1 vs {ref})" if ref else ""),
               console=console)
    text = next(row for _, row in seen.values())
    console.print((f"evaluation text: {text.get('quality_text_id')} sha256 "
                         f"{str(text.get('quality_text_sha256'))[:12]}…, window {text.get('quality_window')} tokens; "
                         f"KL over the reference's top-{text.get('quality_top_k')} tokens + a tail bucket "
                         "(a lower bound)"))


# --- a fleet's lines ------------------------------------------------------------------------------

def fleet_case_line(o, done: int, total: int) -> str:
    from harness.fit import case_verdict
    from harness.metrics import summarize

    p = o.placement
    where = f"{p.machine_class}" + (f" @ {o.hostname} ({o.node_id[:12]})" if o.node_id else "")
    head = f"[{done}/{total}] " + escape(f"{where} {p.case.model_label} {p.case.label}")
    if not o.written:
        return Markup(f"{head}: [yellow]duplicate result ignored[/]")
    if o.status != "ok":
        return Markup(f"{head}: [red]{escape(o.status)}[/] {escape(str(o.error or ''))}")
    ok_rows = [r for r in o.rows if r["status"] == "ok"]
    dec = summarize([r["decode_tok_s"] for r in ok_rows])
    peak = max((r.get("peak_rss_bytes") or 0) for r in ok_rows) if ok_rows else None
    fit = case_verdict(o.rows)[0]
    return Markup(f"{head}: [green]ok[/] {fit_markup(fit)} · decode {dec.median if dec else float('nan'):,.1f} "
                  f"tok/s, peak RSS {mib(peak)} MiB, {o.wall_s or 0:.1f} s")


def fleet_summary(console: Console, dataset, summary, classes: list[str]) -> None:
    records = []
    for cls in classes:
        mine = [o for o in summary.outcomes if o.placement.machine_class == cls and o.written]
        records.append({"machine_class": cls, "ok": sum(o.status == "ok" for o in mine),
                        "failed": sum(o.status not in ("ok", "lost") for o in mine),
                        "lost": sum(o.status == "lost" for o in mine),
                        "not_run": sum(p.machine_class == cls for p, _ in summary.not_run)})
    columns = [Column("machine_class", "machine class"), Column("ok", right=True), Column("failed", right=True),
               Column("lost", right=True), Column("not_run", "not run", right=True)]
    print_rows("table", columns, records, title=f"fleet run {dataset.root.name}", console=console)
    console.print((f"dataset: {dataset.root} (partitioned by machine_class)\n"
                         f"compare the machines: fitbench compare {dataset.root} --by machine_class"))


STATUS_COLUMNS = [Column("node"), Column("address"), Column("state"), Column("class"), Column("runtimes"),
                  Column("RAM GiB", right=True), Column("done", right=True), Column("failed", right=True),
                  Column("running")]


def status_table(snap: dict, status_mod) -> Table:
    """The fleet's nodes as a rich table (also what a live display refreshes)."""
    table = Table(title="fitbench fleet", caption=Text("\n".join(status_mod.run_lines(snap))))
    for c in STATUS_COLUMNS:
        table.add_column(c.heading, justify="right" if c.right else "left")
    for r in status_mod.rows(snap):
        table.add_row(*[Text(c.text(r)) for c in STATUS_COLUMNS], style=None if r["state"] == "alive" else "dim")
    return table


def print_status(console: Console, snap: dict, status_mod) -> None:
    rows = status_mod.rows(snap)
    if not rows:
        console.print("no fitbench agent in this cluster; start one with `fitbench fleet agent --address HEAD:6379`")
    elif console.is_terminal:
        console.print(status_table(snap, status_mod))
    else:  # logs and pipes get a plain, tab-separated table
        cols = list(rows[0])
        click.echo("\t".join(cols))
        for r in rows:
            click.echo("\t".join(str(r[c]) for c in cols))
    for line in status_mod.run_lines(snap):
        click.echo(line)


# --- fitbench bench: llama-bench's columns ------------------------------------------------------

class JsonlPrinter(Printer):
    """One JSON object per line, flushed as each record comes (llama-bench's jsonl)."""

    def row(self, record: dict, style: str | None = None) -> None:
        click.echo(json.dumps(record, default=str))
        sys.stdout.flush()


def _bench_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _bench_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _bench_rate(record: dict) -> str:
    if record.get("avg_ts") is None:
        return record.get("status") or "-"
    return f"{record['avg_ts']:.2f} ± {record.get('stddev_ts') or 0:.2f}"


# llama-bench's headings for the option columns a sweep may show
BENCH_OPTION_TITLES = {"n_batch": "n_batch", "n_gpu_layers": "ngl", "flash_attn": "fa", "type_k": "type_k",
                       "type_v": "type_v"}


def bench_columns(shown_options: list[str], fmt_name: str = "md", all_fields: tuple[str, ...] = ()) -> list[Column]:
    """llama-bench's columns (the option columns only where the sweep varies them) plus fitbench's
    peak memory, TTFT and fit; csv gets every field of ``all_fields`` raw, as llama-bench's csv does."""
    if fmt_name == "csv":
        return [Column(key) for key in all_fields]
    options = [Column(key, BENCH_OPTION_TITLES.get(key, key), show=lambda v: str(int(v)) if isinstance(v, bool)
                      else str(v), right=True) for key in shown_options]
    return [
        Column("model_type", "model"),
        Column("model_size", "size", show=_bench_size, right=True),
        Column("model_n_params", "params", show=_bench_params, right=True),
        Column("backends", "backend"),
        Column("n_threads", "threads", right=True),
        *options,
        Column("test", "test", right=True),
        Column("avg_ts", "t/s", label=_bench_rate, right=True),
        Column("peak_rss_bytes", "peak MiB", show=mib, right=True),
        Column("ttft_ms", "TTFT ms", show=number("{:,.1f}"), right=True),
        fit_column(),
        *(SERVING_BENCH_COLUMNS if "pl" in shown_options else []),
    ]


def _serving_mark(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, "-")


# `bench --parallel`: all sessions together (llama-batched-bench's S_TG), p90 TTFT and the serving verdict
SERVING_BENCH_COLUMNS = (
    Column("speed_tg", "all t/s", show=number("{:,.2f}"), right=True),
    Column("ttft_p90_ms", "p90 TTFT ms", show=number("{:,.1f}"), right=True),
    Column("serving_fits", "serves", label=lambda r: _serving_mark(r.get("serving_fits"))),
)


def make_bench_printer(fmt_name: str, console: Console | None = None) -> Printer:
    """``fitbench bench -o``: md, csv, json, jsonl (llama-bench's names) or table."""
    if fmt_name == "jsonl":
        return JsonlPrinter()
    return make_printer({"md": "markdown"}.get(fmt_name, fmt_name), console)
