"""Compare result files: matched cases, medians, change, significance, regressions.

Reading goes through DuckDB over the Parquet files (one query aggregates any
number of files and rows), so comparing folders with a million rows takes
seconds, not minutes.

Matching: rows match on the case identity — artifact sha256, runtime, the
options that change *what* is measured (all but thread counts, which change
how fast it runs and are exactly what a comparison may be about), n_ctx,
prompt and generation lengths, and the budget the case asked for, enforced
or not (``requested_budget``: a 200 MiB yardstick on a machine without a
writable cgroup is still a different case from no budget). Differences in
the ignored options, machines, runtime versions, budget methods or schema
versions are reported, never silently joined.

Two kinds of figure (``PER_CASE_COLUMNS`` decides which is which):

- per repetition (decode, prefill, TTFT): each repetition is a sample.
  Welch's t-test on the repetitions of each side (two-sided, 95 %), with the
  critical t value for the Welch–Satterthwaite degrees of freedom. With fewer
  than two repetitions on a side the change is untested and marked so.
- per case (peak memory, load figures, quality, task pass rate): one worker
  process measures them once and every repetition row carries a copy, so the
  copies are not samples (their variance is 0 by construction). Each is taken
  once per measured case (run, case, machine); with at least two measured
  cases on both sides (several runs) they are tested over the cases, else the
  change is shown as one figure per side, untested (``test: none``). Such a
  figure counts as a change only beyond its repeatability floor (the metric's
  smallest change that counts).

A per-repetition change is within the noise, never a regression, when it is
smaller than either side's 95 % confidence interval (``noise_pct``), or when
either side ran on a disturbed machine (rows with ``noise_flag``: steal,
other processes' load): such a side's repetitions can agree with each other
and still all be slow. A change counts as a regression when it is worse than
the threshold and beyond the noise, and either significant, or, for an
untested per-case figure, beyond that floor:
a memory or quality figure that grew past the threshold fails a gate even
though one figure per side cannot be tested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from harness.errors import FitbenchError
from harness.fit import ORDER
from harness.metrics import T_975, t_critical  # noqa: F401 (re-exported: their home was here)
from harness.results import REQUESTED_SINCE, RESULT_COLUMNS, expand_result_files, requested_budget  # noqa: F401

# (column, label, unit, higher_is_better, smallest change that counts, in percent)
METRICS = (
    ("decode_tok_s", "decode", "tok/s", True, 0.0),
    ("prefill_tok_s", "prefill", "tok/s", True, 0.0),
    ("ttft_s", "TTFT", "s", False, 0.0),
    # per case: one process, one figure; below 1 % is page-level jitter, not a change
    ("peak_rss_bytes", "peak RSS", "MiB", False, 1.0),
    # quality probe: one figure per case, repeatable to well under 1 % on one machine
    ("quality_ppl", "perplexity", "", False, 1.0),
    ("quality_kl_mean", "KL", "nats", False, 1.0),
    ("task_pass_rate", "task pass rate", "", True, 1.0),
)

# Figures of the whole case, not of one repetition: harness.rows writes them once per worker
# process (load, memory over the case, the quality probe and task checks, which run once per
# artifact/runtime/options) and copies them onto every row of the case. Compare takes each once
# per measured case; every other numeric column is a per-repetition sample.
PER_CASE_COLUMNS = frozenset({
    "load_s", "case_wall_s", "spawn_s", "import_s",
    "baseline_rss_bytes", "runtime_rss_bytes", "load_rss_bytes", "load_peak_rss_bytes", "peak_rss_bytes", "vmhwm_bytes",
    "ru_maxrss_bytes", "peak_uss_bytes", "sys_available_min_bytes", "swap_used_max_bytes",
    "runtime_peak_bytes", "offload_host_bytes", "offload_device_bytes",
    "gpu_total_bytes", "gpu_used_peak_bytes", "gpu_proc_peak_bytes",
    "case_major_faults", "case_read_bytes", "sampler_samples", "exit_code",
} | {c.name for c in RESULT_COLUMNS if c.name.startswith(("quality_", "task_"))})

IGNORED_OPTIONS = ("n_threads", "n_threads_batch")
class CompareError(FitbenchError, ValueError):
    """Files that cannot be compared; the message names the file."""


def welch(n1: int, m1: float, v1: float, n2: int, m2: float, v2: float) -> tuple[bool | None, float | None]:
    """(significant?, t statistic); None when a side has fewer than two samples."""
    if n1 < 2 or n2 < 2:
        return None, None
    se2 = v1 / n1 + v2 / n2
    if se2 <= 0:
        return (m1 != m2), math.inf if m1 != m2 else 0.0
    t = (m2 - m1) / math.sqrt(se2)
    df = se2 ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1)) if (v1 or v2) else n1 + n2 - 2
    return abs(t) > t_critical(df), t


def expand(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Files, globs or folders -> result files: harness.results.expand_result_files (raises ResultsError)."""
    return expand_result_files(patterns)


# The budget a case asked for (null: none), enforced or not. Rows of schema 1.3 on say it
# (``budget_requested_bytes``, null when none was asked); older rows are read from what they
# were judged against: an enforced budget is the one asked for, and a judged-only budget other
# than the machine's RAM (what a run without a budget is judged against) was a yardstick asked for.
_MAJOR = "TRY_CAST(split_part(schema_version, '.', 1) AS INTEGER)"
_MINOR = "TRY_CAST(split_part(schema_version, '.', 2) AS INTEGER)"
REQUESTED_BUDGET_SQL = (
    f"CASE WHEN {_MAJOR} > {REQUESTED_SINCE[0]} OR ({_MAJOR} = {REQUESTED_SINCE[0]} AND {_MINOR} >= {REQUESTED_SINCE[1]}) "
    "THEN budget_requested_bytes "
    "WHEN budget_method IS NOT NULL AND budget_method <> 'none' THEN budget_bytes "
    "WHEN budget_bytes IS NOT DISTINCT FROM coalesce(ram_bytes, sys_mem_total_bytes) THEN NULL "
    "ELSE budget_bytes END")


@dataclass
class Side:
    label: str
    files: list[Path]
    info: dict[str, Any] = field(default_factory=dict)
    where: tuple[str, str] | None = None  # (column, value): only these rows of the files, e.g. one machine class


def _key_options_sql() -> str:
    # options_json minus the thread counts, canonical (json keys come sorted from the writer)
    expr = "options_json"
    for opt in IGNORED_OPTIONS:
        expr = f"json_remove({expr}::JSON, '$.{opt}')::VARCHAR"
    return expr


# Columns the queries use; a file from an older schema minor version may lack some.
USED_COLUMNS = ("artifact_sha256", "artifact_name", "model_label", "runtime", "runtime_version", "options_json",
                "n_ctx", "prompt_tokens", "gen_tokens", "budget_bytes", "budget_method", "budget_requested_bytes",
                "ram_bytes", "sys_mem_total_bytes", "case_label", "case_key", "run_id", "fit_class", "status",
                "machine_class", "machine_id", "schema_version", "turn", "workflow_json", "noise_flag", "parallel") \
    + tuple(m for m, *_ in METRICS)
# Absent from older files without anything to note: before workflows every row is case-level,
# and the requested budget is read from the budget columns (REQUESTED_BUDGET_SQL).
# noise_flag and parallel: schema 1.4 (before it, one session and no noise record)
SILENTLY_MISSING = ("turn", "workflow_json", "budget_requested_bytes", "noise_flag", "parallel")


def _source(con: duckdb.DuckDBPyConnection, files: str,
            where: tuple[str, str] | None = None) -> tuple[str, list[str]]:
    """A subquery over the files with every used column, NULL where the files lack it."""
    # hive_partitioning off: a fleet dataset's machine_class=<x> folders repeat a column the rows already hold
    scan = f"read_parquet([{files}], union_by_name = true, hive_partitioning = false)"
    present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
    missing = [c for c in USED_COLUMNS if c not in present and c not in SILENTLY_MISSING]
    types = {c.name: c.type for c in RESULT_COLUMNS}
    cols = ", ".join(c if c in present else f"CAST(NULL AS {_sql_type(types[c])}) AS {c}" for c in USED_COLUMNS)
    cond = ""
    if where is not None:
        column, value = where
        cond = f" WHERE {column} IS NOT DISTINCT FROM '{value.replace(chr(39), chr(39) * 2)}'"
    return f"(SELECT {cols} FROM {scan}{cond})", missing


def _sql_type(t: Any) -> str:
    import pyarrow as pa

    return "DOUBLE" if pa.types.is_floating(t) else "BIGINT" if pa.types.is_integer(t) else "BOOLEAN" \
        if pa.types.is_boolean(t) else "VARCHAR"


def _stats(metric: str, source: str) -> str:
    return (f"count({source}) AS {metric}_n, median({source}) AS {metric}_med, avg({source}) AS {metric}_mean, "
            f"coalesce(var_samp({source}), 0) AS {metric}_var")


def aggregate(con: duckdb.DuckDBPyConnection, side: Side, name: str) -> None:
    """One row per case identity (KEY): per-repetition figures over the rows, per-case figures
    over the measured cases (each (run, case, machine) once)."""
    files = _file_list(side.files)
    try:
        source, missing = _source(con, files, side.where)
    except duckdb.Error as exc:
        raise CompareError(f"{side.label}: cannot read the results ({str(exc).splitlines()[0][:160]})") from None
    fit_rank = "CASE fit_class " + " ".join(f"WHEN '{c}' THEN {i}" for i, c in enumerate(ORDER)) + " END"
    rep_metrics = [m for m, *_ in METRICS if m not in PER_CASE_COLUMNS]
    case_metrics = [m for m, *_ in METRICS if m in PER_CASE_COLUMNS]
    keys = ", ".join(KEY)
    same_key = " AND ".join(f"r.{k} IS NOT DISTINCT FROM p.{k}" for k in KEY)
    try:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE {name} AS
            WITH src AS (SELECT *, {_key_options_sql()} AS key_options, {REQUESTED_BUDGET_SQL} AS budget,
                                coalesce(parallel, 1) AS sessions FROM {source}),
            measured AS (SELECT {keys}, {", ".join(f"max({m}) AS {m}" for m in case_metrics)}
                         FROM src GROUP BY {keys}, run_id, case_key, machine_id),
            per_case AS (SELECT {keys}, {", ".join(_stats(m, m) for m in case_metrics)} FROM measured GROUP BY {keys}),
            per_rep AS (
                SELECT {keys}, any_value(artifact_name) AS artifact_name, any_value(model_label) AS model_label,
                       any_value(case_label) AS case_label,
                       string_agg(DISTINCT options_json, ' | ') AS options_seen,
                       string_agg(DISTINCT runtime_version, ',') AS runtime_versions,
                       string_agg(DISTINCT budget_method, ',' ORDER BY budget_method) AS budget_methods,
                       max({fit_rank}) AS fit_rank,
                       count(*) FILTER (WHERE status <> 'ok') AS failures,
                       coalesce(bool_or(noise_flag), false) AS noisy,
                       string_agg(DISTINCT status, ',') FILTER (WHERE status <> 'ok') AS failure_statuses,
                       {", ".join(_stats(m, m) for m in rep_metrics)}
                FROM src GROUP BY {keys})
            SELECT r.*, p.* EXCLUDE ({keys}) FROM per_rep r JOIN per_case p ON {same_key}
        """)
        meta = con.execute(f"""
            SELECT string_agg(DISTINCT machine_class, ','), string_agg(DISTINCT machine_id, ','),
                   string_agg(DISTINCT schema_version, ','), string_agg(DISTINCT runtime || ' ' || runtime_version, ','),
                   count(*)
            FROM {source}
        """).fetchone()
    except duckdb.Error as exc:
        raise CompareError(f"{side.label}: cannot read the results ({str(exc).splitlines()[0][:160]})") from None
    side.info = {"machine_class": meta[0], "machine_id": meta[1], "schema_version": meta[2],
                 "runtime_versions": meta[3], "rows": meta[4], "missing_columns": missing}


@dataclass
class Comparison:
    baseline: Side
    candidate: Side
    rows: list[dict[str, Any]]
    unmatched_baseline: list[str]
    unmatched_candidate: list[str]
    notes: list[str]

    def regressions(self, threshold_pct: float) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "metric" and _regression(r, threshold_pct)] \
            + [r for r in self.rows if r["kind"] == "fit" and r["worse"]]


def _regression(r: dict[str, Any], threshold_pct: float) -> bool:
    """Worse than the threshold, and either significant or (an untested per-case figure) beyond its floor."""
    if r["worse_pct"] is None or r["worse_pct"] <= threshold_pct:
        return False
    if r["test"] == "none":
        return r["beyond_floor"]
    if r.get("within_noise"):
        return False
    return bool(r["significant"])


def _ci_pct(n: int, mean: float, var: float) -> float | None:
    """Half-width of a side's 95 % confidence interval, in percent of its mean."""
    if n < 2 or not mean:
        return None
    return t_critical(n - 1) * math.sqrt(var / n) / abs(mean) * 100


# ``workflow_json`` and ``turn``: a workflow matches only the same session shape, turn by turn; its
# case-level rows match as whole cases. Files older than workflows read both as NULL (single-turn).
# ``budget``: the requested budget (REQUESTED_BUDGET_SQL), null when none was asked.
# ``sessions``: parallel sessions (schema 1.4; older files are one session), so 4 users never match 1.
KEY = ("artifact_sha256", "runtime", "key_options", "n_ctx", "prompt_tokens", "gen_tokens", "budget",
       "workflow_json", "turn", "sessions")


def metric_row(case: str, metric: str, b: dict[str, Any], c: dict[str, Any], threshold_pct: float) -> dict[str, Any] | None:
    """The comparison of one metric of one matched case, or None when a side did not measure it."""
    _, label, unit, higher_better, min_effect = next(m for m in METRICS if m[0] == metric)
    n1, n2 = b[f"{metric}_n"], c[f"{metric}_n"]
    if not n1 or not n2:
        return None
    per_case = metric in PER_CASE_COLUMNS
    m1, m2 = b[f"{metric}_med"], c[f"{metric}_med"]
    change = (m2 - m1) / m1 * 100 if m1 else None
    # beyond the figure's repeatability floor (a change from 0 counts when the value moved at all)
    beyond_floor = abs(change) >= min_effect and change != 0 if change is not None else m1 != m2
    if per_case and (n1 < 2 or n2 < 2):
        test, significant = "none", None  # one figure per side: nothing to test
    else:
        test = "welch over cases" if per_case else "welch over repetitions"
        significant, _ = welch(n1, b[f"{metric}_mean"], b[f"{metric}_var"], n2, c[f"{metric}_mean"], c[f"{metric}_var"])
        if significant and change is not None and abs(change) < min_effect:
            significant = False
    worse = None if change is None else (-change if higher_better else change)
    row = {"kind": "metric", "case": case, "metric": label, "unit": unit, "baseline": m1, "candidate": m2,
           "change_pct": change, "worse_pct": worse, "significant": significant, "per_case": per_case, "test": test,
           "min_effect_pct": min_effect, "beyond_floor": beyond_floor, "n": f"{n1}/{n2}" + (" cases" if per_case else "")}
    if not per_case:  # the noise a per-repetition difference must clear
        cis = [c for c in (_ci_pct(n1, b[f"{metric}_mean"], b[f"{metric}_var"]),
                           _ci_pct(n2, c[f"{metric}_mean"], c[f"{metric}_var"])) if c is not None]
        row["noise_pct"] = max(cis) if cis else None
        row["noisy"] = bool(b.get("noisy") or c.get("noisy"))
        row["within_noise"] = row["noisy"] or (change is not None and row["noise_pct"] is not None
                                               and abs(change) <= row["noise_pct"])
    row["regression"] = _regression(row, threshold_pct)
    # What a default view shows: a significant change, a per-case figure that moved beyond its
    # floor, and repetitions too few to test (the reader should know nothing was tested).
    if test == "none":
        row["notable"] = beyond_floor
    else:
        row["notable"] = significant is None or bool(significant)
    return row


def compare(baseline: Side, candidate: Side, threshold_pct: float = 5.0) -> Comparison:
    con = duckdb.connect()
    aggregate(con, baseline, "base")
    aggregate(con, candidate, "cand")
    join = " AND ".join(f"b.{k} IS NOT DISTINCT FROM c.{k}" for k in KEY)
    cols = [d for d in con.execute("SELECT * FROM base LIMIT 0").description]
    names = [d[0] for d in cols]
    matched = con.execute(f"SELECT b.*, c.* FROM base b JOIN cand c ON {join} "
                          "ORDER BY b.model_label, b.n_ctx, b.prompt_tokens, b.budget NULLS FIRST, b.turn NULLS LAST").fetchall()
    turn = "CASE WHEN {0}.turn IS NULL THEN '' ELSE ' turn ' || {0}.turn END"
    unmatched_b = [r[0] for r in con.execute(f"SELECT b.model_label || ' ' || b.case_label || {turn.format('b')} "
                                             f"FROM base b ANTI JOIN cand c ON {join} ORDER BY 1").fetchall()]
    unmatched_c = [r[0] for r in con.execute(f"SELECT c.model_label || ' ' || c.case_label || {turn.format('c')} "
                                             f"FROM cand c ANTI JOIN base b ON {join} ORDER BY 1").fetchall()]
    rows: list[dict[str, Any]] = []
    option_changes: set[str] = set()
    version_changes: set[str] = set()
    method_changes: set[str] = set()
    for record in matched:
        b = dict(zip(names, record[:len(names)]))
        c = dict(zip(names, record[len(names):]))
        case = f"{b['model_label']} {b['runtime']} {b['case_label']}" + (f" turn {b['turn']}" if b["turn"] is not None else "")
        if b["options_seen"] != c["options_seen"]:
            option_changes.add(f"{b['options_seen']} -> {c['options_seen']}")
        if b["runtime_versions"] != c["runtime_versions"]:
            version_changes.add(f"{b['runtime']} {b['runtime_versions']} -> {c['runtime_versions']}")
        if b["budget"] is not None and b["budget_methods"] != c["budget_methods"]:
            method_changes.add(f"{b['budget'] / 2**20:,.0f} MiB: {b['budget_methods'] or '-'} -> {c['budget_methods'] or '-'}")
        for metric, *_ in METRICS:
            row = metric_row(case, metric, b, c, threshold_pct)
            if row is not None:
                rows.append(row)
        fb, fc = b["fit_rank"], c["fit_rank"]
        if fb != fc or b["failures"] or c["failures"]:
            cls_b = ORDER[fb] if fb is not None else b["failure_statuses"] or "-"
            cls_c = ORDER[fc] if fc is not None else c["failure_statuses"] or "-"
            worse_fit = fb is not None and fc is not None and fc > fb
            rows.append({"kind": "fit", "case": case, "metric": "fit class", "baseline": cls_b, "candidate": cls_c,
                         "worse": worse_fit, "regression": worse_fit, "notable": True})
    notes = []
    bi, ci = baseline.info, candidate.info
    if bi["machine_class"] != ci["machine_class"] or bi["machine_id"] != ci["machine_id"]:
        notes.append(f"different machines: {bi['machine_class']} (id {bi['machine_id']}) vs "
                     f"{ci['machine_class']} (id {ci['machine_id']}); differences include the hardware")
    if bi["schema_version"] != ci["schema_version"]:
        notes.append(f"schema versions differ: {bi['schema_version']} vs {ci['schema_version']}; compared on shared columns")
    for side in (baseline, candidate):
        if side.info["missing_columns"]:
            notes.append(f"{side.label}: older schema {side.info['schema_version']} lacks "
                         f"{', '.join(side.info['missing_columns'])}; read as empty")
    for change in sorted(version_changes):
        notes.append(f"runtime version changed: {change}")
    for change in sorted(option_changes):
        notes.append(f"options differ (not part of the case key): {change}")
    for change in sorted(method_changes):
        notes.append(f"budget enforcement differs (none = judged only, not enforced): {change}")
    return Comparison(baseline, candidate, rows, unmatched_b, unmatched_c, notes)


def fmt_value(value: Any, unit: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "MiB":
        return f"{value / 2**20:,.1f}"
    if unit == "s":
        return f"{value:,.3f}"
    if unit in ("", "nats"):  # perplexity, KL, pass rates: small numbers whose digits matter
        return f"{value:,.4g}"
    return f"{value:,.1f}"


def verdict_text(row: dict[str, Any]) -> str:
    if row["kind"] == "fit":
        return "WORSE FIT" if row["worse"] else "fit changed"
    if row.get("test") == "none":  # a per-case figure, one per side: compared with its floor, not tested
        if row["regression"]:
            return "REGRESSION"
        if not row["beyond_floor"]:
            return "same (one figure)"
        return "better (one figure)" if (row["worse_pct"] or 0) < 0 else "worse (one figure, within threshold)"
    if row["significant"] is None:
        return "untested (n<2)"
    if row["regression"]:
        return "REGRESSION"
    if row.get("noisy") and row["significant"]:
        return "noisy run (noise_flag): not judged"
    if row.get("within_noise") and row["significant"]:
        return f"within noise (±{row['noise_pct']:.1f}%)"
    if row["significant"]:
        return "better" if (row["worse_pct"] or 0) < 0 else "worse (within threshold)"
    return "noise"


def metric_label(row: dict[str, Any]) -> str:
    """``peak RSS (MiB, per case)``: the unit, and whether the figure is the case's rather than a repetition's."""
    parts = [p for p in (row.get("unit"), "per case" if row.get("per_case") else None) if p]
    return row["metric"] + (f" ({', '.join(parts)})" if parts else "")


def table_rows(cmp: Comparison) -> list[dict[str, str]]:
    out = []
    for r in cmp.rows:
        unit = r.get("unit")
        out.append({
            "case": r["case"], "metric": metric_label(r),
            "baseline": fmt_value(r["baseline"], unit), "candidate": fmt_value(r["candidate"], unit),
            "change": "-" if r.get("change_pct") is None else f"{r['change_pct']:+.1f}%",
            "n": r.get("n", "-"), "verdict": verdict_text(r),
        })
    return out


def to_json(cmps: list[Comparison], threshold: float) -> str:
    return json.dumps([{
        "baseline": [str(p) for p in c.baseline.files], "candidate": [str(p) for p in c.candidate.files],
        "notes": c.notes, "unmatched_baseline": c.unmatched_baseline, "unmatched_candidate": c.unmatched_candidate,
        "rows": c.rows, "regressions": len(c.regressions(threshold)),
    } for c in cmps], indent=2, default=str)


# Columns a cross-machine view may split the rows by.
BY_COLUMNS = ("machine_class", "machine_id")


def split_by(files: list[Path], column: str, baseline: str | None = None) -> list[Side]:
    """One Side per value of ``column`` in the files (baseline first), e.g. one per machine class of a fleet run."""
    if column not in BY_COLUMNS:
        raise CompareError(f"--by {column}: choose one of {', '.join(BY_COLUMNS)}")
    con = duckdb.connect()
    source, missing = _source(con, _file_list(files))
    if column in missing:
        raise CompareError(f"the results have no {column} column to split by")
    values = [r[0] for r in con.execute(f"SELECT DISTINCT {column} FROM {source} WHERE {column} IS NOT NULL "
                                        "ORDER BY 1").fetchall()]
    if baseline is not None:
        if baseline not in values:
            raise CompareError(f"--baseline {baseline!r} is not a {column} in the results; they hold: {', '.join(values)}")
        values = [baseline] + [v for v in values if v != baseline]
    if len(values) < 2:
        raise CompareError(f"the results hold one {column} ({', '.join(values) or 'none'}); "
                           f"--by {column} needs results from at least two")
    return [Side(f"{column}={v}", files, where=(column, v)) for v in values]


def _file_list(files: list[Path]) -> str:
    return ", ".join(f"'{str(p).replace(chr(39), chr(39) * 2)}'" for p in files)


def cross_table(sides: list[Side]) -> tuple[list[str], list[dict[str, Any]]]:
    """The cross-machine matrix: one row per case, per side its fit class, decode tok/s, TTFT and peak memory.

    Returns (side labels, rows); each row has ``case`` and, per side label, a dict of medians (or None
    where that side did not measure the case)."""
    con = duckdb.connect()
    names = []
    for i, side in enumerate(sides):
        aggregate(con, side, f"s{i}")
        names.append(f"s{i}")
    keys = " UNION ".join(f"SELECT {', '.join(KEY)}, model_label, runtime AS rt, case_label FROM {n}" for n in names)
    cases = con.execute(f"SELECT DISTINCT * FROM ({keys}) ORDER BY model_label, rt, n_ctx, prompt_tokens").fetchall()
    cols = [d[0] for d in con.execute(f"SELECT * FROM {names[0]} LIMIT 0").description]
    rows = []
    for case in cases:
        ident = dict(zip(list(KEY) + ["model_label", "rt", "case_label"], case))
        row: dict[str, Any] = {"case": f"{ident['model_label']} {ident['rt']} {ident['case_label']}"}
        cond = " AND ".join(f"{k} IS NOT DISTINCT FROM ?" for k in KEY)
        for side, name in zip(sides, names):
            found = con.execute(f"SELECT * FROM {name} WHERE {cond}", [ident[k] for k in KEY]).fetchone()
            if found is None:
                row[side.label] = None
                continue
            rec = dict(zip(cols, found))
            fit = ORDER[rec["fit_rank"]] if rec["fit_rank"] is not None else (rec["failure_statuses"] or None)
            row[side.label] = {"fit": fit, "decode_tok_s": rec["decode_tok_s_med"], "ttft_s": rec["ttft_s_med"],
                               "peak_rss_bytes": rec["peak_rss_bytes_med"], "failures": rec["failures"]}
        rows.append(row)
    return [s.label for s in sides], rows
