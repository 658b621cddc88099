"""The runner protocol and the registry of runners.

A runner knows one runtime and nothing else: no Parquet, no sampling, no fit
classes. The harness talks to runtimes only through this seam. Runner modules
must not import their runtime at module import time, so that listing runners
(or validating a scenario) never pays for, or crashes on, a runtime.

Runners register through the ``fitbench.runners`` entry-point group; the
built-in ones are registered there too (see pyproject.toml). A scenario may
also name a runner as ``package.module:ClassName`` for development.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

ENTRY_POINT_GROUP = "fitbench.runners"

# Fallback for running from a source tree where the package metadata (and so
# the entry points) is not installed.
BUILTIN_RUNNERS = {
    "llama.cpp": "runners.llama_cpp:LlamaCppRunner",
    "torch": "runners.torch:TorchRunner",
    "onnxruntime": "runners.onnx:OnnxGenaiRunner",
    "mlx": "runners.mlx:MlxRunner",
}


class RunnerError(Exception):
    """A runtime failed while running a case (becomes a ``runtime_error`` row)."""


class LoadError(RunnerError):
    """The artifact could not be loaded (becomes a ``load_error`` row)."""


class OptionError(ValueError):
    """A runner option has an unknown name or a bad value (a usage error)."""


@dataclass(frozen=True)
class Option:
    """One runner option: its type, default and help, for validation and docs."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


@dataclass
class Availability:
    """Whether a runtime can be used here, and if not, how to get it."""

    available: bool
    version: str | None = None
    devices: list[str] = field(default_factory=list)
    reason: str | None = None
    install: str | None = None
    notes: str | None = None  # e.g. the execution providers present, for `fitbench runners`


@dataclass
class LoadInfo:
    """What the runtime actually did when loading, recorded in every result row."""

    device: str
    runtime_version: str
    n_ctx: int  # the context the runtime really allocated
    n_ctx_meaning: str  # how this runtime interprets "configured context"
    n_layers_total: int | None = None
    n_layers_device: int | None = None
    kv_type: str | None = None
    n_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The KV-cache and attention settings the runtime really used (see ``Runner.kv_settings``).
    kv_type_k: str | None = None
    kv_type_v: str | None = None
    attn_impl: str | None = None
    flash_attn: bool | None = None


KV_SETTING_KEYS = ("kv_type_k", "kv_type_v", "attn_impl", "flash_attn")


# --- availability without importing a runtime ------------------------------------------
#
# The CLI process is also the measuring parent: a runtime imported there (hundreds of MB,
# native thread pools) would sit beside the sampler for the whole suite. So availability
# has two layers: ``missing_modules`` and ``dist_version`` answer "installed? which
# version?" from import metadata alone; ``probe_runtime`` asks a short-lived interpreter
# what only an import can tell (that it imports at all, devices, execution providers).

PROBE_TIMEOUT_S = 120.0  # importing torch on a busy small machine takes tens of seconds
_PROBE_MARK = "FITBENCH-RUNTIME-PROBE "
# Runs in the child: this process's sys.path, then the probe function; one marked JSON line back.
# os._exit skips interpreter teardown, where some native runtimes join their thread pools slowly.
_PROBE_MAIN = """
import importlib, json, os, sys
sys.path[:] = json.loads(sys.argv[1])
module, _, func = sys.argv[2].partition(":")
try:
    answer = json.dumps({"facts": getattr(importlib.import_module(module), func)()})
except BaseException as exc:
    text = (str(exc).strip().splitlines() or [""])[0]
    answer = json.dumps({"error": type(exc).__name__ + (": " + text if text else "")})
sys.stdout.write("\\n" + sys.argv[3] + answer + "\\n")
sys.stdout.flush()
os._exit(0)
"""


def missing_modules(*names: str) -> list[str]:
    """The top-level modules among ``names`` that are not installed, found without importing them."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a half-installed package: the probe will say more
            found = True
        if not found:
            missing.append(name)
    return missing


def dist_version(*dists: str) -> str | None:
    """The version of the first installed distribution among ``dists``, from its metadata (None: none is)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class Probe:
    """What a runtime's probe function answered in a child interpreter, or why it could not."""

    facts: dict[str, Any]
    error: str | None = None  # one line, naming the package: ready to be an Availability reason

    @property
    def ok(self) -> bool:
        return self.error is None


_probe_cache: dict[tuple[str, str], Probe] = {}
_probe_lock = threading.Lock()


def probe_runtime(what: str, target: str, key: str | None = "", timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Call ``target`` ("module:function": imports the runtime, returns a JSON-able dict) in a
    fresh interpreter with this process's ``sys.path``, so this process never imports it.

    Cached per process by (target, key): pass the installed version as ``key`` so an upgrade
    in between is seen. ``what`` names the package in a failure reason, e.g.
    ``"onnxruntime-genai 0.8.0"``."""
    with _probe_lock:
        cache_key = (target, key or "")
        if cache_key not in _probe_cache:
            _probe_cache[cache_key] = _run_probe(what, target, timeout)
        return _probe_cache[cache_key]


def clear_probe_cache() -> None:
    """Forget every probe answer (tests; a long-lived process after installing a runtime)."""
    with _probe_lock:
        _probe_cache.clear()


def _run_probe(what: str, target: str, timeout: float) -> Probe:
    cmd = [sys.executable, "-c", _PROBE_MAIN, json.dumps(sys.path), target, _PROBE_MARK]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Probe({}, f"{what} is installed but importing it took longer than {timeout:g} s")
    except OSError as exc:
        return Probe({}, f"{what} is installed but no Python could be started to probe it: {exc.strerror or exc}")
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(_PROBE_MARK):
            try:
                answer = json.loads(line[len(_PROBE_MARK):])
            except ValueError:
                break
            if isinstance(answer.get("facts"), dict):
                return Probe(answer["facts"])
            return Probe({}, f"{what} is installed but failed to import: {_one_line(str(answer.get('error')))}")
    if out.returncode < 0:
        try:
            how = signal.Signals(-out.returncode).name
        except ValueError:
            how = f"signal {-out.returncode}"
        return Probe({}, f"{what} is installed but importing it crashed the interpreter ({how})")
    last = ([ln for ln in out.stderr.splitlines() if ln.strip()] or [f"exit status {out.returncode}, no answer"])[-1]
    return Probe({}, f"{what} is installed but failed to import: {_one_line(last)}")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


class Runner:
    """Base class for runners. Subclasses fill in the class variables and methods.

    The call order in one worker process is: ``load`` once, then ``tokenize``
    and ``generate`` any number of times (each ``generate`` may be followed by
    ``extend`` calls that continue its sequence), then ``close``.
    """

    name: ClassVar[str]
    formats: ClassVar[set[str]]
    options: ClassVar[dict[str, Option]] = {}
    # True when ``extend`` continues a session from the runtime's own KV/prompt cache.
    # Without it, a workflow replays the whole history with ``generate`` (rows say kv_reuse=false).
    supports_extend: ClassVar[bool] = False
    # Sessions the next ``load`` must make room for (KV for each): set by the worker before
    # ``load`` when a case asks for parallel sessions; ``n_ctx`` stays the context of one session.
    parallel: int = 1
    # Why ``generate_parallel`` is missing, in a user's words (an ``unavailable`` row's reason).
    no_parallel_reason: ClassVar[str] = "this runner does not run parallel sessions (no generate_parallel)"

    @classmethod
    def available(cls) -> Availability:
        """Whether the runtime can be used here. Must not import the runtime into this process
        (the measuring parent): ``missing_modules``/``dist_version`` for the cheap answer,
        ``probe_runtime`` for what needs an import."""
        raise NotImplementedError

    @classmethod
    def case_availability(cls, options: dict[str, Any]) -> Availability:
        """Whether a case with these options can run here (e.g. its execution provider
        is present). An unavailable case becomes an ``unavailable`` row, not a crash."""
        return cls.available()

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Check option names and types; return options with defaults filled in."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            known = ", ".join(sorted(cls.options)) or "none"
            raise OptionError(f"unknown option {unknown[0]!r} for runtime {cls.name!r} (known: {known})")
        resolved: dict[str, Any] = {}
        for key, spec in cls.options.items():
            value = options.get(key, spec.default)
            if value is not None:
                value = _coerce(key, value, spec)
            resolved[key] = value
        return resolved

    @classmethod
    def kv_settings(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The KV-cache element types and attention kernel these options ask for, as the uniform
        result columns ``kv_type_k``, ``kv_type_v`` (llama.cpp's names: f32, f16, bf16, q8_0, q4_0, ...;
        MLX's group quantization as q8/q4), ``attn_impl`` (the kernel: flash, standard, sdpa, eager,
        ...) and ``flash_attn`` (a fused kernel that never materialises the attention scores).
        Worked out without importing the runtime, so a case that fails to load still says what it
        asked for; the worker's LoadInfo then reports what was used. {} when the runtime says nothing."""
        return {}

    def prepare(self) -> None:
        """Import the runtime (called before ``load`` is timed, so load time is the model's alone)."""

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        """Process the prompt from an empty cache, then yield a ``time.perf_counter()``
        timestamp as each new token is produced, exactly ``max_new_tokens`` times."""
        raise NotImplementedError

    def generate_parallel(self, prompts: list[list[int]], max_new_tokens: int) -> Iterator[tuple[int, float]]:
        """N sessions at once on the one loaded model (``len(prompts) <= self.parallel``): each prompt is
        processed from an empty cache as its own sequence, then every step decodes one token of every
        session together (one batch). Yields ``(session, time.perf_counter())`` as each session's token
        is produced, exactly ``max_new_tokens`` per session. All prompts are handed over at the call, so
        a session's first timestamp minus the call's start is its TTFT under contention.
        Single-session cases never call this (they use ``generate``)."""
        raise NotImplementedError

    def session_kv_bytes(self) -> int | None:
        """The runtime's own figure for the KV bytes one session of the last generation holds (its
        filled cells), or None. Called after a timed repetition, outside the timed window."""
        return None

    def memory_stats(self) -> dict[str, int | float | None]:
        """The runtime's own allocator figures after the measured repetitions, for the result row.

        Keys among ``runtime_peak_bytes`` (e.g. torch ``max_memory_allocated``
        since load, MLX peak memory), ``offload_host_bytes`` and
        ``offload_device_bytes`` (weights placed on the host vs the
        accelerator when a model is split). Called before ``close``; a runtime
        that exposes nothing returns {} and the columns stay null."""
        return {}

    # Quality probe (optional; the harness calls these only where a runner overrides them).
    def logits(self, tokens: list[int]) -> Any:
        """From an empty cache, evaluate ``tokens`` and return float32 raw logits as a
        numpy array of shape ``(len(tokens), n_vocab)``; row i predicts token i+1."""
        raise NotImplementedError

    def greedy_tokens(self, prompt_tokens: list[int], max_new_tokens: int) -> list[int]:
        """Optional fast path for task checks: greedy continuation from an empty cache, at most
        ``max_new_tokens``, stopping at end-of-generation. Without it, the harness decodes
        greedily through ``logits()`` (re-scoring the sequence per token)."""
        raise NotImplementedError

    def detokenize(self, tokens: list[int]) -> str:
        """Token ids -> text, special (control) tokens rendered as nothing."""
        raise NotImplementedError

    def extend(self, new_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        """Continue the sequence left by the previous ``generate``/``extend`` without clearing
        the cache: first feed the last token sampled (which ``generate`` never decoded), then
        ``new_tokens``, then yield a ``time.perf_counter()`` timestamp per new token exactly as
        ``generate`` does. Runners that implement it set ``supports_extend = True``."""
        raise NotImplementedError

    def close(self) -> None:
        pass


MEMORY_STATS_KEYS = ("runtime_peak_bytes", "offload_host_bytes", "offload_device_bytes")


def overrides(runner: Runner | type[Runner], method: str) -> bool:
    """Whether a runner implements an optional protocol method (rather than inheriting the stub)."""
    cls = runner if isinstance(runner, type) else type(runner)
    return getattr(cls, method, None) is not getattr(Runner, method, None)


def parallel_unavailable(runner: Runner | type[Runner], sessions: int) -> str | None:
    """Why a case of ``sessions`` parallel sessions cannot run on this runner, or None when it can."""
    if sessions <= 1 or overrides(runner, "generate_parallel"):
        return None
    cls = runner if isinstance(runner, type) else type(runner)
    return f"{cls.name}: {cls.no_parallel_reason}"


def short_repr(value: Any) -> str:
    """repr() cut to one readable line, for error messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(key: str, value: Any, spec: Option) -> Any:
    # bool is an int subclass in Python: keep the two apart on purpose.
    if spec.type is bool and not isinstance(value, bool):
        raise OptionError(f"option {key!r} must be true or false, got {short_repr(value)}")
    if spec.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise OptionError(f"option {key!r} must be an integer, got {short_repr(value)}")
    if spec.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise OptionError(f"option {key!r} must be a number, got {short_repr(value)}")
    if spec.type is str and not isinstance(value, str):
        raise OptionError(f"option {key!r} must be a string, got {short_repr(value)}")
    if spec.choices is not None and value not in spec.choices:
        choices = ", ".join(str(c) for c in spec.choices)
        raise OptionError(f"option {key!r} must be one of {choices}, got {short_repr(value)}")
    return spec.type(value)


class UnknownRunner(LookupError):
    pass


def registered_runners() -> dict[str, str]:
    """Runtime name -> "module:Class" for every registered runner."""
    found = dict(BUILTIN_RUNNERS)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def get_runner_class(name: str) -> type[Runner]:
    """Resolve a runtime name (or a ``module:Class`` path) to its runner class."""
    target = registered_runners().get(name)
    if target is None:
        if ":" not in name:
            known = ", ".join(sorted(registered_runners()))
            raise UnknownRunner(f"unknown runtime {name!r} (known: {known})")
        target = name
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise UnknownRunner(f"cannot import runner {target!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise UnknownRunner(f"{target!r} is not a fitbench Runner subclass")
    return cls
