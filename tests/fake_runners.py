"""Runners that misbehave on purpose, to test the harness without a runtime.

They follow the real protocol (and run in the real spawned worker), so the
suite's handling of each kind of failure is exercised end to end.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

from runners.base import Availability, LoadError, LoadInfo, Option, Runner, RunnerError


class FakeRunner(Runner):
    """Generates with a fixed delay per token; prefill cost grows with the prompt."""

    name = "fake"
    formats = {"gguf"}
    options = {
        "token_delay": Option(float, 0.002, "seconds per generated token"),
        "prefill_delay": Option(float, 0.00001, "seconds per prompt token"),
        "alloc_mb": Option(int, 0, "MiB to allocate and touch at load"),
    }

    def __init__(self) -> None:
        self._opts: dict[str, Any] = {}
        self._ballast: bytearray | None = None

    @classmethod
    def available(cls) -> Availability:
        return Availability(True, "0.0-test", ["cpu"])

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        self._opts = self.validate_options(options)
        if self._opts["alloc_mb"]:
            self._ballast = bytearray(self._opts["alloc_mb"] << 20)
            for i in range(0, len(self._ballast), 4096):
                self._ballast[i] = 1
        return LoadInfo(device="cpu", runtime_version="0.0-test", n_ctx=n_ctx, n_ctx_meaning="fake", n_threads=1)

    def tokenize(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        time.sleep(self._opts["prefill_delay"] * len(prompt_tokens))
        for _ in range(max_new_tokens):
            time.sleep(self._opts["token_delay"])
            yield time.perf_counter()


class FakeKvRunner(FakeRunner):
    """Writes a KV cache of ``kv_kib_per_token`` for every prompt token it processes, like llama.cpp
    whose preallocated cache becomes resident only as it is written."""

    options = {**FakeRunner.options, "kv_kib_per_token": Option(int, 64, "KiB written per processed token")}

    def __init__(self) -> None:
        super().__init__()
        self._kv: bytearray | None = None

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        self._kv = None
        kv = bytearray((len(prompt_tokens) + max_new_tokens) * self._opts["kv_kib_per_token"] << 10)
        for i in range(0, len(kv), 4096):
            kv[i] = 1
        self._kv = kv
        return super().generate(prompt_tokens, max_new_tokens)


class LoadFailRunner(FakeRunner):
    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        raise LoadError("fake runtime refuses this artifact")


class RaisingRunner(FakeRunner):
    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        yield time.perf_counter()
        raise RunnerError("fake runtime failed mid-generation")


class CrashRunner(FakeRunner):
    """Dies like a native crash: SIGSEGV, no Python cleanup."""

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        os.kill(os.getpid(), signal.SIGSEGV)
        yield time.perf_counter()


class HangRunner(FakeRunner):
    """Never finishes, and starts a grandchild that must not be left behind."""

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        import subprocess
        import sys

        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(os.environ["FITBENCH_TEST_GRANDCHILD"]).write_text(str(proc.pid))
        time.sleep(600)
        yield time.perf_counter()


class UnavailableRunner(FakeRunner):
    @classmethod
    def available(cls) -> Availability:
        return Availability(False, reason="fakeruntime is not installed", install="pip install fakeruntime")


class HogRunner(FakeRunner):
    """Allocates without bound (touching every page) until something stops it."""

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        hoard = []
        while True:
            block = bytearray(16 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            hoard.append(block)
        yield time.perf_counter()


class ExitMidStreamRunner(FakeRunner):
    """Produces a few tokens, then the process exits as if the runtime called exit()."""

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        for i in range(max_new_tokens):
            if i == 2:
                os._exit(3)
            yield time.perf_counter()


class AbortRunner(FakeRunner):
    """Dies like a failed assertion in native code (GGML_ASSERT -> abort)."""

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        print("GGML_ASSERT(n_tokens <= n_batch) failed", flush=True)
        os.abort()
        yield time.perf_counter()


class OffloadStatsRunner(FakeRunner):
    """Reports allocator figures like a GPU runtime whose model is split between GPU and host."""

    def memory_stats(self) -> dict[str, int | float | None]:
        return {"runtime_peak_bytes": 123 << 20, "offload_host_bytes": 40 << 20, "offload_device_bytes": 60 << 20,
                "not_a_column": 1}


class BrokenStatsRunner(FakeRunner):
    """memory_stats raises: the repetitions must still become ok rows."""

    def memory_stats(self) -> dict[str, int | float | None]:
        raise RuntimeError("allocator stats unavailable")


class LogitsRunner(FakeRunner):
    """A fake with the quality surface: characters as tokens (vocab 64), logits from a fixed
    bigram table; option ``noise`` perturbs them, like a coarser quantization would."""

    VOCAB = 64
    options = {**FakeRunner.options, "noise": Option(float, 0.0, "std of the perturbation added to the logits"),
               "logits_delay": Option(float, 0.0, "seconds each logits() call sleeps")}

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % self.VOCAB for c in text]

    def logits(self, tokens: list[int]):
        import numpy as np

        time.sleep(self._opts.get("logits_delay") or 0.0)
        table = np.random.default_rng(0).normal(size=(self.VOCAB, self.VOCAB)).astype(np.float32) * 3
        out = table[np.asarray(tokens)]
        if self._opts.get("noise"):
            out = out + np.random.default_rng(1).normal(size=out.shape).astype(np.float32) * self._opts["noise"]
        return out

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(48 + t) for t in tokens)


class OtherTokenizerRunner(LogitsRunner):
    """Same logits, different token ids for the same text."""

    def tokenize(self, text: str) -> list[int]:
        return [(ord(c) + 1) % self.VOCAB for c in text]


class FakeExtendRunner(FakeRunner):
    """Keeps a pretend KV cache, so workflows continue sessions with extend().

    ``turn_delays`` ("0,0,0.6") adds seconds before the first token of the
    n-th call of a session (generate starts a session, each extend is the
    next turn): a turn that turns slow, to test worst-turn verdicts.
    ``fail_turn`` makes that turn fail like an allocation failure.
    """

    supports_extend = True
    options = {
        **FakeRunner.options,
        "turn_delays": Option(str, "", "comma-separated extra seconds before the first token, per turn"),
        "fail_turn": Option(int, 0, "turn (1-based) whose prefill raises MemoryError; 0 = none"),
    }

    def __init__(self) -> None:
        super().__init__()
        self.cache: list[int] = []
        self._turn = 0

    def _prefill(self, feed: list[int]) -> None:
        self._turn += 1
        if self._turn == self._opts["fail_turn"]:
            raise MemoryError("fake KV cache cannot grow")
        delays = [float(d) for d in self._opts["turn_delays"].split(",") if d.strip()]
        extra = delays[self._turn - 1] if self._turn <= len(delays) else 0.0
        time.sleep(self._opts["prefill_delay"] * len(feed) + extra)
        self.cache += feed

    def _reply(self, max_new_tokens: int) -> Iterator[float]:
        for i in range(max_new_tokens):
            time.sleep(self._opts["token_delay"])
            if i + 1 < max_new_tokens:
                self.cache.append(7)  # every sampled token but the last is decoded
            yield time.perf_counter()

    def generate(self, prompt_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        self.cache, self._turn = [], 0
        self._prefill(list(prompt_tokens))
        yield from self._reply(max_new_tokens)

    def extend(self, new_tokens: list[int], max_new_tokens: int) -> Iterator[float]:
        self._prefill([7, *new_tokens])  # the last sampled token first
        yield from self._reply(max_new_tokens)


# --- runtime probe functions, called by runners.base.probe_runtime in a child interpreter ---

def probe_facts_ok() -> dict[str, Any]:
    """Answers with the child's pid; appends a line to $FITBENCH_TEST_PROBE_LOG per call."""
    print("a runtime chatting on stdout while it imports")
    log = os.environ.get("FITBENCH_TEST_PROBE_LOG")
    if log:
        with open(log, "a") as f:
            f.write("probed\n")
    return {"pid": os.getpid(), "devices": ["cpu", "npu"]}


def probe_facts_broken() -> dict[str, Any]:
    raise ImportError("libfake.so.1: cannot open shared object file: No such file or directory\n(second line)")


def probe_facts_hang() -> dict[str, Any]:
    time.sleep(600)
    return {}


def probe_facts_crash() -> dict[str, Any]:
    """Dies like a native library segfaulting at import (no core file)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


class FakeParallelRunner(FakeRunner):
    """N sessions: the prompts prefilled one after another (each session's first token right after
    its own prefill), then one step of ``token_delay`` per token for all sessions together."""

    loaded_for = 0  # the ``parallel`` the last load saw

    def load(self, artifact: Path, n_ctx: int, options: dict[str, Any]) -> LoadInfo:
        FakeParallelRunner.loaded_for = self.parallel
        self._filled = 0
        return super().load(artifact, n_ctx, options)

    def generate_parallel(self, prompts: list[list[int]], max_new_tokens: int) -> Iterator[tuple[int, float]]:
        if len(prompts) > self.parallel:
            raise RunnerError(f"{len(prompts)} sessions, loaded for {self.parallel}")
        for s, prompt in enumerate(prompts):
            time.sleep(self._opts["prefill_delay"] * len(prompt))
            yield s, time.perf_counter()
        for _ in range(max_new_tokens - 1):
            time.sleep(self._opts["token_delay"])
            for s in range(len(prompts)):
                yield s, time.perf_counter()
        self._filled = len(prompts[0]) + max_new_tokens - 1

    def session_kv_bytes(self) -> int | None:
        return 1000 * self._filled
