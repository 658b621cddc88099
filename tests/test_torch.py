"""The torch runner on the real sample model (SmolLM2-135M, Hugging Face safetensors, bf16).

Runs the real runtime (torch + transformers on the CPU); float32 where the
test compares token choices between code paths, so that ties cannot flip.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import time

import pandas as pd
import pytest

from harness.worker.prompt import build_prompt
from runners.base import OptionError, RunnerError, get_runner_class
from runners.torch import TorchRunner, parse_bytes
from tests.conftest import ROOT
from tests.test_cli import fitbench

HF_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct-hf"


@pytest.fixture(scope="module")
def hf_model():
    if not (HF_MODEL / "config.json").exists():
        pytest.fail(f"HF sample model missing at {HF_MODEL}: run `make sample-models`")
    return HF_MODEL


@pytest.fixture(scope="module")
def runner(hf_model):
    r = TorchRunner()
    r.prepare()
    r.info = r.load(hf_model, 512, {"dtype": "float32", "n_threads": 1})
    yield r
    r.close()


@pytest.fixture(scope="module")
def dynamic_runner(hf_model):
    r = TorchRunner()
    r.info = r.load(hf_model, 512, {"dtype": "float32", "n_threads": 1, "static_cache": False})
    yield r
    r.close()


def picked(r: TorchRunner, stream) -> list[int]:
    """Drain a generate/extend stream; the token ids it picked."""
    stamps = list(stream)
    assert len(stamps) == len(r.generated)
    return list(r.generated)


# --- without the model ---------------------------------------------------------------

def test_registered_and_options_checked_without_importing_torch():
    assert get_runner_class("torch") is TorchRunner
    assert TorchRunner.validate_options({})["static_cache"] is True
    for bad in ({"dtype": "float8"}, {"device": "tpu"}, {"max_gpu_memory": "lots"}, {"n_threads": 0},
                {"static_cache": "yes"}, {"attn_implementation": "magic"}):
        with pytest.raises(OptionError):
            TorchRunner.validate_options(bad)
    assert parse_bytes("200MiB") == 200 << 20 and parse_bytes("1.5GB") == 1_500_000_000


def test_importing_the_runner_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, runners.torch as t; t.TorchRunner.validate_options({'dtype': 'float32'}); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported the runtime'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unavailable_with_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    avail = TorchRunner.available()
    assert not avail.available and "transformers" in avail.reason
    assert "pip install 'fitbench[torch]'" in avail.install


def test_runners_command_shows_torch_unavailable_with_the_install_line(monkeypatch):
    from click.testing import CliRunner

    from harness.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = CliRunner().invoke(cli, ["runners", "--json"])
    assert result.exit_code == 0, result.output
    [row] = [r for r in json.loads(result.output) if r["runtime"] == "torch"]
    assert not row["available"] and "torch" in row["reason"] and "fitbench[torch]" in row["install"]
    table = CliRunner().invoke(cli, ["runners"]).output
    assert "torch" in table and "not installed" in table


# --- the real model ---------------------------------------------------------------

@pytest.mark.model
def test_available_lists_devices():
    avail = TorchRunner.available()
    assert avail.available and avail.version.startswith("torch ") and "transformers" in avail.version
    assert avail.devices[0] == "cpu"


@pytest.mark.model
def test_load_reports_what_the_runtime_did(runner):
    info = runner.info
    assert info.device == "cpu" and info.n_ctx == 512 and info.n_threads == 1
    assert info.n_layers_total == 30 and info.n_layers_device == 0
    assert info.kv_type == "f32/f32"
    assert "StaticCache(max_cache_len=512)" in info.n_ctx_meaning and "allocated at load" in info.n_ctx_meaning
    assert info.extra["n_params"] > 100e6 and info.extra["attn_implementation"] == "sdpa"


@pytest.mark.model
def test_static_cache_holds_n_ctx_positions_from_load(runner):
    layers = runner._cache.layers
    assert len(layers) == 30
    assert all(layer.is_initialized and tuple(layer.keys.shape) == (1, 3, 512, 64) for layer in layers)


@pytest.mark.model
def test_dynamic_cache_says_so(dynamic_runner):
    assert "DynamicCache" in dynamic_runner.info.n_ctx_meaning and "no KV preallocated" in dynamic_runner.info.n_ctx_meaning


@pytest.mark.model
def test_prompt_has_the_exact_token_count(runner):
    for n in (1, 7, 300):
        assert len(build_prompt(runner.tokenize, n)) == n


@pytest.mark.model
def test_generate_streams_exactly_n_stamps_and_ignores_eos(runner):
    prompt = build_prompt(runner.tokenize, 100)
    t0 = time.perf_counter()
    stamps = list(runner.generate(prompt, 12))
    assert len(stamps) == 12 and len(runner.generated) == 12
    assert t0 < stamps[0] and stamps == sorted(stamps)
    eos = runner._tokenizer.eos_token_id
    # Ask for tokens after an EOS: still exactly n stamps.
    assert len(list(runner.generate([*prompt[:10], eos], 5))) == 5


@pytest.mark.model
def test_every_generate_starts_from_an_empty_cache(runner):
    prompt = build_prompt(runner.tokenize, 80)
    first = picked(runner, runner.generate(prompt, 6))
    picked(runner, runner.generate(build_prompt(runner.tokenize, 200, seed=7), 6))  # leaves other KV behind
    assert picked(runner, runner.generate(prompt, 6)) == first


@pytest.mark.model
def test_context_overflow_is_a_runner_error(runner):
    with pytest.raises(RunnerError, match="configured context is 512"):
        list(runner.generate(build_prompt(runner.tokenize, 500), 20))


@pytest.mark.model
@pytest.mark.parametrize("which", ["runner", "dynamic_runner"])
def test_logits_agree_with_the_greedy_picks(which, request):
    r = request.getfixturevalue(which)
    prompt = build_prompt(r.tokenize, 60)
    tokens = picked(r, r.generate(prompt, 8))
    logits = r.logits(prompt + tokens[:-1])
    assert logits.shape == (len(prompt) + 7, 49152) and str(logits.dtype) == "float32"
    # Row i predicts token i+1: the rows from the prompt's last token on are the greedy picks.
    assert list(logits[len(prompt) - 1:].argmax(-1)) == tokens


@pytest.mark.model
@pytest.mark.parametrize("which", ["runner", "dynamic_runner"])
def test_extend_continues_the_kept_cache(which, request):
    r = request.getfixturevalue(which)
    assert TorchRunner.supports_extend
    prompt = build_prompt(r.tokenize, 50)
    reply = picked(r, r.generate(prompt, 5))
    user = r.tokenize(" Question: what is the capital of France? Answer:")
    continued = picked(r, r.extend(user, 6))
    # The same greedy tokens as a fresh generate over the whole conversation so far.
    assert picked(r, r.generate(prompt + reply + user, 6)) == continued
    again = picked(r, r.extend(user, 3))  # extend after extend
    assert picked(r, r.generate(prompt + reply + user + continued + user, 3)) == again


@pytest.mark.model
def test_extend_needs_a_sequence_and_room(runner):
    runner.logits([1, 2, 3])  # leaves no sequence to continue
    with pytest.raises(RunnerError, match="needs a finished generate"):
        list(runner.extend([1], 2))
    list(runner.generate(build_prompt(runner.tokenize, 400), 8))
    with pytest.raises(RunnerError, match="configured context"):
        list(runner.extend(build_prompt(runner.tokenize, 100), 8))


@pytest.mark.model
def test_memory_stats_on_cpu(runner):
    assert runner.memory_stats() == {"runtime_peak_bytes": None}


@pytest.mark.model
def test_weight_placement_follows_the_accelerate_device_map(runner):
    """What memory_stats and n_layers_device report for a split model, from a device map as
    accelerate writes it (ints are CUDA indices); no GPU needed to check the bookkeeping."""
    import torch

    model = runner._model
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    hf_map = {"model.embed_tokens": 0, "lm_head": 0, "model.norm": "cpu", "model.rotary_emb": "cpu",
              **{f"model.layers.{i}": 0 if i < 12 else "cpu" for i in range(30)}}
    saved_device = runner._device
    model.hf_device_map = hf_map
    runner._device = torch.device("cuda", 0)
    try:
        placement = runner._placement()
        assert set(placement) == {"cuda:0", "cpu"} and sum(placement.values()) == total
        assert runner._host_bytes(placement) == 18 * layer_bytes + 576 * 4  # 18 layers and the final norm
        assert runner._layers_on_accelerator(30) == 12
    finally:
        del model.hf_device_map
        runner._device = saved_device
    assert runner._placement() == {"cpu": total} and runner._layers_on_accelerator(30) == 0


@pytest.mark.model
def test_cuda_on_a_cpu_build_is_an_option_error(hf_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(OptionError, match="no CUDA GPU"):
        TorchRunner().load(hf_model, 256, {"device": "cuda"})
    with pytest.raises(OptionError, match="device_map"):
        TorchRunner().load(hf_model, 256, {"device": "cpu", "max_gpu_memory": "1GiB"})


@pytest.mark.model
def test_runners_command_lists_torch_with_devices():
    proc = fitbench("runners", "--json")
    assert proc.returncode == 0, proc.stderr
    [row] = [r for r in json.loads(proc.stdout) if r["runtime"] == "torch"]
    assert row["available"] and row["formats"] == ["hf"] and "cpu" in row["devices"]


@pytest.mark.model
def test_fitbench_run_gives_ok_torch_rows(tmp_path, write_scenario, hf_model):
    scenario = write_scenario({
        "name": "torch-small",
        "models": [{"artifact": str(hf_model), "runtime": "torch", "label": "smollm2-hf",
                    "options": {"dtype": ["bfloat16", "float32"], "n_threads": 1}}],
        "contexts": [256], "fill": 0.5, "gen_tokens": 6, "warmup": 1, "repetitions": 1, "timeout": 300,
    })
    proc = fitbench("run", str(scenario), "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [results] = [p for p in glob.glob(f"{tmp_path}/torch-small-*.parquet") if not p.endswith(".timeline.parquet")]
    df = pd.read_parquet(results)
    assert (df["status"] == "ok").all(), df[["status", "error"]]
    assert len(df) == 2 and (df["runtime"] == "torch").all() and (df["artifact_format"] == "hf").all()
    assert (df["n_ctx_runtime"] == 256).all() and df["n_ctx_meaning"].str.contains("StaticCache").all()
    assert sorted(df["kv_type"]) == ["bf16/bf16", "f32/f32"]
    assert (df["prompt_tokens"] == 128).all() and (df["gen_tokens"] == 6).all()
    assert (df["peak_rss_bytes"] > 200 << 20).all() and (df["decode_tok_s"] > 0).all() and (df["ttft_s"] > 0).all()
    # float32 weights take twice the memory of bf16 ones
    peaks = df.set_index("kv_type")["peak_rss_bytes"]
    assert peaks["f32/f32"] > peaks["bf16/bf16"] + (200 << 20)
    # CPU: no allocator peak, no offload, no GPU figures (none on this machine), and a verdict
    assert df["runtime_peak_bytes"].isna().all() and df["offload_host_bytes"].isna().all()
    assert df["fit_class"].notna().all() and not df["fit_offload"].any()
    assert df["artifact_n_params"].iloc[0] == 134515008 and df["artifact_quant"].iloc[0] == "bf16"
