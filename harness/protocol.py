"""The parent <-> worker messages: the only thing that crosses the process boundary.

The parent sends one ``WorkerSpec`` line on the control pipe (then ``Exit``
when it has read the child's /proc entries); the worker sends the messages
below on the message pipe, one JSON line each, ``[kind, fields]``. Both sides
encode and decode through this module, so a field is named in one place and
a typo is a TypeError in a test, not a silent None in a row.

Order for a case: Started, Loaded, [Warmup], Rep* or (Turn+, Rep)* for a
workflow session, [QualityStart, Quality], Done; or Failed at any point.
A reference run (quality scoring of the reference artifact): Started,
Loaded, Reference, Done.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Union


@dataclass(frozen=True)
class WorkflowPlan:
    """A multi-turn session: the new tokens of each turn and the length of each reply."""

    new_tokens: list[int]
    reply_tokens: int
    reuse_cache: bool = True


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process runs (built by ``harness.case``; the reference run by ``harness.quality``)."""

    KIND: ClassVar[str] = "spec"
    runtime: str
    artifact: str
    options: dict[str, Any]
    n_ctx: int
    prompt_tokens: int
    gen_tokens: int
    warmup: int = 0
    repetitions: int = 1
    quality: dict[str, Any] | None = None  # QualitySpec.worker_spec(): the probe's text, tasks and reference
    workflow: WorkflowPlan | None = None
    mode: str = "case"  # "case" | "reference"
    parallel: int = 1  # sessions at once on the one loaded model (1: the single-session path, generate())
    sys_path: list[str] = field(default_factory=list)  # the parent's import path (runners named module:Class)


@dataclass(frozen=True)
class Exit:
    """Parent -> worker: the parent has read what it needs; exit now."""

    KIND: ClassVar[str] = "exit"


@dataclass(frozen=True)
class Started:
    """Before the runtime is imported: the process's own baseline."""

    KIND: ClassVar[str] = "started"
    pid: int
    baseline_rss: int | None
    t: float


@dataclass(frozen=True)
class Loaded:
    """After the artifact is loaded; ``info`` is the runner's LoadInfo as a dict."""

    KIND: ClassVar[str] = "loaded"
    load_s: float
    t0: float
    t1: float
    info: dict[str, Any]
    prompt_tokens: int
    rss_after_load: int | None
    rss_after_import: int | None = None  # the runtime imported (Runner.prepare), nothing loaded yet


@dataclass(frozen=True)
class Warmup:
    KIND: ClassVar[str] = "warmup"
    t0: float
    t1: float


@dataclass(frozen=True)
class Rep:
    """One timed repetition: a timestamp per generated token. ``session``: the end mark of a
    workflow session (its turns came as Turn messages; ``stamps`` is then the last turn's end).
    With parallel sessions, all prompts were handed over at ``t_start``."""

    KIND: ClassVar[str] = "rep"
    repetition: int
    t_start: float
    stamps: list[float]
    session: bool = False
    # Parallel sessions: each session's own timestamps (``stamps`` is then all of them, in order).
    sessions: list[list[float]] | None = None
    kv_session_bytes: int | None = None  # Runner.session_kv_bytes() after this repetition


@dataclass(frozen=True)
class Turn:
    """One turn of a workflow session. ``processed_tokens`` is what this turn prefilled (the new
    tokens with KV reuse, the whole history without); ``context_tokens`` what the cache then holds."""

    KIND: ClassVar[str] = "turn"
    repetition: int
    turn: int
    t_start: float
    stamps: list[float]
    new_tokens: int
    processed_tokens: int
    context_tokens: int
    kv_reuse: bool


@dataclass(frozen=True)
class QualityStart:
    """The quality probe begins, after the timed part: the case's memory figures stop here."""

    KIND: ClassVar[str] = "quality_start"
    t: float


@dataclass(frozen=True)
class Quality:
    """The probe's ``quality_*`` / ``task_*`` columns (or ``quality_error``)."""

    KIND: ClassVar[str] = "quality"
    t: float
    columns: dict[str, Any]


@dataclass(frozen=True)
class Reference:
    """Reference mode: the top-k cache was written; a summary of it."""

    KIND: ClassVar[str] = "reference"
    result: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """A failure the worker caught itself; ``status`` is a result status (load_error, oom, ...)."""

    KIND: ClassVar[str] = "error"
    status: str
    error: str
    detail: str = ""


@dataclass(frozen=True)
class Done:
    """Finished; ``memory`` holds the runner's allocator figures (Runner.memory_stats)."""

    KIND: ClassVar[str] = "done"
    memory: dict[str, Any] = field(default_factory=dict)


Message = Union[WorkerSpec, Exit, Started, Loaded, Warmup, Rep, Turn, QualityStart, Quality, Reference, Failed, Done]
KINDS: dict[str, type] = {cls.KIND: cls for cls in (WorkerSpec, Exit, Started, Loaded, Warmup, Rep, Turn,
                                                    QualityStart, Quality, Reference, Failed, Done)}


class ProtocolError(ValueError):
    """A line that is not a message of this protocol (a bug or a foreign writer on the pipe)."""


def encode(message: Message) -> str:
    """One JSON line (with its newline)."""
    return json.dumps([message.KIND, asdict(message)]) + "\n"


def decode(line: str | bytes) -> Message:
    try:
        kind, payload = json.loads(line)
        cls = KINDS[kind]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"not a worker message: {str(line)[:120]!r}") from exc
    if cls is WorkerSpec and payload.get("workflow") is not None:
        payload = {**payload, "workflow": WorkflowPlan(**payload["workflow"])}
    names = {f.name for f in fields(cls)}
    unknown = set(payload) - names
    if unknown:
        raise ProtocolError(f"{kind} message has unknown fields {sorted(unknown)}")
    return cls(**payload)


@dataclass
class CaseEvents:
    """What the parent has heard from one worker, in order; rows.py turns it into rows."""

    started: Started | None = None
    loaded: Loaded | None = None
    warmup: Warmup | None = None
    reps: list[Rep] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    quality_start: QualityStart | None = None
    quality: Quality | None = None
    reference: Reference | None = None
    failed: Failed | None = None
    done: Done | None = None

    def add(self, message: Message) -> None:
        if isinstance(message, Rep):
            self.reps.append(message)
        elif isinstance(message, Turn):
            self.turns.append(message)
        else:
            setattr(self, message.KIND if message.KIND != "error" else "failed", message)

    @property
    def finished(self) -> bool:
        """The worker reported its end (done or a failure it caught): it can exit gracefully."""
        return self.done is not None or self.failed is not None

    @property
    def timed_reps(self) -> list[Rep]:
        """Repetitions of single-turn cases (a session's end mark is not one)."""
        return [r for r in self.reps if not r.session]
