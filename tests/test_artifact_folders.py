"""Folder artifacts: ONNX (onnxruntime-genai), MLX and Hugging Face, told apart from their own files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from harness.artifact import ArtifactError, inspect_artifact, sha256_file
from tests.conftest import ROOT

MODELS = ROOT / "models"


def write_safetensors(path: Path, tensors: dict[str, list[int]], metadata: dict | None = None, truncate: int = 0) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (offset - truncate))


def hf_folder(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "hidden_size": 64,
                                                    "num_hidden_layers": 2, "max_position_embeddings": 2048,
                                                    "vocab_size": 100, "dtype": "bfloat16", **config}))
    return folder


def test_hf_folder(tmp_path):
    folder = hf_folder(tmp_path)
    write_safetensors(folder / "model.safetensors", {"embed": [100, 64], "norm": [64]})
    info = inspect_artifact(folder)
    assert info.format == "hf" and info.quant == "bf16" and info.n_params == 100 * 64 + 64
    assert info.n_layers == 2 and info.n_kv_heads == 2 and info.head_dim == 16 and info.context_length == 2048
    assert info.size_bytes == sum(p.stat().st_size for p in folder.iterdir())


def test_mlx_folder_by_its_quantization_block_or_metadata(tmp_path):
    folder = hf_folder(tmp_path, quantization={"bits": 4, "group_size": 64})
    write_safetensors(folder / "model.safetensors", {"w": [8, 8]})
    info = inspect_artifact(folder)
    assert info.format == "mlx" and info.quant == "q4" and info.n_params is None
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_safetensors(folder / "model.safetensors", {"w": [8, 8]}, metadata={"format": "mlx"})
    assert inspect_artifact(folder).format == "mlx"


def test_damaged_folders(tmp_path):
    folder = hf_folder(tmp_path)
    with pytest.raises(ArtifactError, match="no .safetensors"):
        inspect_artifact(folder)
    write_safetensors(folder / "model.safetensors", {"w": [8, 8]}, truncate=10)
    with pytest.raises(ArtifactError, match="truncated"):
        inspect_artifact(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not readable JSON"):
        inspect_artifact(folder)
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    with pytest.raises(ArtifactError, match="not in the folder"):
        inspect_artifact(onnx)


def test_folder_hash_covers_names_and_contents(tmp_path):
    folder = hf_folder(tmp_path)
    write_safetensors(folder / "model.safetensors", {"w": [8, 8]})
    first = sha256_file(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")  # hidden files are not the artifact
    assert sha256_file(folder) == first
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    assert sha256_file(folder) != first


@pytest.mark.model
@pytest.mark.parametrize("name, fmt, quant", [
    ("SmolLM2-135M-Instruct-onnx-int4", "onnx", "int4"),
    ("SmolLM2-135M-Instruct-mlx-q4", "mlx", "q4"),
    ("SmolLM2-135M-Instruct-hf", "hf", "bf16"),
])
def test_sample_folders(name, fmt, quant):
    path = MODELS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make sample-models`")
    info = inspect_artifact(path)
    assert (info.format, info.quant) == (fmt, quant)
    assert info.n_layers == 30 and info.n_kv_heads == 3 and info.context_length == 8192 and info.vocab_size == 49152
