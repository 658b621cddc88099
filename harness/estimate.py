"""Predict a case's peak memory from the artifact's own metadata, before running it.

    peak ~ runtime overhead + weights + KV cache + compute buffers

- weights: the artifact's tensor bytes *as the runtime holds them*. A GGUF
  or ONNX artifact is held as the file is (mmapped or read, resident once
  touched). A Hugging Face folder is cast at load to the runner's dtype:
  torch's ``dtype`` option (``auto`` = the checkpoint's own, float32 where
  config.json names none), MLX's ``dtype`` (``auto`` = float32 on the CPU
  backend). So a float32 load of a bf16 folder holds twice the file:
  safetensors bytes x target-dtype bytes / stored-dtype bytes, the stored
  dtype read from config.json (``torch_dtype``/``dtype``) or, failing that,
  the safetensors headers. Quantized folders (MLX q4, a
  ``quantization_config``) keep their packed weights: not scaled.
- KV cache: layers x n_ctx x KV heads x head dim x (bytes per K element +
  bytes per V element). Grouped-query attention is why KV heads, not
  attention heads, count here. The element type is the runtime's: llama.cpp
  ``type_k``/``type_v``; torch and MLX the load dtype; onnxruntime-genai the
  model's I/O dtype (float32 for CPU builds, float16 for CUDA/DirectML
  ones), preallocated for the whole n_ctx (``past_present_share_buffer``).
- compute buffers: the attention scores of one micro-batch and their
  softmax, 2 x n_ubatch x (filled context) x heads x 4 bytes (llama.cpp
  without flash attention; with it they are not materialised). onnxruntime-genai
  also returns float32 logits for *every* prompt position at prefill:
  prompt tokens x vocabulary x 4 bytes, far more than the KV cache at
  long prompts (llama.cpp and the torch runner keep the last position only).
- runtime overhead: interpreter, runtime libraries, thread pools and the
  fixed part of the compute graph: 66 MiB for llama-cpp-python on CPU,
  fitted on the sample model (peaks of 180, 247 and 470 MiB at contexts 512,
  2048 and 8192 half filled; the estimate is within 3 % of each).
  onnxruntime on CPU also prepacks every weight for its matmul kernels, a
  second copy as large as the weights (measured: 92 MiB with prepacking off,
  209 MiB on, for the sample's 82 MiB int4 graph).

Fitted for onnxruntime-genai on the int4 CPU sample (ru_maxrss of a bare
process; n_ctx/prompt tokens -> measured vs this estimate): 512/256 282 vs
290 MiB, 2048/1024 529 vs 533, 2048/2040 761 vs 759, 8192/4096 1517 vs 1487.
Before the float32 KV, the logits and the prepacked copy were counted the
estimate said 267 MiB where 574 were measured at 2048.

What it still leaves out: transient copies during a dtype cast at load (a
float32 load of a bf16 file may hold both for a moment), allocator slack,
activations other than attention scores (about 46 KiB per prompt token on
the ONNX sample, inside the fit above), GPU placement (everything is
counted as host memory), and a quality probe's arrays.

The point is not to replace measurement but to say, before a case runs,
whether it can possibly fit, and to report how far the guess was off once
it has run (``fitbench estimate`` does both).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from harness.artifact import ArtifactError, ArtifactInfo, _safetensors_header, folder_files
from harness.errors import FitbenchError

# bytes per element of llama.cpp KV cache types (block formats: block bytes / 32)
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
# MLX group quantization (kv_bits, group 64): packed bits plus a scale and a bias per group in the
# compute dtype (f32 on the CPU backend, taken as the upper bound). Only for runtime mlx.
MLX_KV_BYTES = {f"q{bits}": bits / 8 + 8 / 64 for bits in (2, 3, 4, 6, 8)}
# Float dtypes by every name they go by: runner options (torch names), config.json, safetensors headers.
DTYPE_NAMES = {"float32": "f32", "float": "f32", "f32": "f32", "F32": "f32",
               "bfloat16": "bf16", "bf16": "bf16", "BF16": "bf16",
               "float16": "f16", "half": "f16", "f16": "f16", "F16": "f16"}
# Fitted on the sample model with llama-cpp-python on CPU (see the module doc).
# torch: interpreter + torch + transformers + tokenizer, fitted on the bf16 HF
# sample on CPU with dtype auto (peaks 687 and 739 MiB at 512 and 2048 half
# filled; the estimate is within 3 % of each).
# onnxruntime: interpreter + onnxruntime(-genai), CPU (the prepacked weight copy is counted apart).
RUNTIME_OVERHEAD = {"llama.cpp": 66 << 20, "torch": 380 << 20, "onnxruntime": 43 << 20}
DEFAULT_OVERHEAD = 64 << 20
ONNX_FP16_PROVIDERS = {"cuda", "dml", "webgpu", "nvtensorrtrtx"}  # builds whose I/O (and KV) is float16


class EstimateError(FitbenchError, ValueError):
    """The artifact lacks the metadata an estimate needs."""


@dataclass
class Estimate:
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def estimate(info: ArtifactInfo, n_ctx: int, runtime: str = "llama.cpp", kv_type: str | None = None,
             flash_attn: bool | None = None, n_ubatch: int | None = None, fill: float = 1.0, *,
             options: Mapping[str, Any] | None = None, dtype: str | None = None) -> Estimate:
    """The estimated peak of ``info`` in ``runtime`` at ``n_ctx`` with ``fill`` of it prompted.

    ``options`` are the case's runner options: they give the KV type (llama.cpp ``type_k``/``type_v``),
    flash attention, the micro-batch, the load dtype (torch, MLX ``dtype``) and the ONNX provider.
    ``kv_type``, ``flash_attn``, ``n_ubatch`` and ``dtype`` given here override them (``kv_type`` is then
    both K and V); left out, each comes from the options, else the runtime's default."""
    opts = dict(options or {})
    needed = {"n_layers": info.n_layers, "n_heads": info.n_heads, "embedding_length": info.embedding_length}
    missing = [k for k, v in needed.items() if not v]
    if missing:
        raise EstimateError(f"{info.name} lacks {', '.join(missing)} in its metadata; cannot estimate its KV cache")
    target = load_dtype(info, runtime, dtype if dtype is not None else opts.get("dtype"), opts)
    k_type, v_type = _kv_types(info, runtime, kv_type, opts, target)
    head_dim = info.head_dim or info.embedding_length // info.n_heads
    kv_heads = info.n_kv_heads or info.n_heads
    per = {**KV_BYTES, **MLX_KV_BYTES}
    kv = info.n_layers * n_ctx * kv_heads * head_dim * (per[k_type] + per[v_type])
    filled = max(1, int(n_ctx * fill))
    ubatch = min(n_ubatch or int(opts.get("n_ubatch") or 512), filled)
    flash = bool(opts.get("flash_attn", False)) if flash_attn is None else flash_attn
    compute = 0 if flash else 2 * ubatch * filled * info.n_heads * 4
    overhead = RUNTIME_OVERHEAD.get(runtime, DEFAULT_OVERHEAD)
    if runtime == "onnxruntime":
        compute += filled * (info.vocab_size or 0) * KV_BYTES[_onnx_io_type(info)]  # logits of every prompt position
        if str(opts.get("provider") or "cpu") == "cpu":
            overhead += info.size_bytes  # the CPU kernels' prepacked copy of the weights
    return Estimate(weights_bytes=_weights_bytes(info, target), kv_bytes=int(kv), compute_bytes=int(compute),
                    overhead_bytes=overhead)


def stored_dtype(info: ArtifactInfo) -> str | None:
    """f32 | bf16 | f16 of an unquantized Hugging Face or MLX folder; None for anything else
    (GGUF, ONNX, quantized weights, or a folder that does not say)."""
    if info.format not in ("hf", "mlx"):
        return None
    if info.quant in DTYPE_NAMES:
        return DTYPE_NAMES[info.quant]
    if info.quant is not None:  # q4, a quantization_config: packed weights, not a float dtype
        return None
    by_bytes: dict[str, int] = {}
    for f in _weight_files(info):
        try:
            header = _safetensors_header(f)
        except ArtifactError:
            return None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            offsets = entry.get("data_offsets")
            size = offsets[1] - offsets[0] if isinstance(offsets, list) and len(offsets) == 2 else 0
            kind = DTYPE_NAMES.get(str(entry.get("dtype")))
            if kind is not None and isinstance(size, int):
                by_bytes[kind] = by_bytes.get(kind, 0) + size
    return max(by_bytes, key=by_bytes.__getitem__) if by_bytes else None


def load_dtype(info: ArtifactInfo, runtime: str, wanted: str | None, options: Mapping[str, Any]) -> str | None:
    """The float dtype (f32, bf16, f16) torch or MLX computes in, and holds an unquantized folder's
    weights and the KV cache in; None for other runtimes, whose artifacts say their own types."""
    if runtime not in ("torch", "mlx"):
        return None
    if wanted not in (None, "auto"):
        if wanted not in DTYPE_NAMES:
            raise EstimateError(f"unknown dtype {wanted!r} (known: float32, bfloat16, float16)")
        return DTYPE_NAMES[wanted]
    stored = stored_dtype(info)
    if runtime == "torch":
        # the runner's auto: the checkpoint's own dtype from config.json, float32 when it names none
        return stored if stored is not None and info.quant in DTYPE_NAMES else "f32"
    # MLX auto: float32 on the CPU backend (bf16/f16 are emulated there); the artifact's own on a GPU (Metal)
    device = options.get("device") or ("gpu" if sys.platform == "darwin" else "cpu")
    return "f32" if device == "cpu" else stored or "f16"


def _weights_bytes(info: ArtifactInfo, target: str | None) -> int:
    stored = stored_dtype(info)
    if target is None or stored is None or target == stored:
        return info.size_bytes
    weights = sum(f.stat().st_size for f in _weight_files(info))
    return info.size_bytes - weights + int(weights * KV_BYTES[target] / KV_BYTES[stored])


def _weight_files(info: ArtifactInfo) -> list:
    try:
        return [f for f in folder_files(info.path) if f.suffix == ".safetensors"] if info.path.is_dir() else []
    except OSError:
        return []


def _kv_types(info: ArtifactInfo, runtime: str, kv_type: str | None, opts: Mapping[str, Any],
              target: str | None) -> tuple[str, str]:
    if kv_type is not None:
        k = v = kv_type
    elif runtime == "llama.cpp":
        k, v = str(opts.get("type_k") or "f16"), str(opts.get("type_v") or "f16")
    elif runtime == "onnxruntime":
        k = v = _onnx_io_type(info)
    elif runtime == "mlx" and opts.get("kv_bits"):
        k = v = f"q{int(opts['kv_bits'])}"
        if k in MLX_KV_BYTES:
            return k, v
    elif target is not None:  # torch, MLX: the KV cache is in the dtype the model computes in
        k = v = target
    else:
        k = v = "f16"
    for t in (k, v):
        if t not in KV_BYTES:
            raise EstimateError(f"unknown KV type {t!r} (known: {', '.join(KV_BYTES)})")
    return k, v


def _onnx_io_type(info: ArtifactInfo) -> str:
    """The I/O (and KV) dtype onnxruntime-genai's builder gave the model: float16 for the GPU
    providers it names in genai_config.json, float32 for CPU builds."""
    try:
        config = json.loads((info.path / "genai_config.json").read_text(encoding="utf-8"))
        providers = config["model"]["decoder"]["session_options"].get("provider_options") or []
        names = {str(name).lower() for entry in providers if isinstance(entry, dict) for name in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "f32"
    return "f16" if names & ONNX_FP16_PROVIDERS else "f32"


def estimate_case(case: Any, info: ArtifactInfo) -> Estimate:
    """The estimate for a scenario case: its runtime, options (KV types, flash attention, dtype)
    and prompt fill. The one call the suite's skip guard and the fleet's placement make."""
    return estimate(info, case.n_ctx, case.runtime, options=case.options, fill=case.prompt_tokens / case.n_ctx)
