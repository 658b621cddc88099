"""The llama.cpp runner on the real sample model (SmolLM2-135M Q4_1)."""

from __future__ import annotations

import time

import pytest

from harness.worker.prompt import build_prompt
from runners.base import LoadError, OptionError, get_runner_class
from runners.llama_cpp import LlamaCppRunner

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runner(sample_model):
    r = LlamaCppRunner()
    info = r.load(sample_model, 1024, {"n_threads": 2})
    r.info = info
    yield r
    r.close()


def test_registered_and_available():
    assert get_runner_class("llama.cpp") is LlamaCppRunner
    avail = LlamaCppRunner.available()
    assert avail.available and avail.version and "cpu" in avail.devices


def test_load_reports_what_the_runtime_did(runner):
    info = runner.info
    assert info.n_ctx == 1024
    assert info.n_layers_total == 30
    assert info.n_layers_device == 0  # CPU build, n_gpu_layers 0
    assert info.kv_type == "f16/f16" and info.n_threads == 2
    assert info.extra["n_params"] > 100e6


def test_prompt_has_the_exact_token_count(runner):
    for n in (1, 7, 300):
        assert len(build_prompt(runner.tokenize, n)) == n
    assert build_prompt(runner.tokenize, 50) == build_prompt(runner.tokenize, 50)


def test_generate_streams_one_timestamp_per_token(runner):
    prompt = build_prompt(runner.tokenize, 200)
    t0 = time.perf_counter()
    stamps = list(runner.generate(prompt, 16))
    assert len(stamps) == 16
    assert t0 < stamps[0] and stamps == sorted(stamps)


def test_every_repetition_prefills_from_scratch(runner):
    """Unlike Llama.generate(reset=True), a repeated prompt is processed again, not reused from the cache."""
    prompt = build_prompt(runner.tokenize, 600)
    ttfts = []
    for _ in range(3):
        t0 = time.perf_counter()
        first = next(iter(runner.generate(prompt, 2)))
        ttfts.append(first - t0)
    short = build_prompt(runner.tokenize, 8)
    t0 = time.perf_counter()
    short_ttft = next(iter(runner.generate(short, 2))) - t0
    assert min(ttfts[1:]) > 0.5 * ttfts[0]
    assert min(ttfts) > 5 * short_ttft


def test_the_context_limit_is_real(runner):
    prompt = build_prompt(runner.tokenize, 1000)
    from runners.base import RunnerError

    with pytest.raises(RunnerError, match="llama_decode failed"):
        list(runner.generate(prompt, 100))  # 1000 + 100 > n_ctx 1024


def test_kv_cache_types_and_flash_attention(sample_model):
    r = LlamaCppRunner()
    try:
        info = r.load(sample_model, 512, {"flash_attn": True, "type_k": "q8_0", "type_v": "q8_0", "n_threads": 2})
        assert info.kv_type == "q8_0/q8_0"
        assert len(list(r.generate(build_prompt(r.tokenize, 64), 4))) == 4
    finally:
        r.close()


def test_options_are_validated():
    with pytest.raises(OptionError, match="unknown option 'n_thread'"):
        LlamaCppRunner.validate_options({"n_thread": 2})
    with pytest.raises(OptionError, match="must be one of"):
        LlamaCppRunner.validate_options({"type_k": "q3"})
    with pytest.raises(OptionError, match="true or false"):
        LlamaCppRunner.validate_options({"flash_attn": "yes"})
    assert LlamaCppRunner.validate_options({})["n_batch"] == 2048


def test_a_damaged_file_is_a_load_error(tmp_path, sample_model):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(sample_model.read_bytes()[:20_000_000])
    with pytest.raises(LoadError):
        LlamaCppRunner().load(cut, 256, {})
