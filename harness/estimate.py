"""Predict a case's peak memory from the artifact's own metadata, before running it.

    peak ~ weights + KV (full layers) + KV (sliding-window layers) + logits + compute buffers + overhead

- weights: the artifact's tensor bytes *as the runtime holds them*. A GGUF
  or ONNX artifact is held as the file is (mmapped or read, resident once
  touched; llama.cpp's mmap prefetches the whole file, an untied embedding
  matrix included). llama.cpp on the CPU also repacks the weights of some
  types (by instruction set: Q4_0, Q4_K, IQ4_NL, MXFP4 with AVX2) into an
  anonymous buffer while their file pages stay mapped: held twice (K-quant
  files of a narrow model are mostly Q4_0 fallbacks: the sample's Q2_K and
  Q3_K_M estimates were 15-16 % low without it). A mixture of experts holds
  every expert. A Hugging Face folder is cast at load to the runner's dtype:
  torch's ``dtype`` option (``auto`` = the checkpoint's own, float32 where
  config.json names none), MLX's ``dtype`` (``auto`` = float32 on the CPU
  backend). So a float32 load of a bf16 folder holds twice the file:
  safetensors bytes x target-dtype bytes / stored-dtype bytes, the stored
  dtype read from config.json (``torch_dtype``/``dtype``) or, failing that,
  the safetensors headers. Quantized folders (MLX q4, a
  ``quantization_config``) keep their packed weights: not scaled.
- KV cache, per layer type (``harness.layout`` says which layers slide):
  positions held x KV heads x head dim x (bytes per K element + bytes per V
  element). A full-attention layer holds n_ctx (llama.cpp: padded to 256;
  MLX: what is filled); a sliding-window layer its window where the runtime
  trims it (torch's caches; llama.cpp only with ``swa_full=false``, window +
  n_ubatch), else n_ctx (``kv_cells``). Grouped-query attention is why KV heads,
  not attention heads, count here. The element type is the runtime's: llama.cpp
  ``type_k``/``type_v``; torch and MLX the load dtype; onnxruntime-genai the
  model's I/O dtype (float32 for CPU builds, float16 for CUDA/DirectML
  ones), preallocated for the whole n_ctx (``past_present_share_buffer``).
- logits: float32 over the vocabulary per output position: the last one
  in llama.cpp (n_outputs x n_vocab), torch (``logits_to_keep=1``) and MLX as
  fitbench runs them, every prompt position in onnxruntime-genai (prompt
  tokens x vocabulary x 4 bytes, far more than the KV cache at long prompts).
- compute buffers at the chosen batch: llama.cpp's micro-batch (n_ubatch)
  over the filled cells: the float32 KQ scores and their float16 copy for the
  product with V, 6 x n_ubatch x filled x heads bytes (none with flash
  attention), plus the filled K and V as attention reads them, 14 bytes per
  cell and KV element. torch prefills the whole prompt in one forward: its
  activations, 5 x (MLP width + hidden) elements of the load dtype per prompt
  token, or, if larger, the load-time fusing of a mixture of experts'
  per-expert tensors (every expert held twice for a moment). Fitted on real
  runs (below).
- runtime overhead: interpreter, runtime libraries, thread pools and the
  fixed part of the compute graph: 78 MiB for llama-cpp-python on CPU, 380
  MiB for torch + transformers, 406 MiB for mlx-lm on mlx[cpu] (before it
  was fitted, 64 MiB: MLX estimates were 60-70 % low). The imported
  runtime alone is the ``runtime_rss_bytes`` column of every row (48, 245,
  29 and 266 MiB here); the rest is what loading adds beyond the weights.
  onnxruntime on CPU also prepacks every weight for its matmul kernels, a
  second copy as large as the weights (measured: 92 MiB with prepacking
  off, 209 MiB on, for the sample's 82 MiB int4 graph).

Fitted on real runs of five architectures (bench/estimate_accuracy.py: small
random-weight Gemma 3 (five of six layers sliding), Mistral (all sliding),
Qwen2 (use_sliding_window), Mixtral-style MoE models built on the spot, and
the sample): llama.cpp on the sample, peaks of 180, 247 and 470 MiB at
contexts 512, 2048 and 8192 half filled, and on the Gemma 3-style GGUF with
and without ``swa_full`` at 512-4096; torch on every tiny architecture.
docs/catalog.md has the table.

Fitted for onnxruntime-genai on the int4 CPU sample (ru_maxrss of a bare
process; n_ctx/prompt tokens -> measured vs this estimate): 512/256 282 vs
290 MiB, 2048/1024 529 vs 533, 2048/2040 761 vs 759, 8192/4096 1517 vs 1487.
Before the float32 KV, the logits and the prepacked copy were counted the
estimate said 267 MiB where 574 were measured at 2048.

What it still leaves out: transient copies during a dtype cast at load (a
float32 load of a bf16 file may hold both for a moment), allocator slack,
onnxruntime's activations other than attention scores (about 46 KiB per
prompt token on the ONNX sample, inside the fit above), sliding windows in
onnxruntime-genai, GPU placement (everything is counted as host memory),
and a quality probe's arrays.

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
# mlx: mlx-lm on mlx[cpu] (Linux), fitted on the q4 sample: 266 MiB with the runtime imported
# (runtime_rss_bytes); peaks 484, 500, 564 and 795 MiB at 512-4096 half filled, estimate +2.5, +3.6,
# +3.1 and -0.8 % (bench/estimate_accuracy.py). Metal on macOS is not fitted.
RUNTIME_OVERHEAD = {"llama.cpp": 78 << 20, "torch": 380 << 20, "onnxruntime": 43 << 20, "mlx": 406 << 20}
DEFAULT_OVERHEAD = 64 << 20
# llama.cpp's compute buffer at a micro-batch, without flash attention: the KQ scores in float32 (the
# softmax runs in place) and their float16 copy for the product with V: 6 bytes per score; and the
# filled K and V as the attention reads them, 14 bytes per cell and KV element (fitted on the sample
# and a Gemma 3-style model, see the module doc).
LLAMA_SCORE_BYTES, LLAMA_KV_READ_BYTES = 6, 14
MLX_SCORE_BYTES, MLX_PREFILL_STEP = 6, 2048  # runners/mlx.py's prefill_step_size default (mlx-lm's)
# torch's one-shot prefill: activations per prompt token, in units of the MLP width and hidden size
# times the load dtype's bytes (fitted on Gemma 3-, Mistral- and Mixtral-style models and the sample).
TORCH_ACT_FFN, TORCH_ACT_HIDDEN = 5.0, 5.0
ONNX_FP16_PROVIDERS = {"cuda", "dml", "webgpu", "nvtensorrtrtx"}  # builds whose I/O (and KV) is float16


class EstimateError(FitbenchError, ValueError):
    """The artifact lacks the metadata an estimate needs."""


@dataclass
class Estimate:
    weights_bytes: int
    kv_bytes: int  # every layer's KV: kv_full_bytes + kv_swa_bytes
    compute_bytes: int
    overhead_bytes: int
    output_bytes: int = 0  # logits (and outputs) held for the vocabulary
    kv_full_bytes: int = 0  # in full-attention layers
    kv_swa_bytes: int = 0  # in sliding-window layers (their window, or all of n_ctx when the runtime keeps all)
    kv_cells_full: int = 0  # positions a full layer holds
    kv_cells_swa: int = 0  # positions a sliding-window layer holds (0: none)

    @property
    def kv_bytes_per_position(self) -> int:
        """KV bytes one context position takes across every layer, whatever number of cells the runtime
        holds (llama.cpp pads n_ctx to 256): what a decoded token reads per position of depth."""
        full = self.kv_full_bytes // self.kv_cells_full if self.kv_cells_full else 0
        return full + (self.kv_swa_bytes // self.kv_cells_swa if self.kv_cells_swa else 0)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes + self.overhead_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def estimate(info: ArtifactInfo, n_ctx: int, runtime: str = "llama.cpp", kv_type: str | None = None,
             flash_attn: bool | None = None, n_ubatch: int | None = None, fill: float = 1.0, *,
             options: Mapping[str, Any] | None = None, dtype: str | None = None) -> Estimate:
    """The estimated peak of ``info`` in ``runtime`` at ``n_ctx`` with ``fill`` of it prompted.

    ``options`` are the case's runner options: they give the KV type (llama.cpp ``type_k``/``type_v``),
    flash attention, the micro-batch, ``swa_full`` (llama.cpp), ``static_cache`` (torch), the load
    dtype (torch, MLX ``dtype``) and the ONNX provider. ``kv_type``, ``flash_attn``, ``n_ubatch`` and
    ``dtype`` given here override them (``kv_type`` is then both K and V); left out, each comes from
    the options, else the runtime's default."""
    opts = dict(options or {})
    needed = {"n_layers": info.n_layers, "n_heads": info.n_heads, "embedding_length": info.embedding_length}
    missing = [k for k, v in needed.items() if not v]
    if missing:
        raise EstimateError(f"{info.name} lacks {', '.join(missing)} in its metadata; cannot estimate its KV cache")
    target = load_dtype(info, runtime, dtype if dtype is not None else opts.get("dtype"), opts)
    k_type, v_type = _kv_types(info, runtime, kv_type, opts, target)
    filled = max(1, int(n_ctx * fill))
    batch = n_ubatch or int(opts.get("n_ubatch") or 512)
    ubatch = min(batch, filled)
    flash = bool(opts.get("flash_attn", False)) if flash_attn is None else flash_attn
    full_cells, swa_cells = kv_cells(info, runtime, n_ctx, filled, opts, batch)
    n_swa = info.layout.n_swa_layers if info.layout else 0
    per = {**KV_BYTES, **MLX_KV_BYTES}  # MLX's kv_bits types (q8, q4) beside llama.cpp's
    per_cell = kv_row_bytes(info) * (per[k_type] + per[v_type])
    kv_full = int((info.n_layers - n_swa) * full_cells * per_cell)
    kv_swa = int(n_swa * swa_cells * per_cell)
    compute = compute_bytes(info, runtime, filled, ubatch, full_cells, flash, target, opts)
    output = output_bytes(info, runtime, filled, opts)
    overhead = RUNTIME_OVERHEAD.get(runtime, DEFAULT_OVERHEAD)
    if runtime == "onnxruntime" and str(opts.get("provider") or "cpu") == "cpu":
        overhead += info.size_bytes  # the CPU kernels' prepacked copy of the weights
    return Estimate(weights_bytes=resident_weights(info, runtime, target, filled, opts), kv_bytes=kv_full + kv_swa,
                    compute_bytes=int(compute), overhead_bytes=overhead, output_bytes=int(output),
                    kv_full_bytes=kv_full, kv_swa_bytes=kv_swa, kv_cells_full=full_cells,
                    kv_cells_swa=swa_cells if n_swa else 0)


def kv_row_bytes(info: ArtifactInfo) -> int:
    """Elements of K (= of V) per position per layer: KV heads x head dim. Grouped-query (and
    multi-query) attention is why KV heads, not attention heads, count; the head dim is the
    model's own (Gemma's 256 is not hidden/heads)."""
    head_dim = info.head_dim or info.embedding_length // info.n_heads
    return (info.n_kv_heads or info.n_heads) * head_dim


def kv_cells(info: ArtifactInfo, runtime: str, n_ctx: int, filled: int, opts: Mapping[str, Any],
             n_ubatch: int) -> tuple[int, int]:
    """Positions a full-attention layer and a sliding-window layer hold in ``runtime``.

    llama.cpp pads n_ctx to 256 cells; its SWA cache is the window plus a micro-batch, padded to 256,
    unless ``swa_full`` (llama.cpp's and llama-cpp-python's default!) keeps all n_ctx. torch's
    StaticCache gives a sliding layer min(window, n_ctx) at load; a DynamicCache grows with the
    prompt. MLX as fitbench runs it caps every layer at n_ctx (one rotating cache per layer, window
    ignored) and grows in steps of 256. onnxruntime-genai preallocates n_ctx for every layer."""
    window = info.layout.sliding_window if info.layout else None
    if runtime == "llama.cpp":
        full = _pad(n_ctx, 256)
        keep_all = opts.get("swa_full")
        swa = full if keep_all is None or bool(keep_all) or not window else min(full, _pad(window + n_ubatch, 256))
        return full, swa
    if runtime == "torch":
        held = n_ctx if opts.get("static_cache", True) else filled
        return held, min(window, held) if window else held
    if runtime == "mlx":
        held = min(n_ctx, _pad(filled, 256))
        return held, held
    return n_ctx, n_ctx


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def compute_bytes(info: ArtifactInfo, runtime: str, filled: int, ubatch: int, kv_cells_full: int, flash: bool,
                  target: str | None, opts: Mapping[str, Any] | None = None) -> float:
    """Activations of the largest step: a llama.cpp micro-batch over the filled KV (scores and their
    softmax, unless flash attention; the MLP's and attention's activations), torch's one-shot
    prefill of the whole prompt (its MLP activations in the load dtype), an MLX prefill chunk's scores."""
    opts = opts or {}
    hidden = info.embedding_length or 0
    ffn = (info.layout.ffn_length if info.layout else None) or 4 * hidden
    if runtime == "llama.cpp":
        kv_seen = min(kv_cells_full, _pad(filled, 256))
        scores = 0 if flash else LLAMA_SCORE_BYTES * ubatch * kv_seen * info.n_heads
        return scores + LLAMA_KV_READ_BYTES * kv_seen * kv_row_bytes(info)
    if runtime == "torch":
        per = KV_BYTES[target] if target else 4
        prefill = filled * (TORCH_ACT_FFN * ffn + TORCH_ACT_HIDDEN * hidden) * per
        # transformers (5) fuses a mixture of experts' per-expert checkpoint tensors into one tensor per
        # layer at load: for a moment every expert's weights are held twice (measured on a Mixtral-style
        # model: +70 MiB for 72 MiB of experts). Before the KV cache exists, so the larger of the two.
        experts = info.layout.n_experts if info.layout else None
        fusing = info.n_layers * experts * 3 * hidden * ffn * per if experts and info.format == "hf" else 0
        return max(prefill, fusing)
    if runtime == "mlx":
        # mlx-lm prefills in prefill_step_size chunks (2048), each chunk's scores over the cache so far,
        # float32 plus a half-size copy as llama.cpp's (fitted on the q4 sample: without it, 19 % low at
        # 4096 half filled, where one 2048-token chunk's scores are 151 MiB)
        step = min(int(opts.get("prefill_step_size") or MLX_PREFILL_STEP), filled)
        return MLX_SCORE_BYTES * step * filled * info.n_heads
    if runtime == "onnxruntime":
        return 0 if flash else 2 * ubatch * filled * info.n_heads * 4
    return 2 * ubatch * filled * info.n_heads * 4


def output_bytes(info: ArtifactInfo, runtime: str, filled: int, opts: Mapping[str, Any]) -> float:
    """Logits held for the vocabulary, float32 (onnxruntime-genai: its I/O type). llama.cpp,
    torch and MLX as fitbench runs them ask for the last position's only (llama.cpp's output
    buffer is n_outputs x n_vocab; torch's ``logits_to_keep=1``); onnxruntime-genai returns every
    prompt position's at prefill: prompt tokens x vocabulary, often more than the KV cache."""
    vocab = info.vocab_size or 0
    if runtime == "onnxruntime":
        return filled * vocab * KV_BYTES[_onnx_io_type(info)]
    outputs = filled if opts.get("logits_all") else 1
    return outputs * vocab * 4


def resident_weights(info: ArtifactInfo, runtime: str, target: str | None, filled: int,
                     opts: Mapping[str, Any]) -> int:
    """Weight bytes resident in memory: all of them. A mixture of experts holds every expert (the file
    has them all, few run per token). llama.cpp mmaps a GGUF with MAP_POPULATE (prefetch), so even an
    untied token-embedding matrix, read only row by row, is resident: measured on a Mistral-style GGUF,
    counting it out made the estimate 18 % low. On the CPU, llama.cpp also copies the weights of the
    types its kernels repack into an anonymous buffer, while their file pages stay mapped: those are
    held twice (``repacked_bytes``). Not with ``use_mmap=false`` (the file is read into a buffer, the
    repacked weights only into theirs) nor with GPU offload (not modelled: layers on a GPU are not
    repacked)."""
    weights = _weights_bytes(info, target)
    if runtime == "llama.cpp" and bool(opts.get("use_mmap", True)) and not opts.get("n_gpu_layers"):
        from harness.measure.machine import cpu_flags

        weights += repacked_bytes(info, cpu_flags())
    return weights


def repacked_types(flags: frozenset[str] | set[str]) -> frozenset[str]:
    """The weight types llama.cpp's CPU backend repacks at load on a CPU with ``flags`` (ggml-cpu's
    repack.cpp as in llama-cpp-python 0.3.36): x86 with AVX2 Q4_0, Q4_K, IQ4_NL and MXFP4, with AVX-512
    Q2_K too; Arm NEON IQ4_NL, and with the dot product (or int8 matmul) instructions Q4_0, Q4_K,
    Q5_K, Q6_K, Q8_0, MXFP4 and Q1_0. ggml checks the flags its CPU variant was built for; the host's
    stand in for them."""
    types: set[str] = set()
    if "avx2" in flags:
        types |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    if "avx512f" in flags:
        types.add("Q2_K")
    if flags & {"neon", "asimd"}:
        types.add("IQ4_NL")
        if flags & {"dotprod", "i8mm"}:
            types |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4", "Q1_0"}
    return frozenset(types)


def repacked_bytes(info: ArtifactInfo, flags: frozenset[str] | set[str]) -> int:
    """Bytes llama.cpp's CPU backend copies into its CPU_REPACK buffer at load (the repacked layout is
    as large as the file's): the matrix weights of ``repacked_types(flags)``. K-quant GGUFs of a
    narrow model fall back to Q4_0/Q5_0 for most tensors (rows of 576 values are not whole 256-value
    K-quant blocks), so a ``Q2_K`` or ``Q3_K_M`` file can hold mostly Q4_0. Measured on the sample's quants (AVX2, n_ctx
    512): anonymous memory after load +43 MiB for Q2_K (42.7 MiB of Q4_0), +50 for Q3_K_M (Q4_0 and
    Q4_K, 49.4), +8 for Q4_K_M (Q4_K, 7.6), +0 for Q4_1, Q6_K, Q8_0, F16; file pages whole in every one."""
    types = repacked_types(flags)
    return sum(n for kind, n in info.matmul_bytes.items() if kind in types)


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
    # parallel sessions each hold a context of n_ctx: the KV is theirs together
    sessions = getattr(case, "parallel", 1) or 1
    return estimate(info, case.n_ctx * sessions, case.runtime, options=case.options,
                    fill=case.prompt_tokens / case.n_ctx)
