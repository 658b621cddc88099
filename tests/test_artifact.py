"""Artifact identification and integrity checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.artifact import ArtifactError, inspect_artifact
from tests.conftest import write_tiny_gguf


@pytest.mark.model
def test_sample_model_metadata(sample_model):
    info = inspect_artifact(sample_model)
    assert info.format == "gguf"
    assert info.architecture == "llama"
    assert info.quant == "Q4_1"
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.context_length) == (30, 9, 3, 8192)
    assert 130e6 < info.n_params < 140e6
    assert info.size_bytes == sample_model.stat().st_size


@pytest.mark.model
def test_truncated_gguf_is_caught(sample_model, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(sample_model.read_bytes()[: 5_000_000])
    with pytest.raises(ArtifactError, match="truncated: its tensors need"):
        inspect_artifact(cut)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(sample_model.read_bytes()[:3000])
    with pytest.raises(ArtifactError, match="truncated (inside its GGUF header|or damaged)"):
        inspect_artifact(header_cut)


def test_tiny_gguf_without_tensors_is_valid(tmp_path):
    info = inspect_artifact(write_tiny_gguf(tmp_path / "t.gguf", context_length=1234))
    assert (info.architecture, info.context_length, info.n_params) == ("fake", 1234, 0)


@pytest.mark.parametrize(
    "content, name, words",
    [
        (b"PK\x03\x04 zip", "model.gguf", "not a GGUF file"),
        (b"hello", "notes.txt", "unknown artifact format"),
    ],
)
def test_wrong_files(tmp_path: Path, content, name, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=words):
        inspect_artifact(path)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        inspect_artifact(tmp_path / "nope.gguf")
    with pytest.raises(ArtifactError, match="folder without genai_config.json"):
        inspect_artifact(tmp_path)


def write_safetensors(path, tensors: dict, extra: bytes = b"") -> None:
    import json
    import struct

    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset + extra)


def hf_folder(tmp_path):
    import json

    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "dtype": "bfloat16", "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_size": 64, "max_position_embeddings": 1024, "vocab_size": 100}))
    write_safetensors(folder / "model.safetensors", {"embed": (100, 64), "layer.0": (64, 64)})
    return folder


def test_hugging_face_folder(tmp_path):
    from harness.artifact import sha256_file

    folder = hf_folder(tmp_path)
    info = inspect_artifact(folder)
    assert (info.format, info.architecture, info.quant) == ("hf", "llama", "bf16")
    assert info.n_params == 100 * 64 + 64 * 64
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (2, 4, 2, 16)
    assert info.context_length == 1024 and info.vocab_size == 100
    assert info.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    digest = sha256_file(folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert sha256_file(folder) != digest  # any file of the folder changes the artifact's hash


def test_damaged_hugging_face_folder(tmp_path):
    folder = hf_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        inspect_artifact(folder)
    weights.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ArtifactError, match="header claims"):
        inspect_artifact(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json is not readable JSON"):
        inspect_artifact(folder)
