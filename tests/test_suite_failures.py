"""Every way a case can die becomes a row, and the suite goes on.

These use misbehaving fake runners inside the real worker process, so the
harness's isolation, timeout, crash handling and result writing are real.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from harness.measure.machine import fingerprint
from harness.preflight import check_scenario
from harness.results import ResultWriter, read_results
from harness.scenario import parse_scenario
from harness.suite import run_suite


def scenario(artifact: Path, runtimes: list[str], **extra):
    data = {
        "name": "failures",
        "models": [{"artifact": str(artifact), "runtime": f"fake_runners:{r}", "label": r} for r in runtimes],
        "contexts": [256],
        "gen_tokens": 8,
        "repetitions": 2,
        "warmup": 0,
        "timeout": 20,
    }
    data.update(extra)
    return parse_scenario(data)


def run(s, tmp_path: Path):
    writer = ResultWriter(tmp_path / "r.parquet")
    results = run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "test-run")
    return results, read_results(writer.results_path).to_pandas()


def test_failures_are_rows_and_the_suite_goes_on(tiny_gguf, tmp_path):
    s = scenario(tiny_gguf, ["LoadFailRunner", "RaisingRunner", "CrashRunner", "FakeRunner"])
    results, df = run(s, tmp_path)
    assert [r.status for r in results] == ["load_error", "runtime_error", "crashed", "ok"]
    by_label = {label: g for label, g in df.groupby("model_label")}
    assert "refuses this artifact" in by_label["LoadFailRunner"]["error"].iloc[0]
    assert "failed mid-generation" in by_label["RaisingRunner"]["error"].iloc[0]
    crash = by_label["CrashRunner"].iloc[0]
    assert "SIGSEGV" in crash["error"] and crash["exit_code"] == -11
    ok = by_label["FakeRunner"]
    assert list(ok["status"]) == ["ok", "ok"] and list(ok["repetition"]) == [0, 1]
    assert (ok["gen_tokens"] == 8).all() and (ok["decode_tok_s"] > 0).all()
    # failure rows still say what was attempted, on what
    assert df["case_key"].notna().all() and df["machine_class"].notna().all()
    assert df["artifact_sha256"].str.len().eq(64).all()


def test_a_hang_is_killed_at_the_timeout_with_its_children(tiny_gguf, tmp_path, monkeypatch):
    marker = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FITBENCH_TEST_GRANDCHILD", str(marker))
    s = scenario(tiny_gguf, ["HangRunner", "FakeRunner"], timeout=4)
    t0 = time.monotonic()
    results, df = run(s, tmp_path)
    assert time.monotonic() - t0 < 30
    assert [r.status for r in results] == ["timeout", "ok"]
    assert "timeout of 4 s" in df[df.status == "timeout"]["error"].iloc[0]
    grandchild = int(marker.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_unavailable_runtime_at_run_time_is_a_row(tiny_gguf, tmp_path):
    s = scenario(tiny_gguf, ["UnavailableRunner"])
    from harness.suite import run_case

    result = run_case(s.cases()[0], check_scenario(scenario(tiny_gguf, ["FakeRunner"]))[tiny_gguf], fingerprint(), "r")
    assert result.status == "unavailable" and "pip install fakeruntime" in result.error


def test_memory_of_the_child_is_measured(tiny_gguf, tmp_path):
    s = scenario(tiny_gguf, ["FakeRunner"], repetitions=1)
    s.models[0].options["alloc_mb"] = 150
    results, df = run(s, tmp_path)
    row = df.iloc[0]
    assert row["peak_rss_bytes"] - row["baseline_rss_bytes"] > 140 << 20
    assert abs(row["peak_rss_bytes"] - row["vmhwm_bytes"]) / row["vmhwm_bytes"] < 0.03
    # the worker does not carry the parent's libraries (pyarrow, pandas, rich)
    assert row["baseline_rss_bytes"] < 60 << 20


@pytest.mark.parametrize("n_ctx, fill", [(256, 0.5)])
def test_timeline_is_written_with_phases(tiny_gguf, tmp_path, n_ctx, fill):
    import pyarrow.parquet as pq

    s = scenario(tiny_gguf, ["FakeRunner"], contexts=[n_ctx], fill=fill, warmup=1, repetitions=2)
    # every phase longer than the sampler's timed grid (100 ms): the warm-up's 4 tokens take 240 ms
    s.models[0].options["token_delay"] = 0.06
    writer = ResultWriter(tmp_path / "r.parquet")
    run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "test-run")
    tl = pq.read_table(writer.timeline_path).to_pandas()
    assert {"load", "warmup", "rep0", "rep1"} <= set(tl["phase"])
    assert tl["t_s"].is_monotonic_increasing


def test_an_obviously_too_big_case_is_skipped_unless_forced(tmp_path):
    from tests.conftest import write_tiny_gguf

    huge = write_tiny_gguf(tmp_path / "huge.gguf", context_length=1 << 20, block_count=80, embedding_length=8192,
                           attention__head_count=64, attention__head_count_kv=64)
    s = scenario(huge, ["FakeRunner"], contexts=[1 << 20], fill=0.001, repetitions=1)
    writer = ResultWriter(tmp_path / "r.parquet")
    [result] = run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "guard")
    assert result.status == "skipped" and "--force" in result.error and "GiB" in result.error
    assert read_results(writer.results_path).column("fit_class").to_pylist() == [None]
    [forced] = run_suite(s.cases(), check_scenario(s), fingerprint(), ResultWriter(tmp_path / "f.parquet"), "g",
                         force=True)
    assert forced.status == "ok"


def test_exit_mid_stream_and_abort_are_crashes_with_the_runtime_last_words(tiny_gguf, tmp_path):
    s = scenario(tiny_gguf, ["ExitMidStreamRunner", "AbortRunner", "FakeRunner"])
    results, df = run(s, tmp_path)
    assert [r.status for r in results] == ["crashed", "crashed", "ok"]
    assert "exited with code 3" in results[0].error
    assert "SIGABRT" in results[1].error and "GGML_ASSERT" in results[1].error  # the log tail travels along


def test_unbounded_allocation_under_a_budget_is_oom(tiny_gguf, tmp_path):
    from harness.measure.budget import create_budget

    probe = create_budget(1 << 30)
    if probe is None:
        pytest.skip("no writable cgroup memory controller: an unbounded allocation cannot be contained here")
    probe.close()
    s = scenario(tiny_gguf, ["HogRunner", "FakeRunner"], budget="256MiB")
    results, df = run(s, tmp_path)
    assert [r.status for r in results] == ["oom", "ok"]
    assert "256 MiB budget" in results[0].error
    assert df[df.status == "oom"]["fit_class"].tolist() == ["no_fit"]
