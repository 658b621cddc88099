"""Small random-weight models of several architectures, built on the spot (no download).

Each is a Hugging Face folder: a config for the architecture, seeded random weights in bfloat16 and
the sample model's tokenizer (SmolLM2, copied from ``models/``). Big enough that their KV caches and
weights are tens of MiB, small enough for a shared 2-core box. Optionally converted to GGUF with
llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist, see ``find_converter``).

Run as a script to build in a child process (keeps torch out of the caller):
``python tests/tiny_models.py OUT_DIR NAME[+gguf] ...`` (``+gguf``: convert that one to GGUF too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_HF = ROOT / "models" / "SmolLM2-135M-Instruct-hf"
SAMPLE_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
SEED = 1234

COMMON = {"vocab_size": 49152, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 12,
          "num_attention_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

# name -> (transformers config and model classes, config overrides). Every one differs from the llama
# sample in what the estimator models: sliding-window layers, head_dim != hidden/heads, KV heads,
# tying, experts. (Gemma 3, not Gemma 2: llama.cpp's Gemma 2 converter wants a sentencepiece tokenizer.)
SPECS: dict[str, tuple[str, str, dict]] = {
    # Gemma 3: five of every six layers slide over 256 tokens; head_dim 128 (not 512/8); 8 KV heads; tied
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"num_key_value_heads": 8, "head_dim": 128, "sliding_window": 256, "sliding_window_pattern": 6,
                "tie_word_embeddings": True, "query_pre_attn_scalar": 128}),
    # Qwen2 with use_sliding_window: layers from max_window_layers on slide; untied; GQA 4 KV heads
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 4, "use_sliding_window": True,
                        "sliding_window": 256, "max_window_layers": 6, "tie_word_embeddings": False}),
    # Mistral: every layer slides over 512 tokens; 2 KV heads (GQA 4:1), untied
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "head_dim": 64, "sliding_window": 512,
                            "tie_word_embeddings": False}),
    # Mixtral: 4 experts (2 per token), all resident; full attention; 2 KV heads
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_key_value_heads": 2, "num_local_experts": 4,
                            "num_experts_per_tok": 2, "num_hidden_layers": 6, "sliding_window": None,
                            "tie_word_embeddings": False}),
}


def build(out_dir: Path, name: str) -> Path:
    """Build one model folder (seeded); returns it. Reuses a finished folder."""
    import torch
    import transformers

    folder = out_dir / f"tiny-{name}-hf"
    if (folder / "model.safetensors").is_file():
        return folder
    config_name, model_name, overrides = SPECS[name]
    config = getattr(transformers, config_name)(**{**COMMON, **overrides})
    model_cls = getattr(transformers, model_name)
    config.torch_dtype = torch.bfloat16
    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.bfloat16)
    with torch.no_grad():  # small weights: activations stay finite whatever the random draw
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    tmp = folder.with_suffix(".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if (SAMPLE_HF / "tokenizer.json").is_file():
        for f in TOKENIZER_FILES:
            if (SAMPLE_HF / f).is_file():
                shutil.copy(SAMPLE_HF / f, tmp / f)
    else:  # only the sample GGUF so far: its tokenizer, through transformers' GGUF reader
        transformers.AutoTokenizer.from_pretrained(str(SAMPLE_GGUF.parent), gguf_file=SAMPLE_GGUF.name).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def find_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py, extracted from the installed llama-cpp-python's sdist
    (FITBENCH_LLAMA_CONVERT, else .cache/llama.cpp or /tmp/llama-cpp-src)."""
    candidates = [os.environ.get("FITBENCH_LLAMA_CONVERT", ""), ROOT / ".cache/llama.cpp/convert_hf_to_gguf.py",
                  *sorted(Path("/tmp/llama-cpp-src").glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def to_gguf(folder: Path, converter: Path) -> Path:
    out = folder.with_name(folder.name.removesuffix("-hf") + ".f16.gguf")
    if not out.is_file():  # the converter uses its own gguf-py (next to it), which matches it
        subprocess.run([sys.executable, str(converter), str(folder), "--outtype", "f16", "--outfile",
                        str(out) + ".part"], check=True, capture_output=True, text=True)
        Path(str(out) + ".part").rename(out)
    return out


def build_in_child(out_dir: Path, names: list[str], gguf: bool | list[str] = False,
                   timeout: float = 600) -> dict[str, Path]:
    """Build (and convert to GGUF: all with ``gguf=True``, or the names listed) in a child interpreter;
    returns name -> folder and name.gguf -> file for what was made. torch stays out of the caller."""
    wanted = set(names if gguf is True else gguf or [])
    cmd = [sys.executable, str(Path(__file__)), str(out_dir), *(n + ("+gguf" if n in wanted else "") for n in names)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    made = {}
    for line in done.stdout.split():
        path = Path(line)
        name = path.name.removeprefix("tiny-").removesuffix("-hf").removesuffix(".f16.gguf")
        made[name + (".gguf" if path.suffix == ".gguf" else "")] = path
    return made


def measure_peaks(artifact: Path, runtime: str, contexts: list[int], options: dict | None = None,
                  fill: float = 0.5, gen_tokens: int = 4, out_dir: Path | None = None,
                  run: bool = True) -> list[dict]:
    """Run ``artifact`` in ``runtime`` at each context (``fill`` of it prompted) through fitbench's own
    case machinery (a worker process per case, the sampler, result rows) and return, per context,
    the measured peak RSS next to the estimate for the same case. Result files stay in ``out_dir``;
    a context already measured there (same artifact, runtime, options, prompt) is not run again, so
    a changed estimator is re-checked against the same measurements for free (``run=False``: only that)."""
    import hashlib
    import json
    import tempfile
    import uuid

    import pyarrow.parquet as pq

    from harness.estimate import estimate_case
    from harness.measure.machine import fingerprint
    from harness.preflight import check_scenario
    from harness.results import ResultWriter
    from harness.scenario import parse_scenario
    from harness.suite import run_suite

    options = options or {}
    s = parse_scenario({"name": "estimate-check", "models": [{"artifact": str(artifact), "runtime": runtime,
                                                               "label": artifact.name, "options": options}],
                        "contexts": contexts, "fill": fill, "gen_tokens": gen_tokens, "warmup": 0,
                        "repetitions": 1, "timeout": 1200, "sampler_interval_ms": 5})
    artifacts = check_scenario(s)
    out = Path(out_dir or tempfile.mkdtemp(prefix="fitbench-estimate-"))
    stem = f"{artifact.name}-{runtime}-{hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]}"
    done: dict[str, dict] = {}
    for f in sorted(out.glob(f"{stem}-*.parquet")):
        if not f.name.endswith(".timeline.parquet"):
            for row in pq.read_table(f).to_pylist():
                if row.get("status") == "ok" and row.get("peak_rss_bytes"):
                    done[row["case_key"]] = row
    todo = [c for c in s.cases() if c.key not in done]
    if todo and run:
        writer = ResultWriter(out / f"{stem}-{uuid.uuid4().hex[:6]}.parquet")
        for result in run_suite(todo, artifacts, fingerprint(), writer, "estimate-check", force=True):
            done[result.case.key] = result.rows[-1]
    rows = []
    for case in s.cases():
        row = done.get(case.key, {})
        e = estimate_case(case, artifacts[case.artifact])
        # the sampled peak or the kernel's VmHWM, whichever is higher (the grid is sparse while timed);
        # a timeout's peak is partial
        peaks = [row.get("peak_rss_bytes"), row.get("vmhwm_bytes")]
        peak = max((p for p in peaks if p), default=None) if row.get("status") == "ok" else None
        rows.append({"artifact": artifact.name, "runtime": runtime, "n_ctx": case.n_ctx,
                     "prompt_tokens": case.prompt_tokens, "status": row.get("status"), "error_text": row.get("error"),
                     "measured_peak_bytes": peak, "vmhwm_bytes": row.get("vmhwm_bytes"), "estimate": e.to_dict(),
                     "error": (e.total_bytes - peak) / peak if peak else None})
    return rows


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    converter = find_converter()
    for arg in sys.argv[2:]:  # NAME, or NAME+gguf to convert it too
        n, _, convert = arg.partition("+")
        f = build(out, n)
        print(f)
        if convert and converter is not None:
            try:
                print(to_gguf(f, converter))
            except subprocess.CalledProcessError as exc:
                print(f"gguf conversion of {n} failed: {exc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
