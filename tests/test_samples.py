"""Sample artifacts for every runtime are made locally, cached and never half-made."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_every_runtime_has_a_step():
    assert samples.step_names() == ["hf", "onnx", "mlx"]
    targets = {s.name: s.target for s in samples.STEPS}
    assert targets["onnx"] == "SmolLM2-135M-Instruct-onnx-int4" and targets["mlx"] == "SmolLM2-135M-Instruct-mlx-q4"


def test_converters_run_with_the_hub_switched_off(tmp_path):
    env = samples.offline_env(tmp_path)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith(str(tmp_path))


def test_existing_targets_are_kept(tmp_path):
    for step in samples.STEPS:
        (tmp_path / step.target).mkdir()
    made = samples.prepare(tmp_path)  # nothing to make, nothing imported or run
    assert set(made) == {"hf", "onnx", "mlx"}


def test_a_missing_source_fails_in_one_line_and_leaves_nothing(tmp_path):
    with pytest.raises(samples.SampleError, match="--only hf"):
        samples.prepare(tmp_path, ["onnx"])
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_failing_converter_reports_its_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "CACHE_DIR", tmp_path / ".cache")
    with pytest.raises(samples.SampleError, match="exit 3.*boom; full log"):
        samples._convert("onnx", ["-c", "import sys; print('working'); print('boom'); sys.exit(3)"], tmp_path / ".cache")


def test_unknown_step(tmp_path):
    with pytest.raises(samples.SampleError, match="unknown sample step 'gguf'"):
        samples.prepare(Path(tmp_path), ["gguf"])


@pytest.mark.parametrize("runner_path, module, extra", [
    ("runners.onnx:OnnxGenaiRunner", "onnxruntime_genai", "fitbench[onnx]"),
    ("runners.mlx:MlxRunner", "mlx_lm", "fitbench[mlx]"),
])
def test_a_missing_runtime_is_unavailable_with_the_install_command(monkeypatch, runner_path, module, extra):
    import importlib.util

    from runners.base import get_runner_class

    cls = get_runner_class(runner_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    avail = cls.available()
    assert not avail.available and "not installed" in avail.reason and extra in avail.install
    assert not cls.case_availability({}).available


def test_skip_missing_passes_over_steps_it_cannot_make(tmp_path, monkeypatch):
    made = []
    steps = [samples.SampleStep("a", "a-art", lambda _m, out: made.append("a"), ("no_such_module_xyz",), "pip x", ""),
             samples.SampleStep("b", "b-art", lambda _m, out: made.append("b"), (), "", "", source="a"),
             samples.SampleStep("c", "c-art", lambda _m, out: made.append("c"), (), "", "")]
    monkeypatch.setattr(samples, "STEPS", steps)
    notes = []
    assert set(samples.prepare(tmp_path, skip_missing=True, progress=notes.append)) == {"c"}
    assert made == ["c"] and any("a: skipped, needs no_such_module_xyz" in n for n in notes)
    assert any("b: skipped, its source step 'a' was skipped" in n for n in notes)
