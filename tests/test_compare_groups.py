"""compare: what a case is (the budget asked for) and which figures are samples (per repetition vs per case)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.analyse.compare import (
    METRICS,
    PER_CASE_COLUMNS,
    REQUESTED_BUDGET_SQL,
    Side,
    compare,
    expand,
    requested_budget,
    table_rows,
)
from harness.results import RESULT_COLUMNS, ResultWriter
from tests.test_cli import fitbench

MiB = 2**20
RAM = 24 << 30
BUDGETS = (None, 200 * MiB, 60 * MiB)  # scenarios/budgets.yaml: none, 200MiB, 60MiB


def rows_for(run_id: str, budget: int | None, method: str = "none", reps: int = 5, decode: float = 80.0,
             peak: int = 300 * MiB, ppl: float | None = None, case_key: str | None = None) -> list[dict]:
    """Rows as harness.rows writes them: the case's figures (peak, quality) copied onto each repetition."""
    label = "pp1024+tg16 @ ctx2048" + (f" <= {budget // MiB}MiB" if budget else "")
    return [{
        "run_id": run_id, "case_key": case_key or f"k{budget}", "case_index": 0, "case_label": label,
        "repetition": rep, "status": "ok", "model_label": "m", "artifact_name": "a.gguf", "artifact_sha256": "f" * 64,
        "runtime": "llama.cpp", "runtime_version": "0.3.36", "options_json": json.dumps({"n_threads": 2}),
        "n_ctx": 2048, "prompt_tokens": 1024, "gen_tokens": 16,
        "budget_requested_bytes": budget, "budget_bytes": budget or RAM, "budget_method": method if budget else "none",
        "ram_bytes": RAM, "decode_tok_s": decode + (rep % 3) * 0.5, "prefill_tok_s": 300.0, "ttft_s": 1.0,
        "peak_rss_bytes": peak, "quality_ppl": ppl, "fit_class": "fits",
        "machine_class": "cpu-x86_64-24GiB", "machine_id": "m1",
    } for rep in range(reps)]


def write(path: Path, rows: list[dict]) -> Path:
    w = ResultWriter(path)
    w.add_case(rows, {})
    return path


def budgets_run(path: Path) -> Path:
    """scenarios/budgets.yaml on a machine without a writable cgroup: every budget judged only."""
    return write(path, [r for b in BUDGETS for r in rows_for(path.stem, b)])


def as_older_schema(path: Path, out: Path) -> Path:
    """The same rows as a 1.2 file wrote them: no budget_requested_bytes."""
    table = pq.read_table(path).drop(["budget_requested_bytes"])
    table = table.set_column(table.schema.get_field_index("schema_version"), "schema_version",
                             pa.array(["1.2"] * table.num_rows))
    pq.write_table(table.replace_schema_metadata({b"fitbench.schema_version": b"1.2"}), out)
    return out


# --- the budget is part of the case ---------------------------------------------------------------------

def test_three_budget_groups_stay_three_without_a_cgroup(tmp_path):
    a, b = budgets_run(tmp_path / "a.parquet"), budgets_run(tmp_path / "b.parquet")
    cmp = compare(Side("a", [a]), Side("b", [b]))
    decode = [r for r in cmp.rows if r["metric"] == "decode"]
    assert [r["case"] for r in decode] == ["m llama.cpp pp1024+tg16 @ ctx2048",
                                           "m llama.cpp pp1024+tg16 @ ctx2048 <= 60MiB",
                                           "m llama.cpp pp1024+tg16 @ ctx2048 <= 200MiB"]
    assert {r["n"] for r in decode} == {"5/5"}  # each group its own five repetitions, not fifteen pooled


def test_files_older_than_the_requested_budget_column_keep_their_groups(tmp_path):
    new = budgets_run(tmp_path / "new.parquet")
    old = as_older_schema(new, tmp_path / "old.parquet")
    cmp = compare(Side("old", [old]), Side("new", [new]))
    assert len([r for r in cmp.rows if r["metric"] == "decode"]) == 3
    assert not cmp.unmatched_baseline and not cmp.unmatched_candidate
    assert not any("budget_requested_bytes" in n for n in cmp.notes)  # read from the budget columns, nothing lost


def test_an_enforced_and_a_judged_budget_match_with_a_note(tmp_path):
    a = write(tmp_path / "a.parquet", rows_for("a", 200 * MiB, "none"))
    b = write(tmp_path / "b.parquet", rows_for("b", 200 * MiB, "cgroup-v2"))
    cmp = compare(Side("a", [a]), Side("b", [b]))
    assert len([r for r in cmp.rows if r["metric"] == "decode"]) == 1
    assert any("budget enforcement differs" in n and "none -> cgroup-v2" in n for n in cmp.notes)


@pytest.mark.parametrize("row, expected", [
    ({"schema_version": "1.3", "budget_requested_bytes": None, "budget_bytes": RAM, "budget_method": "none"}, None),
    ({"schema_version": "1.3", "budget_requested_bytes": 5, "budget_bytes": 5, "budget_method": "none"}, 5),
    ({"schema_version": "1.2", "budget_bytes": RAM, "budget_method": "none", "ram_bytes": RAM}, None),
    ({"schema_version": "1.2", "budget_bytes": 7, "budget_method": "none", "ram_bytes": RAM}, 7),
    ({"schema_version": "1.2", "budget_bytes": RAM, "budget_method": "cgroup-v1", "ram_bytes": RAM}, RAM),
    ({"schema_version": "1.2", "budget_bytes": 7, "budget_method": "none", "sys_mem_total_bytes": 7}, None),
    ({"schema_version": "1.0"}, None),
])
def test_requested_budget_in_python_and_sql_agree(row, expected):
    import duckdb

    assert requested_budget(row) == expected
    cols = {c: row.get(c) for c in ("schema_version", "budget_requested_bytes", "budget_bytes", "budget_method",
                                    "ram_bytes", "sys_mem_total_bytes")}
    con = duckdb.connect()
    con.execute("CREATE TABLE t (schema_version VARCHAR, budget_requested_bytes BIGINT, budget_bytes BIGINT, "
                "budget_method VARCHAR, ram_bytes BIGINT, sys_mem_total_bytes BIGINT)")
    con.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)", list(cols.values()))
    assert con.execute(f"SELECT {REQUESTED_BUDGET_SQL} FROM t").fetchone()[0] == expected


# --- per-case figures are not samples ---------------------------------------------------------------------

def test_the_per_case_set_is_one_definition_of_real_columns():
    names = {c.name for c in RESULT_COLUMNS}
    assert PER_CASE_COLUMNS <= names  # a typo would silently turn a figure into a per-repetition sample
    assert {"peak_rss_bytes", "vmhwm_bytes", "quality_ppl", "quality_kl_mean", "task_pass_rate", "load_s"} <= PER_CASE_COLUMNS
    assert not {"decode_tok_s", "prefill_tok_s", "ttft_s", "rep_peak_rss_bytes", "read_bytes"} & PER_CASE_COLUMNS


def test_a_one_percent_change_of_a_per_case_figure_over_five_repetitions_is_not_significant(tmp_path):
    a = write(tmp_path / "a.parquet", rows_for("a", None, peak=300 * MiB, ppl=20.0))
    b = write(tmp_path / "b.parquet", rows_for("b", None, peak=303 * MiB, ppl=20.2))
    cmp = compare(Side("a", [a]), Side("b", [b]))
    by = {r["metric"]: r for r in cmp.rows}
    for metric in ("peak RSS", "perplexity"):
        r = by[metric]
        assert r["change_pct"] == pytest.approx(1.0)
        # one figure per side (the five rows are copies of it): untested, so never significant
        assert (r["per_case"], r["test"], r["significant"], r["n"]) == (True, "none", None, "1/1 cases")
        assert r["regression"] is False
    assert cmp.regressions(5.0) == []
    assert by["decode"]["n"] == "5/5" and by["decode"]["test"] == "welch over repetitions"
    table = {t["metric"]: t for t in table_rows(cmp)}
    assert "one figure" in table["peak RSS (MiB, per case)"]["verdict"]
    assert table["peak RSS (MiB, per case)"]["n"] == "1/1 cases"
    assert table["decode (tok/s)"]["n"] == "5/5"


def test_a_large_per_case_change_still_fails_the_gate(tmp_path):
    a = write(tmp_path / "a.parquet", rows_for("a", None, peak=300 * MiB))
    b = write(tmp_path / "b.parquet", rows_for("b", None, peak=360 * MiB))
    cmp = compare(Side("a", [a]), Side("b", [b]))
    [reg] = cmp.regressions(5.0)
    assert reg["metric"] == "peak RSS" and reg["test"] == "none" and reg["significant"] is None
    assert cmp.regressions(25.0) == []
    same = compare(Side("a", [a]), Side("a2", [a]))
    assert [t["verdict"] for t in table_rows(same) if t["metric"].startswith("peak RSS")] == ["same (one figure)"]
    assert not [r for r in same.rows if r["notable"]]  # nothing for a default view to show


def test_per_case_figures_are_tested_over_cases_when_runs_repeat_them(tmp_path):
    def runs(name: str, peaks: list[float]) -> Path:
        rows = [r for i, p in enumerate(peaks) for r in rows_for(f"{name}{i}", None, peak=int(p * MiB))]
        return write(tmp_path / f"{name}.parquet", rows)

    a = runs("a", [300, 301, 299, 300.5])
    b = runs("b", [304, 305, 303, 304.5])  # +1.3 %, the runs' spread well below it
    [r] = [r for r in compare(Side("a", [a]), Side("b", [b])).rows if r["metric"] == "peak RSS"]
    assert (r["test"], r["n"], r["significant"]) == ("welch over cases", "4/4 cases", True)
    c = runs("c", [290, 318, 296, 313])  # a like shift, drowned in run-to-run spread
    [r] = [r for r in compare(Side("a", [a]), Side("c", [c])).rows if r["metric"] == "peak RSS"]
    assert r["significant"] is False


def test_json_marks_per_case_rows(tmp_path):
    a = write(tmp_path / "a.parquet", rows_for("a", None))
    b = write(tmp_path / "b.parquet", rows_for("b", None, peak=330 * MiB))
    data = json.loads(fitbench("compare", str(a), str(b), "--format", "json").stdout)
    by = {r["metric"]: r for r in data[0]["rows"]}
    assert by["peak RSS"]["per_case"] is True and by["peak RSS"]["test"] == "none"
    assert by["decode"]["per_case"] is False and by["decode"]["test"] == "welch over repetitions"
    assert {m for m, *_ in METRICS} >= {"peak_rss_bytes", "decode_tok_s"}


# --- inputs: one resolver ---------------------------------------------------------------------------------

def test_globs_with_timeline_companions_name_each_result_file_once(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name in ("a", "b"):
        w = ResultWriter(results / f"{name}.parquet")
        w.add_case(rows_for(name, None), {"t_s": [0.0, 0.1], "rss_bytes": [1, 2], "run_id": [name] * 2,
                                          "case_key": ["kNone"] * 2, "case_index": [0, 0]})
        assert w.timeline_path.exists()
    found = expand([str(results / "*.parquet")])
    assert found == [results / "a.parquet", results / "b.parquet"]
    assert expand([str(results / "a.timeline.parquet")]) == [results / "a.parquet"]
    proc = fitbench("compare", str(results / "a*.parquet"), str(results / "b*.parquet"), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["baseline"] == [str(results / "a.parquet")]
    missing = fitbench("compare", str(results / "a.parquet"), str(tmp_path / "none*.parquet"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no result files" in missing.stderr
