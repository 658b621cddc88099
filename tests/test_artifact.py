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
