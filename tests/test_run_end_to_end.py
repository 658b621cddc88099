"""The README's main job, end to end: `fitbench run scenarios/quick.yaml` on the real model."""

from __future__ import annotations

import glob

import pandas as pd
import pytest

from harness.results import SCHEMA_VERSION
from tests.conftest import ROOT
from tests.test_cli import fitbench

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, sample_model):
    out = tmp_path_factory.mktemp("quick")
    # The shipped scenario with fewer repetitions and tokens, to keep the test short.
    proc = fitbench("run", str(ROOT / "scenarios" / "quick.yaml"), "-o", str(out), "-r", "2", "-n", "8")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [results] = [p for p in glob.glob(f"{out}/quick-*.parquet") if not p.endswith(".timeline.parquet")]
    return proc, pd.read_parquet(results), pd.read_parquet(results.replace(".parquet", ".timeline.parquet"))


def test_rows_for_every_context(quick_run):
    proc, df, _ = quick_run
    assert (df["status"] == "ok").all(), df[["status", "error"]]
    assert sorted(df["n_ctx"].unique()) == [512, 2048, 8192]
    assert (df.groupby("n_ctx").size() == 2).all()
    assert (df["n_ctx_runtime"] == df["n_ctx"]).all()
    assert list(df.sort_values("n_ctx").drop_duplicates("n_ctx")["prompt_tokens"]) == [256, 1024, 4096]
    assert (df["gen_tokens"] == 8).all()
    assert (df["artifact_quant"] == "Q4_1").all() and (df["runtime"] == "llama.cpp").all()
    assert df["schema_version"].eq(SCHEMA_VERSION).all()
    assert "summary" in proc.stdout


def test_ttft_grows_with_the_filled_context(quick_run):
    _, df, _ = quick_run
    ttft = df.groupby("n_ctx")["ttft_s"].median()
    assert ttft[512] < ttft[2048] < ttft[8192]
    assert (df["decode_tok_s"] > 0).all() and (df["prefill_tok_s"] > 0).all()


def test_sampled_peak_agrees_with_the_kernel(quick_run):
    _, df, _ = quick_run
    gap = (df["peak_rss_bytes"] - df["vmhwm_bytes"]).abs() / df["vmhwm_bytes"]
    assert (gap < 0.05).all(), gap
    # getrusage's ru_maxrss (what /usr/bin/time -v prints) covers the whole life, interpreter
    # teardown included, so it can only be at or above the peak read before the worker exits
    assert (df["ru_maxrss_bytes"] >= 0.99 * df["vmhwm_bytes"]).all()
    # a bigger KV cache is more memory
    peak = df.groupby("n_ctx")["peak_rss_bytes"].max()
    assert peak[512] < peak[2048] < peak[8192]
    assert (df["baseline_rss_bytes"] < df["load_rss_bytes"]).all()


def test_startup_is_split_from_load(quick_run):
    _, df, _ = quick_run
    assert (df["spawn_s"] > 0).all() and (df["import_s"] > 0).all() and (df["load_s"] > 0).all()
    assert (df["spawn_s"] + df["import_s"] + df["load_s"] < df["case_wall_s"]).all()


def test_timeline_covers_each_case(quick_run):
    _, df, tl = quick_run
    assert set(tl["case_key"]) == set(df["case_key"])
    assert {"load", "warmup", "rep0", "rep1"} <= set(tl["phase"])
