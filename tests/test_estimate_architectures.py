"""The estimate against real runs of non-llama architectures, built on the spot (no download).

Two small random-weight models, seeded: Gemma 3 (five of every six layers slide over a 256-token
window, head_dim 128 != hidden/heads, tied) and Mistral (every layer slides over 512 tokens, GQA
2 KV heads, untied). Each runs through fitbench's own case machinery in the torch runner at
contexts where the window matters (for Gemma 3 a full-KV estimate overshoots by clearly more than
the window-aware one misses at 2048), and, when llama.cpp's converter is at hand, as a GGUF in llama.cpp with its
default full-size SWA cache and with ``swa_full=false``. The estimate must be within 10 % of the
measured peak RSS at every context.

torch's fixed cost (interpreter, torch, transformers, the kernels a forward pages in) is a constant
of the machine, not of the model, and on these tiny models it is two thirds of the peak: fitted on
one machine (380 MiB), it measured 54 MiB more on another (CI). So the torch check takes this
machine's offset from the sample (a llama, the architecture the constant was fitted on) run the
same way, and holds the other architectures to 10 % with it: what must transfer across
architectures is the model-dependent part. The offset itself must stay within a quarter of the
constant, so a drifting constant still fails.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from tests.tiny_models import SAMPLE_GGUF, SAMPLE_HF, build_in_child, find_converter, measure_peaks

TOLERANCE = 0.10
CONTEXTS = {"gemma3": [512, 2048], "mistral": [2048]}
# About two minutes on a quiet 2-core machine; a loaded one (the worker imports torch per case) needs more.
pytestmark = [pytest.mark.model, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not SAMPLE_GGUF.exists():
        pytest.skip("sample model missing (make setup): its tokenizer is the tiny models' tokenizer")
    pytest.importorskip("transformers")
    # FITBENCH_TINY_MODELS: a folder to build them in and reuse (bench/estimate_accuracy.py --models-dir)
    out = Path(os.environ["FITBENCH_TINY_MODELS"]) if os.environ.get("FITBENCH_TINY_MODELS") else \
        tmp_path_factory.mktemp("tiny")
    return build_in_child(out, ["gemma3", "mistral"], gguf=["gemma3"] if find_converter() is not None else [])


TORCH_OPTIONS = {"device": "cpu", "n_threads": 1}


@pytest.fixture(scope="module")
def torch_offset(tmp_path_factory) -> int:
    """This machine's torch peak beyond the estimate, measured on the sample at 512 (bytes)."""
    from harness.estimate import RUNTIME_OVERHEAD

    if not SAMPLE_HF.exists():
        pytest.skip("sample HF folder missing (make setup)")
    (row,) = measure_peaks(SAMPLE_HF, "torch", [512], TORCH_OPTIONS, out_dir=tmp_path_factory.mktemp("sample"))
    assert row["status"] == "ok", row["error_text"]
    offset = row["measured_peak_bytes"] - row["estimate"]["total_bytes"]
    assert abs(offset) <= RUNTIME_OVERHEAD["torch"] / 4, (
        f"the sample in torch: estimate {row['estimate']['total_bytes'] / 2**20:.0f} MiB vs measured "
        f"{row['measured_peak_bytes'] / 2**20:.0f} MiB: the fixed overhead no longer fits this machine")
    return offset


def check(rows: list[dict], offset: int = 0) -> None:
    for r in rows:
        assert r["status"] == "ok", r["error_text"]
        peak, est = r["measured_peak_bytes"], r["estimate"]["total_bytes"]
        error = (est + offset - peak) / peak
        assert abs(error) <= TOLERANCE, (
            f"{r['artifact']} {r['runtime']} ctx {r['n_ctx']}: estimate {est / 2**20:.0f} MiB "
            f"{'' if not offset else f'{offset / 2**20:+.0f} MiB for this machine '}"
            f"vs measured {peak / 2**20:.0f} MiB ({error:+.1%})")


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_torch_estimates_hold_for_sliding_window_architectures(tiny, name, tmp_path, torch_offset):
    from harness.artifact import inspect_artifact
    from harness.estimate import estimate

    info = inspect_artifact(tiny[name])
    assert info.layout.n_swa_layers == {"gemma3": 10, "mistral": 12}[name]
    rows = measure_peaks(tiny[name], "torch", CONTEXTS[name], TORCH_OPTIONS, out_dir=tmp_path)
    check(rows, torch_offset)
    if name == "gemma3":  # the window is what made it right: every layer's KV at n_ctx is off by more
        longest = rows[-1]
        measured = longest["measured_peak_bytes"]
        full = estimate(replace(info, layout=None), longest["n_ctx"], "torch", fill=0.5).total_bytes + torch_offset
        windowed = longest["estimate"]["total_bytes"] + torch_offset
        # the full-KV estimate overshoots, and by clearly more than the window-aware one misses (a margin,
        # not the tolerance: the gap is ~9-10 % of the peak here, the window-aware error ~1-5 %)
        assert full > measured and (full - measured) / measured > abs(windowed - measured) / measured + 0.03


def test_llama_cpp_estimates_hold_with_and_without_a_full_size_swa_cache(tiny, tmp_path):
    if "gemma3.gguf" not in tiny:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (FITBENCH_LLAMA_CONVERT or .cache/llama.cpp)")
    pytest.importorskip("llama_cpp")
    default = measure_peaks(tiny["gemma3.gguf"], "llama.cpp", [2048], {"n_threads": 1}, out_dir=tmp_path)
    trimmed = measure_peaks(tiny["gemma3.gguf"], "llama.cpp", [2048], {"n_threads": 1, "swa_full": False},
                            out_dir=tmp_path)
    check(default + trimmed)
    # llama.cpp's default keeps all n_ctx in the sliding layers; trimmed to the window it measurably holds less
    assert default[0]["estimate"]["kv_swa_bytes"] > 2 * trimmed[0]["estimate"]["kv_swa_bytes"]
    assert trimmed[0]["measured_peak_bytes"] < default[0]["measured_peak_bytes"] - (
        default[0]["estimate"]["kv_swa_bytes"] - trimmed[0]["estimate"]["kv_swa_bytes"]) / 2
