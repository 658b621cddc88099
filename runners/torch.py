"""Hugging Face checkpoints through PyTorch + transformers (cuda, mps or cpu).

The timed path is our own greedy loop over ``model(...)`` forward calls, not
``model.generate`` with a streamer: the prompt is prefilled from an empty
cache in one forward, then one forward per generated token, and a
``time.perf_counter()`` stamp is taken as soon as each token is picked (after
a device synchronize on CUDA/MPS, so the stamp is when the token really
exists, not when the kernel was queued). EOS is not a stop. This is the same
shape as the llama.cpp runner's low-level loop, so TTFT and decode rates are
comparable across runtimes.

"Configured context" is allocated KV where the runtime allows it: with
``static_cache`` (the default) a transformers ``StaticCache`` of ``n_ctx``
positions is allocated at load; with a ``DynamicCache`` nothing is
preallocated and KV grows with the sequence (``n_ctx`` then only caps the
sequence). ``LoadInfo.n_ctx_meaning`` says which.

Partial offload: ``device_map`` (accelerate) with ``max_gpu_memory`` caps the
GPU share; layers beyond it stay in host memory and are streamed to the GPU
per forward. The bytes on each side are reported by ``memory_stats``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import time
from pathlib import Path
from typing import Any, ClassVar, Iterator

from runners.base import (
    Availability,
    LoadError,
    LoadInfo,
    Option,
    OptionError,
    Runner,
    RunnerError,
    dist_version,
    missing_modules,
    probe_runtime,
)

INSTALL = "pip install 'fitbench[torch]'  (CPU-only: pip install torch==2.13.0 first, so pip does not pull a CUDA build)"
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}

FACTS = "runners.torch:runtime_facts"  # run by available() in a child interpreter


def runtime_facts() -> dict[str, Any]:
    """What only importing torch tells (runs in a probe child: the harness never imports torch,
    which is large, slow to import, and a broken CUDA install must not take the harness down)."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": [], "mps": False}
    try:
        if torch.cuda.is_available():
            facts["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # a CUDA build without a usable driver still runs on the CPU
        facts["cuda_error"] = " ".join(str(exc).split())[:200]
    try:
        facts["mps"] = bool(torch.backends.mps.is_available())
    except Exception:
        pass
    return facts


def parse_bytes(text: str) -> int:
    """'200MiB', '2GiB', '1.5GB', '123456' -> bytes (bare K/M/G are binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise OptionError(f"option 'max_gpu_memory' must be a size like 512MiB or 2GiB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise OptionError(f"option 'max_gpu_memory' must be positive, got {text!r}")
    return value


def default_threads() -> int:
    """Physical cores, like the llama.cpp runner (torch's own default is the same on most machines)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


class TorchRunner(Runner):
    name = "torch"
    formats = {"hf"}
    supports_extend: ClassVar[bool] = True
    options = {
        "device": Option(str, "auto", "where to run: auto (cuda, else mps, else cpu), cpu, cuda, mps",
                         ("auto", "cpu", "cuda", "mps")),
        "dtype": Option(str, "auto", "weight and KV dtype; auto = the checkpoint's own (config.json dtype)", DTYPES),
        "attn_implementation": Option(str, "sdpa", "transformers attention implementation", ATTENTION),
        "device_map": Option(str, None, "accelerate device map (auto, balanced, sequential): with max_gpu_memory, "
                                        "layers beyond the cap stay in host memory (partial offload)", DEVICE_MAPS),
        "max_gpu_memory": Option(str, None, "GPU memory cap per GPU for device_map, e.g. 2GiB (implies device_map=auto)"),
        "n_threads": Option(int, None, "CPU threads for torch (torch.set_num_threads; default: physical cores)"),
        "static_cache": Option(bool, True, "preallocate a StaticCache of n_ctx at load (false: DynamicCache that "
                                           "grows with the sequence)"),
    }

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._cache: Any = None
        self._device: Any = None  # where inputs go and where the KV lives (the execution device)
        self._static = True
        self._n_ctx = 0
        self._pos = 0  # tokens in the cache
        self._kv_token_bytes = 0  # KV bytes per filled position of one session
        self.session_generated: list[list[int]] = []  # per session, by the last generate_parallel()
        self._last: int | None = None  # the last picked token, not yet fed to the model
        self._cache_kw = "cache"
        self._logits_kw = "logits_to_keep"
        self._cache_position = False
        self._cuda_indices: list[int] = []
        self.generated: list[int] = []  # token ids picked by the last generate()/extend(), for checks

    # --- availability -------------------------------------------------------------

    @classmethod
    def available(cls) -> Availability:
        missing = missing_modules("torch", "transformers", "accelerate")
        if missing:
            return Availability(False, reason=f"{', '.join(missing)} not installed", install=INSTALL)
        torch_version, tf_version = dist_version("torch"), dist_version("transformers")
        probe = probe_runtime(f"torch {torch_version or '(unknown version)'}", FACTS, key=torch_version)
        version = f"torch {probe.facts.get('torch') or torch_version}, transformers {tf_version}"
        if not probe.ok:
            return Availability(False, version, reason=probe.error, install=INSTALL)
        devices = ["cpu"] + [f"cuda:{i} ({name})" for i, name in enumerate(probe.facts.get("cuda", []))]
        if probe.facts.get("mps"):
            devices.append("mps")
        notes = f"CUDA not usable: {probe.facts['cuda_error']}" if probe.facts.get("cuda_error") else None
        return Availability(True, version, devices, notes=notes)

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        resolved = super().validate_options(options)
        if resolved.get("max_gpu_memory") is not None:
            parse_bytes(resolved["max_gpu_memory"])
        if resolved.get("n_threads") is not None and resolved["n_threads"] < 1:
            raise OptionError(f"option 'n_threads' must be at least 1, got {resolved['n_threads']}")
        return resolved

    @classmethod
    def kv_settings(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The KV cache is in the model's dtype (transformers has no separate cache dtype without a
        quantization backend); the kernel is ``attn_implementation``: eager materialises the scores,
        the others are fused (sdpa runs torch's flash-attention kernel on the CPU)."""
        opts = cls.validate_options(options)
        kv = KV_NAMES.get(opts["dtype"])  # auto: the checkpoint's own, known after load
        attn = opts["attn_implementation"]
        return {"kv_type_k": kv, "kv_type_v": kv, "attn_impl": attn, "flash_attn": attn != "eager"}

    # --- loading --------------------------------------------------------------------

    def prepare(self) -> None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise LoadError(f"torch/transformers are not installed: {INSTALL}") from exc

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        opts = self.validate_options(options)
        n_threads = opts["n_threads"] or default_threads()
        torch.set_num_threads(n_threads)
        device = self._resolve_device(torch, opts["device"])
        device_map = opts["device_map"] or ("auto" if opts["max_gpu_memory"] else None)
        if device_map and device.type != "cuda":
            raise OptionError(f"device_map/max_gpu_memory split a model between a CUDA GPU and the host; "
                              f"device is {device.type}: use device=cuda or drop device_map")
        try:
            config = AutoConfig.from_pretrained(str(artifact))
            dtype = self._resolve_dtype(torch, opts["dtype"], config)
            kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": opts["attn_implementation"]}
            if device_map:
                kwargs["device_map"] = device_map
                if opts["max_gpu_memory"]:
                    cap = parse_bytes(opts["max_gpu_memory"])
                    kwargs["max_memory"] = {i: cap for i in range(torch.cuda.device_count())}
                    kwargs["max_memory"]["cpu"] = _host_memory()
            model = AutoModelForCausalLM.from_pretrained(str(artifact), **kwargs)
            if not device_map:
                model.to(device)
            model.eval()
            self._tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        except (OptionError, MemoryError):
            raise
        except Exception as exc:
            raise LoadError(f"transformers could not load {artifact.name}: {type(exc).__name__}: {exc}") from exc
        self._model, self._device, self._n_ctx = model, device, n_ctx
        self._static = opts["static_cache"]
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache_position = "cache_position" in params  # older transformers index static caches by it
        self._logits_kw = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._cache = self._new_cache(text_config, n_ctx, dtype)
        heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        # K and V of every layer for one position: what one filled cell of one session costs
        self._kv_token_bytes = (2 * text_config.num_hidden_layers * heads * head_dim
                                * torch.tensor([], dtype=dtype).element_size())
        placement = self._placement()
        self._cuda_indices = sorted({int(d.partition(":")[2] or 0) for d in placement if d.startswith("cuda")} |
                                    ({device.index or 0} if device.type == "cuda" else set()))
        if device.type == "cuda":
            for i in self._cuda_indices:
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)  # the peak covers generation, weights included
        n_layers = getattr(text_config, "num_hidden_layers", None)
        layers_on_device = self._layers_on_accelerator(n_layers)
        kv = KV_NAMES.get(str(dtype).removeprefix("torch."), str(dtype))
        gpu_names = [torch.cuda.get_device_name(i) for i in self._cuda_indices] if device.type == "cuda" else []
        return LoadInfo(
            device=device.type + ("+cpu" if self._host_bytes(placement) and device.type != "cpu" else ""),
            runtime_version=f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}",
            n_ctx=n_ctx,
            n_ctx_meaning=(f"transformers StaticCache(max_cache_len={n_ctx}): KV for n_ctx positions allocated at load"
                           if self._static else
                           "transformers DynamicCache: no KV preallocated, it grows with the sequence; "
                           "n_ctx only caps prompt + generation"),
            n_layers_total=n_layers,
            n_layers_device=layers_on_device,
            kv_type=f"{kv}/{kv}",
            n_threads=n_threads,
            **{**self.kv_settings(opts), "kv_type_k": kv, "kv_type_v": kv},
            extra={"n_params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype),
                   "attn_implementation": opts["attn_implementation"], "device_map": device_map,
                   "static_cache": self._static, "gpus": gpu_names,
                   "hf_device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
                   if device_map else None},
        )

    @staticmethod
    def _resolve_device(torch: Any, wanted: str) -> Any:
        cuda = torch.cuda.is_available()
        mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
        if wanted == "auto":
            wanted = "cuda" if cuda else "mps" if mps else "cpu"
        if wanted == "cuda" and not cuda:
            raise OptionError("device=cuda but torch sees no CUDA GPU (CPU build of torch, or no driver); use device=cpu")
        if wanted == "mps" and not mps:
            raise OptionError("device=mps but this torch has no MPS backend (Apple silicon only); use device=cpu")
        return torch.device("cuda", torch.cuda.current_device()) if wanted == "cuda" else torch.device(wanted)

    @staticmethod
    def _resolve_dtype(torch: Any, wanted: str, config: Any) -> Any:
        if wanted == "auto":
            own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            if isinstance(own, torch.dtype):
                return own
            wanted = str(own) if own in ("float32", "bfloat16", "float16") else "float32"
        return getattr(torch, wanted)

    def _new_cache(self, text_config: Any, n_ctx: int, dtype: Any) -> Any:
        from transformers import StaticCache

        if not self._static:
            return None  # a fresh DynamicCache per generate()
        cache = StaticCache(config=self._model.config, max_cache_len=n_ctx)
        hf_map = getattr(self._model, "hf_device_map", None) or {}
        gpus = {v for v in hf_map.values() if isinstance(v, int) or str(v).startswith("cuda")}
        if hasattr(cache, "early_initialization") and len(gpus) <= 1:
            # Allocate the whole KV now, so "configured context" is memory really held from load on.
            # (Layers split over several GPUs keep their KV on their own GPU: that is allocated at
            # the first forward, the warm-up, instead.)
            heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
            head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
            cache.early_initialization(max(1, self.parallel), heads, head_dim, dtype, self._device)
        return cache

    # --- placement: what lives where -----------------------------------------------

    def _placement(self) -> dict[str, int]:
        """Parameter bytes per device ("cpu", "disk", "cuda:0", "mps"). With an accelerate device
        map, modules mapped to the host keep their weights there (their parameters may show as
        'meta' on the module), so the map decides, not ``p.device``."""
        hf_map = getattr(self._model, "hf_device_map", None) or {}
        out: dict[str, int] = {}
        for name, p in self._model.named_parameters():
            dev = _mapped_device(hf_map, name) if hf_map else _device_name(p.device)
            out[dev] = out.get(dev, 0) + p.numel() * p.element_size()
        return out

    @staticmethod
    def _host_bytes(placement: dict[str, int]) -> int:
        return sum(n for d, n in placement.items() if d in HOST_DEVICES)

    def _layers_on_accelerator(self, n_layers: int | None) -> int | None:
        """Transformer blocks whose weights live on the accelerator (0 on the CPU)."""
        if n_layers is None:
            return None
        if self._device.type == "cpu":
            return 0
        hf_map = getattr(self._model, "hf_device_map", None) or {}
        if not hf_map:
            return n_layers
        first_param: dict[int, str] = {}
        for name, _ in self._model.named_parameters():
            m = re.search(r"\.layers\.(\d+)\.", name)
            if m:
                first_param.setdefault(int(m.group(1)), name)
        return sum(1 for i in range(n_layers)
                   if i in first_param and _mapped_device(hf_map, first_param[i]) not in HOST_DEVICES)

    # --- the timed path -----------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def _sync(self) -> None:
        import torch

        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        elif self._device.type == "mps":
            torch.mps.synchronize()

    def _reset(self) -> None:
        from transformers import DynamicCache

        if self._static:
            self._cache.reset()
        else:
            self._cache = DynamicCache(config=self._model.config)
        self._pos, self._last = 0, None

    def _forward(self, tokens: list[int], logits_to_keep: int = 1) -> Any:
        """Feed ``tokens`` at the current position; return the logits of the last ``logits_to_keep``."""
        import torch

        n = len(tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=self._device)
        positions = torch.arange(self._pos, self._pos + n, device=self._device)
        kwargs: dict[str, Any] = {self._cache_kw: self._cache, "position_ids": positions.unsqueeze(0),
                                  "use_cache": True, self._logits_kw: logits_to_keep}
        if self._cache_position:
            kwargs["cache_position"] = positions
        out = self._model(input_ids=ids, **kwargs)
        self._pos += n
        if not self._static:  # a DynamicCache is updated in place; older transformers may return a new one
            returned = getattr(out, "cache", None)
            returned = returned if returned is not None else getattr(out, "past_key_values", None)
            if returned is not None:
                self._cache = returned
        return out.logits[0]

    def _check_room(self, needed: int) -> None:
        if needed > self._n_ctx:
            raise RunnerError(f"the sequence needs {needed} positions but the configured context is {self._n_ctx}: "
                              "raise n_ctx or generate fewer tokens")

    def _stream(self, first_input: list[int], max_new_tokens: int) -> Iterator[float]:
        import torch

        with torch.inference_mode():
            logits = self._forward(first_input)
            for i in range(max_new_tokens):
                # Greedy pick; .item() waits for the device, the explicit sync makes that plain.
                token = int(logits[-1].argmax().item())
                self._last = token  # picked, not yet fed: extend() feeds it first
                self.generated.append(token)
                self._sync()
                yield time.perf_counter()
                if i + 1 < max_new_tokens:
                    logits = self._forward([token])

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        if not prompt_tokens or max_new_tokens < 1:
            raise RunnerError("generate needs a prompt of at least one token and max_new_tokens >= 1")
        self._check_room(len(prompt_tokens) + max_new_tokens - 1)
        self._reset()  # a real prefill every time: from an empty cache
        self.generated = []
        yield from self._stream(list(prompt_tokens), max_new_tokens)

    def extend(self, new_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        """Continue after the previous generate/extend with the kept cache: feed the last picked
        token, then ``new_tokens``, then stream ``max_new_tokens`` new ones."""
        if self._last is None:
            raise RunnerError("extend() needs a finished generate() or extend() before it")
        if max_new_tokens < 1:
            raise RunnerError("extend needs max_new_tokens >= 1")
        self._check_room(self._pos + 1 + len(new_tokens) + max_new_tokens - 1)
        first = [self._last, *new_tokens]
        self._last = None
        self.generated = []
        yield from self._stream(first, max_new_tokens)

    def generate_parallel(self, prompts: list[list[int]], max_new_tokens: int) -> Iterator[tuple[int, float]]:
        """A batch of N: the prompts (of equal length: no padding, so every row does the same work)
        prefilled in one forward, then one forward of N tokens per step."""
        import torch

        n = len(prompts)
        if not 1 <= n <= max(1, self.parallel):
            raise RunnerError(f"{n} sessions, but the model was loaded for {self.parallel}")
        if not prompts[0] or max_new_tokens < 1 or any(len(p) != len(prompts[0]) for p in prompts):
            raise RunnerError("parallel sessions need prompts of one length (at least one token) and max_new_tokens >= 1")
        self._check_room(len(prompts[0]) + max_new_tokens - 1)
        self._reset()
        self.generated = []
        self.session_generated = [[] for _ in prompts]  # token ids per session, for checks
        with torch.inference_mode():
            logits = self._forward_batch([list(p) for p in prompts])
            for i in range(max_new_tokens):
                picked = logits.argmax(dim=-1).tolist()  # .tolist() waits for the device
                self._sync()
                for s, token in enumerate(picked):
                    self.session_generated[s].append(int(token))
                stamp = time.perf_counter()
                for s in range(n):
                    yield s, stamp
                if i + 1 < max_new_tokens:
                    logits = self._forward_batch([[t] for t in picked])
        self._last = None  # sessions are not continued with extend()

    def _forward_batch(self, rows: list[list[int]]) -> Any:
        """Feed one equal-length row per session at the current position; the last logits of each."""
        import torch

        width = len(rows[0])
        ids = torch.tensor(rows, dtype=torch.long, device=self._device)
        positions = torch.arange(self._pos, self._pos + width, device=self._device)
        kwargs: dict[str, Any] = {self._cache_kw: self._cache, "position_ids": positions.expand(len(rows), -1),
                                  "use_cache": True, self._logits_kw: 1}
        if self._cache_position:
            kwargs["cache_position"] = positions
        out = self._model(input_ids=ids, **kwargs)
        self._pos += width
        if not self._static:
            returned = getattr(out, "cache", None)
            returned = returned if returned is not None else getattr(out, "past_key_values", None)
            if returned is not None:
                self._cache = returned
        return out.logits[:, -1, :]

    def session_kv_bytes(self) -> int | None:
        """KV bytes of the positions one session has filled (layers x K and V x heads x head_dim x dtype)."""
        return self._kv_token_bytes * self._pos if self._model is not None else None

    def detokenize(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def logits(self, tokens: list[int]) -> Any:
        """float32 logits (len(tokens), n_vocab) from an empty cache; row i predicts token i+1.
        Runs without the KV cache, so it may be longer than n_ctx; a following extend() is not allowed."""
        import torch

        if not tokens:
            raise RunnerError("logits needs at least one token")
        self._pos, self._last = 0, None
        with torch.inference_mode():
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)
            out = self._model(input_ids=ids, use_cache=False, **{self._logits_kw: 0})
            return out.logits[0].float().cpu().numpy()

    # --- after the measured repetitions ------------------------------------------

    def memory_stats(self) -> dict[str, int | float | None]:
        import torch

        stats: dict[str, int | float | None] = {"runtime_peak_bytes": None}
        if self._model is None:
            return {}
        if self._device.type == "cuda":
            stats["runtime_peak_bytes"] = sum(torch.cuda.max_memory_allocated(i) for i in self._cuda_indices)
        if self._device.type != "cpu":
            placement = self._placement()
            host = self._host_bytes(placement)
            stats["offload_host_bytes"] = host
            stats["offload_device_bytes"] = sum(placement.values()) - host
        return stats

    def close(self) -> None:
        self._model = self._cache = self._tokenizer = None


HOST_DEVICES = ("cpu", "disk", "meta")


def _device_name(dev: Any) -> str:
    """'cuda:0' for CUDA devices (index made explicit), else the device type."""
    if isinstance(dev, int):
        return f"cuda:{dev}"
    text = str(dev)
    return "cuda:0" if text == "cuda" else text


def _mapped_device(hf_map: dict[str, Any], param_name: str) -> str:
    """The device accelerate's map gives a parameter: the entry of its longest module prefix."""
    best, best_len = hf_map.get("", "cpu"), -1
    for module, dev in hf_map.items():
        if module and (param_name == module or param_name.startswith(module + ".")) and len(module) > best_len:
            best, best_len = dev, len(module)
    return _device_name(best)


def _host_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return 1 << 40
