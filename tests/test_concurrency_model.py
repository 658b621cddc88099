"""Parallel sessions in the real runtimes on the real sample model: llama.cpp (n_seq_max, one batch of N
sequences per step), torch (a batch of N), onnxruntime-genai (batch_size); and a run end to end."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from harness.worker.prompt import SEED, build_prompt
from runners.base import RunnerError
from tests.conftest import ROOT
from tests.test_cli import fitbench

pytestmark = pytest.mark.model

HF_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-hf"
ONNX_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4"


def check_sessions(runner, n_tokens: int = 6, prompt_tokens: int = 24) -> None:
    """Two different prompts, then the first one twice: every session gets exactly ``n_tokens`` stamps in
    order, and identical prompts give identical tokens (the sessions do not leak into each other)."""
    a = build_prompt(runner.tokenize, prompt_tokens, SEED)
    b = build_prompt(runner.tokenize, prompt_tokens, SEED + 1)
    t0 = time.perf_counter()
    items = list(runner.generate_parallel([a, b], n_tokens))
    by_session = {s: [t for i, t in items if i == s] for s in (0, 1)}
    assert {s: len(v) for s, v in by_session.items()} == {0: n_tokens, 1: n_tokens}
    assert len(items) == 2 * n_tokens
    for stamps in by_session.values():
        assert t0 < stamps[0] and stamps == sorted(stamps)
    first = [list(t) for t in runner.session_generated]
    assert [len(t) for t in first] == [n_tokens, n_tokens]
    list(runner.generate_parallel([a, a], n_tokens))
    assert runner.session_generated[0] == runner.session_generated[1] == first[0]
    assert runner.session_kv_bytes() > 0


def test_llama_cpp_two_sequences_in_one_batch(sample_model):
    from runners.llama_cpp import LlamaCppRunner

    r = LlamaCppRunner()
    r.parallel = 2
    info = r.load(sample_model, 256, {"n_threads": 2})
    try:
        assert info.n_ctx == 256 and info.extra["n_seq_max"] == 2 and info.extra["n_ctx_total"] == 512
        check_sessions(r)
        # 400 prompt tokens in batches of 256: session 0 gets its first token one batch before session 1
        items = list(r.generate_parallel([build_prompt(r.tokenize, 200), build_prompt(r.tokenize, 200, SEED + 1)], 2))
        firsts = [next(t for i, t in items if i == s) for s in (0, 1)]
        assert firsts[0] < firsts[1]
        one = r.session_kv_bytes()
        # the same session alone (sequence 0) holds what it held next to another
        list(r.generate(build_prompt(r.tokenize, 200), 2))
        assert abs(r.session_kv_bytes() - one) < 0.05 * one
        with pytest.raises(RunnerError, match="loaded for 2"):
            list(r.generate_parallel([[1], [1], [1]], 2))
        with pytest.raises(RunnerError, match="KV cells"):
            list(r.generate_parallel([build_prompt(r.tokenize, 250)] * 2, 16))
    finally:
        r.close()


def test_torch_batch_of_two(sample_model):
    pytest.importorskip("transformers")
    if not (HF_MODEL / "config.json").exists():
        pytest.fail(f"HF sample model missing at {HF_MODEL}: run `make sample-models`")
    from runners.torch import TorchRunner

    r = TorchRunner()
    r.parallel = 2
    r.prepare()
    r.load(HF_MODEL, 64, {"dtype": "float32", "n_threads": 1})
    try:
        check_sessions(r)
        with pytest.raises(RunnerError, match="one length"):
            list(r.generate_parallel([[1, 2], [1]], 2))
    finally:
        r.close()


def test_onnx_batch_size_two(sample_model):
    pytest.importorskip("onnxruntime_genai")
    if not (ONNX_MODEL / "genai_config.json").is_file():
        pytest.fail(f"{ONNX_MODEL} is missing: run `make sample-models`")
    from runners.onnx import OnnxGenaiRunner

    r = OnnxGenaiRunner()
    r.parallel = 2
    r.prepare()
    r.load(ONNX_MODEL, 64, {})
    try:
        check_sessions(r)
    finally:
        r.close()


def test_llama_cpp_parallel_run_end_to_end(sample_model, tmp_path, write_scenario):
    path = write_scenario({"name": "conc", "models": [{"artifact": str(sample_model), "runtime": "llama.cpp",
                                                       "options": {"n_threads": 2}}],
                           "contexts": [256], "prompt_tokens": [64], "gen_tokens": 8, "parallel": [1, 2],
                           "warmup": 0, "repetitions": 1})
    proc = fitbench("run", str(path), "-o", str(tmp_path / "out"), env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    found = [f for f in (tmp_path / "out").glob("conc-*.parquet") if not f.name.endswith(".timeline.parquet")]
    df = pd.read_parquet(found[0])
    assert list(df["status"]) == ["ok", "ok"] and list(df["parallel"]) == [1, 2]
    one, two = df.iloc[0], df.iloc[1]
    assert one["gen_tokens"] == two["gen_tokens"] == 8
    rates = json.loads(two["session_decode_tok_s_json"])
    ttfts = json.loads(two["session_ttft_s_json"])
    assert len(rates) == len(ttfts) == 2 and all(r > 0 for r in rates)
    # lockstep decoding: every session ends in the same step, so all together is the sum of the sessions
    assert two["aggregate_decode_tok_s"] == pytest.approx(sum(rates), rel=0.02)
    assert two["ttft_s"] == pytest.approx(max(ttfts), abs=1e-5)
    assert two["ttft_p90_s"] <= two["ttft_s"] and two["user_decode_min_tok_s"] == pytest.approx(min(rates), rel=1e-3)
    assert one["kv_session_bytes"] > 0 and two["kv_session_bytes"] == pytest.approx(one["kv_session_bytes"], rel=0.05)
    assert json.loads(two["runtime_extra_json"])["n_seq_max"] == 2
    assert two["serving_reason"].split(":")[0] in ("fits 2 users at context 256", "does not fit 2 users at context 256")
    assert "serving: parallel sessions" in proc.stdout
