"""``fitbench catalog update|pull|show`` and ``fitbench estimate``: the catalog of measured fits, and predictions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from harness.catalog import DEFAULT_CATALOG, load_catalog, options_label, query, save_catalog, update_catalog
from harness.cli.options import (
    FORMAT_RUNTIMES,
    THRESHOLD_OPTION,
    UsageError,
    contexts_option,
    format_option,
    option_values,
    read_result_files,
    size_option,
    threshold_options,
)
from harness.cli.present import Column, fit_column, make_console, mib, number, print_rows
from harness.fit import Thresholds


@click.group()
def catalog() -> None:
    """The catalog of artifacts and measured fits (catalog.yaml)."""


CATALOG_OPTION = click.option("--catalog", "catalog_path", type=click.Path(path_type=Path), default=DEFAULT_CATALOG,
                              show_default=True, envvar="FITBENCH_CATALOG", help="catalog file")


@catalog.command("update")
@click.argument("results", nargs=-1, required=True)
@CATALOG_OPTION
def catalog_update(results: tuple[str, ...], catalog_path: Path) -> None:
    """Fold measured fits from RESULTS (Parquet files, globs or folders) into the catalog."""
    cat = load_catalog(catalog_path)
    tables = read_result_files(results)
    counts = update_catalog(cat, tables)
    save_catalog(cat)
    make_console().print(f"{catalog_path}: {counts['added']} added, {counts['updated']} updated, "
                         f"{counts['unchanged']} already there, {counts['skipped']} without a verdict "
                         f"(from {len(tables)} file(s)); {len(cat.artifacts)} artifact(s), {len(cat.fits)} fit(s)",
                         markup=False)


@catalog.command("pull")
@click.argument("url")
@CATALOG_OPTION
@click.option("--machine-class", help="only fits for this machine class (default: every class)")
@click.option("--retries", type=click.IntRange(1, 20), default=4, show_default=True, help="attempts before giving up")
@click.option("--allow-http", is_flag=True, help="allow a plain http:// URL to another machine (default: https, "
              "or http to this machine only)")
def catalog_pull(url: str, catalog_path: Path, machine_class: str | None, retries: int, allow_http: bool) -> None:
    """Merge community fits from an upstream at URL into the catalog, marked as community-measured.

    Local measurements are never overwritten: community entries carry options 'community',
    their sample and machine counts, and are replaced by the next pull. The answer is
    untrusted: it is read up to 32 MiB, and an entry that is malformed (a wrong type, a
    non-finite number, a machine class that is not one) is skipped and counted.
    """
    from harness.share.client import Retry, fetch_fits
    from harness.share.community import merge_community

    cat = load_catalog(catalog_path)
    err = make_console(stderr=True)
    data = fetch_fits(url, Retry(attempts=retries), lambda msg: err.print(f"fitbench: {msg}"),
                      allow_http=allow_http, machine_class=machine_class)
    counts = merge_community(cat, data, url)
    save_catalog(cat)
    make_console().print(f"{catalog_path}: community fits from {url}: {counts['added']} added, {counts['updated']} "
                         f"updated, {counts['unchanged']} unchanged, {counts['skipped']} malformed skipped; "
                         f"{counts['local_alongside']} sit next to local measurements, which are kept as they are",
                         markup=False)


def _prompt_label(fit: dict) -> str:
    """Prompt tokens of a catalog fit; a workflow's shape, e.g. '2288 (chat, 10 turns)'."""
    text = str(fit.get("prompt_tokens") or "-")
    try:
        wf = json.loads(fit["workflow"]) if fit.get("workflow") else None
    except (TypeError, ValueError):
        wf = None
    if isinstance(wf, dict):
        text += f" ({wf.get('kind')}, {wf.get('turns') or wf.get('questions')} turns)"
    return text


@catalog.command("show")
@CATALOG_OPTION
@click.option("--machine-class", help="default: this machine's class; 'all' for every class")
@click.option("--context", type=click.IntRange(min=1),
              help="what fits at this context (the smallest measured at or above it)")
@click.option("--budget", help="judge the measured peaks against this memory size, e.g. 8GiB")
@THRESHOLD_OPTION
@format_option()
def catalog_show(catalog_path: Path, machine_class: str | None, context: int | None, budget: str | None,
                 thresholds: tuple[str, ...], fmt: str) -> None:
    """What fits on this machine (class), at what context, how fast."""
    from harness.measure import machine as machine_mod

    cat = load_catalog(catalog_path)
    if not cat.fits:
        raise UsageError(f"{catalog_path} has no measured fits yet; run `fitbench catalog update results/` first")
    mc = None if machine_class == "all" else machine_class or machine_mod.fingerprint().machine_class
    budget_bytes = size_option("--budget", budget) if budget else None
    th = threshold_options(Thresholds(), thresholds)
    rows = query(cat, mc, context, budget_bytes, headroom=th.headroom)
    if not rows:
        classes = ", ".join(sorted({str(f["machine_class"]) for f in cat.fits}))
        at = f" at context {context} or more" if context else ""
        raise UsageError(f"no fits measured for machine class {mc!r}{at}; classes in the catalog: {classes}")
    title = f"catalog: {mc or 'all machine classes'}" + (f", context >= {context:,}" if context else "")
    quality = any("quality_text" in f for f in rows)
    columns = [
        Column("artifact", wrap=True), *([Column("machine_class", "machine")] if mc is None else []), Column("runtime"),
        Column("options", show=options_label), Column("n_ctx", show=number("{:,}"), right=True),
        Column("prompt_tokens", "prompt", label=_prompt_label, right=True),
        Column("budget_bytes", "budget MiB", label=lambda f: mib(f["budget_bytes"]) if f.get("budget_bytes") else "RAM",
               right=True),
        fit_column(), *([fit_column("budget_verdict", "at budget")] if budget else []),
        Column("peak_rss_bytes", "peak MiB", mib, right=True),
        Column("decode_tok_s", "tg tok/s", number("{:,.1f}"), right=True),
        Column("ttft_s", "TTFT s", number("{:,.2f}"), right=True),
        *([Column("quality_ppl", "PPL", number("{:,.2f}"), right=True),
           Column("quality_kl", "KL", number("{:.4f}"), right=True),
           Column("quality_top1", "top-1", number("{:.1%}"), right=True),
           Column("task_pass_rate", "tasks", number("{:.0%}"), right=True)] if quality else []),
        Column("count", "runs", get=lambda f: f.get("count", 1), right=True),
    ]
    print_rows(fmt, columns, rows, title=title + (f", judged against {budget}" if budget else ""))


@click.command("estimate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--context", "-c", "contexts", required=True, help="context length(s), e.g. 2048 or 512,2048,8192")
@click.option("--runtime", help="default: the one for the artifact's format")
@click.option("--kv-type", help="KV cache element type, e.g. q8_0 (default: the runtime's own, f16 for llama.cpp)")
@click.option("--flash-attn", is_flag=True, help="flash attention (no materialised score matrix)")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE",
              help="runner option as in a scenario, e.g. --option dtype=float32 (torch), --option type_v=q4_0")
@click.option("--fill", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="filled fraction of the context")
@click.option("--budget", help="judge the estimate against this memory size (default: this machine's RAM)")
@click.option("--results", "result_files", multiple=True,
              help="result files to compare the estimate with (globs, folders)")
@THRESHOLD_OPTION
@format_option()
def estimate_cmd(artifact: Path, contexts: str, runtime: str | None, kv_type: str | None, flash_attn: bool,
                 options: tuple[str, ...], fill: float, budget: str | None, result_files: tuple[str, ...],
                 thresholds: tuple[str, ...], fmt: str) -> None:
    """Predict peak memory and the memory verdict from ARTIFACT's metadata; compare with measurements."""
    from harness.artifact import inspect_artifact
    from harness.estimate import estimate
    from harness.fit import memory_verdict
    from harness.measure import machine as machine_mod

    info = inspect_artifact(artifact)
    n_ctxs = contexts_option(contexts)
    th = threshold_options(Thresholds(), thresholds)
    runner_options = option_values(options)
    runtime = runtime or FORMAT_RUNTIMES.get(info.format, "llama.cpp")
    budget_bytes = size_option("--budget", budget) if budget else machine_mod.fingerprint().ram_bytes
    measured: dict[int, int] = {}
    for _, rows in read_result_files(result_files) if result_files else []:
        for row in rows:
            if (row.get("artifact_name") == info.name and row.get("runtime") == runtime and row.get("peak_rss_bytes")
                    and row.get("status") == "ok" and (row.get("fill") is None or abs(row["fill"] - fill) < 1e-6)):
                measured[row["n_ctx"]] = max(measured.get(row["n_ctx"], 0), row["peak_rss_bytes"])
    records = []
    for n in n_ctxs:
        e = estimate(info, n, runtime, kv_type, flash_attn or None, fill=fill, options=runner_options)
        verdict = memory_verdict(e.total_bytes, budget_bytes, th.headroom)  # the one memory verdict
        m = measured.get(n)
        records.append({"n_ctx": n, **e.to_dict(), "budget_bytes": budget_bytes, "fit_class": verdict.fit_class,
                        "fit_reason": verdict.reason, "measured_peak_bytes": m,
                        "error": (e.total_bytes - m) / m if m else None})
    # The breakdown: KV by layer type (full attention; sliding window, which holds its window unless
    # the runtime keeps all), logits for the vocabulary, compute buffers at the batch, fixed overhead.
    swa = bool(info.layout and info.layout.n_swa_layers)
    columns = [Column("n_ctx", show=number("{:,}"), right=True),
               *[Column(f"{part}_bytes", f"{title} MiB", mib, right=True)
                 for part, title in (("weights", "weights"), ("kv_full", "KV full"),
                                     *((("kv_swa", "KV SWA"),) if swa else ()), ("output", "logits"),
                                     ("compute", "compute"), ("overhead", "overhead"), ("total", "total"))],
               fit_column("fit_class", "verdict"), Column("measured_peak_bytes", "measured MiB", mib, right=True),
               Column("error", show=number("{:+.1%}"), right=True)]
    kv_text = kv_type or "the runtime's default"
    if swa:
        kv_text += (f"; {info.layout.n_swa_layers} of {info.n_layers} layers slide over "
                    f"{info.layout.sliding_window:,} tokens")
    if info.layout and info.layout.n_experts:
        kv_text += f"; {info.layout.n_experts} experts resident"
    print_rows(fmt, columns, records,
               title=f"estimate: {info.name} in {runtime}, KV {kv_text}"
                     f"{', flash attention' if flash_attn else ''}{_options_text(runner_options)}, "
                     f"{fill:.0%} filled, budget {mib(budget_bytes)} MiB")



def _options_text(options: dict) -> str:
    return "".join(f", {k}={v}" for k, v in sorted(options.items()))
