"""The onnxruntime-genai runner on the real sample model (SmolLM2-135M, ONNX int4, CPU provider)."""

from __future__ import annotations

import pytest

from harness.worker.prompt import build_prompt
from runners.base import LoadError, OptionError, RunnerError, get_runner_class
from runners.onnx import OnnxGenaiRunner
from tests import runner_contract as contract
from tests.conftest import ROOT

pytestmark = pytest.mark.model
ONNX_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4"


@pytest.fixture(scope="module")
def artifact():
    if not (ONNX_MODEL / "genai_config.json").is_file():
        pytest.fail(f"{ONNX_MODEL} is missing: run `make sample-models` (fitbench models prepare-sample)")
    return ONNX_MODEL


@pytest.fixture(scope="module")
def runner(artifact):
    r = OnnxGenaiRunner()
    r.prepare()
    r.info = r.load(artifact, 512, {"provider": "cpu"})
    yield r
    r.close()


def test_registered_and_available_with_providers():
    assert get_runner_class("onnxruntime") is OnnxGenaiRunner
    avail = OnnxGenaiRunner.available()
    assert avail.available and avail.version
    assert avail.devices[0] == "cpu"
    assert "CPUExecutionProvider" in avail.notes


def test_load_records_provider_and_configured_context(runner):
    info = runner.info
    assert info.n_ctx == 512 and "max_length" in info.n_ctx_meaning
    assert info.device == "cpu"
    assert info.extra["provider"] == "cpu" and info.extra["execution_provider"] == "CPUExecutionProvider"
    assert info.extra["max_length"] == 512 and info.extra["past_present_share_buffer"] is True
    assert info.n_layers_total == 30
    assert info.kv_type == "f32"  # the int4 CPU build keeps float32 activations and KV


def test_exact_stamps(runner):
    contract.check_exact_stamps(runner, 100, 12)


def test_eos_is_not_a_stop(runner):
    """A prompt the model answers and then ends: generation goes on past EOS for exactly n tokens."""
    prompt = runner.tokenize("The capital of France is Paris. The capital of Italy is")
    tokens = contract.greedy(runner, runner.generate(prompt, 20))
    assert len(tokens) == 20
    eos = tokens.index(2)  # the model does end its answer here
    assert eos < 19 and tokens[eos + 1:]
    # What follows EOS is what the model predicts after EOS: the same as re-prefilling it.
    history = prompt + tokens[:-1]
    assert int(runner.logits(history)[len(prompt) + eos].argmax()) == tokens[eos + 1]


def test_extend_after_eos_equals_reprefilling(runner):
    prompt = runner.tokenize("The capital of France is Paris. The capital of Italy is")
    tokens = contract.greedy(runner, runner.generate(prompt, 20))
    upto_eos = tokens[:tokens.index(2) + 1]
    assert contract.greedy(runner, runner.generate(prompt, len(upto_eos))) == upto_eos  # ends on EOS
    new = runner.tokenize(" And the capital of Spain is")
    extended = contract.greedy(runner, runner.extend(new, 5))
    assert extended == contract.greedy(runner, runner.generate(prompt + upto_eos + new, 5))


def test_logits_agree_with_greedy_generation(runner):
    contract.check_logits_agree_with_greedy(runner, 100, 10, tolerance=0.1)


def test_extend_equals_reprefilling_the_history(runner):
    assert OnnxGenaiRunner.supports_extend
    contract.check_extend_equals_reprefill(runner, 100, 6)


def test_context_limit_is_max_length(runner):
    prompt = build_prompt(runner.tokenize, 500)
    with pytest.raises(RunnerError, match="context full"):
        list(runner.generate(prompt, 20))  # 500 + 20 > max_length 512


def test_absent_provider_is_unavailable_not_a_crash():
    avail = OnnxGenaiRunner.case_availability({"provider": "cuda"})
    if "cuda" in OnnxGenaiRunner.available().devices:
        pytest.skip("this machine has the CUDA provider")
    assert not avail.available
    assert "cuda" in avail.reason and "not present" in avail.reason and avail.install
    assert OnnxGenaiRunner.case_availability({"provider": "cpu"}).available


def test_unknown_provider_is_an_option_error():
    with pytest.raises(OptionError, match="provider"):
        OnnxGenaiRunner.validate_options({"provider": "tpu"})


def test_a_folder_without_a_model_is_a_load_error(tmp_path, artifact):
    (tmp_path / "genai_config.json").write_text((artifact / "genai_config.json").read_text())
    r = OnnxGenaiRunner()
    r.prepare()
    with pytest.raises(LoadError):
        r.load(tmp_path, 256, {})
