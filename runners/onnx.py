"""ONNX model folders (genai_config.json) through onnxruntime-genai, with the
execution provider chosen per case: cpu, cuda, dml (DirectML), openvino,
qnn (NPU), coreml, webgpu.

The timed path is onnxruntime-genai's own token loop: a new ``og.Generator``
per ``generate()`` (an empty KV cache, so a real prefill), ``append_tokens``
for the prompt (the prefill), then ``generate_next_token`` per token; its
first call only samples from the prefill's logits, each later one decodes
the previous token and samples. That is the llama.cpp runner's order: a
timestamp per sampled token, and the last sampled token never decoded.
Greedy (``do_sample=False``). EOS is not a stop: onnxruntime-genai marks the
sequence done at EOS, so the runner appends the EOS token itself and goes on,
which decodes it exactly as the other runners do.

Configured context: ``n_ctx`` becomes the search option ``max_length`` (prompt
plus generated tokens). With ``past_present_share_buffer`` (the default) the
generator allocates one KV buffer of ``max_length`` tokens when it is
created, inside the timed region of each ``generate()``; without it the KV
tensors grow with the sequence.
"""

from __future__ import annotations

import json
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

INSTALL = "pip install 'fitbench[onnx]'"
# fitbench's provider name -> (onnxruntime's execution provider, the name
# onnxruntime-genai's Config.append_provider takes, the package that brings it).
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", None, "onnxruntime-genai"),
    "cuda": ("CUDAExecutionProvider", "cuda", "onnxruntime-genai-cuda"),
    "dml": ("DmlExecutionProvider", "dml", "onnxruntime-genai-directml (Windows)"),
    "openvino": ("OpenVINOExecutionProvider", "OpenVINO", "onnxruntime-openvino with onnxruntime-genai"),
    "qnn": ("QNNExecutionProvider", "QNN", "onnxruntime-qnn with onnxruntime-genai (Snapdragon)"),
    "coreml": ("CoreMLExecutionProvider", "CoreML", "onnxruntime-genai on macOS"),
    "webgpu": ("WebGpuExecutionProvider", "WebGPU", "onnxruntime-genai-webgpu"),
}
DTYPE_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


FACTS = "runners.onnx:runtime_facts"  # run by available() in a child interpreter
# The CUDA / DirectML / WebGPU builds are separate distributions of the same module.
GENAI_DISTS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml", "onnxruntime-genai-webgpu")
ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")
# onnxruntime-genai's own "was I built for it" checks, used when no onnxruntime module is installed.
GENAI_CHECKS = (("cuda", "is_cuda_available"), ("dml", "is_dml_available"), ("openvino", "is_openvino_available"),
                ("qnn", "is_qnn_available"), ("webgpu", "is_webgpu_available"))


def _genai_version() -> str | None:
    return dist_version(*GENAI_DISTS)


def runtime_facts() -> dict[str, Any]:
    """What only importing the runtime tells: onnxruntime-genai imports, and which execution
    providers are here. Runs in a probe child (never in the harness) and in the worker's load()."""
    import onnxruntime_genai as og

    facts: dict[str, Any] = {"ort_providers": None, "genai_checks": {}}
    if not missing_modules("onnxruntime"):
        try:
            import onnxruntime

            facts["ort_providers"] = list(onnxruntime.get_available_providers())
        except Exception as exc:
            facts["ort_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    for name, check in GENAI_CHECKS:
        try:
            facts["genai_checks"][name] = bool(getattr(og, check)())
        except Exception:  # an older onnxruntime-genai without that check
            pass
    return facts


def providers_from(facts: dict[str, Any]) -> list[str]:
    """fitbench provider names usable here, cpu first, from ``runtime_facts``."""
    eps = facts.get("ort_providers")
    if eps is not None:
        return [name for name, (ep, _og, _pkg) in PROVIDERS.items() if ep in eps]
    # No onnxruntime Python module beside onnxruntime-genai: what onnxruntime-genai says
    # it was built for is the (weaker) answer.
    return ["cpu"] + [name for name, present in facts.get("genai_checks", {}).items() if present]


def present_providers() -> list[str]:
    """Providers usable here, asked in this process: for the worker, which has imported the runtime."""
    return providers_from(runtime_facts())


class OnnxGenaiRunner(Runner):
    name = "onnxruntime"
    formats = {"onnx"}
    supports_extend: ClassVar[bool] = True
    options = {
        "provider": Option(str, "cpu", "execution provider", tuple(PROVIDERS)),
        "past_present_share_buffer": Option(bool, True, "preallocate one KV buffer of max_length (= n_ctx) tokens "
                                            "per generator instead of growing the KV tensors"),
        "intra_op_num_threads": Option(int, None, "onnxruntime intra-op threads (default: onnxruntime's choice)"),
    }

    def __init__(self) -> None:
        self._og: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._n_ctx = 0
        self._opts: dict[str, Any] = {}
        self._eos: set[int] = set()
        self._generator: Any = None  # kept alive after generate() so extend() can continue it
        self._last: int | None = None  # the token sampled last
        self._kv_type_name: str | None = None
        self._kv_shape: tuple = (None, None, None)  # layers, KV heads, head size (genai_config.json)
        self._filled = 0  # positions one session filled in the last generate()/generate_parallel()
        self.session_generated: list[list[int]] = []  # token ids per session, for checks

    @classmethod
    def available(cls) -> Availability:
        if missing_modules("onnxruntime_genai"):
            return Availability(False, reason="onnxruntime-genai is not installed", install=INSTALL)
        version = _genai_version()
        probe = probe_runtime(f"onnxruntime-genai {version or '(unknown version)'}", FACTS,
                              key=f"{version} {dist_version(*ORT_DISTS)}")
        if not probe.ok:  # a broken native library is "unavailable", not a crash
            return Availability(False, version, reason=probe.error, install=INSTALL)
        eps = probe.facts.get("ort_providers")
        notes = (f"onnxruntime {dist_version(*ORT_DISTS) or '?'}; execution providers: "
                 f"{', '.join(eps) if eps is not None else probe.facts.get('ort_error', 'unknown')}")
        return Availability(True, version, providers_from(probe.facts), notes=notes)

    @classmethod
    def case_availability(cls, options: dict[str, Any]) -> Availability:
        avail = cls.available()
        provider = options.get("provider") or cls.options["provider"].default
        if not avail.available or provider in avail.devices:
            return avail
        ep, _og_name, package = PROVIDERS[provider]
        return Availability(False, avail.version, avail.devices,
                            reason=f"execution provider {provider} ({ep}) is not present here "
                                   f"(present: {', '.join(avail.devices) or 'none'})",
                            install=package)

    def prepare(self) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise LoadError(f"onnxruntime-genai is not installed: {INSTALL}") from exc
        self._og = og

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        og = self._og
        opts = self.validate_options(options)
        provider = opts["provider"]
        if provider not in present_providers():
            raise LoadError(f"execution provider {provider} is not present here; install {PROVIDERS[provider][2]}")
        try:
            config = og.Config(str(artifact))
            config.clear_providers()  # CPU unless a provider is appended
            og_name = PROVIDERS[provider][1]
            if og_name is not None:
                config.append_provider(og_name)
            if opts["intra_op_num_threads"] is not None:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": opts["intra_op_num_threads"]}}}}))
            self._model = og.Model(config)
            self._tokenizer = og.Tokenizer(self._model)
        except Exception as exc:
            raise LoadError(f"onnxruntime-genai could not load {artifact.name} with provider {provider}: {exc}") from exc
        self._n_ctx, self._opts = n_ctx, opts
        self._eos = {int(t) for t in self._tokenizer.eos_token_ids}
        genai = json.loads((artifact / "genai_config.json").read_text())
        model_cfg = genai.get("model", {})
        trained = model_cfg.get("context_length")
        if isinstance(trained, int) and n_ctx > trained:
            raise LoadError(f"n_ctx {n_ctx} is beyond the model's context_length {trained} in genai_config.json")
        decoder = model_cfg.get("decoder", {})
        self._kv_shape = (decoder.get("num_hidden_layers"), decoder.get("num_key_value_heads"), decoder.get("head_size"))
        device = str(self._model.device_type).lower()  # what the session really runs on (CPU, CUDA, DML, ...)
        self._kv_type_name = self._kv_type()
        return LoadInfo(
            device=provider if provider != "cpu" else device,
            runtime_version=_genai_version() or "unknown",
            n_ctx=n_ctx,
            n_ctx_meaning=("onnxruntime-genai max_length (prompt + generated tokens); "
                           + ("past_present_share_buffer: one KV buffer of max_length tokens allocated per generator"
                              if opts["past_present_share_buffer"] else "KV tensors grow with the sequence up to max_length")),
            n_layers_total=decoder.get("num_hidden_layers"),
            n_layers_device=decoder.get("num_hidden_layers") if provider != "cpu" else 0,
            kv_type=self._kv_type_name,
            kv_type_k=self._kv_type_name, kv_type_v=self._kv_type_name, attn_impl=_attention_op(artifact),
            n_threads=opts["intra_op_num_threads"],
            extra={"provider": provider, "execution_provider": PROVIDERS[provider][0],
                   "model_device_type": str(self._model.device_type), "max_length": n_ctx,
                   "past_present_share_buffer": opts["past_present_share_buffer"],
                   "onnxruntime_version": dist_version(*ORT_DISTS)},
        )

    @classmethod
    def kv_settings(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Nothing to choose: onnxruntime-genai's model builder fixes the KV dtype (the model's I/O
        dtype) and the attention operator when it exports the model; LoadInfo reports both."""
        return {}

    def _kv_type(self) -> str | None:
        """The KV cache dtype is the model's I/O dtype (the builder uses one for both); read it
        from a two-token logits probe instead of importing onnx into the measured process."""
        try:
            generator = self._generator_for(max_length=2)
            generator.append_tokens([0])
            return DTYPE_NAMES.get(str(generator.get_output("logits").dtype))
        except Exception:
            return None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    # --- the timed path -------------------------------------------------

    def _generator_for(self, max_length: int) -> Any:
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=max_length, do_sample=False,
                                  past_present_share_buffer=self._opts.get("past_present_share_buffer", True))
        return self._og.Generator(self._model, params)

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        self._check_room(0, len(prompt_tokens), max_new_tokens)
        # A new generator per call: an empty KV cache, so a real prefill.
        self._generator, self._last = None, None
        self._generator = self._generator_for(self._n_ctx)
        self._filled = len(prompt_tokens) + max_new_tokens - 1
        return self._run(list(prompt_tokens), max_new_tokens)

    def extend(self, new_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        if self._generator is None:
            raise RunnerError("extend() needs a previous generate() in this process")
        if not self._opts["past_present_share_buffer"]:
            raise RunnerError("extend() needs past_present_share_buffer: true (onnxruntime-genai cannot rewind "
                              "a growing KV cache)")
        if self._last is None:
            raise RunnerError("extend() needs a previous generate() that produced a token")
        generator = self._generator
        feed = [self._last, *new_tokens]
        # The sequence ends with the token sampled last, which is not in the KV
        # cache yet, and append_tokens would not decode it: take it off and feed
        # it again with the new tokens. (An EOS that ended the sequence is not
        # in it: it is just fed again.)
        pending = not self._eos_pending()
        self._check_room(int(generator.token_count()) - pending, len(feed), max_new_tokens)
        if pending:
            generator.rewind_to(int(generator.token_count()) - 1)
        return self._run(feed, max_new_tokens)

    def _eos_pending(self) -> bool:
        return self._last is not None and self._last in self._eos and bool(self._generator.is_done())

    def _check_room(self, in_sequence: int, new: int, max_new_tokens: int) -> None:
        if in_sequence + new + max_new_tokens > self._n_ctx:
            raise RunnerError(f"context full: {in_sequence} in the sequence + {new} new + {max_new_tokens} to generate "
                              f"exceed max_length (n_ctx) {self._n_ctx}")

    def _run(self, feed: list[int], max_new_tokens: int) -> Iterator[float]:
        generator = self._generator
        self._last = None
        try:
            if feed:
                generator.append_tokens(feed)
            for _ in range(max_new_tokens):
                if self._eos_pending():
                    # Done at EOS: feed EOS itself and go on (EOS is not a stop).
                    generator.append_tokens([self._last])
                generator.generate_next_token()
                self._last = int(generator.get_next_tokens()[0])
                yield time.perf_counter()
        except RunnerError:
            raise
        except Exception as exc:
            raise RunnerError(f"onnxruntime-genai failed while generating: {exc}") from exc

    def generate_parallel(self, prompts: list[list[int]], max_new_tokens: int) -> Iterator[tuple[int, float]]:
        """One generator with search option ``batch_size`` N: the prompts (of one length) appended as an
        N-row batch (one prefill), then each ``generate_next_token`` decodes one token of every session.
        EOS cannot be fed back per row in a batch, so ``min_length`` holds it off instead: every
        session produces exactly ``max_new_tokens``."""
        import numpy as np

        n, length = len(prompts), len(prompts[0]) if prompts else 0
        if not length or max_new_tokens < 1 or any(len(p) != length for p in prompts):
            raise RunnerError("parallel sessions need prompts of one length (at least one token) and max_new_tokens >= 1")
        self._check_room(0, length, max_new_tokens)
        self._generator, self._last = None, None  # extend() does not continue a batch
        params = self._og.GeneratorParams(self._model)
        try:
            params.set_search_options(max_length=self._n_ctx, do_sample=False, batch_size=n,
                                      min_length=length + max_new_tokens,
                                      past_present_share_buffer=self._opts.get("past_present_share_buffer", True))
            generator = self._og.Generator(self._model, params)
            generator.append_tokens(np.asarray(prompts, dtype=np.int32))
            self.session_generated = [[] for _ in prompts]
            for _ in range(max_new_tokens):
                generator.generate_next_token()
                picked = generator.get_next_tokens()  # waits for the step, as the single-session loop does
                stamp = time.perf_counter()
                for s, token in enumerate(picked):
                    self.session_generated[s].append(int(token))
                for s in range(n):
                    yield s, stamp
        except RunnerError:
            raise
        except Exception as exc:
            raise RunnerError(f"onnxruntime-genai failed while generating {n} sessions: {exc}") from exc
        self._filled = length + max_new_tokens - 1

    def session_kv_bytes(self) -> int | None:
        """K and V of every layer for the positions one session filled, from genai_config.json and the KV dtype."""
        layers, heads, head_size = self._kv_shape
        elem = {"f32": 4, "f16": 2, "bf16": 2}.get(self._kv_type_name or "")
        if not (layers and heads and head_size and elem and self._filled):
            return None
        return 2 * layers * heads * head_size * elem * self._filled

    @property
    def last_token(self) -> int | None:
        """The token sampled last by generate()/extend(): what greedy decoding produced, for tests and quality checks."""
        return self._last

    def last_sequence(self) -> list[int]:
        """Every token of the current generator (prompt and generated), for tests and quality checks."""
        return [int(t) for t in self._generator.get_sequence(0)] if self._generator is not None else []

    # --- quality hook ---------------------------------------------------

    def detokenize(self, tokens: list[int]) -> str:
        import numpy as np

        # onnxruntime-genai's decode renders special tokens; task answers compare text only.
        return self._tokenizer.decode(np.asarray(tokens, dtype=np.int32))

    def logits(self, tokens: list[int]) -> Any:
        """Raw float32 logits (len(tokens), n_vocab) from an empty cache; row i predicts token i+1."""
        import numpy as np

        generator = self._generator_for(max(len(tokens) + 1, 2))
        generator.append_tokens(list(tokens))
        out = np.asarray(generator.get_output("logits"))
        if out.ndim != 3 or out.shape[1] != len(tokens):
            raise RunnerError(f"the model returned logits of shape {out.shape}, not one row per token "
                              "(a graph that keeps only the last token's logits)")
        return out[0].astype(np.float32)

    # No memory_stats(): onnxruntime-genai exposes no allocator statistics;
    # the harness's RSS and /proc figures are the memory measurement.

    def close(self) -> None:
        self._generator = None
        self._tokenizer = None
        self._model = None


ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "PagedAttention", "Attention")


def _attention_op(artifact: Path) -> str | None:
    """The attention operator the builder put in the graph (GroupQueryAttention for its decoder
    models), found by name in the graph file: the weights are external data, the graph is small."""
    try:
        genai = json.loads((artifact / "genai_config.json").read_text())
        graph = artifact / genai["model"]["decoder"]["filename"]
        if graph.stat().st_size > 64 << 20:  # weights inside the graph file: not worth reading here
            return None
        data = graph.read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((op for op in ATTENTION_OPS if op.encode() in data), None)
