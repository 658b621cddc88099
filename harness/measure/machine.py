"""Machine fingerprint: what a result was measured on, without saying who measured it.

The machine id is a salted hash of the OS machine-id (or, where there is
none, of hardware facts), never of the hostname or user. The machine class
is deliberately coarse (``cpu-x86_64-24GiB``, ``nvidia-h200-141GiB``,
``apple-m3-16GiB``) so results from like machines group together.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

# Instruction-set extensions that decide which kernels a runtime can use.
INTERESTING_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve", "sve2", "dotprod", "i8mm",
)
RUNTIME_DISTS = ("llama-cpp-python", "mlx", "mlx-lm", "onnxruntime", "onnxruntime-genai", "torch", "transformers")


@dataclass
class GPU:
    name: str
    memory_bytes: int
    driver: str | None = None


@dataclass
class Machine:
    machine_id: str
    machine_class: str
    cpu_model: str
    cpu_arch: str
    cpu_flags: list[str]
    cpu_cores: int
    cpu_threads: int
    ram_bytes: int
    os: str
    python_version: str
    fitbench_version: str
    runtime_versions: dict[str, str] = field(default_factory=dict)
    gpus: list[GPU] = field(default_factory=list)
    # memory read bandwidth (harness.measure.bandwidth), filled in by the first case that needs it
    mem_bandwidth_gbs: float | None = None
    mem_bandwidth_source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Hardware", "Model") and value.strip():
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string") or model
        if platform.machine() == "arm64":
            flags.update({"neon", "asimd", "dotprod"})
    if "asimddp" in flags:  # Linux on Arm names the dot product instructions so
        flags.add("dotprod")
    return model, [f for f in INTERESTING_FLAGS if f in flags]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags among INTERESTING_FLAGS (read once: the estimate asks per candidate)."""
    return frozenset(_cpu_info()[1])


def _sysctl(name: str) -> str | None:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _gpus() -> list[GPU]:
    """NVIDIA GPUs through NVML when nvidia-ml-py is installed; nothing otherwise."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            found.append(GPU(name, int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), driver))
        return found
    finally:
        pynvml.nvmlShutdown()


def _runtime_versions() -> dict[str, str]:
    versions = {}
    for dist in RUNTIME_DISTS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _machine_id() -> str:
    seed = ""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            seed = Path(candidate).read_text().strip()
            break
        except OSError:
            continue
    if not seed and sys.platform == "darwin":
        out = subprocess.run(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"], capture_output=True, text=True).stdout
        match = re.search(r'"IOPlatformUUID" = "([^"]+)"', out)
        seed = match.group(1) if match else ""
    if not seed:  # never the CPU, RAM or arch: a row carries them, so anyone could recompute the id
        seed = _install_seed()
    return hashlib.sha256(f"fitbench-machine-v1|{seed}".encode()).hexdigest()[:16]


def _install_seed() -> str:
    """A random seed made once for this install (no OS machine id, e.g. a container); a process-random one
    where the config folder is read-only, so the id is at worst unstable, never derivable from a row."""
    import secrets

    from harness.userconfig import ConfigError, install_secret

    try:
        return install_secret("machine-seed")
    except ConfigError:
        return secrets.token_hex(32)


def gib(n_bytes: int) -> int:
    return max(1, round(n_bytes / 2**30))


def machine_class(cpu_model: str, arch: str, ram_bytes: int, gpus: list[GPU]) -> str:
    if gpus:
        gpu = gpus[0]
        words = [w for w in re.split(r"[\s-]+", gpu.name.lower()) if w not in ("nvidia", "geforce", "tesla", "")]
        short = words[0] if words else "gpu"
        if short in ("rtx", "gtx", "quadro", "titan") and len(words) > 1:
            short += words[1]  # "RTX 4090" -> rtx4090
        count = f"{len(gpus)}x" if len(gpus) > 1 else ""
        return f"nvidia-{count}{short}-{gib(gpu.memory_bytes)}GiB"
    match = re.search(r"Apple (M\d+(?: (?:Pro|Max|Ultra))?)", cpu_model)
    if match:
        return f"apple-{match.group(1).lower().replace(' ', '')}-{gib(ram_bytes)}GiB"
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch.lower())
    return f"cpu-{arch}-{gib(ram_bytes)}GiB"


def fingerprint() -> Machine:
    cpu_model, flags = _cpu_info()
    ram = psutil.virtual_memory().total
    gpus = _gpus()
    arch = platform.machine()
    try:
        fitbench_version = importlib.metadata.version("fitbench")
    except importlib.metadata.PackageNotFoundError:
        fitbench_version = "0+source"
    return Machine(
        machine_id=_machine_id(),
        machine_class=machine_class(cpu_model, arch, ram, gpus),
        cpu_model=cpu_model,
        cpu_arch=arch,
        cpu_flags=flags,
        cpu_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        cpu_threads=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_bytes=ram,
        os=f"{platform.system()} {platform.release()}",
        python_version=platform.python_version(),
        fitbench_version=fitbench_version,
        runtime_versions=_runtime_versions(),
        gpus=gpus,
    )
