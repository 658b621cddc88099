"""MLX artifacts (and plain Hugging Face folders) through mlx-lm: Apple GPU on
macOS, the CPU backend (``mlx[cpu]``) on Linux.

The timed path is fitbench's own greedy loop over mlx-lm's model and KV cache,
not ``mlx_lm.generate``/``stream_generate``: those stop at EOS, overlap the
next step with ``mx.async_eval`` and keep no per-token timestamps. Here every
``generate()`` starts from a new, empty cache (a real prefill), the prompt
is evaluated in ``prefill_step_size`` chunks, and each token is forced with
``mx.eval`` before its timestamp, so TTFT and decode rate mean what they mean
for the llama.cpp runner.

Configured context: MLX allocates no KV cache at load; the cache grows as
tokens arrive (in steps of 256). ``n_ctx`` becomes mlx-lm's ``max_kv_size``:
a RotatingKVCache that never holds more than ``n_ctx`` tokens. mlx-lm's own
``make_prompt_cache(model, max_kv_size)`` ignores the cap for models that
build their own cache (llama does, in mlx-lm 0.32), so the runner builds the
rotating cache itself. fitbench never lets it rotate: a case or an
``extend()`` that would need more than ``n_ctx`` tokens is an error, as a
full KV cache is in llama.cpp.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar, Iterator

from runners.base import (
    Availability,
    LoadError,
    LoadInfo,
    Option,
    Runner,
    RunnerError,
    dist_version,
    missing_modules,
    probe_runtime,
)

INSTALL = "pip install 'fitbench[mlx]'  (macOS on Apple silicon: Metal GPU; Linux: the mlx[cpu] backend)"
KEEP_TOKENS = 4  # tokens a rotating cache never evicts (mlx-lm's choice for max_kv_size)
FACTS = "runners.mlx:runtime_facts"  # run by available() in a child interpreter


def _versions() -> tuple[str | None, str | None]:
    return dist_version("mlx-lm"), dist_version("mlx")


def runtime_facts() -> dict[str, Any]:
    """What only importing mlx tells: a backend for this platform, a GPU, the default device.
    Runs in a probe child, never in the harness. (mlx_lm is not imported: it pulls in
    transformers, and its failures show at load.)"""
    import mlx.core as mx

    device = mx.default_device()
    return {"gpu": _has_gpu(mx), "default_device": getattr(device.type, "name", str(device))}


class MlxRunner(Runner):
    name = "mlx"
    formats = {"mlx", "hf"}
    no_parallel_reason = ("parallel sessions are not wired for MLX yet: mlx-lm's generate_step runs one "
                          "sequence; batched decoding (mlx-lm's BatchGenerator) is future work")
    supports_extend: ClassVar[bool] = True
    options = {
        "device": Option(str, None, "gpu or cpu (default: gpu where MLX has one, else cpu)", ("gpu", "cpu")),
        "prefill_step_size": Option(int, 2048, "prompt tokens evaluated per step (mlx-lm's default)"),
        "dtype": Option(str, "auto", "activation/KV dtype: auto = float32 on the CPU backend (its bfloat16 and "
                        "float16 are emulated, 4-5x slower), the artifact's own dtype on a GPU",
                        ("auto", "float32", "float16", "bfloat16")),
        "kv_bits": Option(int, None, "quantize the KV cache to this many bits (mlx-lm QuantizedKVCache, "
                          "group quantization; a quantized cache does not rotate, n_ctx is enforced)", (2, 3, 4, 6, 8)),
        "kv_group_size": Option(int, 64, "group size of the quantized KV cache (mlx-lm's default)", (32, 64, 128)),
        "kv_cache": Option(str, "rotating", "rotating: cap the KV cache at n_ctx (max_kv_size); "
                           "unbounded: let it grow (n_ctx is then not enforced)", ("rotating", "unbounded")),
    }

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._n_ctx = 0
        self._opts: dict[str, Any] = {}
        self._cache: list[Any] | None = None
        self._last: int | None = None  # sampled by the previous call, not yet fed to the model

    @classmethod
    def available(cls) -> Availability:
        if missing_modules("mlx_lm", "mlx"):
            return Availability(False, reason="mlx-lm is not installed", install=INSTALL)
        lm_version, mx_version = _versions()
        probe = probe_runtime(f"mlx {mx_version or '(unknown version)'}", FACTS, key=f"{mx_version} {lm_version}")
        if not probe.ok:  # e.g. mlx without a backend for this platform
            return Availability(False, lm_version, reason=probe.error, install=INSTALL)
        devices = ["gpu", "cpu"] if probe.facts.get("gpu") else ["cpu"]
        return Availability(True, lm_version, devices,
                            notes=f"mlx {mx_version}, default device {probe.facts.get('default_device')}")

    def prepare(self) -> None:
        try:
            import mlx.core  # noqa: F401
            import mlx_lm  # noqa: F401
        except ImportError as exc:
            raise LoadError(f"mlx-lm is not installed: {INSTALL}") from exc

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        import mlx.core as mx
        from mlx_lm import load as mlx_load

        opts = self.validate_options(options)
        device = opts["device"] or ("gpu" if _has_gpu(mx) else "cpu")
        if device == "gpu" and not _has_gpu(mx):
            raise LoadError("MLX has no GPU on this machine (the Linux mlx[cpu] backend is CPU only); use device: cpu")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never a hub download
        try:
            self._model, self._tokenizer = mlx_load(str(artifact))
        except Exception as exc:
            raise LoadError(f"mlx-lm could not load {artifact.name}: {exc}") from exc
        self._n_ctx, self._opts = n_ctx, opts
        dtype = opts["dtype"]
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else None
        if dtype is not None:
            # Casts float parameters (norms, embeddings, quantization scales);
            # packed quantized weights stay packed. Activations and KV follow.
            self._model.set_dtype(getattr(mx, dtype))
        mx.eval(self._model.parameters())  # weights resident now, not lazily during the first prefill
        lm_version, mx_version = _versions()
        cache = self._new_cache()
        capped = opts["kv_cache"] == "rotating"
        float_kv = _dtype_name(_weights_dtype(self._model))  # the cache's dtype unless kv_bits quantizes it
        return LoadInfo(
            device=device,
            runtime_version=lm_version or "unknown",
            n_ctx=n_ctx,
            n_ctx_meaning=("mlx-lm max_kv_size: nothing is allocated at load; the KV cache grows with use "
                           "(256-token steps) and a rotating cache caps it at n_ctx tokens" if capped else
                           "mlx-lm unbounded KV cache: grows with use, n_ctx is not enforced"),
            n_layers_total=len(self._model.layers),
            n_layers_device=len(self._model.layers) if device == "gpu" else 0,
            kv_type=f"q{opts['kv_bits']}" if opts["kv_bits"] else float_kv,
            **{"kv_type_k": float_kv, "kv_type_v": float_kv, **self.kv_settings(opts)},
            extra={"mlx_version": mx_version, "dtype_option": opts["dtype"], "kv_cache": type(cache[0]).__name__,
                   "max_kv_size": n_ctx if capped else None, "prefill_step_size": opts["prefill_step_size"]},
        )

    @classmethod
    def kv_settings(cls, options: dict[str, Any]) -> dict[str, Any]:
        """MLX attention is mx.fast.scaled_dot_product_attention (fused); a quantized cache goes through
        mlx-lm's quantized_scaled_dot_product_attention, which computes the scores explicitly."""
        opts = cls.validate_options(options)
        bits = opts["kv_bits"]
        if not bits:
            return {"attn_impl": "sdpa", "flash_attn": True}
        return {"kv_type_k": f"q{bits}", "kv_type_v": f"q{bits}", "attn_impl": "quantized_sdpa", "flash_attn": False}

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    # --- the timed path -------------------------------------------------

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        # A real prefill every time: a new, empty cache.
        self._cache, self._last = self._new_cache(), None
        return self._run(list(prompt_tokens), max_new_tokens)

    def extend(self, new_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        if self._cache is None or self._last is None:
            raise RunnerError("extend() needs a previous generate() in this process")
        return self._run([self._last, *new_tokens], max_new_tokens)

    def _run(self, feed: list[int], max_new_tokens: int) -> Iterator[float]:
        import mlx.core as mx

        capped = self._opts["kv_cache"] == "rotating" or self._opts["kv_bits"]
        if capped and self._cache[0].offset + len(feed) + max_new_tokens - 1 > self._n_ctx:
            raise RunnerError(f"context full: {self._cache[0].offset} cached + {len(feed)} new + "
                              f"{max_new_tokens - 1} to generate exceed n_ctx {self._n_ctx}")
        logits = self._prefill(mx.array(feed, dtype=mx.int32))
        for i in range(max_new_tokens):
            # Greedy; EOS is not a stop, so every repetition does the same work.
            token = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(token)
            self._last = int(token.item())
            yield time.perf_counter()
            if i + 1 < max_new_tokens:
                logits = self._model(token[:, None], cache=self._cache)
                self._last = None  # fed: the cache now holds it

    @property
    def last_token(self) -> int | None:
        """The token sampled last by generate()/extend(): what greedy decoding produced, for tests and quality checks."""
        return self._last

    def _prefill(self, tokens: Any) -> Any:
        """Evaluate ``tokens`` into the cache; return the logits for the last one (lazy).

        As in mlx-lm's generate_step (and llama.cpp), all but the last token
        go in ``prefill_step_size`` chunks with only the cache evaluated: MLX
        is lazy, so the vocabulary projection of those positions (a fifth of
        a prefill's work for this model) is never computed. The last token
        alone then gives the logits to sample from."""
        import mlx.core as mx

        step = max(1, self._opts["prefill_step_size"])
        head = tokens[:-1]
        while head.size > 0:
            self._model(head[:step][None], cache=self._cache)
            mx.eval([c.state for c in self._cache])
            head = head[step:]
        return self._model(tokens[-1:][None], cache=self._cache)

    # --- quality and memory hooks -----------------------------------------

    def detokenize(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def logits(self, tokens: list[int]) -> Any:
        """Raw float32 logits (len(tokens), n_vocab) from an empty cache; row i predicts token i+1."""
        import mlx.core as mx
        import numpy as np

        cache = self._new_cache(capped=False)  # scoring may be longer than the case's n_ctx
        rows = []
        step = max(1, self._opts["prefill_step_size"])
        for start in range(0, len(tokens), step):
            out = self._model(mx.array(tokens[start:start + step], dtype=mx.int32)[None], cache=cache)
            out = out[0].astype(mx.float32)
            mx.eval(out)
            rows.append(np.array(out, copy=True))
        return np.concatenate(rows, axis=0)

    def memory_stats(self) -> dict[str, int | float | None]:
        import mlx.core as mx

        # The process is fresh per case, so the allocator's peak is this case's (load included).
        return {"runtime_peak_bytes": int(mx.get_peak_memory())}

    def close(self) -> None:
        self._cache = self._model = self._tokenizer = None
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:
            pass

    def _new_cache(self, capped: bool | None = None) -> list[Any]:
        from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache

        cache = make_prompt_cache(self._model)
        if self._opts.get("kv_bits") and capped is not False:
            # Quantized from the first token (mlx-lm's quantized_kv_start 0); capacity is checked in _run.
            return [QuantizedKVCache(group_size=self._opts["kv_group_size"], bits=self._opts["kv_bits"])
                    if type(c) is KVCache else c for c in cache]
        if capped is None:
            capped = self._opts["kv_cache"] == "rotating"
        if capped:
            # Full-attention layers get the max_kv_size cap; layers the model
            # already gives a sliding window keep theirs.
            cache = [RotatingKVCache(max_size=self._n_ctx, keep=KEEP_TOKENS) if type(c) is KVCache else c
                     for c in cache]
        return cache


def _has_gpu(mx: Any) -> bool:
    try:
        if mx.metal.is_available():
            return True
    except Exception:
        pass
    try:
        return bool(mx.cuda.is_available())
    except Exception:
        return False


def _weights_dtype(model: Any) -> Any:
    """The dtype of the first floating-point tensor (norms stay float in quantized models)."""
    from mlx.utils import tree_flatten

    for _name, value in tree_flatten(model.parameters()):
        if "float" in str(value.dtype):
            return value.dtype
    return None


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    text = str(dtype).rsplit(".", 1)[-1]
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(text, text)
