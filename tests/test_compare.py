"""compare: matching, significance, regressions, fit changes, notes, formats, bad files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from harness.analyse.compare import CompareError, Side, compare, expand, split_by, t_critical, welch
from harness.results import ResultsError, ResultWriter
from tests.test_cli import fitbench

MiB = 2**20


def write_run(path: Path, decode: list[float], ttft: float = 1.0, fit: str = "fits", machine: str = "m1",
              n_ctx: int = 2048, threads: int = 2, extra_case: bool = False, peak: int = 300 * MiB,
              noisy: bool | None = None) -> Path:
    rows = []
    cases = [(n_ctx, "k1")] + ([(4096, "k2")] if extra_case else [])
    for n, key in cases:
        for rep, d in enumerate(decode):
            rows.append({
                "run_id": path.stem, "case_key": key, "case_index": 0, "case_label": f"pp{n // 2}+tg32 @ ctx{n}",
                "repetition": rep, "status": "ok", "model_label": "m", "artifact_name": "a.gguf",
                "artifact_sha256": "f" * 64, "runtime": "llama.cpp", "runtime_version": "0.3.36",
                "options_json": json.dumps({"n_threads": threads}), "n_ctx": n, "prompt_tokens": n // 2,
                "gen_tokens": 32, "budget_bytes": 24 << 30, "budget_method": "none", "decode_tok_s": d,
                "prefill_tok_s": 300.0 + rep, "ttft_s": ttft + 0.001 * rep, "peak_rss_bytes": peak, "fit_class": fit,
                "machine_class": "cpu-x86_64-24GiB", "machine_id": machine, "noise_flag": noisy,
            })
    w = ResultWriter(path)
    w.add_case(rows, {})
    return path


def test_welch_and_t_table():
    assert t_critical(1) == 12.706 and t_critical(4.7) == 2.776 and t_critical(100) == 1.96
    sig, _ = welch(5, 100.0, 1.0, 5, 90.0, 1.0)
    assert sig is True
    sig, _ = welch(5, 100.0, 25.0, 5, 99.0, 25.0)
    assert sig is False
    assert welch(1, 100.0, 0.0, 5, 50.0, 1.0) == (None, None)


def test_same_runs_show_no_regression(tmp_path):
    rnd = random.Random(1)
    a = write_run(tmp_path / "a.parquet", [80 + rnd.gauss(0, 1) for _ in range(5)])
    b = write_run(tmp_path / "b.parquet", [80 + rnd.gauss(0, 1) for _ in range(5)])
    cmp = compare(Side("a", [a]), Side("b", [b]))
    assert cmp.regressions(5.0) == [] and not cmp.unmatched_baseline and not cmp.notes


def test_a_real_slowdown_is_flagged_and_threads_are_not_in_the_key(tmp_path):
    a = write_run(tmp_path / "a.parquet", [80, 81, 79, 80, 80.5])
    b = write_run(tmp_path / "b.parquet", [45, 46, 44, 45, 45.5], threads=1)
    cmp = compare(Side("a", [a]), Side("b", [b]))
    [reg] = cmp.regressions(5.0)
    assert reg["metric"] == "decode" and reg["change_pct"] == pytest.approx(-43.75, abs=0.1)
    assert any("n_threads" in n for n in cmp.notes)
    assert cmp.regressions(50.0) == []  # significant, but inside a 50 % threshold


def test_a_difference_within_the_noise_is_not_a_regression(tmp_path):
    from harness.analyse.compare import verdict_text

    a = write_run(tmp_path / "a.parquet", [80, 81, 79, 80, 80.5])
    b = write_run(tmp_path / "b.parquet", [45, 46, 44, 45, 45.5], noisy=True)  # a busy machine made it slow
    cmp = compare(Side("a", [a]), Side("b", [b]))
    [decode] = [r for r in cmp.rows if r["metric"] == "decode"]
    assert decode["significant"] and decode["noisy"] and cmp.regressions(5.0) == []
    assert verdict_text(decode) == "noisy run (noise_flag): not judged"
    # wide repetitions on one side: a 6 % change inside a ±20 % interval is not claimed
    c = write_run(tmp_path / "c.parquet", [80, 80.2, 79.8, 80.1, 79.9])
    d = write_run(tmp_path / "d.parquet", [60, 90, 70, 80, 76])
    [decode] = [r for r in compare(Side("c", [c]), Side("d", [d])).rows if r["metric"] == "decode"]
    assert decode["within_noise"] and decode["noise_pct"] > abs(decode["change_pct"]) and not decode["regression"]


def test_fit_class_changes_are_always_shown(tmp_path):
    a = write_run(tmp_path / "a.parquet", [80, 80, 80])
    b = write_run(tmp_path / "b.parquet", [80, 80, 80], fit="spill")
    cmp = compare(Side("a", [a]), Side("b", [b]))
    [fit] = [r for r in cmp.rows if r["kind"] == "fit"]
    assert (fit["baseline"], fit["candidate"], fit["worse"]) == ("fits", "spill", True)
    assert fit in cmp.regressions(99.0)


def test_machines_unmatched_cases_and_memory_jitter(tmp_path):
    a = write_run(tmp_path / "a.parquet", [80, 81, 79], extra_case=True)
    b = write_run(tmp_path / "b.parquet", [80, 81, 79], machine="m2", peak=300 * MiB + 4096)
    cmp = compare(Side("a", [a]), Side("b", [b]))
    assert any("different machines" in n for n in cmp.notes)
    assert cmp.unmatched_baseline == ["m pp2048+tg32 @ ctx4096"]
    mem = [r for r in cmp.rows if r["metric"] == "peak RSS"][0]
    # one figure per case and side: untested, and one page is below its floor
    assert (mem["test"], mem["significant"], mem["beyond_floor"], mem["regression"]) == ("none", None, False, False)


def test_bad_files_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("nope")
    # expand is harness.results.expand_result_files: its errors are ResultsError (a FitbenchError)
    with pytest.raises(ResultsError, match="junk.parquet: not a readable Parquet"):
        expand([str(junk)])
    with pytest.raises(ResultsError, match="no result files"):
        expand([str(tmp_path / "*.nothing")])
    with pytest.raises(ResultsError, match="file not found"):
        expand([str(tmp_path / "missing.parquet")])
    with pytest.raises(CompareError, match="--by"):
        split_by([junk], "hostname")


def test_cli_gates_ci(tmp_path):
    a = write_run(tmp_path / "a.parquet", [80, 81, 79, 80])
    b = write_run(tmp_path / "b.parquet", [81, 80, 79.5, 80])
    c = write_run(tmp_path / "c.parquet", [60, 61, 59, 60])
    assert fitbench("compare", str(a), str(b), "--fail-on-regression").returncode == 0
    slow = fitbench("compare", str(a), str(c), "--fail-on-regression", "--format", "markdown")
    assert slow.returncode == 1 and "| REGRESSION |" in slow.stdout
    assert "-25.0%" in slow.stdout and "regression(s)" in slow.stderr
    data = json.loads(fitbench("compare", str(a), str(c), "--format", "json").stdout)
    assert data[0]["regressions"] >= 1
    csv_out = fitbench("compare", str(a), str(c), "--format", "csv").stdout.splitlines()
    assert csv_out[0] == "case,metric,baseline,candidate,change,n,verdict"
    bad = fitbench("compare", str(a), str(tmp_path / "missing.parquet"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_an_older_schema_is_read_with_a_note(tmp_path):
    import pyarrow.parquet as pq

    new = write_run(tmp_path / "new.parquet", [80, 81, 79])
    table = pq.read_table(new).drop(["fit_class", "budget_method", "budget_bytes"])
    old = tmp_path / "old.parquet"
    table = table.set_column(table.schema.get_field_index("schema_version"), "schema_version",
                             pa.array(["1.0"] * table.num_rows))
    pq.write_table(table.replace_schema_metadata({b"fitbench.schema_version": b"1.0"}), old)
    cmp = compare(Side("old", [old]), Side("new", [new]))
    assert any("older schema 1.0 lacks" in n and "fit_class" in n for n in cmp.notes)
    assert [r for r in cmp.rows if r["metric"] == "decode"][0]["significant"] is False
