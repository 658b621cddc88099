"""The child-process side of one case: load, warm up, generate, report timings.

Runs as ``python -m harness.worker`` in a fresh interpreter, so that its peak
memory belongs to this case alone, a crash cannot take the suite down, and
nothing of the parent (pyarrow, pandas, rich) is imported into the process
being measured. multiprocessing's spawn would re-import the parent's main
module, which for the ``fitbench`` console script is the whole CLI (~80 MB).

It talks to the parent over two inherited pipes with the messages of
``harness.protocol`` (a WorkerSpec arrives on the control pipe; Started,
Loaded, Warmup, Rep, Turn, QualityStart, Quality, Reference, Failed and Done
go back on the message pipe).

The parent reads the kernel's VmHWM between "done" and "exit", while the
child still exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.protocol import (
    Done,
    Exit,
    Failed,
    Loaded,
    Message,
    Quality,
    QualityStart,
    Reference,
    Rep,
    Started,
    Turn,
    Warmup,
    WorkerSpec,
    WorkflowPlan,
    decode,
    encode,
)
from harness.worker.prompt import SEED, build_prompt

WARMUP_GEN_TOKENS = 4


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:
            return None


class Channel:
    """Protocol messages as JSON lines over a pair of pipe descriptors."""

    def __init__(self, msg_fd: int, ctl_fd: int) -> None:
        self._out = os.fdopen(msg_fd, "w", buffering=1)
        self._in = os.fdopen(ctl_fd, "r")

    def send(self, message: Message) -> None:
        self._out.write(encode(message))
        self._out.flush()

    def recv(self) -> Message:
        line = self._in.readline()
        if not line:
            raise EOFError("the parent closed the control pipe")
        return decode(line)


def die_with_parent() -> None:
    """Linux: if the harness is killed (even with SIGKILL), take this worker down too."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    parser = argparse.ArgumentParser(description="fitbench case worker (started by the harness, not by hand)")
    parser.add_argument("--msg-fd", type=int, required=True)
    parser.add_argument("--ctl-fd", type=int, required=True)
    args = parser.parse_args(argv)
    conn = Channel(args.msg_fd, args.ctl_fd)
    spec = conn.recv()
    if not isinstance(spec, WorkerSpec):
        raise SystemExit(f"expected a WorkerSpec first, got {type(spec).__name__}")
    for entry in reversed(spec.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)  # the parent's import path, e.g. for runners named module:Class
    child_main(conn, spec)


def child_main(conn: Any, spec: WorkerSpec) -> None:
    # The parent owns Ctrl-C: it decides whether to stop this case.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = "runtime_error"
    runner = None
    try:
        conn.send(Started(pid=os.getpid(), baseline_rss=_rss_bytes(), t=time.perf_counter()))
        from runners.base import LoadError, get_runner_class

        status = "load_error"
        runner = get_runner_class(spec.runtime)()
        runner.parallel = max(1, spec.parallel)  # room for every session's KV at load
        runner.prepare()
        rss_imported = _rss_bytes()
        t0 = time.perf_counter()
        try:
            info = runner.load(Path(spec.artifact), spec.n_ctx, spec.options)
        except LoadError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # any failure inside load is a load error
            raise LoadError(f"{type(exc).__name__}: {exc}") from exc
        t1 = time.perf_counter()
        status = "runtime_error"
        session = session_tokens(runner.tokenize, spec.workflow) if spec.workflow else None
        prompt = session[0][0] if session else build_prompt(runner.tokenize, spec.prompt_tokens)
        conn.send(Loaded(load_s=t1 - t0, t0=t0, t1=t1, info=asdict(info), prompt_tokens=len(prompt),
                         rss_after_load=_rss_bytes(), rss_after_import=rss_imported))

        if spec.mode == "reference":
            from harness.quality.probe import reference_probe

            _require_logits(runner, spec.runtime)
            conn.send(Reference(reference_probe(runner, spec.quality or {})))
            runner.close()
            runner = None
            conn.send(Done())
            _wait_for_exit(conn)
            return

        parallel = spec.parallel > 1 and session is None
        if parallel:
            run_parallel(conn, runner, spec, prompt)
        else:
            warm_up(conn, spec, lambda n: runner.generate(prompt, n))

        for rep in range(spec.repetitions if session is None and not parallel else 0):
            stamps: list[float] = []
            t_start = time.perf_counter()
            for stamp in runner.generate(prompt, spec.gen_tokens):
                stamps.append(stamp)
            conn.send(Rep(repetition=rep, t_start=t_start, stamps=stamps, kv_session_bytes=_kv_bytes(runner)))
        if session is not None and spec.workflow is not None:
            for rep in range(spec.repetitions):
                play_session(conn, runner, rep, *session, spec.workflow.reply_tokens, spec.workflow.reuse_cache)
        memory = runtime_memory(runner)  # before close: the allocator's peak dies with the model
        if spec.quality:
            # After the timed part, so it costs the speed figures nothing; the parent
            # reads the peak memory at QualityStart and keeps the probe's apart.
            conn.send(QualityStart(t=time.perf_counter()))
            columns = quality_probe(runner, spec)
            conn.send(Quality(t=time.perf_counter(), columns=columns))
        runner.close()
        runner = None
        conn.send(Done(memory=memory))
        _wait_for_exit(conn)  # hold still until the parent has read our /proc entries
    except MemoryError:
        _report(conn, "oom", "MemoryError: the runtime could not allocate memory")
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as a row
        from runners.base import LoadError

        if isinstance(exc, LoadError):
            status = "load_error"
        tail = "".join(traceback.format_exception(exc)[-3:]).strip().replace("\n", " | ")
        _report(conn, status, f"{type(exc).__name__}: {exc}" if str(exc) else tail, tail)


def warm_up(conn: Any, spec: WorkerSpec, generate: Callable[[int], Iterable[Any]]) -> None:
    """``spec.warmup`` untimed generations (``generate(n_tokens)``), short ones: they fill the caches
    and thread pools, not the measurement."""
    if not spec.warmup:
        return
    w0 = time.perf_counter()
    for _ in range(spec.warmup):
        for _item in generate(min(WARMUP_GEN_TOKENS, spec.gen_tokens)):
            pass
    conn.send(Warmup(t0=w0, t1=time.perf_counter()))


def run_parallel(conn: Any, runner: Any, spec: WorkerSpec, first_prompt: list[int]) -> None:
    """Warm-up and timed repetitions of ``spec.parallel`` sessions at once: each session its own
    prompt of the same length (its own seed), all handed over together."""
    prompts = [first_prompt] + [build_prompt(runner.tokenize, len(first_prompt), SEED + i)
                                for i in range(1, spec.parallel)]
    warm_up(conn, spec, lambda n: runner.generate_parallel(prompts, n))
    for rep in range(spec.repetitions):
        sessions: list[list[float]] = [[] for _ in prompts]
        stamps: list[float] = []
        t_start = time.perf_counter()
        for index, stamp in runner.generate_parallel(prompts, spec.gen_tokens):
            sessions[index].append(stamp)
            stamps.append(stamp)
        conn.send(Rep(repetition=rep, t_start=t_start, stamps=sorted(stamps), sessions=sessions,
                      kv_session_bytes=_kv_bytes(runner)))


def _kv_bytes(runner: Any) -> int | None:
    """The runner's KV bytes per session, when it tells; a failure costs the column only."""
    try:
        value = runner.session_kv_bytes()
    except Exception:  # noqa: BLE001
        return None
    return int(value) if isinstance(value, (int, float)) and value >= 0 else None


def _wait_for_exit(conn: Any) -> None:
    while not isinstance(conn.recv(), Exit):
        pass


def runtime_memory(runner: Any) -> dict[str, Any]:
    """The runner's allocator figures, when its class provides them; a failure here
    costs the columns, never the measured repetitions."""
    from runners.base import MEMORY_STATS_KEYS, Runner

    if type(runner).memory_stats is Runner.memory_stats:
        return {}
    try:
        stats = runner.memory_stats() or {}
    except Exception:  # noqa: BLE001
        return {}
    # All keys are byte counts (Parquet int64 columns).
    return {k: None if v is None else int(v) for k, v in stats.items()
            if k in MEMORY_STATS_KEYS and (v is None or isinstance(v, (int, float)))}


def _require_logits(runner: Any, runtime: str) -> None:
    from runners.base import overrides

    if not overrides(runner, "logits"):
        from harness.quality.probe import QualityError

        raise QualityError(f"runtime {runtime!r} does not expose logits, so it has no quality probe")


def quality_probe(runner: Any, spec: WorkerSpec) -> dict[str, Any]:
    """The case's quality columns; any failure is a quality_error value, never a failed case."""
    from harness.quality.probe import QualityError, case_probe

    q = spec.quality or {}
    try:
        _require_logits(runner, spec.runtime)
        if q.get("tasks"):
            from runners.base import overrides

            if not overrides(runner, "detokenize"):
                raise QualityError(f"runtime {spec.runtime!r} has no detokenize, so it cannot run task checks")
        if q.get("tokens") and spec.n_ctx < q["window"]:
            raise QualityError(f"context {spec.n_ctx} is smaller than the quality window {q['window']}")
        return case_probe(runner, q)
    except QualityError as exc:
        return {"quality_error": str(exc), "quality_text_id": q["text_id"], "quality_text_sha256": q["text_sha256"]}
    except Exception as exc:  # noqa: BLE001 - a runtime failing while scoring loses the probe, not the case
        return {"quality_error": f"quality probe failed: {type(exc).__name__}: {exc}",
                "quality_text_id": q["text_id"], "quality_text_sha256": q["text_sha256"]}


def session_tokens(tokenize: Any, plan: WorkflowPlan) -> tuple[list[list[int]], list[list[int]]]:
    """(new tokens per turn, stand-in reply per turn) from a workflow plan, with the runner's tokenizer.
    Each turn gets its own text (its own seed); only the first keeps the BOS."""
    turns = [build_prompt(tokenize, n, SEED) if i == 0 else build_prompt(tokenize, n + 1, SEED + i)[1:]
             for i, n in enumerate(plan.new_tokens)]
    # Replaying a history needs the replies as tokens, and generate() yields only timestamps:
    # stand-ins of the same length cost the same to prefill.
    replies = [build_prompt(tokenize, plan.reply_tokens + 1, SEED + 1000 + i)[1:] for i in range(len(turns))]
    return turns, replies


def play_session(conn: Any, runner: Any, rep: int, turns: list[list[int]], replies: list[list[int]],
                 reply_tokens: int, reuse_cache: bool = True) -> None:
    """One multi-turn session: extend() from the runtime's cache where it can, else replay the history."""
    reuse = reuse_cache and bool(getattr(type(runner), "supports_extend", False))
    history: list[int] = []
    session_start = time.perf_counter()
    for i, new in enumerate(turns):
        t_start = time.perf_counter()
        stamps: list[float] = []
        if i and reuse:
            processed = len(new) + 1  # extend() first decodes the last reply token
            try:
                for stamp in runner.extend(new, reply_tokens):
                    stamps.append(stamp)
            except NotImplementedError:
                reuse = False  # claimed but not implemented: replay like any other runner
                t_start, stamps = time.perf_counter(), []
        if not (i and reuse):
            prompt = history + new
            processed = len(prompt)
            for stamp in runner.generate(prompt, reply_tokens):
                stamps.append(stamp)
        history += new
        conn.send(Turn(repetition=rep, turn=i + 1, t_start=t_start, stamps=stamps, new_tokens=len(new),
                       processed_tokens=processed, context_tokens=len(history), kv_reuse=reuse))
        history += replies[i]
    conn.send(Rep(repetition=rep, t_start=session_start, stamps=[stamps[-1]], session=True))


def _report(conn: Any, status: str, error: str, detail: str = "") -> None:
    try:
        conn.send(Failed(status=status, error=error, detail=detail))
        _wait_for_exit(conn)
    except (OSError, EOFError, ValueError):
        pass


if __name__ == "__main__":
    main()
