"""GGUF artifacts through llama-cpp-python (CPU, CUDA, Metal, ROCm/Vulkan builds).

Loading and tokenization use the high-level ``Llama`` object; the timed path
is the low-level greedy loop llama-bench uses: the prompt decoded in
``n_batch`` chunks from an empty KV cache, then one ``llama_decode`` per
generated token. ``Llama.generate`` is avoided on purpose: it keeps the
matching prompt prefix between calls (so repeated prefills barely prefill)
and adds Python work per token.

``extend`` continues a session from the same KV cache (a multi-turn
workflow): only the new tokens are decoded, as a chat server with a prompt
cache would do.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import time
from pathlib import Path
from typing import Any, Iterator

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

# KV cache types by the names llama.cpp's own tools use (-ctk/-ctv).
KV_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
    "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
FLOAT_KV = ("f32", "f16", "bf16")  # the V cache types llama.cpp accepts without flash attention
INSTALL = "pip install 'fitbench[llama]'  (CUDA: CMAKE_ARGS=-DGGML_CUDA=on; Metal is on by default on macOS)"
FACTS = "runners.llama_cpp:runtime_facts"  # run by available() in a child interpreter
GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL")


def runtime_facts() -> dict[str, Any]:
    """What only importing llama_cpp tells (runs in a probe child, never in the harness)."""
    import llama_cpp

    return {"gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}


def default_threads() -> int:
    """Physical cores, as llama-bench uses; llama-cpp-python's own default is half the logical cores."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


@contextlib.contextmanager
def _sequences(llama_cpp: Any, n: int) -> Iterator[None]:
    """Make the next ``Llama(...)`` context hold ``n`` sequences, each with its own KV stream
    (``kv_unified`` off, llama-batched-bench's default): ``Llama`` has no n_seq_max argument, so its
    default context parameters are wrapped while it is built. One sequence: nothing changes."""
    if n <= 1:
        yield
        return
    module = llama_cpp.llama_cpp
    original = module.llama_context_default_params

    def with_sequences() -> Any:
        params = original()
        params.n_seq_max = n
        params.kv_unified = False
        return params

    module.llama_context_default_params = with_sequences
    try:
        yield
    finally:
        module.llama_context_default_params = original


def _put(batch: Any, j: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[j] = token
    batch.pos[j] = pos
    batch.n_seq_id[j] = 1
    batch.seq_id[j][0] = seq
    batch.logits[j] = int(logits)


class LlamaCppRunner(Runner):
    name = "llama.cpp"
    formats = {"gguf"}
    supports_extend = True  # the low-level loop keeps its KV cache between calls
    options = {
        "n_threads": Option(int, None, "threads for generation (default: physical cores)"),
        "n_threads_batch": Option(int, None, "threads for prompt processing (default: n_threads)"),
        "n_batch": Option(int, 2048, "logical batch size for prompt processing"),
        "n_ubatch": Option(int, 512, "physical batch size for prompt processing"),
        "n_gpu_layers": Option(int, 0, "layers to offload to the GPU (-1 = all)"),
        "flash_attn": Option(bool, False, "use flash attention"),
        "type_k": Option(str, "f16", "K cache type", tuple(KV_TYPES)),
        "type_v": Option(str, "f16", "V cache type (quantized V needs flash_attn)", tuple(KV_TYPES)),
        "use_mmap": Option(bool, True, "mmap the weights (pages can be evicted and re-read)"),
        "use_mlock": Option(bool, False, "lock the weights in RAM"),
        "offload_kqv": Option(bool, True, "keep the KV cache on the GPU with the layers"),
        "swa_full": Option(bool, True, "full-size KV for sliding-window layers (llama.cpp's default); false: "
                                       "only the window + a micro-batch (Gemma 2/3 and other SWA models)"),
    }

    def __init__(self) -> None:
        self._llama: Any = None
        self._sampler: Any = None
        self._n_batch = 512
        self._n_past = 0  # tokens in the KV cache
        self._last: int | None = None  # sampled by the last call, not decoded yet: what extend() feeds first
        self.generated: list[int] = []  # token ids the last generate/extend sampled (for checks, not timed)
        self.session_generated: list[list[int]] = []  # per session, by the last generate_parallel

    @classmethod
    def available(cls) -> Availability:
        if missing_modules("llama_cpp"):
            return Availability(False, reason="llama-cpp-python is not installed", install=INSTALL)
        version = dist_version("llama-cpp-python")
        probe = probe_runtime(f"llama-cpp-python {version or '(unknown version)'}", FACTS, key=version)
        if not probe.ok:  # a broken native library is "unavailable", not a crash
            return Availability(False, version, reason=probe.error, install=INSTALL)
        devices = ["cpu"]
        if probe.facts.get("gpu_offload"):
            info = str(probe.facts.get("system_info", "")).lower()
            devices += [b.lower() for b in GPU_BACKENDS if b.lower() in info] or ["gpu"]
        return Availability(True, version, devices)

    def prepare(self) -> None:
        try:
            import llama_cpp  # noqa: F401  (loads the native libraries)
        except ImportError as exc:
            raise LoadError(f"llama-cpp-python is not installed: {INSTALL}") from exc

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        try:
            import llama_cpp
        except ImportError as exc:
            raise LoadError(f"llama-cpp-python is not installed: {INSTALL}") from exc
        opts = self.validate_options(options)
        n_threads = opts["n_threads"] or default_threads()
        self._n_batch = min(opts["n_batch"], n_ctx)
        sessions = max(1, self.parallel)
        try:
            with _sequences(llama_cpp, sessions):
                self._llama = llama_cpp.Llama(
                    model_path=str(artifact),
                    n_ctx=n_ctx * sessions,
                    n_batch=self._n_batch,
                    n_ubatch=min(opts["n_ubatch"], self._n_batch),
                    n_threads=n_threads,
                    n_threads_batch=opts["n_threads_batch"] or n_threads,
                    n_gpu_layers=opts["n_gpu_layers"],
                    flash_attn=opts["flash_attn"],
                    type_k=KV_TYPES[opts["type_k"]],
                    type_v=KV_TYPES[opts["type_v"]],
                    use_mmap=opts["use_mmap"],
                    use_mlock=opts["use_mlock"],
                    offload_kqv=opts["offload_kqv"],
                    swa_full=opts["swa_full"],
                    verbose=False,
                )
        except Exception as exc:
            if opts["type_v"] not in FLOAT_KV and not opts["flash_attn"]:
                # llama.cpp refuses the context (it cannot transpose a quantized V without the fused kernel)
                raise LoadError(f"llama.cpp: a quantized V cache ({opts['type_v']}) needs flash attention; "
                                f"set flash_attn=true (bench: -fa 1) or type_v f16 ({exc})") from exc
            raise LoadError(f"llama.cpp could not load {artifact.name}: {exc}") from exc

        model = self._llama._model.model
        n_layers = int(llama_cpp.llama_model_n_layer(model))
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        ngl = opts["n_gpu_layers"]
        on_device = 0 if not gpu else (n_layers if ngl < 0 else min(ngl, n_layers))
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        self._sampler = chain
        extra: dict[str, Any] = {"n_params": int(llama_cpp.llama_model_n_params(model)), "n_batch": self._n_batch}
        if sessions > 1:
            extra.update(n_seq_max=int(llama_cpp.llama_n_seq_max(self._llama.ctx)), kv_unified=False,
                         n_ctx_total=int(llama_cpp.llama_n_ctx(self._llama.ctx)))
        return LoadInfo(
            device="gpu" if on_device else "cpu",
            runtime_version=importlib.metadata.version("llama-cpp-python"),
            n_ctx=int(llama_cpp.llama_n_ctx(self._llama.ctx) if sessions == 1
                      else llama_cpp.llama_n_ctx_seq(self._llama.ctx)),
            n_ctx_meaning="llama.cpp n_ctx: KV cache cells allocated at load" if sessions == 1 else
            f"llama.cpp n_ctx_seq: KV cells per sequence, {sessions} sequences (n_seq_max) allocated at load",
            n_layers_total=n_layers,
            n_layers_device=on_device,
            kv_type=f"{opts['type_k']}/{opts['type_v']}",
            n_threads=n_threads,
            extra=extra,
            **self.kv_settings(opts),
        )

    @classmethod
    def kv_settings(cls, options: dict[str, Any]) -> dict[str, Any]:
        opts = cls.validate_options(options)
        return {"kv_type_k": opts["type_k"], "kv_type_v": opts["type_v"], "flash_attn": opts["flash_attn"],
                "attn_impl": "flash" if opts["flash_attn"] else "standard"}

    def tokenize(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        import llama_cpp

        # A real prefill every time: start from an empty KV cache.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._llama.ctx), True)
        self._n_past, self._last = 0, None
        return self._run(llama_cpp, list(prompt_tokens), max_new_tokens)

    def extend(self, new_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        import llama_cpp

        if self._last is None:
            raise RunnerError("extend() continues a generate() that finished; call generate() first")
        n_ctx = int(llama_cpp.llama_n_ctx(self._llama.ctx))
        need = self._n_past + 1 + len(new_tokens) + max_new_tokens - 1
        if need > n_ctx:  # say so in session terms rather than as a failed llama_decode
            raise RunnerError(f"context full: the session needs {need:,} KV cells, n_ctx is {n_ctx:,}")
        # The last sampled token was never decoded (generate stops after sampling it): it goes first.
        return self._run(llama_cpp, [self._last, *new_tokens], max_new_tokens)

    def generate_parallel(self, prompts: list[list[int]], max_new_tokens: int) -> Iterator[tuple[int, float]]:
        """As llama-batched-bench: every prompt is its own sequence (seq_id = session), packed in order
        into batches of n_batch tokens; a session's first token is sampled as soon as the batch holding
        its last prompt token is decoded (so TTFT grows with its place in the queue). Then each step is
        one llama_decode of a batch carrying one token per session."""
        import llama_cpp

        ctx = self._llama.ctx
        n = len(prompts)
        if not 1 <= n <= int(llama_cpp.llama_n_seq_max(ctx)):
            raise RunnerError(f"{n} sessions, but the model was loaded for {llama_cpp.llama_n_seq_max(ctx)}")
        if not all(prompts) or max_new_tokens < 1:
            raise RunnerError("every session needs a prompt of at least one token and max_new_tokens >= 1")
        room = int(llama_cpp.llama_n_ctx_seq(ctx))
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens - 1 > room:
            raise RunnerError(f"a session needs {longest + max_new_tokens - 1:,} KV cells, each has {room:,}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._n_past, self._last = 0, None  # nothing for extend(): sessions are not continued
        self.generated = []
        batch = llama_cpp.llama_batch_init(max(self._n_batch, n), 0, 1)
        try:
            last: list[int] = [0] * n
            self.session_generated = [[] for _ in range(n)]  # token ids per session (for checks, not timed)
            packed = [(s, pos, tok) for s, prompt in enumerate(prompts) for pos, tok in enumerate(prompt)]
            for start in range(0, len(packed), self._n_batch):
                chunk = packed[start:start + self._n_batch]
                ends = []  # (batch index, session) of each prompt that ends in this chunk
                for j, (s, pos, tok) in enumerate(chunk):
                    is_end = pos == len(prompts[s]) - 1
                    _put(batch, j, tok, pos, s, is_end)
                    if is_end:
                        ends.append((j, s))
                batch.n_tokens = len(chunk)
                self._decode_batch(llama_cpp, ctx, batch)
                for j, s in ends:
                    last[s] = int(llama_cpp.llama_sampler_sample(self._sampler, ctx, j))
                    self.session_generated[s].append(last[s])
                    yield s, time.perf_counter()
            for step in range(1, max_new_tokens):
                for s in range(n):
                    _put(batch, s, last[s], len(prompts[s]) + step - 1, s, True)
                batch.n_tokens = n
                self._decode_batch(llama_cpp, ctx, batch)
                for s in range(n):
                    last[s] = int(llama_cpp.llama_sampler_sample(self._sampler, ctx, s))
                    self.session_generated[s].append(last[s])
                    yield s, time.perf_counter()
        finally:
            llama_cpp.llama_batch_free(batch)

    def session_kv_bytes(self) -> int | None:
        """What llama.cpp would save of sequence 0's state: its filled KV cells (every session has the same length)."""
        import llama_cpp

        if self._llama is None:
            return None
        return int(llama_cpp.llama_state_seq_get_size(self._llama.ctx, 0))

    @staticmethod
    def _decode_batch(llama_cpp: Any, ctx: Any, batch: Any) -> None:
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RunnerError(f"llama_decode failed with code {rc} ({'no KV cache slot' if rc == 1 else 'error'})")

    def _run(self, llama_cpp: Any, feed: list[int], max_new_tokens: int) -> Iterator[float]:
        """Decode ``feed`` after what the KV cache holds, then sample greedily, one decode per token."""
        ctx = self._llama.ctx
        self.generated = []
        self._last = None  # a failed or abandoned call leaves nothing to extend
        tokens = (llama_cpp.llama_token * len(feed))(*feed)
        for start in range(0, len(feed), self._n_batch):
            n = min(self._n_batch, len(feed) - start)
            chunk = (llama_cpp.llama_token * n).from_buffer(tokens, start * ctypes.sizeof(llama_cpp.llama_token))
            self._decode(llama_cpp, ctx, chunk, n)
            self._n_past += n
        one = (llama_cpp.llama_token * 1)()
        for i in range(max_new_tokens):
            # Greedy pick from the last logits; EOS is not a stop: the case asks
            # for exactly max_new_tokens so every repetition does the same work.
            one[0] = llama_cpp.llama_sampler_sample(self._sampler, ctx, -1)
            self.generated.append(int(one[0]))
            yield time.perf_counter()
            if i + 1 < max_new_tokens:
                self._decode(llama_cpp, ctx, one, 1)
                self._n_past += 1
        self._last = int(one[0]) if max_new_tokens else None

    def _prefill(self, llama_cpp: Any, ctx: Any, prompt_tokens: list[int]) -> None:
        # A real prefill every time: start from an empty KV cache.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._n_past, self._last = 0, None  # nothing left to extend()
        tokens = (llama_cpp.llama_token * len(prompt_tokens))(*prompt_tokens)
        for start in range(0, len(prompt_tokens), self._n_batch):
            n = min(self._n_batch, len(prompt_tokens) - start)
            chunk = (llama_cpp.llama_token * n).from_buffer(tokens, start * ctypes.sizeof(llama_cpp.llama_token))
            self._decode(llama_cpp, ctx, chunk, n)

    def greedy_tokens(self, prompt_tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation, stopping at an end-of-generation token (for task checks)."""
        import llama_cpp

        ctx = self._llama.ctx
        if len(prompt_tokens) + max_new_tokens > int(llama_cpp.llama_n_ctx(ctx)):
            raise RunnerError(f"prompt ({len(prompt_tokens)}) + {max_new_tokens} new tokens exceed the loaded context")
        vocab = llama_cpp.llama_model_get_vocab(self._llama._model.model)
        self._prefill(llama_cpp, ctx, prompt_tokens)
        out: list[int] = []
        one = (llama_cpp.llama_token * 1)()
        for i in range(max_new_tokens):
            token = llama_cpp.llama_sampler_sample(self._sampler, ctx, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.append(int(token))
            if i + 1 < max_new_tokens:
                one[0] = token
                self._decode(llama_cpp, ctx, one, 1)
        return out

    def logits(self, tokens: list[int]) -> Any:
        """Raw logits for every position: a batch with the output flag set on each token
        (``llama_batch_get_one`` only returns the last), read back with ``llama_get_logits``."""
        import llama_cpp
        import numpy as np

        ctx = self._llama.ctx
        n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        if len(tokens) > n_ctx:
            raise RunnerError(f"{len(tokens)} tokens do not fit the loaded context of {n_ctx}")
        n_vocab = int(self._llama.n_vocab())
        out = np.empty((len(tokens), n_vocab), dtype=np.float32)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._n_past, self._last = 0, None  # nothing left to extend()
        batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self._n_batch):
                n = min(self._n_batch, len(tokens) - start)
                batch.n_tokens = n
                for j in range(n):
                    batch.token[j] = tokens[start + j]
                    batch.pos[j] = start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    raise RunnerError(f"llama_decode failed with code {rc} while scoring")
                # Outputs come back contiguous, in batch order, one n_vocab row per flagged token.
                ptr = llama_cpp.llama_get_logits(ctx)
                out[start:start + n] = np.ctypeslib.as_array(ptr, shape=(n, n_vocab))
        finally:
            llama_cpp.llama_batch_free(batch)
        return out

    def detokenize(self, tokens: list[int]) -> str:
        return self._llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    @staticmethod
    def _decode(llama_cpp: Any, ctx: Any, tokens: Any, n: int) -> None:
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n))
        if rc != 0:
            # 1 = no KV slot (context full), <0 = error
            raise RunnerError(f"llama_decode failed with code {rc} ({'no KV cache slot' if rc == 1 else 'error'})")

    def close(self) -> None:
        if self._sampler is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
        if self._llama is not None:
            self._llama.close()
            self._llama = None
