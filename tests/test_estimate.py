"""estimate: weights as the runtime holds them (dtype), KV types per runtime, ONNX logits and prepacking."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from harness.artifact import inspect_artifact
from harness.estimate import EstimateError, estimate, load_dtype, stored_dtype
from tests.conftest import write_tiny_gguf

BYTES = {"BF16": 2, "F16": 2, "F32": 4}
LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 2, 4, 2, 64, 100
HEAD_DIM = HIDDEN // HEADS


def hf_folder(tmp_path: Path, stored: str = "BF16", config_dtype: str | None = "bfloat16", **config) -> Path:
    """A Hugging Face folder whose one tensor is 1000 x 64 elements of ``stored``."""
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = {"model_type": "llama", "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "max_position_embeddings": 2048,
           "vocab_size": VOCAB, **config}
    if config_dtype is not None:
        cfg["torch_dtype"] = config_dtype
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").write_text("{}" * 50)  # not a weight: never scaled
    n = 1000 * 64 * BYTES[stored]
    raw = json.dumps({"w": {"dtype": stored, "shape": [1000, 64], "data_offsets": [0, n]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * n)
    return folder


def weights_file(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def test_a_float32_load_of_a_bf16_folder_holds_twice_the_weights(tmp_path):
    folder = hf_folder(tmp_path)
    info = inspect_artifact(folder)
    st, other = weights_file(folder), info.size_bytes - weights_file(folder)
    auto = estimate(info, 512, "torch", options={"dtype": "auto"})
    assert auto.weights_bytes == info.size_bytes  # auto = the checkpoint's own bf16
    f32 = estimate(info, 512, "torch", options={"dtype": "float32"})
    assert f32.weights_bytes == other + 2 * st
    assert f32.kv_bytes == 2 * auto.kv_bytes == 2 * LAYERS * 512 * KV_HEADS * HEAD_DIM * 4  # KV in the load dtype
    assert estimate(info, 512, "torch", dtype="float16").weights_bytes == info.size_bytes
    assert estimate(info, 512, "torch", dtype="float32").total_bytes == f32.total_bytes  # argument = option


def test_the_stored_dtype_comes_from_the_safetensors_header_when_config_names_none(tmp_path):
    folder = hf_folder(tmp_path, stored="BF16", config_dtype=None)
    info = inspect_artifact(folder)
    assert stored_dtype(info) == "bf16"
    # the torch runner loads a checkpoint without a dtype in float32: twice the bf16 file
    assert load_dtype(info, "torch", "auto", {}) == "f32"
    assert estimate(info, 512, "torch").weights_bytes == info.size_bytes + weights_file(folder)


def test_a_float32_folder_loaded_in_bfloat16_is_half(tmp_path):
    folder = hf_folder(tmp_path, stored="F32", config_dtype="float32")
    info = inspect_artifact(folder)
    st = weights_file(folder)
    assert estimate(info, 512, "torch", options={"dtype": "bfloat16"}).weights_bytes == info.size_bytes - st + st // 2


def test_gguf_onnx_and_quantized_weights_are_what_the_file_holds(tmp_path):
    gguf = inspect_artifact(write_tiny_gguf(tmp_path / "t.gguf", embedding_length=HIDDEN, attention__head_count=HEADS))
    assert estimate(gguf, 512, "llama.cpp", options={"dtype": "float32"}).weights_bytes == gguf.size_bytes
    mlx = hf_folder(tmp_path, quantization={"bits": 4, "group_size": 64})
    info = inspect_artifact(mlx)
    assert info.format == "mlx" and stored_dtype(info) is None
    e = estimate(info, 512, "mlx", options={"dtype": "float32"})
    assert e.weights_bytes == info.size_bytes  # packed weights stay packed
    assert e.kv_bytes == LAYERS * 512 * KV_HEADS * HEAD_DIM * 8  # activations and KV follow the dtype


def test_llama_cpp_kv_types_and_flash_attention_come_from_the_options(tmp_path):
    info = inspect_artifact(write_tiny_gguf(tmp_path / "t.gguf", embedding_length=HIDDEN, attention__head_count=HEADS))
    old = estimate(info, 1024, "llama.cpp", "f16", False, fill=0.5)  # the call the suite makes today
    assert estimate(info, 1024, "llama.cpp", fill=0.5).total_bytes == old.total_bytes
    q8 = estimate(info, 1024, "llama.cpp", fill=0.5, options={"type_k": "q8_0", "type_v": "f16", "flash_attn": True})
    per_pos = LAYERS * HEADS * HEAD_DIM  # no KV heads in the tiny GGUF: all heads
    kv_read = 14 * 512 * HEADS * HEAD_DIM  # the filled K and V as attention reads them, per layer
    assert q8.kv_bytes == int(1024 * per_pos * (34 / 32 + 2)) and q8.compute_bytes == kv_read  # no scores
    assert old.compute_bytes == 6 * 512 * 512 * HEADS + kv_read  # float32 scores + their float16 copy
    with pytest.raises(EstimateError, match="unknown KV type 'q3'"):
        estimate(info, 1024, options={"type_k": "q3"})
    with pytest.raises(EstimateError, match="unknown dtype 'int3'"):
        estimate(inspect_artifact(hf_folder(tmp_path)), 1024, "torch", dtype="int3")


def onnx_folder(tmp_path: Path, providers: list | None = None) -> Path:
    folder = tmp_path / "onnx"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\0" * 4096)
    decoder = {"filename": "model.onnx", "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
               "hidden_size": HIDDEN, "head_size": HEAD_DIM, "num_hidden_layers": LAYERS,
               "session_options": {"provider_options": providers or []}}
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": decoder, "vocab_size": VOCAB,
                                                                     "type": "llama"}}))
    return folder


def test_onnx_counts_float32_kv_all_prompt_logits_and_the_prepacked_weights(tmp_path):
    cpu = inspect_artifact(onnx_folder(tmp_path))
    e = estimate(cpu, 2048, "onnxruntime", fill=0.5)
    assert e.kv_bytes == LAYERS * 2048 * KV_HEADS * HEAD_DIM * 8  # float32 K and V
    assert e.compute_bytes == 2 * 512 * 1024 * HEADS * 4  # attention scores of a micro-batch
    assert e.output_bytes == 1024 * VOCAB * 4  # float32 logits for every prompt token
    assert e.overhead_bytes == (43 << 20) + cpu.size_bytes  # the CPU kernels' prepacked copy
    assert estimate(cpu, 2048, "onnxruntime", fill=0.5, options={"provider": "cuda"}).overhead_bytes == 43 << 20
    gpu = inspect_artifact(onnx_folder(tmp_path / "g", [{"cuda": {}}]))
    assert estimate(gpu, 2048, "onnxruntime", fill=0.5).kv_bytes == e.kv_bytes // 2  # float16 I/O builds


@pytest.mark.model
def test_the_sample_models_estimates_are_near_their_measured_peaks():
    """Measured on the CPU sample (module doc): ONNX int4 529 MiB at 2048/1024, torch bf16 739 MiB at 2048 half."""
    from tests.conftest import ROOT

    onnx = ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4"
    hf = ROOT / "models" / "SmolLM2-135M-Instruct-hf"
    if not onnx.exists() or not hf.exists():
        pytest.skip("sample models not converted (make sample-models)")
    e = estimate(inspect_artifact(onnx), 2048, "onnxruntime", fill=0.5).total_bytes / 2**20
    assert abs(e - 529) / 529 < 0.1
    t = estimate(inspect_artifact(hf), 2048, "torch", fill=0.5, options={"dtype": "auto"}).total_bytes / 2**20
    assert abs(t - 739) / 739 < 0.1
