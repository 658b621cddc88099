"""Parallel sessions on fake runners: the timing figures, scenario and bench parsing, the rows, the
serving verdict, and the commands end to end (the real runtimes: tests/test_concurrency_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.benchsweep import BenchCase, Sweep, bench_records, expand
from harness.cli.run import users_verdict
from harness.fit import Thresholds, case_serving, max_users, serving_verdict
from harness.measure.machine import fingerprint
from harness.metrics import parallel_timing
from harness.preflight import check_scenario
from harness.results import ResultWriter
from harness.scenario import ScenarioError, parse_scenario
from harness.suite import run_suite
from tests.conftest import write_tiny_gguf
from tests.test_cli import assert_usage_error, fitbench

FAKE = "fake_runners:FakeParallelRunner"


def scenario(art: Path, runtime: str = FAKE, **extra) -> dict:
    return {"name": "conc", "models": [{"artifact": str(art), "runtime": runtime,
                                        "options": extra.pop("options", {"token_delay": 0.002})}],
            "contexts": [256], "prompt_tokens": [32], "gen_tokens": 6, "warmup": 0, "repetitions": 2, **extra}


# --- the figures ------------------------------------------------------------------------------------

def test_parallel_timing_from_stamps():
    # 3 sessions handed over at t=10: first tokens at 11, 12, 13 (queued prefills); then all step together.
    sessions = [[11.0, 13.5, 14.0, 14.5], [12.0, 13.5, 14.0, 14.5], [13.0, 13.5, 14.0, 14.5]]
    pt = parallel_timing(10.0, sessions, prompt_tokens=100)
    assert pt.session_ttft_s == [1.0, 2.0, 3.0]
    assert pt.ttft_p50_s == 2.0 and pt.ttft_p90_s == pytest.approx(2.8)
    # the shared phase starts at 13.0 (the last first token): 3 tokens each in 1.5 s
    assert pt.session_decode_tok_s == [2.0, 2.0, 2.0]
    assert pt.user_decode_tok_s == 2.0 and pt.user_decode_min_tok_s == 2.0
    assert pt.aggregate_decode_tok_s == pytest.approx(9 / 1.5)
    assert pt.prefill_tok_s == pytest.approx(300 / 3.0)
    assert pt.e2e_s == 4.5 and len(pt.itl) == 9
    with pytest.raises(ValueError, match="backwards"):
        parallel_timing(10.0, [[11.0, 10.5]], 10)
    with pytest.raises(ValueError, match="at least one"):
        parallel_timing(10.0, [[11.0], []], 10)


def test_a_slower_session_is_the_minimum_not_the_median():
    sessions = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 3.0, 5.0]]
    pt = parallel_timing(0.0, sessions, 10)
    assert pt.session_decode_tok_s == [1.0, 1.0, 0.5]
    assert pt.user_decode_tok_s == 1.0 and pt.user_decode_min_tok_s == 0.5
    assert pt.aggregate_decode_tok_s == pytest.approx(6 / 4.0)


# --- the scenario field and the bench flag ----------------------------------------------------------

def test_parallel_sweeps_and_keeps_single_session_keys(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    plain = parse_scenario(scenario(art), source="c.yaml").cases()
    swept = parse_scenario(scenario(art, parallel=[1, 2, 4, 4]), source="c.yaml").cases()
    assert [c.parallel for c in swept] == [1, 2, 4]  # repeated counts are one case
    assert swept[0].key == plain[0].key and plain[0].parallel == 1  # N=1 measures what it always did
    assert len({c.key for c in swept}) == 3
    assert swept[2].label == "4x(pp32+tg6) @ ctx256"
    assert parse_scenario(scenario(art, parallel=8), source="c.yaml").parallel == [8]


@pytest.mark.parametrize("value, where, words", [
    (0, "parallel[0]", "at least 1"), ([1, 300], "parallel[1]", "at most 256"), ("two", "parallel[0]", "integer"),
    ([], "parallel", "must not be empty"),
])
def test_bad_parallel_values_name_the_field(tmp_path, value, where, words):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(scenario(art, parallel=value), source="c.yaml")
    assert exc.value.where == where and words in exc.value.message


def test_parallel_is_not_for_workflows(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    data = {**scenario(art, parallel=[2]), "workflow": {"kind": "chat", "turns": 2}}
    for key in ("prompt_tokens", "gen_tokens"):
        data.pop(key)
    with pytest.raises(ScenarioError, match="parallel"):
        parse_scenario(data, source="c.yaml")


def test_bench_sweep_crosses_parallel(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf", context_length=8192)
    cases, _ = expand(Sweep(models=[art], n_prompt=[64], n_gen=[8], parallel=[1, 2, 4]))
    assert [bc.case.parallel for bc in cases] == [1, 2, 4]
    assert {bc.case.n_ctx for bc in cases} == {72}  # the context is per session
    assert Sweep(models=[art], parallel=[1, 2]).shown_fields() == ["pl"]
    assert Sweep(models=[art]).shown_fields() == []


# --- the serving verdict ----------------------------------------------------------------------------

def ok_row(**kw) -> dict:
    return {"status": "ok", "parallel": 4, "n_ctx": 2048, "fit_memory": "resident", "fit_class": "fits",
            "ttft_p90_s": 1.5, "user_decode_tok_s": 20.0, "aggregate_decode_tok_s": 75.0, **kw}


def test_serving_verdict_in_the_users_words():
    v = serving_verdict(ok_row())
    assert v.serving_fits is True
    assert v.serving_reason == "fits 4 users at context 2,048: p90 TTFT 1.50 s, 20.0 tok/s per user, 75.0 tok/s in all"
    slow = serving_verdict(ok_row(ttft_p90_s=12.0, user_decode_tok_s=4.0))
    assert slow.serving_fits is False
    assert slow.serving_reason == ("does not fit 4 users at context 2,048: p90 TTFT 12.00 s > 10 s; "
                                   "4.0 tok/s per user < 10")
    strict = serving_verdict(ok_row(), Thresholds().merged({"max_ttft_p90_s": 1.0, "min_user_tok_s": 25}))
    assert strict.serving_fits is False and "> 1 s" in strict.serving_reason and "< 25" in strict.serving_reason
    spilled = serving_verdict(ok_row(fit_memory="spill", fit_reason="read 900 MiB from storage"))
    assert spilled.serving_fits is False and "memory spill: read 900 MiB" in spilled.serving_reason
    one = serving_verdict(ok_row(parallel=1))
    assert one.serving_reason.startswith("fits 1 user at context 2,048") and "in all" not in one.serving_reason
    oom = serving_verdict({"status": "oom", "parallel": 8, "n_ctx": 2048, "fit_class": "no_fit",
                           "fit_reason": "oom: killed"})
    assert oom.serving_fits is False and oom.serving_reason == "does not fit 8 users at context 2,048: oom: killed"
    timeout = serving_verdict({"status": "timeout", "parallel": 8, "n_ctx": 2048, "fit_class": "slow",
                               "fit_reason": "timed out before finishing"})
    assert timeout.serving_fits is False and timeout.serving_reason.endswith("2,048: timed out before finishing")
    crashed = serving_verdict({"status": "crashed", "parallel": 2, "n_ctx": 512, "fit_class": None})
    assert crashed.serving_fits is None


def test_case_serving_and_max_users():
    rows = [{**ok_row(), "serving_fits": True, "serving_reason": "fits"},
            {**ok_row(), "serving_fits": False, "serving_reason": "does not fit: slow"}]
    assert case_serving(rows) == (False, "does not fit: slow")
    # every repetition serves: the reason quotes their medians (what the serving table shows), not the first's
    served = [{**ok_row(ttft_p90_s=p90, user_decode_tok_s=user), "serving_fits": True, "serving_reason": "fits"}
              for p90, user in ((1.0, 30.0), (3.0, 10.0), (2.0, 12.0))]
    assert case_serving(served) == (True, "fits 4 users at context 2,048: p90 TTFT 2.00 s, 12.0 tok/s per user, "
                                          "75.0 tok/s in all")
    assert case_serving([{"serving_fits": None, "serving_reason": "no serving verdict: crashed"}]) == \
        (None, "no serving verdict: crashed")
    assert max_users({1: True, 2: True, 4: False, 8: True}) == 2  # 8 alone does not count
    assert max_users({1: False, 2: True}) is None
    assert max_users({1: True, 2: True, 4: True}) == 4


def test_users_verdict_turns_a_missed_serving_target_into_slow():
    rows = [{**ok_row(), "repetition": 0, "fit_class": "fits", "fit_reason": "resident",
             "serving_fits": False, "serving_reason": "does not fit 4 users at context 2,048: p90 TTFT 12 s > 10 s"}]
    assert users_verdict(rows, 4) == ("slow", rows[0]["serving_reason"])
    assert users_verdict(rows, 1) == ("fits", "resident")


# --- end to end on a fake runner --------------------------------------------------------------------

def run(art: Path, tmp_path: Path, **kw) -> pd.DataFrame:
    s = parse_scenario(scenario(art, **kw), source="c.yaml")
    writer = ResultWriter(tmp_path / "c.parquet")
    run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "run-1")
    return pd.read_parquet(writer.results_path)


def test_parallel_rows_carry_every_session(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    df = run(art, tmp_path, parallel=[1, 3], options={"token_delay": 0.01, "prefill_delay": 0.001})
    assert len(df) == 4 and set(df["status"]) == {"ok"}
    single, multi = df[df["parallel"] == 1], df[df["parallel"] == 3]
    assert len(single) == len(multi) == 2
    # one session: its own figures are the serving ones
    first = single.iloc[0]
    assert first["ttft_p90_s"] == first["ttft_s"] and first["aggregate_decode_tok_s"] == first["decode_tok_s"]
    assert pd.isna(first["session_ttft_s_json"])
    for _, row in multi.iterrows():
        ttfts = json.loads(row["session_ttft_s_json"])
        rates = json.loads(row["session_decode_tok_s_json"])
        assert len(ttfts) == len(rates) == 3
        assert ttfts == sorted(ttfts) and ttfts[2] > ttfts[0]  # queued prefills: TTFT grows per session
        assert row["ttft_s"] == pytest.approx(max(ttfts), abs=1e-5)
        assert row["gen_tokens"] == 6  # per session
        # the shared phase: 5 steps of 10 ms for every session at once
        assert row["aggregate_decode_tok_s"] == pytest.approx(3 * row["user_decode_tok_s"], rel=0.05)
        assert row["kv_session_bytes"] == 1000 * (32 + 6 - 1)
        assert row["serving_reason"].startswith("fits 3 users at context 256")
        assert row["case_label"] == "3x(pp32+tg6) @ ctx256"


def test_a_runner_without_parallel_sessions_is_unavailable(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    df = run(art, tmp_path, runtime="fake_runners:FakeRunner", parallel=[1, 2])
    assert list(df["status"]) == ["ok", "ok", "unavailable"]
    row = df.iloc[-1]
    assert row["parallel"] == 2 and "does not run parallel sessions" in row["error"]
    assert pd.isna(row["fit_class"]) and pd.isna(row["serving_fits"])


def test_bench_records_carry_batched_bench_fields(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    s = parse_scenario(scenario(art, parallel=[2], prompt_tokens=[16]), source="c.yaml")
    case = s.cases()[0]
    rows = [{**ok_row(parallel=2), "repetition": i, "ttft_s": 0.5, "e2e_s": 1.5, "prefill_tok_s": 64.0,
             "decode_tok_s": 9.0, "user_decode_tok_s": 10.0 + i, "aggregate_decode_tok_s": 20.0, "ttft_p90_s": 0.45,
             "kv_session_bytes": 4096, "serving_fits": True, "serving_reason": "fits 2 users"} for i in range(2)]
    pp, tg = bench_records(BenchCase(case, 16, 0), rows, "r.parquet")
    assert pp["pl"] == tg["pl"] == 2
    assert pp["avg_ts"] == 64.0  # both sessions' prompts over the time until the last first token
    assert tg["avg_ts"] == 10.5 and tg["speed_tg"] == 20.0  # the median user; all sessions together
    assert tg["ttft_p90_ms"] == pytest.approx(450.0) and tg["kv_session_bytes"] == 4096
    assert tg["serving_fits"] is True  # in the figures above: the reason quotes the medians, like the record
    assert tg["serving_reason"] == "fits 2 users at context 2,048: p90 TTFT 0.45 s, 10.5 tok/s per user, 20.0 tok/s in all"


def test_bench_parallel_end_to_end(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    proc = fitbench("bench", "-m", str(art), "--runtime", FAKE, "-p", "16", "-n", "4", "-npl", "1,2", "-r", "1",
                    "-o", "json", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [(r["pl"], r["test"]) for r in records] == [(1, "pp16"), (1, "tg4"), (2, "pp16"), (2, "tg4")]
    assert all(r["serving_fits"] is True and r["speed_tg"] for r in records)
    assert "fits 2 users at context 20" in proc.stderr
    md = fitbench("bench", "-m", str(art), "--runtime", FAKE, "-p", "16", "-n", "4", "--parallel", "2", "-r", "1",
                  "--output-dir", str(tmp_path))
    assert md.returncode == 0, md.stderr
    assert "| pl |" in md.stdout.replace("  ", " ") or " pl " in md.stdout
    assert "serves" in md.stdout
    assert_usage_error(fitbench("bench", "-m", str(art), "--runtime", FAKE, "-npl", "0", "-o", "json",
                                "--output-dir", str(tmp_path)), "-npl")


def test_run_summary_shows_the_serving_table(tmp_path, write_scenario):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    path = write_scenario(scenario(art, parallel=[1, 2], repetitions=1))
    proc = fitbench("run", str(path), "-o", str(tmp_path / "out"), env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "serving: parallel sessions" in proc.stdout
    assert "fits 2 users at context 256 (tried 1, 2)" in proc.stdout


def test_fit_users_searches_per_user_count(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf", context_length=1024)
    proc = fitbench("fit", str(art), "--runtime", FAKE, "--users", "1,2", "--min-context", "256", "--step", "256",
                    "-n", "4", "-o", str(tmp_path), env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "with 1 user: fits up to its trained maximum of 1,024" in proc.stdout
    assert "with 2 users: fits up to its trained maximum of 1,024" in proc.stdout
    assert_usage_error(fitbench("fit", str(art), "--runtime", FAKE, "--users", "1,x", "-o", str(tmp_path)),
                       "--users")
