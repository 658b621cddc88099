"""The sample-artifact steps: registered, offline, cached, never half-made."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import samples


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
