"""KV-cache type and attention kernel as uniform columns (kv_type_k, kv_type_v, attn_impl, flash_attn)
and as `fitbench bench -ctk/-ctv/-fa` dimensions in every runtime that has them."""

from __future__ import annotations

import json

import pytest

from harness.benchsweep import BenchError, Sweep, runner_options
from harness.results import read_results
from runners.base import get_runner_class
from tests.conftest import ROOT
from tests.test_cli import assert_usage_error, fitbench

HF_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-hf"
MLX_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-mlx-q4"
ONNX_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4"


def sweep(**flags) -> Sweep:
    return Sweep(models=[], flags=flags)


def test_each_runtime_maps_its_options_onto_the_columns():
    llama = get_runner_class("llama.cpp").kv_settings({"type_k": "q8_0", "type_v": "q4_0", "flash_attn": True})
    assert llama == {"kv_type_k": "q8_0", "kv_type_v": "q4_0", "flash_attn": True, "attn_impl": "flash"}
    assert get_runner_class("llama.cpp").kv_settings({})["attn_impl"] == "standard"
    torch = get_runner_class("torch").kv_settings({"attn_implementation": "eager", "dtype": "bfloat16"})
    assert torch == {"kv_type_k": "bf16", "kv_type_v": "bf16", "attn_impl": "eager", "flash_attn": False}
    mlx = get_runner_class("mlx").kv_settings({"kv_bits": 4})
    assert mlx == {"kv_type_k": "q4", "kv_type_v": "q4", "attn_impl": "quantized_sdpa", "flash_attn": False}
    assert get_runner_class("onnxruntime").kv_settings({}) == {}


def test_bench_flags_become_each_runtimes_option():
    assert runner_options(sweep(flash_attn=[False, True]), "torch") == {"attn_implementation": ["eager", "sdpa"]}
    assert runner_options(sweep(type_k=["q8_0", "f16"], type_v=["q8_0", "f16"]), "mlx") == {"kv_bits": [8, None]}
    assert runner_options(sweep(type_k=["q8_0"], type_v=["q8_0"], flash_attn=[True]), "llama.cpp") == {
        "type_k": "q8_0", "type_v": "q8_0", "flash_attn": True}


@pytest.mark.parametrize("runtime, flags, words", [
    ("onnxruntime", {"type_k": ["q8_0"]}, ["-ctk", "'onnxruntime'", "fixes the KV type"]),
    ("onnxruntime", {"flash_attn": [True]}, ["-fa", "'onnxruntime'"]),
    ("torch", {"type_v": ["q8_0"]}, ["-ctv", "'torch'", "model's dtype"]),
    ("mlx", {"flash_attn": [True]}, ["-fa", "'mlx'", "fused attention"]),
    ("mlx", {"type_k": ["q8_0"], "type_v": ["q4_0"]}, ["'mlx'", "same values"]),
    ("mlx", {"type_k": ["iq4_nl"]}, ["-ctk iq4_nl", "MLX"]),
])
def test_a_runtime_without_the_setting_is_one_line_naming_it(runtime, flags, words):
    with pytest.raises(BenchError) as err:
        runner_options(sweep(**flags), runtime)
    for word in words:
        assert word in str(err.value)


def _rows(out):
    [path] = [p for p in out.glob("bench-*.parquet") if not p.name.endswith(".timeline.parquet")]
    return read_results(path).to_pylist()


@pytest.mark.model
def test_llama_cpp_kv_types_and_flash_attention_are_columns(tmp_path, sample_model):
    proc = fitbench("bench", "-m", str(sample_model), "-p", "16", "-n", "2", "-r", "1", "-ctk", "q8_0", "-ctv", "q8_0",
                    "-fa", "0,1", "-o", "json", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert {(r["type_k"], r["type_v"], r["flash_attn"]) for r in records} == {("q8_0", "q8_0", False),
                                                                              ("q8_0", "q8_0", True)}
    rows = {r["flash_attn"]: r for r in _rows(tmp_path / "out")}
    assert rows[True]["status"] == "ok" and rows[True]["attn_impl"] == "flash" and rows[True]["kv_type_v"] == "q8_0"
    # quantized V without flash attention: llama.cpp refuses the context; a clear load_error row, not a crash
    assert rows[False]["status"] == "load_error" and rows[False]["fit_class"] == "no_fit"
    assert "needs flash attention" in rows[False]["error"] and rows[False]["kv_type_k"] == "q8_0"


@pytest.mark.model
def test_torch_attention_implementation_from_fa(tmp_path):
    if not (HF_MODEL / "config.json").is_file():
        pytest.fail(f"{HF_MODEL} is missing: run `make sample-models`")
    proc = fitbench("bench", "-m", str(HF_MODEL), "-p", "16", "-n", "2", "-r", "1", "-fa", "0,1",
                    "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    rows = {r["attn_impl"]: r for r in _rows(tmp_path / "out")}
    assert set(rows) == {"eager", "sdpa"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["eager"]["flash_attn"] is False and rows["sdpa"]["flash_attn"] is True
    assert rows["sdpa"]["kv_type_k"] == rows["sdpa"]["kv_type_v"] == rows["sdpa"]["kv_type"].split("/")[0]


@pytest.mark.model
def test_mlx_quantized_kv_cache_from_ctk(tmp_path):
    if not (MLX_MODEL / "config.json").is_file():
        pytest.fail(f"{MLX_MODEL} is missing: run `make sample-models`")
    proc = fitbench("bench", "-m", str(MLX_MODEL), "-p", "16", "-n", "2", "-r", "1", "-ctk", "q8_0,f16",
                    "-ctv", "q8_0,f16", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    rows = {r["kv_type_k"]: r for r in _rows(tmp_path / "out")}
    assert set(rows) == {"q8", "f32"} and all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["q8"]["attn_impl"] == "quantized_sdpa" and rows["f32"]["attn_impl"] == "sdpa"
    assert "QuantizedKVCache" in rows["q8"]["runtime_extra_json"]


@pytest.mark.model
def test_onnx_reports_its_fixed_kv_type_and_operator(tmp_path):
    if not (ONNX_MODEL / "genai_config.json").is_file():
        pytest.fail(f"{ONNX_MODEL} is missing: run `make sample-models`")
    assert_usage_error(fitbench("bench", "-m", str(ONNX_MODEL), "-ctk", "q8_0", "--output-dir", str(tmp_path / "x")),
                       "-ctk", "'onnxruntime'", "fixes the KV type")
    proc = fitbench("bench", "-m", str(ONNX_MODEL), "-p", "16", "-n", "2", "-r", "1",
                    "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    [row] = _rows(tmp_path / "out")
    assert row["kv_type_k"] == row["kv_type_v"] == "f32" and row["attn_impl"] == "GroupQueryAttention"
