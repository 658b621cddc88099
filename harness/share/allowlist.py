"""The published list of what leaves the machine: every column a bundle may carry, and how it is treated.

A column that is not on this list is never sent, whatever a results file holds (a new
column of harness/results.py stays home until someone adds it here, with a reason).
docs/shared-columns.md is generated from this list (``python -m harness.docs``), so the
promise and the code cannot drift apart.

Treatments of text (numbers and true/false are sent as they are):

- ``text``: free text through the scrubber (harness/share/anonymise.py): paths cut to
  their file name, host, user and real names, home folder, e-mail addresses, URLs, IP
  addresses, token-like strings and serial numbers removed, at most 500 characters;
- ``json``: a JSON document whose every key and string goes through the scrubber;
- ``code``: a short machine-made word (a version, a quant type, a status); a value that
  is not one, or that names this host or user, is not sent (null);
- ``hash``: a hex digest; anything else is replaced by a keyed hash of it;
- ``run id``, ``machine id``: re-derived with this install's secret salt (keyed hashes):
  unique per run and per machine, and nothing else;
- ``file name``, ``time``, ``os``, ``quality text``: see their reasons below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TEXT, JSON, CODE, HASH = "text", "json", "code", "hash"
RUN_ID, MACHINE_ID, FILE_NAME, TIME, OS, QUALITY_TEXT, KEEP = (
    "run id", "machine id", "file name", "time", "os", "quality text", "as is")
TREATMENTS = (KEEP, TEXT, JSON, CODE, HASH, RUN_ID, MACHINE_ID, FILE_NAME, TIME, OS, QUALITY_TEXT)

# A code: a short word a program made, e.g. 0.3.36, Q4_1, llama.cpp, cgroup-v2, cpu-x86_64-24GiB, f16/f16, avx2,fma
CODE_FORM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:/,=-]{0,199}( [A-Za-z0-9._+:/,=-]{1,40}){0,3}$")
HASH_FORM = re.compile(r"^[0-9a-f]{16,64}$")
# What a re-derived run id looks like; a bundle whose run ids do not was written before the allow-list.
RUN_ID_FORM = re.compile(r"^u1-[0-9a-f]{24}$")


@dataclass(frozen=True)
class Shared:
    column: str
    treatment: str
    why: str


def _list(*specs: tuple[str, str, str]) -> dict[str, Shared]:
    return {name: Shared(name, treatment, why) for name, treatment, why in specs}


_FIGURE = "a measured figure: what the community table is made of"
_MACHINE = "describes the hardware class, shared by every machine of its kind"
_ARTIFACT = "describes the artifact, identical for everyone who has the file"
_CONFIG = "the configuration measured: what makes two rows comparable"
_NOISE = "what disturbed the measurement (steal, other load, frequency, heat): how far to trust the figures"

SHARED_RESULT_COLUMNS: dict[str, Shared] = _list(
    ("schema_version", CODE, "which columns the row has"),
    ("run_id", RUN_ID, "tells runs apart; the local id holds the run's start second, so a keyed hash of it is sent"),
    ("case_index", KEEP, _CONFIG),
    ("case_key", HASH, "a hash of the artifact's file name, runtime, options, context and token counts, all sent anyway"),
    ("case_label", TEXT, _CONFIG),
    ("repetition", KEEP, _CONFIG),
    ("status", CODE, "whether the case ran; failed rows count in the verdicts"),
    ("error", TEXT, "why a case failed; errors quote paths and names, hence the scrubber"),
    ("started_at", TIME, "rounded down to the hour: when, roughly, without a timestamp to match with logs"),
    ("artifact_name", FILE_NAME, _ARTIFACT),
    ("artifact_path", FILE_NAME, "cut to the file name (the folders may name a person); equals artifact_name"),
    ("artifact_size_bytes", KEEP, _ARTIFACT),
    ("artifact_sha256", HASH, "identifies the artifact exactly"),
    ("artifact_format", CODE, _ARTIFACT),
    ("artifact_quant", CODE, _ARTIFACT),
    ("artifact_arch", CODE, _ARTIFACT),
    *((name, KEEP, _ARTIFACT) for name in ("artifact_n_params", "artifact_n_layers", "artifact_n_kv_heads",
                                           "artifact_n_heads", "artifact_head_dim", "artifact_context_length")),
    ("runtime", CODE, _CONFIG),
    ("runtime_version", CODE, _CONFIG),
    ("options_json", JSON, _CONFIG),
    ("device", CODE, _CONFIG),
    ("n_layers_total", KEEP, _CONFIG),
    ("n_layers_device", KEEP, _CONFIG),
    ("kv_type", CODE, _CONFIG),
    ("n_threads", KEEP, _CONFIG),
    ("n_ctx", KEEP, _CONFIG),
    ("n_ctx_runtime", KEEP, _CONFIG),
    ("n_ctx_meaning", TEXT, "the runtime's own words for its context setting"),
    ("fill", KEEP, _CONFIG),
    ("prompt_tokens", KEEP, _CONFIG),
    ("gen_tokens", KEEP, _CONFIG),
    ("warmup", KEEP, _CONFIG),
    *((name, KEEP, _FIGURE) for name in (
        "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "e2e_s",
        "case_wall_s", "spawn_s", "import_s", "baseline_rss_bytes", "runtime_rss_bytes", "load_rss_bytes",
        "peak_rss_bytes", "vmhwm_bytes",
        "ru_maxrss_bytes", "peak_uss_bytes", "rep_peak_rss_bytes", "load_peak_rss_bytes", "sys_mem_total_bytes",
        "sys_available_min_bytes", "swap_used_max_bytes", "runtime_peak_bytes", "offload_host_bytes",
        "offload_device_bytes", "gpu_total_bytes", "gpu_used_peak_bytes", "gpu_proc_peak_bytes", "gpu_util_mean_pct",
        "gpu_power_mean_w", "major_faults", "minor_faults", "read_bytes", "swap_in_pages", "swap_out_pages",
        "case_major_faults", "case_read_bytes", "cpu_util", "energy_prefill_j", "energy_decode_j",
        "energy_j_per_token", "avg_power_w")),
    ("energy_source", CODE, "which meters the energy figures come from"),
    ("energy_note", TEXT, "why energy is missing or partial"),
    ("budget_bytes", KEEP, "the memory the verdict was judged against"),
    ("budget_requested_bytes", KEEP, "whether a budget was asked for"),
    ("budget_method", CODE, "whether the budget was enforced"),
    ("budget_note", TEXT, "why a budget was not enforced"),
    ("budget_peak_bytes", KEEP, _FIGURE),
    ("fit_class", CODE, "the client's verdict (the server recomputes its own)"),
    ("fit_reason", TEXT, "the verdict in words"),
    ("fit_memory", CODE, "a component of the verdict"),
    ("fit_headroom", KEEP, "a component of the verdict"),
    ("fit_speed", CODE, "a component of the verdict"),
    ("fit_offload", KEEP, "a component of the verdict"),
    ("thresholds_json", JSON, "the thresholds the client's verdict used"),
    ("quality_text_id", QUALITY_TEXT, "the built-in evaluation text's id is sent; a user's own text is sent as "
                                      "`file` (its file name may say what it is; its sha256 identifies it)"),
    ("quality_text_sha256", HASH, "which text the quality figures were measured on"),
    ("quality_tokens_sha256", HASH, "which token ids were scored"),
    *((name, KEEP, _FIGURE) for name in (
        "quality_window", "quality_positions", "quality_nll_mean", "quality_ppl", "quality_reference_ppl",
        "quality_ppl_ratio", "quality_top_k", "quality_kl_mean", "quality_kl_median", "quality_kl_p99",
        "quality_top1_agree", "quality_s", "quality_peak_rss_bytes")),
    ("quality_reference_sha256", HASH, "which artifact KL is measured from"),
    ("quality_case_key", HASH, "which case measured the quality figures (a case_key)"),
    ("quality_error", TEXT, "why a quality figure is missing; errors quote paths and names, hence the scrubber"),
    ("task_sha256", HASH, "which task checks ran (identifies them without naming the file)"),
    *((name, KEEP, _FIGURE) for name in ("task_count", "task_passed", "task_pass_rate", "task_s")),
    ("turn", KEEP, _CONFIG),
    ("turns", KEEP, _CONFIG),
    ("workflow_kind", CODE, _CONFIG),
    ("workflow_json", JSON, _CONFIG),
    *((name, KEEP, _FIGURE) for name in ("turn_new_tokens", "context_tokens", "processed_tokens")),
    ("kv_reuse", KEEP, _CONFIG),
    ("fit_turn", KEEP, "which turn decided a session's verdict"),
    ("sampler_interval_ms", KEEP, "how the timeline was sampled"),
    ("sampler_samples", KEEP, "how many samples the server must find in the timeline"),
    ("exit_code", KEEP, "how the worker ended"),
    ("machine_id", MACHINE_ID, "counts independent machines; a keyed hash with this install's secret salt, so "
                               "it cannot be computed from a results file shared elsewhere"),
    ("machine_class", CODE, _MACHINE),
    ("cpu_model", TEXT, _MACHINE),
    ("cpu_flags", CODE, _MACHINE),
    ("cpu_cores", KEEP, _MACHINE),
    ("cpu_threads", KEEP, _MACHINE),
    ("ram_bytes", KEEP, _MACHINE),
    ("gpu_names", TEXT, _MACHINE),
    ("os", OS, "kept as its kernel's major.minor, e.g. Linux 6.18: the build string can single a machine out"),
    ("python_version", CODE, "the harness's interpreter"),
    ("fitbench_version", CODE, "the harness that measured"),
    ("runtime_extra_json", JSON, "what the runtime reported at load (execution provider, KV cache kind); its "
                                 "strings can hold paths, hence the scrubber"),
    ("sampler_timed_interval_ms", KEEP, "how the timeline was sampled while the worker was timed"),
    *((name, KEEP, _FIGURE) for name in ("decode_tok_s_mean", "decode_tok_s_ci95", "drift", "rep_drift")),
    *((name, KEEP, _NOISE) for name in ("drift_flag", "noise_flag", "steal_fraction", "outside_load_cores",
                                        "cpu_mhz_mean", "cpu_mhz_min", "temp_c_max")),
    ("measurement_note", TEXT, "why a row was flagged drifting or noisy, in words"),
    ("mem_bandwidth_gbs", KEEP, _MACHINE),
    ("mem_bandwidth_source", CODE, "how the bandwidth was measured (a probe, a GPU's spec figure)"),
    *((name, KEEP, _FIGURE) for name in ("roofline_bytes_per_token", "roofline_tok_s", "roofline_efficiency")),
    ("parallel", KEEP, _CONFIG + " (sessions at once; contribute sends only one-session rows today)"),
    *((name, KEEP, _FIGURE) for name in ("ttft_p50_s", "ttft_p90_s", "user_decode_tok_s", "user_decode_min_tok_s",
                                         "aggregate_decode_tok_s", "kv_session_bytes", "serving_fits")),
    *((name, JSON, _FIGURE) for name in ("session_ttft_s_json", "session_decode_tok_s_json")),
    ("serving_reason", TEXT, "the serving verdict in words"),
    *((name, CODE, _CONFIG) for name in ("kv_type_k", "kv_type_v", "attn_impl")),
    ("flash_attn", KEEP, _CONFIG),
)

# Result columns that never leave the machine, and why (every result column is on one list or the other).
NOT_SHARED: dict[str, str] = {
    "scenario": "a name the user chose; the configuration columns say what was measured",
    "model_label": "a label the user chose; the artifact's file name and sha256 say which model it is",
    "quality_reference": "a label the user chose; quality_reference_sha256 identifies the reference",
    "task_file": "the name of the user's own task file; task_sha256 identifies the checks",
    "task_results_json": "the model's answers to the user's own tasks may quote private text; the counts compare",
    "fleet_node_id": "a Ray node id names one node of the user's cluster; the re-hashed machine_id counts machines",
}

SHARED_TIMELINE_COLUMNS: dict[str, Shared] = _list(
    ("schema_version", CODE, "which columns the sample has"),
    ("run_id", RUN_ID, "re-derived exactly as the rows' run_id"),
    ("case_key", HASH, "as the rows' case_key"),
    ("case_index", KEEP, _CONFIG),
    ("machine_id", MACHINE_ID, "re-derived exactly as the rows' machine_id"),
    ("machine_class", CODE, _MACHINE),
    ("phase", CODE, "spawn, load, rep<N>, ...: which part of the case the sample is in"),
    *((name, KEEP, "a raw sample: the server recomputes the figures from them") for name in (
        "t_s", "rss_bytes", "uss_bytes", "sys_available_bytes", "swap_used_bytes", "pswpin", "pswpout", "minflt",
        "majflt", "cpu_s", "read_bytes", "cpu_energy_uj", "gpu_energy_mj", "gpu_power_mw", "gpu_used_bytes",
        "gpu_proc_bytes", "gpu_util_pct", "cpu_mhz", "temp_c", "sys_busy_s", "sys_steal_s")),
)


def unlisted(columns: list[str]) -> list[str]:
    """Result columns on neither list: a schema change that must decide, here, whether the column is sent."""
    return [c for c in columns if c not in SHARED_RESULT_COLUMNS and c not in NOT_SHARED]
