"""The MLX runner on the real sample model (SmolLM2-135M, MLX q4). On Linux this is
mlx's CPU backend, which is slow on small machines: the cases here stay tiny."""

from __future__ import annotations

import pytest

from harness.worker.prompt import build_prompt
from runners.base import RunnerError, get_runner_class
from runners.mlx import MlxRunner
from tests import runner_contract as contract
from tests.conftest import ROOT

pytestmark = pytest.mark.model
MLX_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-mlx-q4"


@pytest.fixture(scope="module")
def artifact():
    if not (MLX_MODEL / "config.json").is_file():
        pytest.fail(f"{MLX_MODEL} is missing: run `make sample-models` (fitbench models prepare-sample)")
    return MLX_MODEL


@pytest.fixture(scope="module")
def runner(artifact):
    r = MlxRunner()
    r.prepare()
    r.info = r.load(artifact, 64, {})
    yield r
    r.close()


def test_registered_and_available():
    assert get_runner_class("mlx") is MlxRunner
    avail = MlxRunner.available()
    assert avail.available and avail.version and "cpu" in avail.devices


def test_load_records_the_kv_cap(runner):
    info = runner.info
    assert info.n_ctx == 64 and "max_kv_size" in info.n_ctx_meaning and "grows with use" in info.n_ctx_meaning
    assert info.extra["kv_cache"] == "RotatingKVCache" and info.extra["max_kv_size"] == 64
    assert info.n_layers_total == 30
    assert info.device in ("cpu", "gpu")
    if info.device == "cpu":
        assert info.kv_type == "f32"  # dtype auto: the CPU backend computes in float32


def test_exact_stamps(runner):
    contract.check_exact_stamps(runner, 16, 5)


def test_logits_agree_with_greedy_generation(runner):
    contract.check_logits_agree_with_greedy(runner, 16, 5, tolerance=0.1)


def test_extend_equals_reprefilling_the_history(runner):
    assert MlxRunner.supports_extend
    contract.check_extend_equals_reprefill(runner, 16, 4)


def test_context_limit_is_max_kv_size(runner):
    prompt = build_prompt(runner.tokenize, 60)
    with pytest.raises(RunnerError, match="context full"):
        list(runner.generate(prompt, 8))  # 60 + 7 decoded > max_kv_size 64


def test_memory_stats_report_the_allocator_peak(runner):
    stats = runner.memory_stats()
    # The 4-bit weights alone are ~70 MB; the peak can only be above them.
    assert stats["runtime_peak_bytes"] > 50e6
