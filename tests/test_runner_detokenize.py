"""Every runner that exposes logits can also turn tokens back into text, so task checks
(harness/tasks.py) run in all four runtimes, not only llama.cpp."""

from __future__ import annotations

import pytest

from runners.base import get_runner_class, overrides
from tests.conftest import ROOT

pytestmark = pytest.mark.model

ARTIFACTS = {
    "torch": ROOT / "models" / "SmolLM2-135M-Instruct-hf",
    "onnxruntime": ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4",
    "mlx": ROOT / "models" / "SmolLM2-135M-Instruct-mlx-q4",
    "llama.cpp": ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
}


@pytest.mark.parametrize("runtime", sorted(ARTIFACTS))
def test_tokenize_then_detokenize_gives_the_text_back(runtime):
    cls = get_runner_class(runtime)
    assert overrides(cls, "logits") and overrides(cls, "detokenize")
    if not ARTIFACTS[runtime].exists():
        pytest.fail(f"{ARTIFACTS[runtime]} missing: run `make sample-models`")
    runner = cls()
    runner.prepare()
    runner.load(ARTIFACTS[runtime], 256, {})
    try:
        text = "The capital of France is Paris."
        tokens = runner.tokenize(text)
        assert runner.detokenize(tokens).strip() == text
        assert runner.detokenize(tokens[-2:]).strip() == "Paris."
    finally:
        runner.close()
