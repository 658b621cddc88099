"""Helpers for the upstream tests: a plausible crafted results file, and uvicorn on a free port in a thread."""

from __future__ import annotations

import socket
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
                                                    limit_concurrency=1000, backlog=2048))
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
