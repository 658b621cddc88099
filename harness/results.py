"""The result schema, defined once, and atomic Parquet writing and reading.

Two files per run:
- ``<name>.parquet``: one row per case repetition (or one row for a case that
  failed before any repetition finished). Columns below.
- ``<name>.timeline.parquet``: the raw sampler samples of every case, keyed
  by ``run_id`` and ``case_key``, so figures can be recomputed later.

Rules: ``schema_version`` is in every row and in the file metadata; the
schema only grows by adding nullable columns (bump the minor version);
renaming or retyping a column is a major version. Files are written to a
temporary file in the same folder, fsynced and renamed over the target, so
a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from harness.errors import FitbenchError

SCHEMA_VERSION = "1.4"  # 1.1: budget and fit columns; 1.2: runtime allocator, GPU, quality, workflow, fleet columns;
# 1.3: load_peak_rss_bytes, budget_requested_bytes, budget_note, budget_peak_bytes, machine_id in the timeline;
# 1.4: drift, noise record, confidence interval, roofline columns; frequency/temperature/steal in the timeline
#      and parallel sessions (parallel, ttft_p50/p90, user/aggregate decode, kv_session_bytes, serving verdict)
#      and KV cache and attention kernel (kv_type_k, kv_type_v, attn_impl, flash_attn)
METADATA_KEY = b"fitbench.schema_version"

STATUSES = ("ok", "load_error", "runtime_error", "oom", "killed", "crashed", "timeout", "stopped", "unavailable",
            "interrupted", "skipped", "lost")  # lost: a fleet node died with the case and no retry was left


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str


def _cols(*specs: tuple[str, pa.DataType, str]) -> list[Column]:
    return [Column(*s) for s in specs]


S, I, F, B, T = pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.timestamp("us", tz="UTC")  # noqa: E741

RESULT_COLUMNS: list[Column] = _cols(
    # identity
    ("schema_version", S, "result schema version, MAJOR.MINOR"),
    ("run_id", S, "id of the fitbench run that wrote the row"),
    ("scenario", S, "scenario name"),
    ("case_index", I, "position of the case in the expanded scenario"),
    ("case_key", S, "stable hash of what is measured: artifact, runtime, options, n_ctx, prompt and gen tokens"),
    ("case_label", S, "llama-bench style label, e.g. pp1024+tg32 @ ctx2048"),
    ("repetition", I, "0-based repetition; null when the case failed before any repetition"),
    ("status", S, " | ".join(STATUSES)),
    ("error", S, "what went wrong, one line; null when ok"),
    ("started_at", T, "when the case started (UTC)"),
    # artifact
    ("model_label", S, "label of the model in the scenario"),
    ("artifact_name", S, "file name of the artifact"),
    ("artifact_path", S, "path of the artifact on the measuring machine"),
    ("artifact_size_bytes", I, "size of the artifact file"),
    ("artifact_sha256", S, "sha256 of the artifact file"),
    ("artifact_format", S, "gguf | onnx | mlx | hf"),
    ("artifact_quant", S, "quantization type, e.g. Q4_1"),
    ("artifact_arch", S, "architecture, e.g. llama"),
    ("artifact_n_params", I, "parameter count"),
    ("artifact_n_layers", I, "transformer blocks"),
    ("artifact_n_kv_heads", I, "KV heads (GQA)"),
    ("artifact_n_heads", I, "attention heads (schema 1.1)"),
    ("artifact_head_dim", I, "dimension of one attention head (schema 1.1)"),
    ("artifact_context_length", I, "context length the model was trained for"),
    # runtime
    ("runtime", S, "runner name, e.g. llama.cpp"),
    ("runtime_version", S, "version of the runtime package"),
    ("options_json", S, "runner options as resolved (defaults filled in), JSON"),
    ("device", S, "where the weights ran: cpu, gpu, ..."),
    ("n_layers_total", I, "layers in the model as the runtime counts them"),
    ("n_layers_device", I, "layers placed on the accelerator"),
    ("kv_type", S, "KV cache element types, K/V"),
    ("kv_type_k", S, "K cache element type in llama.cpp's names (f32, f16, bf16, q8_0, q4_0, ...; MLX group "
                     "quantization: q8, q4): asked for by the options, as reported by the runtime once loaded "
                     "(schema 1.4)"),
    ("kv_type_v", S, "V cache element type, as kv_type_k (schema 1.4)"),
    ("attn_impl", S, "attention kernel: llama.cpp flash | standard; torch attn_implementation (sdpa, eager, ...); "
                     "MLX sdpa | quantized_sdpa; ONNX the graph's operator, e.g. GroupQueryAttention (schema 1.4)"),
    ("flash_attn", B, "a fused attention kernel that never materialises the scores (llama.cpp flash_attn; "
                      "torch anything but eager; MLX sdpa) (schema 1.4)"),
    ("n_threads", I, "CPU threads the runtime used"),
    # case
    ("n_ctx", I, "configured context requested by the scenario"),
    ("n_ctx_runtime", I, "context the runtime actually allocated"),
    ("n_ctx_meaning", S, "how this runtime interprets configured context"),
    ("fill", F, "fraction of n_ctx the prompt was asked to fill; null for explicit prompt lengths"),
    ("prompt_tokens", I, "tokens in the prompt (the filled context when generation starts)"),
    ("gen_tokens", I, "tokens generated in this repetition"),
    ("warmup", I, "unrecorded warm-up generations before the first repetition"),
    # timings (seconds, tokens per second)
    ("load_s", F, "artifact load time"),
    ("ttft_s", F, "prompt handed to runtime -> first generated token, prefill included"),
    ("prefill_tok_s", F, "prompt_tokens / ttft_s"),
    ("decode_tok_s", F, "(gen_tokens - 1) / time from first to last generated token"),
    ("itl_p50_s", F, "inter-token latency, median"),
    ("itl_p90_s", F, "inter-token latency, 90th percentile"),
    ("itl_p99_s", F, "inter-token latency, 99th percentile"),
    ("e2e_s", F, "prompt handed to runtime -> last generated token"),
    ("case_wall_s", F, "wall time of the whole case: spawn, import, load, warm-up, repetitions"),
    ("spawn_s", F, "worker start: process spawn and interpreter start-up until it reports (schema 1.1)"),
    ("import_s", F, "runtime import and runner set-up before the load starts (schema 1.1)"),
    # memory (bytes) over the whole case
    ("baseline_rss_bytes", I, "child RSS before the runtime was imported"),
    ("runtime_rss_bytes", I, "child RSS with the runtime imported, before the load: the runtime's own footprint on "
                             "this machine, which calibrates the estimate's fixed overhead (schema 1.4)"),
    ("load_rss_bytes", I, "child RSS right after load"),
    ("peak_rss_bytes", I, "highest sampled child RSS over the case"),
    ("vmhwm_bytes", I, "the kernel's peak RSS of the child (VmHWM), read just before it exits"),
    ("ru_maxrss_bytes", I, "the child's max RSS from getrusage when reaped: what /usr/bin/time -v reports (schema 1.1)"),
    ("peak_uss_bytes", I, "highest sampled unique memory of the child (sampled less often)"),
    ("rep_peak_rss_bytes", I, "highest sampled child RSS during this repetition (a workflow turn row: this turn)"),
    ("load_peak_rss_bytes", I, "highest sampled child RSS from spawn to the end of load (schema 1.3): "
                               "the verdict never judges below it"),
    ("sys_mem_total_bytes", I, "physical memory of the machine"),
    ("sys_available_min_bytes", I, "lowest system available memory seen during the case"),
    ("swap_used_max_bytes", I, "highest swap in use on the system during the case"),
    # runtime allocator and GPU memory (torch runner, NVML in the sampler); null where not measurable
    ("runtime_peak_bytes", I, "the runtime's own allocator peak since load, e.g. torch.cuda.max_memory_allocated; null on CPU"),
    ("offload_host_bytes", I, "weight bytes the runtime placed in host memory while others are on the accelerator"),
    ("offload_device_bytes", I, "weight bytes the runtime placed on the accelerator (with offload_host_bytes: a split model)"),
    ("gpu_total_bytes", I, "memory of the visible NVIDIA GPUs (NVML), summed"),
    ("gpu_used_peak_bytes", I, "highest GPU memory in use on the device(s) during the case, every process (NVML)"),
    ("gpu_proc_peak_bytes", I, "highest GPU memory of the case's own process during the case (NVML per-process)"),
    ("gpu_util_mean_pct", F, "mean GPU utilisation during the repetition, percent (NVML)"),
    ("gpu_power_mean_w", F, "mean GPU power draw during the repetition, watts (NVML)"),
    # paging / spill during this repetition
    ("major_faults", I, "major page faults of the child during the repetition"),
    ("minor_faults", I, "minor page faults of the child during the repetition"),
    ("read_bytes", I, "bytes the child read from storage during the repetition (/proc/PID/io)"),
    ("swap_in_pages", I, "system pages swapped in during the repetition"),
    ("swap_out_pages", I, "system pages swapped out during the repetition"),
    ("case_major_faults", I, "major page faults of the child over the whole case, load included"),
    ("case_read_bytes", I, "bytes the child read from storage over the whole case, load included"),
    ("cpu_util", F, "child CPU time / wall time during the repetition (1.0 = one core busy)"),
    # energy (schema 1.1): whole CPU packages (RAPL) and GPUs (NVML), so an upper bound on a busy machine
    ("energy_prefill_j", F, "joules from handing over the prompt to the first token"),
    ("energy_decode_j", F, "joules from the first to the last generated token"),
    ("energy_j_per_token", F, "energy_decode_j / (gen_tokens - 1)"),
    ("avg_power_w", F, "average power over the repetition, watts"),
    ("energy_source", S, "rapl | nvml | rapl+nvml; null when nothing could be read"),
    ("energy_note", S, "why energy is missing or partial, e.g. no powercap on this machine"),
    # budget and fit (schema 1.1)
    ("budget_bytes", I, "memory budget the case was judged against (the machine's RAM when none was set)"),
    ("budget_requested_bytes", I, "the budget the scenario or --budget asked for, enforced or not; null when none "
                                  "was asked (schema 1.3)"),
    ("budget_method", S, "how the budget was applied: cgroup-v1 | cgroup-v2 | systemd-scope (enforced) | "
                         "none (judged only)"),
    ("budget_note", S, "why a requested budget was not enforced, or how it was (schema 1.3)"),
    ("budget_peak_bytes", I, "the budget cgroup's own peak charge (memory.peak / max_usage_in_bytes), page cache "
                             "included (schema 1.3)"),
    ("fit_class", S, "fits | tight | degraded | slow | offload | spill | no_fit; null when the case gave no verdict"),
    ("fit_reason", S, "why, in words, with the numbers that decided it"),
    ("fit_memory", S, "memory component: resident | tight | over_budget | spill | no_fit"),
    ("fit_headroom", F, "(budget - peak RSS) / budget"),
    ("fit_speed", S, "speed component: interactive | slow"),
    ("fit_offload", B, "part of the model ran off the accelerator"),
    ("thresholds_json", S, "the fit thresholds used, JSON"),
    # quality probe (issue #10): once per artifact/runtime/options, after the timed repetitions
    ("quality_text_id", S, "evaluation text: stdlib-docstrings-vN-pyX.Y or file:NAME"),
    ("quality_text_sha256", S, "sha256 of the evaluation text: figures compare only when this matches"),
    ("quality_tokens_sha256", S, "sha256 of the scored token ids: equal across artifacts that share a tokenizer"),
    ("quality_window", I, "tokens per scoring window (each from an empty cache)"),
    ("quality_positions", I, "next-token predictions scored"),
    ("quality_nll_mean", F, "mean negative log-likelihood per scored token, nats"),
    ("quality_ppl", F, "perplexity over the evaluation text: exp(quality_nll_mean)"),
    ("quality_reference", S, "label of the reference artifact KL is measured from"),
    ("quality_reference_sha256", S, "sha256 of the reference artifact"),
    ("quality_reference_ppl", F, "the reference's perplexity on the same tokens"),
    ("quality_ppl_ratio", F, "quality_ppl / quality_reference_ppl"),
    ("quality_top_k", I, "reference log-probs kept per position; KL uses them plus one tail bucket (a lower bound)"),
    ("quality_kl_mean", F, "mean KL(reference || artifact) per position, nats (top-k + tail approximation)"),
    ("quality_kl_median", F, "median KL per position, nats"),
    ("quality_kl_p99", F, "99th percentile KL per position, nats"),
    ("quality_top1_agree", F, "fraction of positions where the artifact's most likely token is the reference's"),
    ("quality_s", F, "seconds the perplexity/KL probe took"),
    ("quality_peak_rss_bytes", I, "highest sampled child RSS during the probe (kept out of peak_rss_bytes)"),
    ("quality_case_key", S, "case whose worker measured the quality figures (shared by cases of one artifact/runtime/options)"),
    ("quality_error", S, "why a quality figure is missing, e.g. a tokenizer that differs from the reference"),
    ("task_file", S, "file name of the task checks (JSONL)"),
    ("task_sha256", S, "sha256 of the task file"),
    ("task_count", I, "task checks run"),
    ("task_passed", I, "task checks whose greedy answer matched"),
    ("task_pass_rate", F, "task_passed / task_count"),
    ("task_results_json", S, "per task: id, passed, answer (cut to 200 chars), JSON"),
    ("task_s", F, "seconds the task checks took"),
    # workflows: multi-turn sessions (issue #11). A workflow case writes one row per turn (``turn`` set)
    # and one case-level row per repetition (``turn`` null) that single-turn readers use.
    ("turn", I, "1-based turn of a workflow session; null for single-turn cases and a session's case-level rows"),
    ("turns", I, "turns in the workflow session; null for single-turn cases"),
    ("workflow_kind", S, "chat | document; null for single-turn cases"),
    ("workflow_json", S, "the workflow spec, JSON"),
    ("turn_new_tokens", I, "tokens this turn handed to the runtime: user message, document, question"),
    ("context_tokens", I, "tokens in the context when this turn's reply starts: history plus the new tokens"),
    ("processed_tokens", I, "tokens processed before this turn's first token: the new ones with kv_reuse, "
                            "the whole history without"),
    ("kv_reuse", B, "the session continued from the runtime's KV/prompt cache (extend); false: history replayed"),
    ("fit_turn", I, "case-level row of a workflow: the turn whose verdict is the case's (the first worst turn)"),
    # parallel sessions (schema 1.4, docs/concurrency.md): N sessions at once on one loaded model, one row
    # per repetition. On such a row ttft_s/decode_tok_s are the worst session's, gen_tokens is per session.
    ("parallel", I, "sessions at once on one loaded model, each with its own prompt and a context of n_ctx; "
                    "1 for a single session"),
    ("ttft_p50_s", F, "TTFT over the sessions, median; all prompts handed over together (schema 1.4)"),
    ("ttft_p90_s", F, "TTFT over the sessions, 90th percentile: what the serving verdict judges (schema 1.4)"),
    ("user_decode_tok_s", F, "per-user decode tok/s, the median session's: its tokens after every session has "
                             "its first, over the time from then to its last token (schema 1.4)"),
    ("user_decode_min_tok_s", F, "the slowest session's decode tok/s, same definition (schema 1.4)"),
    ("aggregate_decode_tok_s", F, "decode tok/s of all sessions together over the shared decode phase "
                                  "(llama-batched-bench's S_TG); one session: decode_tok_s (schema 1.4)"),
    ("session_ttft_s_json", S, "each session's TTFT, seconds, JSON list in session order (schema 1.4)"),
    ("session_decode_tok_s_json", S, "each session's decode tok/s, JSON list in session order (schema 1.4)"),
    ("kv_session_bytes", I, "KV cache bytes one session holds after the repetition, the runtime's own figure "
                            "(llama.cpp llama_state_seq_get_size; torch: cache tensors / sessions) (schema 1.4)"),
    ("serving_fits", B, "the parallel sessions fit: memory resident, p90 TTFT and per-user decode within the "
                        "thresholds max_ttft_p90_s and min_user_tok_s (schema 1.4)"),
    ("serving_reason", S, "the serving verdict in words, e.g. 'fits 4 users at context 2048: ...' (schema 1.4)"),
    # sampler
    ("sampler_interval_ms", F, "requested sampling interval"),
    ("sampler_samples", I, "samples actually taken over the case"),
    ("sampler_timed_interval_ms", F, "the sampler's grid while the worker was timed: no denser than 100 ms, "
                                     "plus a sample at every phase boundary (schema 1.4)"),
    # drift and noise (issue #18): what disturbed the measurement, and how sure the figure is (schema 1.4)
    ("decode_tok_s_mean", F, "mean decode tok/s over the case's repetitions"),
    ("decode_tok_s_ci95", F, "half-width of the 95% confidence interval of decode_tok_s_mean (Student t over "
                             "the repetitions); null with one repetition"),
    ("drift", F, "relative change of decode tok/s from the case's first to its last repetition, "
                 "(last - first) / first; null with one repetition"),
    ("rep_drift", F, "within this repetition: relative change of the decode rate from its first quarter of "
                     "tokens to its last quarter"),
    ("drift_flag", B, "drift or rep_drift beyond the max_drift threshold: throttling or a change of load "
                      "during the case"),
    ("noise_flag", B, "the case ran on a disturbed machine (steal, other processes' load) or its confidence "
                      "interval is wider than max_ci (thresholds)"),
    ("measurement_note", S, "why drift_flag or noise_flag is set, in words"),
    ("steal_fraction", F, "CPU steal over the case: the hypervisor ran other guests on our CPUs, as a fraction "
                          "of the case's wall time x logical CPUs (/proc/stat)"),
    ("outside_load_cores", F, "CPUs kept busy by everything but the case's worker during the case: system busy "
                              "CPU seconds minus the worker's, per second (the harness's own sampler included)"),
    ("cpu_mhz_mean", F, "mean CPU frequency over the case (cpufreq, else /proc/cpuinfo)"),
    ("cpu_mhz_min", F, "lowest CPU frequency sampled during the case"),
    ("temp_c_max", F, "hottest temperature sampled during the case (thermal zones, hwmon, NVML), degrees C"),
    # roofline (issue #18): decode against what the memory bandwidth allows (schema 1.4)
    ("mem_bandwidth_gbs", F, "memory read bandwidth of the device that ran the case, GB/s: a streaming read "
                             "measured once per machine (CPU) or NVML's figure (GPU)"),
    ("mem_bandwidth_source", S, "how mem_bandwidth_gbs was found, e.g. numpy-read-4threads-256MiB, nvml-spec"),
    ("roofline_bytes_per_token", I, "bytes one decoded token reads: the weights plus the KV cache at the "
                                    "repetition's mean decode depth (harness/estimate.py)"),
    ("roofline_tok_s", F, "decode tok/s the memory bandwidth allows: mem_bandwidth / roofline_bytes_per_token"),
    ("roofline_efficiency", F, "decode_tok_s / roofline_tok_s: the share of what this machine's memory allows"),
    # child process
    ("exit_code", I, "child exit code; negative = killed by that signal"),
    # machine
    ("machine_id", S, "stable hashed machine id (no hostname)"),
    ("machine_class", S, "coarse class, e.g. cpu-x86_64-24GiB"),
    ("cpu_model", S, "CPU model name"),
    ("cpu_flags", S, "relevant ISA extensions, comma separated"),
    ("cpu_cores", I, "physical cores"),
    ("cpu_threads", I, "logical CPUs"),
    ("ram_bytes", I, "physical memory"),
    ("gpu_names", S, "GPUs, comma separated"),
    ("os", S, "operating system and kernel"),
    ("python_version", S, "Python version of the harness"),
    ("fitbench_version", S, "fitbench version"),
    # fleet runs (fitbench fleet run): where in the Ray cluster the case ran
    ("fleet_node_id", S, "Ray node id of the agent that ran the case; null for local runs"),
    # runners for onnxruntime-genai and MLX (issue #4): what the runtime reported at load beyond
    # the fixed fields, e.g. the execution provider used, max_length, the KV cache kind
    ("runtime_extra_json", S, "runtime-specific load facts (LoadInfo.extra), JSON"),
)

TIMELINE_COLUMNS: list[Column] = _cols(
    ("schema_version", S, "result schema version"),
    ("run_id", S, "run that wrote the sample"),
    ("case_key", S, "case the sample belongs to"),
    ("case_index", I, "position of the case in the scenario"),
    ("machine_id", S, "machine that took the sample (schema 1.3; a fleet run has several per run)"),
    ("t_s", F, "seconds since the case's child was started"),
    ("phase", S, "spawn | load | prompt | warmup | rep<N> | rep<N>/turn<M> | quality | teardown: "
                 "quality samples are the probe's, outside the case's memory figures"),
    ("rss_bytes", I, "child resident memory"),
    ("uss_bytes", I, "child unique memory (null between the dearer USS samples)"),
    ("sys_available_bytes", I, "system available memory"),
    ("swap_used_bytes", I, "system swap in use"),
    ("pswpin", I, "system pages swapped in, cumulative"),
    ("pswpout", I, "system pages swapped out, cumulative"),
    ("minflt", I, "child minor faults, cumulative"),
    ("majflt", I, "child major faults, cumulative"),
    ("cpu_s", F, "child CPU seconds, cumulative"),
    ("read_bytes", I, "child bytes read from storage, cumulative"),
    ("cpu_energy_uj", I, "CPU package energy since the case started, microjoules (RAPL, unwrapped)"),
    ("gpu_energy_mj", F, "GPU energy since the case started, millijoules (NVML)"),
    ("gpu_power_mw", F, "GPU power draw, milliwatts (NVML)"),
    # GPU memory (NVML in the sampler)
    ("gpu_used_bytes", I, "GPU memory in use on the device(s), every process (NVML)"),
    ("gpu_proc_bytes", I, "GPU memory of the case's own process (NVML per-process)"),
    ("gpu_util_pct", F, "GPU utilisation, percent (NVML)"),
    # what disturbs the measurement, sampled about once a second (schema 1.4)
    ("cpu_mhz", F, "mean CPU frequency, MHz (cpufreq, else /proc/cpuinfo)"),
    ("temp_c", F, "hottest temperature readable (thermal zones, hwmon, NVML), degrees C"),
    ("sys_busy_s", F, "system busy CPU seconds over all CPUs, cumulative (/proc/stat)"),
    ("sys_steal_s", F, "system steal CPU seconds over all CPUs, cumulative (/proc/stat)"),
)


def schema(columns: list[Column]) -> pa.Schema:
    fields = [pa.field(c.name, c.type, nullable=True, metadata={"doc": c.doc}) for c in columns]
    return pa.schema(fields, metadata={METADATA_KEY: SCHEMA_VERSION.encode()})


RESULT_SCHEMA = schema(RESULT_COLUMNS)
TIMELINE_SCHEMA = schema(TIMELINE_COLUMNS)


class ResultsError(FitbenchError):
    """A results file cannot be written or read; the message says why."""


def to_table(rows: Iterable[dict[str, Any]], sch: pa.Schema) -> pa.Table:
    rows = list(rows)
    names = set(sch.names)
    for row in rows:
        extra = set(row) - names
        if extra:  # a typo in a column name must fail loudly, not vanish
            raise ValueError(f"row has columns not in the schema: {sorted(extra)}")
        row.setdefault("schema_version", SCHEMA_VERSION)
    return pa.Table.from_pylist(rows, schema=sch)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that ``path`` is always either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def file_schema_version(path: Path) -> str | None:
    meta = pq.read_schema(path).metadata or {}
    value = meta.get(METADATA_KEY)
    return value.decode(errors="replace") if value else None


def read_results(path: Path) -> pa.Table:
    """Read a results file, refusing one written by an incompatible (newer major) schema."""
    try:
        version = file_schema_version(path)
    except (OSError, pa.ArrowException) as exc:
        raise ResultsError(f"{path} is not a readable Parquet file: {_one_line(exc)}") from None
    if version is None:
        raise ResultsError(f"{path} has no {METADATA_KEY.decode()} metadata; it was not written by fitbench")
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ResultsError(f"{path} uses schema {version}; "
                           f"this fitbench reads {SCHEMA_VERSION.split('.')[0]}.x — upgrade fitbench")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ResultsError(f"{path} is damaged: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def timeline_path_for(results_path: Path) -> Path:
    return results_path.with_name(results_path.name.removesuffix(".parquet") + ".timeline.parquet")


class ResultWriter:
    """Keeps a run's rows and rewrites both files atomically after every case.

    Rewriting is O(rows) per case, which is nothing next to a case's runtime,
    and it means the files on disk are complete and valid after every case.
    """

    def __init__(self, results_path: Path) -> None:
        self.results_path = results_path
        self.timeline_path = timeline_path_for(results_path)
        self.rows: list[dict[str, Any]] = []
        self.timeline_tables: list[pa.Table] = []

    def keep(self, rows: list[dict[str, Any]], timeline: pa.Table | None) -> None:
        """Start from rows already on disk (a resumed run)."""
        self.rows = list(rows)
        self.timeline_tables = [timeline.cast(TIMELINE_SCHEMA)] if timeline is not None and timeline.num_rows else []

    def add_case(self, rows: list[dict[str, Any]], timeline_rows: dict[str, list]) -> None:
        self.rows.extend(rows)
        if timeline_rows and timeline_rows.get("t_s"):
            n = len(timeline_rows["t_s"])
            columns = {c.name: timeline_rows.get(c.name, [None] * n) for c in TIMELINE_COLUMNS}
            columns["schema_version"] = [SCHEMA_VERSION] * n
            self.timeline_tables.append(pa.table(columns, schema=TIMELINE_SCHEMA))
        self.flush()

    def flush(self) -> None:
        # Case order, whatever order the cases ran in (a resumed run appends out of order).
        # A workflow's turn rows come before their repetition's case-level row.
        self.rows.sort(key=lambda r: (r.get("case_index") or 0, r.get("repetition") is None, r.get("repetition") or 0,
                                      r.get("turn") is None, r.get("turn") or 0))
        try:
            write_atomic(to_table(self.rows, RESULT_SCHEMA), self.results_path)
            if self.timeline_tables:
                timeline = pa.concat_tables(self.timeline_tables).sort_by([("case_index", "ascending"), ("t_s", "ascending")])
                write_atomic(timeline, self.timeline_path)
        except OSError as exc:
            raise ResultsError(f"cannot write results to {self.results_path.parent}: {exc.strerror or exc}") from exc


TIMELINE_SUFFIX = ".timeline.parquet"


def result_path_for(path: Path) -> Path:
    """A timeline companion's result file (a result file is its own)."""
    if path.name.endswith(TIMELINE_SUFFIX):
        return path.with_name(path.name.removesuffix(TIMELINE_SUFFIX) + ".parquet")
    return path


def expand_result_files(patterns: Iterable[str | Path]) -> list[Path]:
    """Files, globs or folders -> result files, in the order given, each once and each checked.

    Every command that reads results takes its inputs through here, so ``results/*.parquet``
    works everywhere: a timeline companion named among them stands for its result file
    (it is read with it), never for a file of its own. A folder is read whole, fleet
    datasets (``machine_class=*/``) included."""
    import glob

    paths: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        p = Path(text)
        if p.is_dir():
            found = sorted(p.glob("*.parquet")) + sorted(p.glob("machine_class=*/*.parquet")) \
                + sorted(p.glob("*/machine_class=*/*.parquet"))
        elif any(c in text for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(text))
        else:
            found = [p]
        found = [result_path_for(f) for f in found]
        if not found:
            raise ResultsError(f"{text}: no result files there; name .parquet files, a glob or a folder of them")
        for f in found:
            if f not in paths:
                paths.append(f)
    for path in paths:
        if not path.exists():
            raise ResultsError(f"{path}: file not found")
        try:
            version = file_schema_version(path)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise ResultsError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
        if version is None:
            raise ResultsError(f"{path}: not a fitbench results file (no schema version)")
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ResultsError(f"{path}: schema {version} cannot be read by this fitbench ({SCHEMA_VERSION})")
    return paths


REQUESTED_SINCE = (1, 3)  # the schema that added budget_requested_bytes


def schema_version_tuple(text: Any) -> tuple[int, int]:
    """"1.3" -> (1, 3); unreadable -> (0, 0)."""
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def requested_budget(row: Mapping[str, Any]) -> int | None:
    """The budget a row's case asked for (null: none), enforced or not; what compare, report and the
    upstream group by. Rows before schema 1.3 had no such column: an enforced budget was asked for,
    a judged-only budget that is not the machine's RAM was a yardstick, the RAM itself means none.
    compare.REQUESTED_BUDGET_SQL is the same rule in SQL."""

    def get(key: str) -> Any:
        value = row.get(key)
        return None if value is None or value != value else value  # NaN (pandas) is missing

    if schema_version_tuple(get("schema_version")) >= REQUESTED_SINCE:
        value = get("budget_requested_bytes")
        return None if value is None else int(value)
    budget, method = get("budget_bytes"), get("budget_method")
    if budget is None:
        return None
    if method is not None and method != "none":
        return int(budget)
    ram = get("ram_bytes") if get("ram_bytes") is not None else get("sys_mem_total_bytes")
    return None if ram is not None and int(budget) == int(ram) else int(budget)
