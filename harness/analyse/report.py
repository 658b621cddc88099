"""A report people would rather look at than read: plots plus the numbers behind them.

One self-contained HTML file (plots embedded as PNG data URIs, no scripts,
no network) and, on request, the same plots as PNG files:

1. decode tok/s and TTFT against the filled context, per artifact and runtime;
2. peak memory against the configured context, with the budget lines;
3. the fit-class matrix: artifact/runtime x context, coloured by verdict;
4. the sampler timeline of one case: RSS and bytes read over time, with the
   load, warm-up and repetition phases shaded;
5. with a quality probe, intelligence density: quality (KL from the
   reference, else perplexity) against peak memory, marker size by decode
   tok/s, so the variant with the most quality per GB stands out.
6. for workflow (multi-turn) cases: TTFT and peak memory against the turn,
   each point coloured by that turn's fit class, with the budget lines.

The case table has energy per generated token where the machine reports
energy (RAPL, NVML).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, ever
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from harness.errors import FitbenchError  # noqa: E402
from harness.fit import worst  # noqa: E402
from harness.results import (  # noqa: E402
    read_results,
    requested_budget,  # noqa: E402
    timeline_path_for,
)

FIT_COLOURS = {"fits": "#2e7d32", "tight": "#c0a000", "degraded": "#5d4037", "slow": "#ef8a00", "offload": "#7b1fa2",
               "spill": "#d84315", "no_fit": "#b71c1c", None: "#9e9e9e"}
PHASE_COLOURS = {"load": "#90caf9", "warmup": "#ffe082", "quality": "#d1c4e9", "teardown": "#e0e0e0"}


class ReportError(FitbenchError, ValueError):
    """Nothing to report, or a file that cannot be read."""


def load(paths: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames, timelines = [], []
    for path in paths:
        frame = read_results(path).to_pandas()
        frames.append(frame)
        tl = timeline_path_for(path)
        if tl.exists():
            try:
                timeline = pq.read_table(tl).to_pandas()
                # A timeline has no machine column; its results file (one per fleet node) says which.
                classes = frame["machine_class"].dropna().unique() if "machine_class" in frame else []
                timeline["machine_class"] = classes[0] if len(classes) == 1 else None
                timelines.append(timeline)
            except Exception:  # a damaged timeline costs its plot, not the report
                pass
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        raise ReportError("the result files hold no rows")
    df["series"] = df["model_label"].fillna(df["artifact_name"]) + " · " + df["runtime"]
    for col in ("turn", "energy_j_per_token", "budget_requested_bytes"):  # files from before workflows / energy / 1.3
        if col not in df.columns:
            df[col] = None
    if df["machine_class"].nunique() > 1:  # results of several machines (a fleet run): one series per machine
        df["series"] = df["series"] + " · " + df["machine_class"].fillna("?")
    return df, (pd.concat(timelines, ignore_index=True) if timelines else pd.DataFrame())


def per_case(df: pd.DataFrame) -> pd.DataFrame:
    """One line per case: medians over ok repetitions, worst fit class, first failure."""
    rows = []
    case_level = df[df["turn"].isna()]  # a workflow's turn rows are plotted per turn, not here
    for (run_id, key, machine_class), g in case_level.groupby(["run_id", "case_key", "machine_class"], sort=False,
                                                              dropna=False):
        ok = g[g["status"] == "ok"]
        rows.append({
            "series": g["series"].iloc[0], "case_label": g["case_label"].iloc[0], "case_key": key, "run_id": run_id,
            "machine_class": machine_class,
            "n_ctx": int(g["n_ctx"].iloc[0]), "prompt_tokens": int(g["prompt_tokens"].iloc[0]),
            "budget_mib": _budget_mib(g),
            "status": "ok" if (g["status"] == "ok").all() else ",".join(sorted(set(g["status"]) - {"ok"})),
            "fit_class": worst([f if isinstance(f, str) else None for f in g["fit_class"]]),
            "decode_tok_s": ok["decode_tok_s"].median() if len(ok) else None,
            "prefill_tok_s": ok["prefill_tok_s"].median() if len(ok) else None,
            "ttft_s": ok["ttft_s"].median() if len(ok) else None,
            "peak_mib": g["peak_rss_bytes"].max() / 2**20 if g["peak_rss_bytes"].notna().any() else None,
            "energy_j_per_token": ok["energy_j_per_token"].median() if ok["energy_j_per_token"].notna().any() else None,
            "reps": len(ok),
            **{name: _first(g, column) for name, column in QUALITY_FIELDS.items()},
        })
    return pd.DataFrame(rows)


def _budget_mib(g: pd.DataFrame) -> float | None:
    """The budget the case asked for, enforced or only judged against (compare groups by the same):
    a 200 MiB yardstick on a machine without a writable cgroup is still its own series."""
    budget = requested_budget(g.iloc[0])
    return None if budget is None else budget / 2**20


QUALITY_FIELDS = {"ppl": "quality_ppl", "ppl_ratio": "quality_ppl_ratio", "kl": "quality_kl_mean",
                  "top1": "quality_top1_agree", "pass_rate": "task_pass_rate", "quality_case": "quality_case_key",
                  "artifact_mib": "artifact_size_bytes", "quality_error": "quality_error"}


def _first(g: pd.DataFrame, column: str):
    if column not in g or not g[column].notna().any():
        return None
    value = g[column].dropna().iloc[0]
    return value / 2**20 if column == "artifact_size_bytes" else value


def density(cases: pd.DataFrame) -> pd.DataFrame:
    """One line per artifact · runtime with its quality, peak memory and decode speed, taken from
    the case that ran the quality probe: which variant gives the most quality per GB here."""
    if "ppl" not in cases or not (cases["ppl"].notna().any() or cases["pass_rate"].notna().any()):
        return pd.DataFrame()
    rows = []
    for series, g in cases.groupby("series", sort=False):
        measured = g[g["case_key"] == g["quality_case"]] if g["quality_case"].notna().any() else g
        c = (measured if len(measured) else g).iloc[0]
        rows.append({"series": series, "artifact_mib": c["artifact_mib"], "peak_mib": c["peak_mib"],
                     "decode_tok_s": c["decode_tok_s"], "ppl": c["ppl"], "ppl_ratio": c["ppl_ratio"], "kl": c["kl"],
                     "top1": c["top1"], "pass_rate": c["pass_rate"], "fit_class": c["fit_class"],
                     "case_label": c["case_label"]})
    return pd.DataFrame(rows).sort_values("peak_mib", na_position="last")


def plot_density(dens: pd.DataFrame) -> bytes:
    use_kl = dens["kl"].notna().any()
    y_col, y_label = ("kl", "mean KL from the reference (nats, log scale)") if use_kl else ("ppl", "perplexity")
    d = dens[dens[y_col].notna() & dens["peak_mib"].notna()]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    speed = d["decode_tok_s"].fillna(0)
    sizes = 40 + 400 * speed / max(float(speed.max()), 1e-9)
    # The reference itself has KL 0: draw it on the floor of the log axis, labelled.
    positive = d.loc[d[y_col] > 1e-6, y_col] if use_kl else d[y_col]  # below: float32 rounding of KL 0
    floor = float(positive.min()) / 3 if use_kl and len(positive) else 1e-6
    ax.scatter(d["peak_mib"], d[y_col].clip(lower=floor) if use_kl else d[y_col], s=sizes,
               c=[FIT_COLOURS.get(f, "#9e9e9e") for f in d["fit_class"]], alpha=0.8, edgecolors="black")
    for r in d.itertuples():
        y = max(getattr(r, y_col), floor) if use_kl else getattr(r, y_col)
        tok = "" if pd.isna(r.decode_tok_s) else f", {r.decode_tok_s:,.1f} tok/s"
        ref = " (reference)" if use_kl and getattr(r, y_col) <= 1e-6 else ""
        ax.annotate(f"{r.series}{tok}{ref}", (r.peak_mib, y), fontsize=8, xytext=(6, 4), textcoords="offset points")
    if use_kl:
        ax.set_yscale("log")
    ax.set(title="Intelligence density: quality vs peak memory (lower-left is better; marker size = decode tok/s, "
                 "colour = fit class)", xlabel="peak RSS (MiB)", ylabel=y_label)
    ax.grid(alpha=0.3)
    return _png(fig)


def per_turn(df: pd.DataFrame) -> pd.DataFrame:
    """Workflow turn rows: medians per (case, turn) over repetitions, worst fit class per turn."""
    turns = df[df["turn"].notna() & (df["status"] == "ok")]
    # the same case measured in several runs: one line per run, told apart by the run id
    runs_per_label = turns.groupby(["series", "case_label"])["run_id"].nunique()
    rows = []
    for (run_id, key, turn), g in turns.groupby(["run_id", "case_key", "turn"], sort=True):
        rows.append({
            "label": f"{g['series'].iloc[0]} {g['case_label'].iloc[0]}"
                     + (f" [{run_id}]" if runs_per_label[(g['series'].iloc[0], g['case_label'].iloc[0])] > 1 else ""),
            "run_id": run_id, "case_key": key,
            "turn": int(turn), "ttft_s": g["ttft_s"].median(), "decode_tok_s": g["decode_tok_s"].median(),
            "peak_mib": g["rep_peak_rss_bytes"].max() / 2**20 if g["rep_peak_rss_bytes"].notna().any() else None,
            "budget_mib": _budget_mib(g),
            "fit_class": worst([f if isinstance(f, str) else None for f in g["fit_class"]]),
        })
    return pd.DataFrame(rows)


def plot_turns(turns: pd.DataFrame) -> bytes:
    """TTFT and peak memory against the turn: where a session stops fitting."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, g in turns.groupby("label"):
        g = g.sort_values("turn")
        line = ax1.plot(g["turn"], g["ttft_s"], label=label, zorder=1)[0]
        ax2.plot(g["turn"], g["peak_mib"], color=line.get_color(), zorder=1)
        for ax, col in ((ax1, "ttft_s"), (ax2, "peak_mib")):
            ax.scatter(g["turn"], g[col], c=[FIT_COLOURS.get(f, "#9e9e9e") for f in g["fit_class"]], s=30,
                       zorder=2, edgecolors=line.get_color())
    for budget in sorted(turns["budget_mib"].dropna().unique()):
        ax2.axhline(budget, linestyle="--", color="#b71c1c", alpha=0.6)
        ax2.annotate(f"budget {budget:,.0f} MiB", (0, budget), xycoords=("axes fraction", "data"), fontsize=8,
                     color="#b71c1c", xytext=(4, 3), textcoords="offset points")
    ax1.set(title="Time to first token per turn", xlabel="turn", ylabel="TTFT (s)")
    ax2.set(title="Peak memory per turn (points coloured by fit class)", xlabel="turn", ylabel="peak RSS (MiB)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.15))
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def series_label(cases: pd.DataFrame) -> pd.Series:
    """artifact · runtime, plus the budget when one was set (a budgeted run is a different machine)."""
    return cases["series"] + cases["budget_mib"].map(lambda b: "" if pd.isna(b) else f" ≤{b:,.0f} MiB")


def plot_speed(cases: pd.DataFrame) -> bytes:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    cases = cases.assign(label=series_label(cases))
    for series, g in cases[cases["decode_tok_s"].notna()].groupby("label"):
        g = g.sort_values("prompt_tokens")
        ax1.plot(g["prompt_tokens"], g["decode_tok_s"], marker="o", label=series)
        ax2.plot(g["prompt_tokens"], g["ttft_s"], marker="o", label=series)
    ax1.set(title="Decode speed vs filled context", xlabel="filled context (prompt tokens)", ylabel="decode (tokens/s)")
    ax2.set(title="Time to first token vs filled context", xlabel="filled context (prompt tokens)", ylabel="TTFT (s)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    return _png(fig)


def plot_memory(cases: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(11, 4))
    cases = cases.assign(label=series_label(cases))
    for label, g in cases[cases["peak_mib"].notna()].groupby("label"):
        g = g.sort_values("n_ctx")
        ax.plot(g["n_ctx"], g["peak_mib"], marker="o", label=label)
    for budget in sorted(cases["budget_mib"].dropna().unique()):
        ax.axhline(budget, linestyle="--", color="#b71c1c", alpha=0.6)
        ax.annotate(f"budget {budget:,.0f} MiB", (ax.get_xlim()[0], budget), fontsize=8, color="#b71c1c",
                    xytext=(4, 3), textcoords="offset points")
    ax.set(title="Peak memory vs configured context", xlabel="configured context n_ctx (tokens)",
           ylabel="peak RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_fit_matrix(cases: pd.DataFrame) -> bytes:
    label = series_label(cases)
    rows = sorted(label.unique())
    cols = sorted(cases["n_ctx"].unique())
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cols) + 3), 0.6 * len(rows) + 1.6))
    for i, row in enumerate(rows):
        for j, n_ctx in enumerate(cols):
            cell = cases[(label == row) & (cases["n_ctx"] == n_ctx)]
            if cell.empty:
                continue
            fit = worst([f if isinstance(f, str) else None for f in cell["fit_class"]]) or "?"
            ax.add_patch(plt.Rectangle((j, i), 0.95, 0.9, color=FIT_COLOURS.get(fit, "#9e9e9e")))
            ax.text(j + 0.475, i + 0.45, fit or "n/a", ha="center", va="center", color="white", fontsize=9,
                    fontweight="bold")
    ax.set_xlim(0, len(cols))
    ax.set_ylim(0, len(rows))
    ax.set_xticks([j + 0.475 for j in range(len(cols))], [f"{c:,}" for c in cols])
    ax.set_yticks([i + 0.45 for i in range(len(rows))], rows, fontsize=8)
    ax.invert_yaxis()
    ax.set(title="Fit class by configured context (worst over repetitions and fills)", xlabel="n_ctx (tokens)")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    return _png(fig)


def plot_timeline(tl: pd.DataFrame, title: str) -> bytes:
    tl = tl.sort_values("t_s")
    fig, ax = plt.subplots(figsize=(11, 4))
    t = tl["t_s"].to_numpy()
    for phase, g in tl.groupby((tl["phase"] != tl["phase"].shift()).cumsum()):
        name = g["phase"].iloc[0]
        colour = PHASE_COLOURS.get(name, "#c8e6c9" if str(name).startswith("rep") else None)
        if colour:
            ax.axvspan(g["t_s"].iloc[0], g["t_s"].iloc[-1], color=colour, alpha=0.5, lw=0)
            ax.text((g["t_s"].iloc[0] + g["t_s"].iloc[-1]) / 2, 0.02, name, transform=ax.get_xaxis_transform(),
                    ha="center", fontsize=8)
    ax.plot(t, tl["rss_bytes"] / 2**20, color="#1565c0", label="RSS (MiB)")
    if tl["uss_bytes"].notna().any():
        u = tl[tl["uss_bytes"].notna()]
        ax.plot(u["t_s"], u["uss_bytes"] / 2**20, "o", color="#6a1b9a", ms=3, label="unique memory (MiB)")
    ax.set(title=title, xlabel="time since the worker started (s)", ylabel="memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if tl["read_bytes"].notna().any():
        ax2 = ax.twinx()
        read = (tl["read_bytes"] - tl["read_bytes"].dropna().iloc[0]) / 2**20
        ax2.plot(t, read, color="#d84315", label="read from storage (MiB, cumulative)")
        ax2.set_ylabel("read from storage (MiB)")
        ax2.set_ylim(0, max(1.0, float(read.max()) * 1.05))
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center right")
    else:
        ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def pick_case(cases: pd.DataFrame, tl: pd.DataFrame, choice: str | None) -> pd.Series | None:
    """The case whose timeline to draw: by index, key or label text; default the largest peak."""
    have = cases[cases["case_key"].isin(set(tl["case_key"]))] if not tl.empty else cases.iloc[0:0]
    if have.empty:
        return None
    if choice is not None:
        found = have[(have["case_key"] == choice) | have["case_label"].str.contains(choice, regex=False)]
        if choice.isdigit() and int(choice) < len(have):
            found = have.iloc[[int(choice)]]
        if found.empty:
            raise ReportError(f"--case {choice!r} matches no case with a timeline; give an index, a case key or "
                              "part of a label like 'ctx2048'")
        return found.iloc[0]
    return have.loc[have["peak_mib"].fillna(0).idxmax()]


def build(paths: list[Path], out: Path, png_dir: Path | None = None, case: str | None = None) -> dict[str, bytes]:
    df, tl = load(paths)
    cases = per_case(df)
    plots = {"speed_vs_context": plot_speed(cases), "memory_vs_context": plot_memory(cases),
             "fit_matrix": plot_fit_matrix(cases)}
    dens = density(cases)
    if not dens.empty:
        plots["quality_density"] = plot_density(dens)
    turns = per_turn(df)
    if not turns.empty:
        plots["turns"] = plot_turns(turns)
    chosen = pick_case(cases, tl, case)
    if chosen is not None:
        sel = tl[(tl["case_key"] == chosen["case_key"]) & (tl["run_id"] == chosen["run_id"])]
        if sel["machine_class"].notna().any() and isinstance(chosen["machine_class"], str):
            sel = sel[sel["machine_class"] == chosen["machine_class"]]  # a fleet run measured it on each class
        plots["timeline"] = plot_timeline(sel, f"Timeline: {chosen['series']} {chosen['case_label']} "
                                               f"({chosen['fit_class'] or chosen['status']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_html(df, cases, plots, paths, dens))
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, data in plots.items():
            (png_dir / f"{name}.png").write_bytes(data)
    return plots


def _html(df: pd.DataFrame, cases: pd.DataFrame, plots: dict[str, bytes], paths: list[Path],
          dens: pd.DataFrame | None = None) -> str:
    def img(name: str, alt: str) -> str:
        if name not in plots:
            return f"<p><em>{alt}: no data</em></p>"
        data = base64.b64encode(plots[name]).decode()
        return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'

    def num(v, fmt: str) -> str:
        return "–" if v is None or pd.isna(v) else fmt.format(v)

    machines = ", ".join(sorted(df["machine_class"].dropna().unique())) or "unknown"
    rows = "\n".join(
        f"<tr><td>{html.escape(r.series)}</td><td>{html.escape(r.case_label)}</td>"
        f"<td class=fit-{r.fit_class or 'none'}>{r.fit_class or '–'}</td><td>{html.escape(r.status)}</td>"
        f"<td>{num(r.ttft_s, '{:.3f}')}</td><td>{num(r.prefill_tok_s, '{:.1f}')}</td>"
        f"<td>{num(r.decode_tok_s, '{:.1f}')}</td><td>{num(r.peak_mib, '{:.0f}')}</td>"
        f"<td>{num(r.budget_mib, '{:.0f}')}</td><td>{num(r.energy_j_per_token, '{:.3f}')}</td><td>{r.reps}</td></tr>"
        for r in cases.itertuples())
    quality = ""
    if dens is not None and not dens.empty:
        text_ids = ", ".join(sorted(df["quality_text_id"].dropna().unique())) if "quality_text_id" in df else ""
        qrows = "\n".join(
            f"<tr><td>{html.escape(r.series)}</td><td>{num(r.artifact_mib, '{:.0f}')}</td>"
            f"<td>{num(r.peak_mib, '{:.0f}')}</td><td>{num(r.decode_tok_s, '{:.1f}')}</td>"
            f"<td>{num(r.ppl, '{:.3f}')}</td><td>{num(r.ppl_ratio, '{:.3f}')}</td><td>{num(r.kl, '{:.4f}')}</td>"
            f"<td>{num(r.top1, '{:.1%}')}</td><td>{num(r.pass_rate, '{:.0%}')}</td>"
            f"<td class=fit-{r.fit_class or 'none'}>{r.fit_class or '–'}</td></tr>" for r in dens.itertuples())
        quality = f"""<h2>Quality and intelligence density</h2>
<p>Evaluation text: {html.escape(text_ids or "–")}. KL is KL(reference || artifact) per token over the
reference's top-k tokens plus a tail bucket (a lower bound of the full KL); top-1 is how often both pick the same
next token.</p>{img("quality_density", "quality vs peak memory")}
<table id="quality"><tr><th>artifact · runtime</th><th>size (MiB)</th><th>peak RSS (MiB)</th><th>decode (tok/s)</th>
<th>PPL</th><th>PPL / ref</th><th>KL</th><th>top-1</th><th>tasks</th><th>fit</th></tr>
{qrows}
</table>"""
    colours = "".join(f".fit-{k}{{background:{v};color:white;font-weight:bold}}" for k, v in FIT_COLOURS.items() if k)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fitbench report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}}
img{{max-width:100%}}table{{border-collapse:collapse;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;
text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}{colours}</style></head><body>
<h1>fitbench report</h1>
<p>{len(df)} rows from {len(paths)} file(s): {html.escape(", ".join(p.name for p in paths))}.
Machine class: {html.escape(machines)}. Medians over the repetitions of each case.</p>
<h2>Speed</h2>{img("speed_vs_context", "decode tok/s and TTFT vs filled context")}
<h2>Memory</h2>{img("memory_vs_context", "peak memory vs configured context")}
<h2>Fit</h2>{img("fit_matrix", "fit class matrix")}
{quality}
<h2>One case over time</h2>{img("timeline", "sampler timeline")}
{"<h2>Workflows: turn by turn</h2>" + img("turns", "TTFT and peak memory per turn") if "turns" in plots else ""}
<h2>Cases</h2>
<table id="cases"><tr><th>artifact · runtime</th><th>case</th><th>fit</th><th>status</th><th>TTFT (s)</th>
<th>prefill (tok/s)</th><th>decode (tok/s)</th><th>peak RSS (MiB)</th><th>budget (MiB)</th><th>energy (J/token)</th>
<th>reps</th></tr>
{rows}
</table></body></html>
"""
