"""estimate across architectures: KV by layer type (sliding window or full), per runtime; logits;
untied embeddings in a mmapped GGUF; experts. Metadata from config.json and GGUF keys."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from harness.artifact import inspect_artifact
from harness.estimate import estimate
from harness.layout import from_config, period_pattern

BASE = {"num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 512,
        "vocab_size": 1000, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}


def hf(tmp_path: Path, name: str, **config) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BASE, **config}))
    n = 64 * 2
    raw = json.dumps({"w": {"dtype": "BF16", "shape": [64], "data_offsets": [0, n]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * n)
    return folder


@pytest.mark.parametrize("config, sliding", [
    ({"model_type": "llama"}, 0),
    ({"model_type": "mistral", "sliding_window": 4096}, 12),  # Mistral: every layer
    ({"model_type": "mistral", "sliding_window": None}, 0),
    ({"model_type": "gemma2", "sliding_window": 4096}, 6),  # alternating, layer 0 slides
    ({"model_type": "gemma3_text", "sliding_window": 512, "sliding_window_pattern": 6}, 10),
    ({"model_type": "gemma3_text", "sliding_window": 512,
      "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"]}, 10),
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 4}, 0),
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 4}, 8),
])
def test_sliding_layers_are_read_as_transformers_builds_its_caches(config, sliding):
    layout = from_config({**BASE, **config})
    assert layout.n_swa_layers == sliding
    assert (layout.sliding_window is not None) == bool(sliding)


def test_period_pattern_is_llama_cpps():
    assert period_pattern(6, 2) == (True, False) * 3  # gemma2: the second of each pair is global
    assert period_pattern(12, 6).count(False) == 2 and period_pattern(12, 6)[5] is False
    assert period_pattern(8, 4, dense_first=True) == (False, True, True, True) * 2
    assert period_pattern(3, 0) == (True,) * 3


def test_torch_static_cache_holds_the_window_in_sliding_layers(tmp_path):
    info = inspect_artifact(hf(tmp_path, "g3", model_type="gemma3_text", sliding_window=256, head_dim=128,
                               sliding_window_pattern=6))
    e = estimate(info, 4096, "torch", fill=0.5)
    row = 4 * 128 * 2 * 2  # KV heads x head_dim (not 512/8) x (K + V) x bf16
    assert e.kv_full_bytes == 2 * 4096 * row and e.kv_swa_bytes == 10 * 256 * row
    assert e.kv_bytes == e.kv_full_bytes + e.kv_swa_bytes
    small = estimate(info, 128, "torch", fill=0.5)  # a window longer than the context holds the context
    assert small.kv_swa_bytes == 10 * 128 * row and small.kv_cells_swa == 128
    dynamic = estimate(info, 4096, "torch", fill=0.5, options={"static_cache": False})
    assert dynamic.kv_full_bytes == 2 * 2048 * row  # a DynamicCache holds the prompt, not n_ctx


def test_kv_bytes_per_position_counts_every_layer_once_whatever_the_cells_held(tmp_path):
    """The roofline's bytes per position of depth: llama.cpp holds 256 padded cells at n_ctx 1, torch one."""
    info = inspect_artifact(hf(tmp_path, "g3", model_type="gemma3_text", sliding_window=256, head_dim=128,
                               sliding_window_pattern=6))
    row = 4 * 128 * 2 * 2  # KV heads x head_dim x (K + V) x f16/bf16
    for runtime in ("torch", "llama.cpp"):
        e = estimate(info, 1, runtime)
        assert e.kv_bytes_per_position == 12 * row, runtime  # 2 full + 10 sliding layers, one position each
    assert estimate(info, 1, "llama.cpp").kv_bytes == 256 * 12 * row  # what dividing by nothing counted


def test_without_sliding_layers_everything_is_full(tmp_path):
    info = inspect_artifact(hf(tmp_path, "q", model_type="qwen2", sliding_window=256, use_sliding_window=False))
    e = estimate(info, 2048, "torch")
    assert e.kv_swa_bytes == 0 and e.kv_cells_swa == 0 and e.kv_full_bytes == 12 * 2048 * 4 * 64 * 2 * 2


def test_onnx_and_mlx_keep_full_kv_in_sliding_layers(tmp_path):
    info = inspect_artifact(hf(tmp_path, "m", model_type="mistral", sliding_window=256))
    assert estimate(info, 2048, "torch").kv_cells_swa == 256
    mlx = estimate(info, 2048, "mlx", fill=0.25)  # fitbench's MLX runner caps every layer at n_ctx; grows with use
    assert mlx.kv_cells_swa == mlx.kv_cells_full == 512


def gguf_file(tmp_path: Path, arch: str, tied: bool, window: int | None = None, pattern=None,
              experts: int | None = None) -> Path:
    import gguf

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{arch}-{'tied' if tied else 'untied'}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(12)
    w.add_embedding_length(512)
    w.add_head_count(8)
    w.add_head_count_kv(4)
    w.add_key_length(128)
    w.add_value_length(128)
    w.add_context_length(8192)
    w.add_vocab_size(1000)
    if window:
        w.add_sliding_window(window)
    if pattern is not None:
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", pattern) if isinstance(pattern, int) else \
            w.add_array(f"{arch}.attention.sliding_window_pattern", pattern)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    w.add_tensor("token_embd.weight", np.zeros((1000, 512), dtype=np.float16))
    if not tied:
        w.add_tensor("output.weight", np.zeros((1000, 512), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_sliding_window_uses_llama_cpps_pattern_and_swa_full(tmp_path):
    info = inspect_artifact(gguf_file(tmp_path, "gemma3", tied=True, window=512))
    assert info.layout.n_swa_layers == 10 and info.layout.sliding_window == 512
    row = 4 * 128 * 2 * 2  # f16 K and V
    kept = estimate(info, 4000, "llama.cpp", fill=0.5)  # llama.cpp's default swa_full: all n_ctx, padded to 256
    assert kept.kv_cells_full == kept.kv_cells_swa == 4096 and kept.kv_bytes == 12 * 4096 * row
    trimmed = estimate(info, 4000, "llama.cpp", fill=0.5, options={"swa_full": False})
    assert trimmed.kv_cells_swa == 1024  # window 512 + micro-batch 512, padded to 256
    assert trimmed.kv_swa_bytes == 10 * 1024 * row and trimmed.kv_full_bytes == 2 * 4096 * row
    # a GGUF's own pattern (an array) wins over the architecture's default
    own = inspect_artifact(gguf_file(tmp_path / "p", "gemma3", tied=True, window=512, pattern=[True, False] * 6))
    assert own.layout.n_swa_layers == 6


def test_gguf_without_a_window_key_keeps_full_kv_even_for_a_mistral_conversion(tmp_path):
    info = inspect_artifact(gguf_file(tmp_path, "llama", tied=False))
    assert info.layout.n_swa_layers == 0
    e = estimate(info, 2048, "llama.cpp", options={"swa_full": False})
    assert e.kv_swa_bytes == 0 and e.kv_full_bytes == 12 * 2048 * 4 * 128 * 4


def test_an_untied_mmapped_embedding_is_counted_whole(tmp_path):
    # llama.cpp's mmap prefetches the file (MAP_POPULATE): measured resident, though read row by row
    untied = inspect_artifact(gguf_file(tmp_path / "u", "llama", tied=False))
    assert untied.layout.tied_embeddings is False and untied.embedding_bytes == 1000 * 512 * 2
    assert estimate(untied, 512, "llama.cpp", fill=1 / 512).weights_bytes == untied.size_bytes
    assert inspect_artifact(gguf_file(tmp_path, "llama", tied=True)).layout.tied_embeddings is True


def test_experts_and_logits(tmp_path):
    moe = inspect_artifact(gguf_file(tmp_path, "llama", tied=True, experts=8))
    assert moe.layout.n_experts == 8 and moe.layout.n_experts_used == 2
    assert estimate(moe, 512, "llama.cpp").weights_bytes == moe.size_bytes  # every expert resident
    info = inspect_artifact(hf(tmp_path, "l", model_type="llama"))
    last = estimate(info, 2048, "torch", fill=0.5)
    assert last.output_bytes == 1000 * 4  # logits_to_keep=1: the last position's float32 logits
    every = estimate(info, 2048, "torch", fill=0.5, options={"logits_all": True})
    assert every.output_bytes == 1024 * 1000 * 4
    cfg = from_config({**BASE, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
                       "tie_word_embeddings": False, "intermediate_size": 1024})
    assert (cfg.n_experts, cfg.n_experts_used, cfg.tied_embeddings, cfg.ffn_length) == (4, 2, False, 1024)


def test_torch_counts_the_load_time_fusing_of_expert_tensors(tmp_path):
    moe = inspect_artifact(hf(tmp_path, "x", model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                              intermediate_size=1024, tie_word_embeddings=False))
    dense = inspect_artifact(hf(tmp_path, "d", model_type="mistral", intermediate_size=1024))
    fusing = 12 * 4 * 3 * 512 * 1024 * 2  # layers x experts x (gate, up, down) x hidden x width x bf16
    assert estimate(moe, 512, "torch", fill=0.5).compute_bytes == fusing
    assert estimate(dense, 512, "torch", fill=0.5).compute_bytes == 256 * 5 * (1024 + 512) * 2  # prefill only


def quant_gguf(tmp_path: Path) -> tuple[Path, int]:
    """A GGUF holding the types llama.cpp's CPU backend repacks (Q4_0, Q4_K, in matrices and an expert
    stack) beside ones it does not (Q3_K, F32 norms), a Q4_0 embedding (looked up by row) and a Q4_0
    matrix of 4 rows (repacking needs multiples of 8). Returns the path and the repackable bytes."""
    import gguf

    T = gguf.GGMLQuantizationType
    path = tmp_path / "quants.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(512)
    w.add_head_count(8)
    w.add_head_count_kv(8)
    w.add_context_length(2048)
    w.add_vocab_size(1000)

    def raw(name: str, kind, shape: tuple[int, ...]) -> int:  # shape in values, innermost last
        block, size = gguf.GGML_QUANT_SIZES[kind]
        data = np.zeros((*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=kind)
        return data.nbytes

    raw("token_embd.weight", T.Q4_0, (1000, 512))
    q4_0 = raw("blk.0.attn_q.weight", T.Q4_0, (512, 512))
    raw("blk.0.attn_k.weight", T.Q4_0, (4, 512))  # 4 rows: not repacked
    raw("blk.0.ffn_down.weight", T.Q3_K, (512, 1024))
    q4_k = raw("blk.0.ffn_up_exps.weight", T.Q4_K, (2, 1024, 512))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(512, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, q4_0 + q4_k


def test_repacked_weight_types_are_held_twice_by_mmapped_llama_cpp(tmp_path, monkeypatch):
    # measured on the sample's Q2_K (180 tensors fell back to Q4_0): file pages and a CPU_REPACK copy
    from harness.estimate import repacked_bytes
    from harness.measure import machine

    path, repackable = quant_gguf(tmp_path)
    info = inspect_artifact(path)
    assert set(info.matmul_bytes) == {"Q4_0", "Q3_K", "Q4_K"}  # not the embedding, the 4-row matrix, the norm
    assert repacked_bytes(info, {"avx", "avx2", "fma"}) == repackable
    assert repacked_bytes(info, {"avx", "fma"}) == 0  # no AVX2: nothing repacked
    assert repacked_bytes(info, {"neon", "asimd", "dotprod"}) == repackable
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    assert estimate(info, 512, "llama.cpp").weights_bytes == info.size_bytes + repackable
    assert estimate(info, 512, "llama.cpp", options={"use_mmap": False}).weights_bytes == info.size_bytes
    assert estimate(info, 512, "llama.cpp", options={"n_gpu_layers": -1}).weights_bytes == info.size_bytes
    assert estimate(info, 512, "onnxruntime").weights_bytes == info.size_bytes
