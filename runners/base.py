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

    @classmethod
    def available(cls) -> Availability:
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
