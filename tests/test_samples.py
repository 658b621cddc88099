"""Sample artifacts for every runtime are made locally, cached and never half-made."""

from __future__ import annotations

import json

import pytest

from harness import samples
from tests.conftest import ROOT
from tests.test_cli import assert_usage_error, fitbench


def test_unknown_step_is_a_usage_error(tmp_path):
    proc = fitbench("models", "prepare-sample", "--models-dir", str(tmp_path), "--only", "nope")
    assert_usage_error(proc, "unknown sample step", "nope")


def test_existing_targets_are_cached_not_remade(tmp_path, monkeypatch):
    calls = []
    step = samples.SampleStep("fake", "fake-artifact", lambda _m, out: calls.append(out), (), "", "fake step")
    monkeypatch.setattr(samples, "STEPS", [step])
    (tmp_path / "fake-artifact").mkdir()
    assert samples.prepare(tmp_path) == {"fake": tmp_path / "fake-artifact"}
    assert calls == []
    samples.prepare(tmp_path, force=True)
    assert len(calls) == 1


def test_a_failed_step_leaves_no_partial_artifact(tmp_path, monkeypatch):
    def half_then_fail(_models, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("converter died")

    monkeypatch.setattr(samples, "STEPS", [samples.SampleStep("bad", "bad-artifact", half_then_fail, (), "", "")])
    with pytest.raises(RuntimeError, match="converter died"):
        samples.prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_converter_names_the_install(tmp_path, monkeypatch):
    step = samples.SampleStep("x", "x-artifact", lambda *_: None, ("no_such_module_xyz",), "pip install 'fitbench[x]'", "")
    monkeypatch.setattr(samples, "STEPS", [step])
    with pytest.raises(samples.SampleError, match=r"no_such_module_xyz: pip install 'fitbench\[x\]'"):
        samples.prepare(tmp_path)


@pytest.mark.model
def test_hf_sample_is_the_dequantized_gguf():
    hf = ROOT / "models" / samples.HF_DIR
    if not hf.is_dir():
        pytest.fail(f"{hf} missing: run `make sample-models`")
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    # 134.5 M parameters in bf16 (tied embeddings stored once)
    size = (hf / "model.safetensors").stat().st_size
    assert 260e6 < size < 280e6
