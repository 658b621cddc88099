"""The ready-to-run answer for a pick: the command (or config) that serves it with the measured settings.

- GGUF: ``llama-server`` when it is on PATH, else llama-cpp-python's own OpenAI-compatible server
  (``python -m llama_cpp.server``, the ``serve`` extra); and an Ollama Modelfile.
- MLX: ``mlx_lm.server``.
- ONNX: the ``genai_config.json`` settings for onnxruntime-genai (it has no server of its own).
- Hugging Face folders (torch): ``transformers serve`` where the installed transformers has it.

Runner options that were part of the measured case (KV types, flash attention, batch sizes,
GPU layers, threads, mmap) become the server's flags, so it runs as it was measured.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# llama.cpp's ggml_type numbers: llama_cpp.server takes --type_k/--type_v as these
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
LLAMA_SERVER_FLAGS = {"n_gpu_layers": "-ngl", "n_threads": "-t", "n_batch": "-b", "n_ubatch": "-ub",
                      "type_k": "-ctk", "type_v": "-ctv"}
PY_SERVER_FLAGS = {"n_gpu_layers": "--n_gpu_layers", "n_threads": "--n_threads", "n_batch": "--n_batch",
                   "n_ubatch": "--n_ubatch"}


@dataclass
class ServeAnswer:
    kind: str  # llama-server | llama_cpp.server | ollama | mlx_lm.server | onnxruntime-genai | transformers serve
    argv: list[str] = field(default_factory=list)  # empty when the answer is a file only
    files: dict[str, str] = field(default_factory=dict)  # file name -> content to write next to the command
    note: str = ""

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "command": self.command or None, "files": self.files, "note": self.note}


def serve_answers(path: Path, runtime: str, options: dict[str, Any], n_ctx: int, host: str = "127.0.0.1",
                  port: int = 8080, which=shutil.which, python: str | None = None) -> list[ServeAnswer]:
    python = python or sys.executable
    path = path.resolve()
    if runtime == "llama.cpp":
        return [_llama(path, options, n_ctx, host, port, which, python), _ollama(path, options, n_ctx)]
    if runtime == "mlx":
        return [ServeAnswer("mlx_lm.server", ["mlx_lm.server", "--model", str(path), "--host", host, "--port",
                                              str(port)],
                            note=f"measured at context {n_ctx:,}; mlx_lm.server grows its KV cache as prompts need")]
    if runtime == "onnxruntime":
        provider = str(options.get("provider") or "cpu")
        patch = {"search": {"max_length": n_ctx}}
        return [ServeAnswer("onnxruntime-genai", files={"genai_config.json (merge)": json.dumps(patch, indent=2)},
                            note=f"set search.max_length to {n_ctx:,} in {path / 'genai_config.json'} "
                                 f"(provider {provider}); onnxruntime-genai is a library, load it with "
                                 f"og.Model({str(path)!r})")]
    if runtime == "torch":
        argv = ["transformers", "serve", "--host", host, "--port", str(port)]
        return [ServeAnswer("transformers serve", argv,
                            note=f"then ask for model {str(path)!r} (transformers loads it on the first request); "
                                 f"dtype {options.get('dtype', 'auto')}, measured at context {n_ctx:,}")]
    return []


def _llama(path: Path, options: dict, n_ctx: int, host: str, port: int, which, python: str) -> ServeAnswer:
    if which("llama-server"):
        argv = ["llama-server", "-m", str(path), "-c", str(n_ctx), "--host", host, "--port", str(port)]
        for key, flag in LLAMA_SERVER_FLAGS.items():
            if options.get(key) is not None:
                argv += [flag, str(options[key])]
        if options.get("flash_attn"):
            argv += ["-fa", "on"]
        if options.get("use_mmap") is False:
            argv.append("--no-mmap")
        if options.get("use_mlock"):
            argv.append("--mlock")
        return ServeAnswer("llama-server", argv)
    argv = [python, "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", str(n_ctx), "--host", host,
            "--port", str(port)]
    for key, flag in PY_SERVER_FLAGS.items():
        if options.get(key) is not None:
            argv += [flag, str(options[key])]
    for key in ("type_k", "type_v"):
        if options.get(key) is not None and options[key] in GGML_TYPES:
            argv += [f"--{key}", str(GGML_TYPES[options[key]])]
    if options.get("flash_attn"):
        argv += ["--flash_attn", "true"]
    if options.get("use_mmap") is False:
        argv += ["--use_mmap", "false"]
    if options.get("use_mlock"):
        argv += ["--use_mlock", "true"]
    return ServeAnswer("llama_cpp.server", argv,
                       note="llama-server is not installed: llama-cpp-python's OpenAI-compatible server "
                            "(pip install 'fitbench[serve]')")


def _ollama(path: Path, options: dict, n_ctx: int) -> ServeAnswer:
    lines = [f"FROM {path}", f"PARAMETER num_ctx {n_ctx}"]
    if options.get("n_gpu_layers") is not None:
        lines.append(f"PARAMETER num_gpu {options['n_gpu_layers']}")
    if options.get("n_threads") is not None:
        lines.append(f"PARAMETER num_thread {options['n_threads']}")
    name = path.stem.lower().replace(".", "-").replace("_", "-")
    return ServeAnswer("ollama", ["ollama", "create", name, "-f", "Modelfile"],
                       files={"Modelfile": "\n".join(lines) + "\n"}, note=f"then: ollama run {name}")
