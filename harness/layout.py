"""What a model's layers hold, read from its metadata: which attention layers slide over a window,
how many experts, whether the output head shares the embedding matrix.

These decide memory, not just speed: a sliding-window layer needs only its window of KV (when the
runtime trims it), every expert of a mixture-of-experts model is resident though few run per token,
and an untied embedding matrix in a mmapped GGUF is read only row by row (mostly never resident).

Two sources say the same things in different words:

- config.json (Hugging Face, MLX): ``layer_types`` (``sliding_attention``/``full_attention``, written
  by recent transformers for Gemma 2/3, Qwen2, ...), else ``sliding_window_pattern`` (older Gemma 3:
  every Nth layer is global), else Qwen2's ``use_sliding_window`` + ``max_window_layers``, else a
  ``sliding_window`` on its own (Mistral: every layer slides). This is what transformers' caches do.
- GGUF: ``<arch>.attention.sliding_window`` and, where present, ``<arch>.attention.sliding_window_pattern``
  (an int period or a per-layer bool array); without it llama.cpp uses its per-architecture default
  period (``LLAMA_SWA_PATTERNS``, from llama.cpp's ``load_swa_pattern`` calls). An architecture
  llama.cpp gives no pattern to (llama, qwen2: a Mistral or Qwen2 conversion) keeps full KV everywhere,
  whatever the checkpoint's window was: llama.cpp does not slide there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# llama.cpp's default SWA period per architecture: within each period of n layers, the last is
# global (full), the rest slide; (n, True) = "dense first": the first of each period is global.
# 0 = every layer slides. From llama.cpp src/models/*.cpp (load_swa_pattern / set_swa_pattern).
LLAMA_SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "gpt-oss": (2, False), "llama4": (4, False), "olmo2": (4, False),
    "exaone4": (4, False), "exaone-moe": (4, False), "plamo3": (8, False), "afmoe": (4, False),
    "smallthinker": (4, True), "phi3": (0, False),
}


@dataclass(frozen=True)
class Layout:
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] | None = None  # per layer: True = holds only its window; None = all full
    n_experts: int | None = None
    n_experts_used: int | None = None
    tied_embeddings: bool | None = None
    ffn_length: int | None = None  # the MLP's inner width (one expert's, for MoE)

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers) if self.sliding_window and self.swa_layers else 0


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def period_pattern(n_layers: int, period: int, dense_first: bool = False) -> tuple[bool, ...]:
    """llama.cpp's set_swa_pattern: True where layer il slides."""
    if period <= 0:
        return (True,) * n_layers
    if dense_first:
        return tuple(il % period != 0 for il in range(n_layers))
    return tuple(il % period < period - 1 for il in range(n_layers))


def from_config(config: Mapping[str, Any]) -> Layout:
    """The layout transformers (and mlx_lm) build from a config.json (its text part for multimodal ones)."""
    n_layers = _int(config.get("num_hidden_layers")) or 0
    window = _int(config.get("sliding_window"))
    swa: tuple[bool, ...] | None = None
    types = config.get("layer_types")
    if config.get("use_sliding_window") is False:  # Qwen2-style: a window in the config, switched off
        window = None
    if window and isinstance(types, list) and types:
        swa = tuple(t in ("sliding_attention", "chunked_attention") for t in types)
    elif window and _int(config.get("sliding_window_pattern")):
        period = config["sliding_window_pattern"]  # older Gemma 3: every period-th layer is global
        swa = tuple((i + 1) % period != 0 for i in range(n_layers))
    elif window and config.get("model_type") == "gemma2":
        swa = tuple((i + 1) % 2 != 0 for i in range(n_layers))
    elif window and config.get("use_sliding_window") is True:
        first = _int(config.get("max_window_layers")) or 0  # Qwen2: layers from max_window_layers on slide
        swa = tuple(i >= first for i in range(n_layers))
    elif window:
        swa = (True,) * n_layers  # Mistral: every layer slides
    experts = _int(config.get("num_local_experts")) or _int(config.get("num_experts")) or _int(config.get("n_routed_experts"))
    used = _int(config.get("num_experts_per_tok")) or _int(config.get("num_experts_per_token"))
    tied = config.get("tie_word_embeddings")
    ffn = _int(config.get("moe_intermediate_size")) if experts else None
    return Layout(sliding_window=window if swa and any(swa) else None, swa_layers=swa if swa and any(swa) else None,
                  n_experts=experts, n_experts_used=used,
                  tied_embeddings=tied if isinstance(tied, bool) else True,  # transformers' default is tied
                  ffn_length=ffn or _int(config.get("intermediate_size")))


def from_gguf(meta: Mapping[str, Any], arch: str | None, n_layers: int | None, tensor_names: set[str]) -> Layout:
    """The layout llama.cpp builds from a GGUF header (``meta`` holds arrays that are not the vocabulary)."""
    def key(k: str) -> Any:
        return meta.get(f"{arch}.{k}")

    n = n_layers or 0
    window = _int(key("attention.sliding_window"))
    swa: tuple[bool, ...] | None = None
    pattern = key("attention.sliding_window_pattern")
    if window:
        if isinstance(pattern, list) and len(pattern) >= n:
            swa = tuple(bool(x) for x in pattern[:n])
        elif _int(pattern) is not None:
            swa = period_pattern(n, pattern, LLAMA_SWA_PATTERNS.get(str(arch), (0, False))[1])
        elif str(arch) in LLAMA_SWA_PATTERNS:
            swa = period_pattern(n, *LLAMA_SWA_PATTERNS[str(arch)])
    ffn = key("expert_feed_forward_length") or key("feed_forward_length")
    if isinstance(ffn, list):  # per-layer widths
        ffn = max((x for x in ffn if isinstance(x, int)), default=None)
    return Layout(sliding_window=window if swa and any(swa) else None, swa_layers=swa if swa and any(swa) else None,
                  n_experts=_int(key("expert_count")), n_experts_used=_int(key("expert_used_count")),
                  tied_embeddings="output.weight" not in tensor_names if tensor_names else None,
                  ffn_length=_int(ffn))
