"""Predict a case's peak memory from the artifact's own metadata, before running it.

    peak ~ runtime overhead + weights + KV cache + compute buffers

- weights: the artifact's tensor bytes (the GGUF file size; mmapped and
  resident once touched).
- KV cache: 2 (K and V) x layers x n_ctx x KV heads x head dim x bytes per
  element of the KV type. Grouped-query attention is why KV heads, not
  attention heads, count here.
- compute buffers (llama.cpp without flash attention): the attention scores
  of one micro-batch and their softmax, 2 x n_ubatch x (filled context) x
  heads x 4 bytes. With flash attention they are not materialised.
- runtime overhead: interpreter, runtime libraries, thread pools and the
  fixed part of the compute graph: 66 MiB for llama-cpp-python on CPU,
  fitted on the sample model (peaks of 180, 247 and 470 MiB at contexts 512,
  2048 and 8192 half filled; the estimate is within 3 % of each).

The point is not to replace measurement but to say, before a case runs,
whether it can possibly fit, and to report how far the guess was off once
it has run (``fitbench estimate`` does both).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from harness.artifact import ArtifactInfo

# bytes per element of llama.cpp KV cache types (block formats: block bytes / 32)
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
# Fitted on the sample model with llama-cpp-python on CPU (see the module doc).
# torch: interpreter + torch + transformers + tokenizer, fitted on the bf16 HF
# sample on CPU (peaks 687 and 739 MiB at 512 and 2048 half filled; the
# estimate is within 3 % of each). float32 weights are twice the bf16 file.
RUNTIME_OVERHEAD = {"llama.cpp": 66 << 20, "torch": 380 << 20}
DEFAULT_OVERHEAD = 64 << 20


class EstimateError(ValueError):
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


def estimate(info: ArtifactInfo, n_ctx: int, runtime: str = "llama.cpp", kv_type: str = "f16",
             flash_attn: bool = False, n_ubatch: int = 512, fill: float = 1.0) -> Estimate:
    needed = {"n_layers": info.n_layers, "n_heads": info.n_heads, "embedding_length": info.embedding_length}
    missing = [k for k, v in needed.items() if not v]
    if missing:
        raise EstimateError(f"{info.name} lacks {', '.join(missing)} in its metadata; cannot estimate its KV cache")
    if kv_type not in KV_BYTES:
        raise EstimateError(f"unknown KV type {kv_type!r} (known: {', '.join(KV_BYTES)})")
    head_dim = info.head_dim or info.embedding_length // info.n_heads
    kv_heads = info.n_kv_heads or info.n_heads
    kv = 2 * info.n_layers * n_ctx * kv_heads * head_dim * KV_BYTES[kv_type]
    filled = max(1, int(n_ctx * fill))
    ubatch = min(n_ubatch, filled)
    scores = 0 if flash_attn else 2 * ubatch * filled * info.n_heads * 4
    return Estimate(
        weights_bytes=info.size_bytes,
        kv_bytes=int(kv),
        compute_bytes=int(scores),
        overhead_bytes=RUNTIME_OVERHEAD.get(runtime, DEFAULT_OVERHEAD),
    )
