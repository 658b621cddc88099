"""Helpers for the upstream tests: a plausible crafted results file, and uvicorn on a free port in a thread."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from harness.results import ResultWriter

MiB = 2**20
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def write_results(folder: Path, run_id: str = "20261128T000000Z-aaaaaa", machine_id: str = "d6657c6bd240a6e3",
                  n_ctx: int = 512, reps: int = 2, decode: float = 80.0, peak: int = 190 * MiB,
                  machine_class: str = "cpu-x86_64-24GiB", **overrides) -> Path:
    """A results file + timeline shaped like a real llama.cpp run of the sample model, internally consistent."""
    prompt, gen, ttft = n_ctx // 2, 8, 0.7
    e2e = ttft + (gen - 1) / decode
    case_key = f"case{n_ctx:05d}"
    # timeline: 10 ms samples over load, then each repetition
    t, ts, phases, rss, avail = 0.0, [], [], [], []
    for phase, duration in [("load", 0.3)] + [(f"rep{r}", e2e * 0.98) for r in range(reps)]:
        steps = max(2, int(duration / 0.01))
        for i in range(steps):
            ts.append(round(t + i * 0.01, 4))
            phases.append(phase)
            rss.append(int(peak * (0.6 + 0.4 * i / (steps - 1))) if phase != "load" else int(peak * 0.5))
            avail.append(20 * 2**30 - rss[-1])
        t += duration + 0.05
    n = len(ts)
    base = {
        "run_id": run_id, "scenario": "tiny", "case_index": 0, "case_key": case_key,
        "case_label": f"pp{prompt}+tg{gen} @ ctx{n_ctx}", "started_at": datetime(2026, 11, 28, 10, 15, tzinfo=timezone.utc),
        "model_label": "smollm2", "artifact_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "artifact_path": "/home/alice/models/SmolLM2-135M-Instruct.Q4_1.gguf", "artifact_size_bytes": 98362432,
        "artifact_sha256": SHA, "artifact_format": "gguf", "artifact_quant": "Q4_1", "artifact_arch": "llama",
        "artifact_n_params": 134515008, "artifact_n_layers": 30, "artifact_context_length": 8192,
        "runtime": "llama.cpp", "runtime_version": "0.3.36", "options_json": '{"n_threads": 2}', "device": "cpu",
        "n_layers_total": 30, "n_layers_device": 0, "n_ctx": n_ctx, "n_ctx_runtime": n_ctx, "fill": 0.5,
        "prompt_tokens": prompt, "warmup": 1, "peak_rss_bytes": max(rss), "vmhwm_bytes": max(rss),
        "sys_available_min_bytes": min(avail), "sampler_interval_ms": 10.0, "sampler_samples": n,
        "budget_bytes": 24 * 2**30, "ram_bytes": 24 * 2**30, "budget_method": "none",
        "fit_class": "fits", "fit_reason": "resident, error in /home/alice/x.log", "machine_id": machine_id,
        "machine_class": machine_class, "cpu_model": "Intel(R) Xeon(R) Processor", "os": "Linux 6.18.44-fc-v669",
        "fitbench_version": "0.1.0",
    }
    rows = []
    for r in range(reps):
        rep_peak = max(v for v, p in zip(rss, phases) if p == f"rep{r}")
        rows.append({**base, "repetition": r, "status": "ok", "gen_tokens": gen, "ttft_s": ttft,
                     "prefill_tok_s": prompt / ttft, "decode_tok_s": decode, "e2e_s": e2e,
                     "rep_peak_rss_bytes": rep_peak, **overrides})
    timeline = {"run_id": [run_id] * n, "case_key": [case_key] * n, "case_index": [0] * n, "t_s": ts,
                "phase": phases, "rss_bytes": rss, "sys_available_bytes": avail}
    writer = ResultWriter(folder / f"tiny-{run_id}.parquet")
    writer.add_case(rows, timeline)
    return writer.results_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """Real uvicorn serving the app on a loopback port, in a thread; stop() shuts it down cleanly."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=1000, backlog=2048,
                                                    proxy_headers=False))  # as `upstream serve` runs it
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


# --- rows from the real producer (harness.rows) over synthetic worker events and samples --------------------

ARTIFACT_SIZE = 98362432


def sample_case(workflow=None, n_ctx: int = 512, reps: int = 2, quality: bool = False):
    """A case of the sample model as a scenario would make it (a workflow case when ``workflow`` is given)."""
    from harness.scenario import Case

    prompt = workflow.context_before_reply()[-1] if workflow else n_ctx // 2
    return Case(index=0, scenario="tiny", model_label="smollm2", artifact=Path("SmolLM2-135M-Instruct.Q4_1.gguf"),
                runtime="llama.cpp", options={}, n_ctx=n_ctx, prompt_tokens=prompt, gen_tokens=8, fill=0.5,
                warmup=0, repetitions=reps, timeout=60.0, sampler_interval_ms=10.0, workflow=workflow)


def sample_machine(machine_id: str = "d6657c6bd240a6e3", machine_class: str = "cpu-x86_64-24GiB"):
    from harness.measure.machine import Machine

    return Machine(machine_id=machine_id, machine_class=machine_class, cpu_model="Intel(R) Xeon(R) Processor",
                   cpu_arch="x86_64", cpu_flags=["avx2"], cpu_cores=2, cpu_threads=2, ram_bytes=24 * 2**30,
                   os="Linux 6.18.44", python_version="3.11.9", fitbench_version="0.1.0")


def produce(case, machine, run_id: str, *, decode: float = 80.0, prefill: float = 4000.0, peak: int = 190 * MiB,
            quality_peak: int | None = None, t_spawn: float = 1000.0) -> tuple[list[dict], dict[str, list]]:
    """Rows and timeline columns of one case, made by harness.rows from the messages a worker would send
    (Started, Loaded, Rep* or (Turn+, Rep)*, [QualityStart, Quality], Done) and 10 ms samples over them.
    ``quality_peak``: a quality probe runs after the repetitions and peaks there."""
    from harness import protocol as p
    from harness.artifact import ArtifactInfo
    from harness.measure.sampler import Timeline
    from harness.rows import base_row, case_rows, judge_rows, timeline_columns

    art = ArtifactInfo(path=Path("/home/alice/models") / case.artifact.name, format="gguf", size_bytes=ARTIFACT_SIZE,
                       architecture="llama", quant="Q4_1", n_params=134515008, n_layers=30, context_length=8192)
    ev = p.CaseEvents()
    t = t_spawn + 0.05
    ev.add(p.Started(pid=4242, baseline_rss=20 * MiB, t=t))
    ev.add(p.Loaded(load_s=0.3, t0=t + 0.01, t1=t + 0.31, prompt_tokens=case.prompt_tokens, rss_after_load=peak // 2,
                    info={"runtime_version": "0.3.36", "device": "cpu", "n_layers_total": 30, "n_layers_device": 0,
                          "n_ctx": case.n_ctx, "n_threads": 2}))
    t += 0.35
    timed: list[tuple[float, float]] = []  # windows whose samples reach the peak

    def reply(t_start: float, tokens: int) -> list[float]:
        first = t_start + max(tokens / prefill, 0.005)
        return [first + k / decode for k in range(case.gen_tokens)]

    for r in range(case.repetitions):
        if case.workflow is None:
            stamps = reply(t, case.prompt_tokens)
            ev.add(p.Rep(repetition=r, t_start=t, stamps=stamps))
            timed.append((t, stamps[-1]))
            t = stamps[-1] + 0.03
            continue
        wf, start = case.workflow, t
        for i, (new, context) in enumerate(zip(wf.new_tokens(), wf.context_before_reply())):
            processed = new if wf.reuse_cache or i == 0 else context
            stamps = reply(t, processed)
            ev.add(p.Turn(repetition=r, turn=i + 1, t_start=t, stamps=stamps, new_tokens=new,
                          processed_tokens=processed, context_tokens=context, kv_reuse=wf.reuse_cache and i > 0))
            timed.append((t, stamps[-1]))
            t = stamps[-1] + 0.02
        ev.add(p.Rep(repetition=r, t_start=start, stamps=[t - 0.02], session=True))
        t += 0.01
    if quality_peak is not None:
        ev.add(p.QualityStart(t=t))
        ev.add(p.Quality(t=t + 0.4, columns={"quality_ppl": 14.2, "quality_nll_mean": 2.653, "quality_s": 0.4}))
        timed.append((t, t + 0.4))
        t += 0.4
    ev.add(p.Done(memory={}))
    tl = Timeline(interval_s=0.01)
    q0 = ev.quality_start.t if ev.quality_start else float("inf")
    k = 0
    while t_spawn + k * 0.01 <= t + 0.05:
        ts = t_spawn + k * 0.01
        inside = any(a <= ts <= b for a, b in timed)
        top = quality_peak if ts >= q0 else peak
        rss = int(top * (0.7 + 0.3 * (k % 7) / 6)) if inside else int(peak * 0.5)
        tl.append({"t": ts, "rss": rss, "sys_available": 20 * 2**30 - rss, "read_bytes": 0, "majflt": 3,
                   "minflt": 100 + k, "cpu_s": 0.01 * k})
        k += 1
    tl.vmhwm = max(tl.samples["rss"])  # the kernel's high-water mark covers the whole process, probe included
    base = base_row(case, machine, run_id, started_at=datetime(2026, 11, 28, 10, 15, tzinfo=timezone.utc),
                    artifact=art, sha256=SHA)
    rows = case_rows(case, base, ev, tl, "ok", None, 0, t - t_spawn, t_spawn)
    judge_rows(rows, case, machine, "none")
    return rows, timeline_columns(case, ev, tl, run_id, t_spawn, machine.machine_id)


def write_produced(path: Path, cases: list[tuple[list[dict], dict[str, list]]]) -> Path:
    """A results file (and its timeline) holding the produced cases, as ResultWriter writes them."""
    writer = ResultWriter(path)
    for rows, timeline in cases:
        writer.add_case(rows, timeline)
    return writer.results_path


@contextlib.contextmanager
def upstream_subprocess(db: Path):
    """`fitbench upstream serve` as a user starts it, in its own process on a free loopback port; yields its URL."""
    from tests.conftest import ROOT

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "upstream", "serve", "--db", str(db),
                             "--port", str(port), "--open", "--no-quarantine"],  # self-service tokens, active at once
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
