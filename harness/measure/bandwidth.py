"""The machine's memory bandwidth: the roofline a decode step is held to.

Decoding one token reads every weight and the KV cache once, so a machine
with B bytes/s of memory bandwidth decodes at most B / (bytes per token)
tokens per second. B is measured once per machine: a streaming read of a
buffer several times the last-level cache, by one numpy thread and by one
per logical CPU, whichever is faster (numpy's reductions release the GIL; a
column-wise max over 16 KiB rows,
which runs at memory speed where a flat sum is bound by the ALU: 9.5 vs 2.1
GB/s on one core of the project's VM), best of a few passes. It runs in a
short-lived subprocess so the measuring parent never imports numpy or holds
the buffer, and the figure is cached per machine id in the cache folder
(``$FITBENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/fitbench``, else
``~/.cache/fitbench``). ``FITBENCH_BANDWIDTH=0`` turns the measurement off
(the roofline columns stay null).

A GPU's figure comes from NVML (memory clock x bus width: the spec bound),
never measured, never required.

``python -m harness.measure.bandwidth [--copy]`` prints the measurement as
JSON; ``--copy`` adds an outside figure, a single-threaded numpy copy of the
same size (read + write bytes per second), for comparison; ``--refresh``
measures again and replaces this machine's cached figure. A figure cached on
a busy machine (load average above half the CPUs) is measured again once the
load has halved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CACHE_VERSION = 1
MIN_BUFFER = 256 << 20  # at least this much, and at least 4x the last-level cache
PASSES = 5
TIMEOUT_S = 120
ENV_SWITCH = "FITBENCH_BANDWIDTH"

# The measurement itself, run as ``python -c`` so the parent stays free of numpy.
_SCRIPT = r"""
import json, sys, threading, time
import numpy as np
size, threads, passes, copy = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
ROW = 4096  # int32s: a reduction over rows is one SIMD max per vector, so memory, not the ALU, is the limit
a = np.ones(size // 4 // ROW * ROW, dtype=np.int32).reshape(-1, ROW)  # written: every page resident
def read(c):
    c.max(axis=0)  # streams its rows; releases the GIL (a flat .sum() is ALU-bound at a fraction of this)
best, used = float("inf"), 1
for n in sorted({1, threads}):  # one thread can beat several on a busy or single-channel machine
    chunks = np.array_split(a, n)
    for _ in range(passes):
        workers = [threading.Thread(target=read, args=(c,)) for c in chunks]
        t = time.perf_counter()
        for w in workers: w.start()
        for w in workers: w.join()
        took = time.perf_counter() - t
        if took < best:
            best, used = took, n
out = {"read_bytes_s": a.nbytes / best, "buffer_bytes": a.nbytes, "threads": used, "passes": passes}
if copy:
    b = np.empty_like(a)
    np.copyto(b, a)
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    out["copy_bytes_s"] = 2 * a.nbytes / best  # read + write
print(json.dumps(out))
"""


def cache_dir() -> Path:
    if os.environ.get("FITBENCH_CACHE_DIR"):
        return Path(os.environ["FITBENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fitbench"


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The largest cache of CPU 0 (sysfs ``index*/size``, e.g. '32768K')."""
    sizes = []
    for index in Path(root).glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if not text[-1:].isdigit() else text
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def buffer_bytes(available: int | None = None) -> int:
    llc = last_level_cache_bytes() or 0
    size = max(MIN_BUFFER, 4 * llc)
    if available:
        size = min(size, max(available // 8, 16 << 20))  # never a burden on a small machine
    return size


def measure(copy: bool = False, size: int | None = None, threads: int | None = None,
            passes: int = PASSES) -> dict:
    """Run the streaming read (and the copy) in a subprocess; raises RuntimeError when it cannot."""
    import psutil

    size = size or buffer_bytes(psutil.virtual_memory().available)
    threads = threads or os.cpu_count() or 1
    try:
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(size), str(threads), str(passes), "1" if copy else "0"],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"bandwidth probe failed: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RuntimeError(f"bandwidth probe failed: {tail}")
    out = json.loads(done.stdout)
    out["source"] = f"numpy-read-{out['threads']}threads-{out['buffer_bytes'] >> 20}MiB"
    return out


def machine_bandwidth(machine_id: str, refresh: bool = False) -> dict | None:
    """The machine's read bandwidth ({read_bytes_s, source, ...}): cached per machine id, measured
    on the first call; None when switched off or when the probe fails (the reason is cached too,
    so a machine without numpy does not retry every case)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    path = cache_dir() / f"bandwidth-{machine_id}.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == CACHE_VERSION and not _busier_then(cached):
                return cached if cached.get("read_bytes_s") else None
        except (OSError, ValueError):
            pass
    try:
        found = {**measure(), "version": CACHE_VERSION, "load_avg": _load()}
    except (RuntimeError, ValueError) as exc:
        found = {"version": CACHE_VERSION, "error": str(exc)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-measure next run
    return found if found.get("read_bytes_s") else None


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _busier_then(cached: dict) -> bool:
    """A figure taken on a busy machine (load above half the CPUs) is measured again once the
    machine is at most half as loaded: the cache keeps the machine's figure, not one moment's."""
    then, now, cpus = cached.get("load_avg"), _load(), os.cpu_count() or 1
    return then is not None and now is not None and then > cpus / 2 and now < then / 2


def gpu_bandwidth() -> dict | None:
    """NVML's memory bandwidth of GPU 0 (memory clock x 2 (DDR) x bus width): the spec bound."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        return {"read_bytes_s": clock_mhz * 1e6 * 2 * bus_bits / 8, "source": "nvml-spec"}
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def main() -> None:
    """``--copy``: add the numpy copy figure; ``--refresh``: measure again and replace this machine's cached figure."""
    copy = "--copy" in sys.argv[1:]
    if "--refresh" in sys.argv[1:]:
        from harness.measure.machine import fingerprint

        out = machine_bandwidth(fingerprint().machine_id, refresh=True) or {}
        if copy:  # the outside figure beside the cached one, measured right after it
            out = {**out, "copy": measure(copy=True)}
        print(json.dumps(out, indent=2))
        return
    print(json.dumps({**measure(copy=copy), "load_avg": _load()}, indent=2))


if __name__ == "__main__":
    main()
