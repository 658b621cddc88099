"""``fitbench recommend``: the pick and the list, from measurements, for the user's constraints."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import format_option, option_values, read_result_files
from harness.cli.present import Column, make_console, mib, number, print_json, print_rows
from harness.recommend.constraints import RecommendError

MARK = {True: "ok", False: "MISS", None: "?"}
CHECK_TITLES = (("memory", "mem"), ("context", "ctx"), ("decode", "speed"), ("ttft", "ttft"), ("quality", "qual"))


@click.command("recommend")
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--budget", help="memory the model may use, e.g. 8GiB or 250MiB (default: this machine's available "
                               "memory)")
@click.option("--context", type=int, default=4096, show_default=True, help="context length the model must hold")
@click.option("--min-tok-s", help="slowest acceptable decode speed, tokens/s (default: the fit threshold, "
                                  "`fitbench thresholds`)")
@click.option("--max-ttft", help="longest acceptable time to first token, e.g. 5s or 800ms (default: the fit "
                                 "threshold)")
@click.option("--max-kl", help="quality: highest mean KL divergence from the reference, nats/token, e.g. 0.05")
@click.option("--max-ppl-ratio", help="quality: highest perplexity relative to the reference, e.g. 1.05")
@click.option("--tasks", type=click.Path(path_type=Path), help="quality: a JSONL file of task checks")
@click.option("--min-pass-rate", help="quality: lowest task pass rate on --tasks, a fraction, e.g. 0.8")
@click.option("--reference", type=click.Path(path_type=Path),
              help="quality reference artifact (e.g. the F16 GGUF): --measure measures KL from it")
@click.option("--reference-runtime", help="runtime of --reference (default: the one for its format)")
@click.option("--users", type=int, default=1, show_default=True,
              help="users at once; rows with a parallel/users column answer it (rows without count as one user)")
@click.option("--runtime", default="any", show_default=True, help="any, llama.cpp, torch, onnx or mlx")
@click.option("--machine-class", default="this", show_default=True,
              help="this (this machine), a machine class, or 'all' to compare classes side by side")
@click.option("--results", "result_files", multiple=True, help="result files, globs or folders (fleet datasets too)")
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path),
              help="catalog with local and pulled community fits (default: $FITBENCH_CATALOG or ./catalog.yaml)")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE",
              help="runner option for the artifacts given, in the runtimes that have it, e.g. --option n_threads=1 "
                   "(used by --measure and in the command to run)")
@click.option("--measure", is_flag=True, help="run the fewest cases that decide the candidates no measurement decides")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="where --measure writes its results (its earlier rows there are reused)")
@click.option("--fill", type=float, default=0.5, show_default=True, help="fraction of the context the prompt fills "
                                                                        "in measured cases")
@click.option("--gen-tokens", "-n", type=click.IntRange(min=2), default=16, show_default=True,
              help="tokens generated per measured case")
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=1, show_default=True,
              help="repetitions per measured case")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="seconds per measured case")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="port in the ready-to-run command")
@format_option()
def recommend(artifacts: tuple[Path, ...], budget, context, min_tok_s, max_ttft, max_kl, max_ppl_ratio, tasks,
              min_pass_rate, reference, reference_runtime, users, runtime, machine_class, result_files, catalog_path,
              options, measure, output_dir, fill, gen_tokens, repetitions, timeout, port, fmt) -> None:
    """Pick what to run for your constraints, from measurements: the pick, every candidate's verdict
    against each constraint with the measurement behind it, and the Pareto front.

    ARTIFACTS: GGUF files, model folders, or a folder of them (e.g. the quants of one model).
    Candidates also come from --results and the catalog (local and pulled community fits).
    """
    import psutil

    from harness.catalog import default_catalog_path, load_catalog
    from harness.measure import machine as machine_mod
    from harness.recommend import constraints as cons
    from harness.recommend.candidates import gather
    from harness.recommend.judge import assess, class_budget, closest, mark_front, pick, predictor

    c = cons.build(budget=budget, available_bytes=psutil.virtual_memory().available, context=context,
                   min_tok_s=min_tok_s, max_ttft=max_ttft, max_kl=max_kl, max_ppl_ratio=max_ppl_ratio,
                   min_pass_rate=min_pass_rate, tasks=tasks, users=users, runtime=runtime,
                   machine_class=machine_class, fill=fill)
    if measure and machine_class != "this":
        raise RecommendError("--measure measures this machine; use it with --machine-class this")
    if reference is not None and not reference.exists():
        raise RecommendError(f"--reference {reference}: not found; give the reference artifact (e.g. the F16 GGUF)")
    patterns = list(result_files)
    if measure and output_dir.is_dir() and any(output_dir.glob("*.parquet")):
        patterns.append(str(output_dir))  # reuse every earlier row
    results = read_result_files(patterns) if patterns else []
    cat_path = catalog_path or default_catalog_path()
    catalog = load_catalog(cat_path) if cat_path.exists() else None
    candidates = gather(list(artifacts), results, catalog, c.runtime, option_values(options))
    if not candidates:
        what = f" for runtime {c.runtime}" if c.runtime else ""
        raise RecommendError(f"no candidates{what}: give artifacts (a GGUF, a model folder or a folder of them), "
                             f"--results files, or a catalog with fits (`fitbench catalog update`)")
    reference_known = reference is not None or any(
        o.quality.get("quality_kl_mean") is not None or o.quality.get("quality_ppl_ratio") is not None
        for cand in candidates for o in cand.observations)
    c = cons.with_quality_default(c, reference_known)
    this_class = machine_mod.fingerprint().machine_class
    predict = predictor(c.fill)
    err = make_console(stderr=True)

    if machine_class == "all":
        _compare_classes(candidates, c, this_class, predict, fmt)
        return
    mc = this_class if machine_class == "this" else machine_class
    report = None
    if measure:
        from harness.recommend.measure import MeasureSettings
        from harness.recommend.measure import measure as run_measure

        ref_runtime = reference_runtime
        if reference is not None and ref_runtime is None:
            from harness.artifact import FORMAT_RUNTIMES, inspect_artifact

            ref_runtime = FORMAT_RUNTIMES.get(inspect_artifact(reference).format, "llama.cpp")
        settings = MeasureSettings(output=output_dir, gen_tokens=gen_tokens, repetitions=repetitions,
                                   timeout=timeout, reference=reference, reference_runtime=ref_runtime)
        report = run_measure(candidates, c, settings, mc, c.budget_bytes, predict,
                             lambda text: err.print(f"fitbench: {text}"))
    budget_bytes = class_budget(c, mc, this_class, [o for x in candidates for o in x.observations])
    assessed = [assess(cand, c, mc, budget_bytes, predict) for cand in candidates]
    if not any(a.figures or any(k.passed is not None for k in a.checks if k.name != "context") for a in assessed):
        raise RecommendError(f"no candidate has a measurement or prediction for machine class {mc!r}; "
                             "use --measure, --results or --machine-class all")
    mark_front(assessed)
    chosen, near = pick(assessed), None
    if chosen is None:
        near = closest(assessed)
    order = sorted(assessed, key=lambda a: ({"pass": 0, "unknown": 1, "fail": 2}[a.verdict], a.predicted_fail,
                                            -(a.value("decode_tok_s") or 0), a.candidate.label))
    answers = _serve(chosen, c, port)
    _print(fmt, c, mc, order, chosen, near, answers, report)


def _serve(chosen, c, port: int) -> list:
    if chosen is None or chosen.candidate.path is None:
        return []
    from harness.recommend.serve import serve_answers

    cand = chosen.candidate
    return serve_answers(cand.path, cand.runtime, {**cand.options, **cand.run_options}, c.context, port=port)


def evidence(a) -> str:
    """Which measurement (or prediction) each figure comes from, grouped by source."""
    names = {"peak_bytes": "peak", "decode_tok_s": "tok/s", "ttft_s": "TTFT", "quality_kl_mean": "KL",
             "quality_ppl_ratio": "PPL ratio", "task_pass_rate": "tasks"}
    by_source: dict[str, list[str]] = {}
    for key, fig in a.figures.items():
        if fig.value is None:
            continue
        origin = "measured here" if fig.origin == "measured" else fig.origin
        by_source.setdefault(f"{origin}: {fig.where}", []).append(names.get(key, key))
    parts = [f"{', '.join(v)} {k}" for k, v in by_source.items()]
    if a.samples == 1 and any(f.origin in ("catalog", "community") for f in a.figures.values()):
        parts.append("(one sample only)")
    return "; ".join(parts) or "no measurement"


def record(a) -> dict:
    """One candidate as raw values (csv/json) with what the table shows."""
    checks = {k.name: k for k in a.checks}
    rec = {
        "front": a.front, "candidate": a.candidate.label, "artifact": a.candidate.name, "runtime": a.candidate.runtime,
        "options": a.candidate.options, "path": str(a.candidate.path) if a.candidate.path else None,
        "machine_class": a.machine_class, "verdict": a.verdict + (" (predicted)" if a.predicted_fail else ""),
        "peak_bytes": a.value("peak_bytes"),
        "peak_source": a.figures["peak_bytes"].origin if "peak_bytes" in a.figures else None,
        "decode_tok_s": a.value("decode_tok_s"), "ttft_s": a.value("ttft_s"),
        "quality_kl_mean": a.value("quality_kl_mean"), "quality_ppl_ratio": a.value("quality_ppl_ratio"),
        "task_pass_rate": a.value("task_pass_rate"), "quality_score": a.quality_score, "quality_per_gib": a.per_gib,
        "misses": "; ".join(f"{k.name}: {k.text}" for k in a.failed()) or None,
        "evidence": evidence(a), "samples": a.samples, "machines": a.machines,
    }
    for name, _ in CHECK_TITLES:
        rec[f"check_{name}"] = checks[name].passed if name in checks else None
    return rec


def list_columns() -> list[Column]:
    return [
        Column("front", "front", get=lambda r: r["front"], label=lambda r: "*" if r["front"] else ""),
        Column("candidate", wrap=True),
        Column("verdict"),
        *[Column(f"check_{name}", title, label=lambda r, k=f"check_{name}": MARK[r[k]]) for name, title in CHECK_TITLES],
        Column("peak_bytes", "peak MiB", right=True,
               label=lambda r: mib(r["peak_bytes"]) + (" (pred)" if r["peak_source"] == "predicted" else "")),
        Column("decode_tok_s", "tok/s", number("{:,.1f}"), right=True),
        Column("ttft_s", "TTFT s", number("{:,.2f}"), right=True),
        Column("quality_kl_mean", "KL", number("{:.4f}"), right=True),
        Column("quality_per_gib", "quality/GiB", number("{:,.2f}"), right=True),
        Column("misses", wrap=True),
        Column("evidence", wrap=True),
    ]


def _headline(a) -> str:
    parts = []
    if a.value("decode_tok_s") is not None:
        parts.append(f"{a.value('decode_tok_s'):,.1f} tok/s")
    if a.value("ttft_s") is not None:
        parts.append(f"TTFT {a.value('ttft_s'):,.2f} s")
    if a.value("peak_bytes") is not None:
        parts.append(f"peak {mib(a.value('peak_bytes'))} MiB")
    if a.value("quality_kl_mean") is not None:
        parts.append(f"KL {a.value('quality_kl_mean'):.4f}")
    return ", ".join(parts)


def _fastest_above(order: list, chosen, verdict: str):
    """The fastest candidate with ``verdict`` that decodes faster than the pick. "fail": one that misses a
    constraint (what the pick costs); "pass": one inside the speed tie band that lost on quality or memory."""
    speed = chosen.value("decode_tok_s") or 0
    faster = [a for a in order if a.verdict == verdict and (a.value("decode_tok_s") or 0) > speed]
    return max(faster, key=lambda a: a.value("decode_tok_s"), default=None)


def _print(fmt: str, c, mc: str, order: list, chosen, near, answers: list, report) -> None:
    records = [record(a) for a in order]
    front = [a.candidate.label for a in order if a.front]
    if fmt == "json":
        print_json({
            "constraints": c.describe(), "machine_class": mc, "budget_bytes": c.budget_bytes, "context": c.context,
            "pick": record(chosen) if chosen else None,
            "faster_but_missing": (record(f) if chosen and (f := _fastest_above(order, chosen, "fail")) else None),
            "closest": ({**record(near), "misses": [{"constraint": k.name, "text": k.text} for k in near.failed()]}
                        if near else None),
            "candidates": records, "pareto_front": front,
            "run": [s.to_dict() for s in answers], "measure": report.to_dict() if report else None,
        })
        return
    if fmt == "csv":
        print_rows(fmt, list_columns(), records)
        return
    out = make_console()
    md = fmt == "markdown"

    def line(text: str) -> None:
        out.print(text, markup=False, highlight=False)

    line(("**fitbench recommend**: " if md else "fitbench recommend: ") + f"{c.describe()} on {mc}")
    line("")
    if chosen is not None:
        line(f"pick: {chosen.candidate.label}: {_headline(chosen)} ({evidence(chosen)})")
        tie = _fastest_above(order, chosen, "pass")
        if tie is not None:
            from harness.recommend.judge import SPEED_TIE
            ahead = (tie.value("decode_tok_s") or 0) / (chosen.value("decode_tok_s") or 1) - 1
            why = "better quality" if (chosen.quality_score or 0) > (tie.quality_score or 0) else "less memory"
            line(f"as fast (within {SPEED_TIE:.0%}): {tie.candidate.label}: {_headline(tie)}; {ahead:.0%} faster, "
                 f"but the pick has {why}")
        faster = _fastest_above(order, chosen, "fail")
        if faster is not None:
            misses = "; ".join(f"{k.name} ({k.text})" for k in faster.failed())
            line(f"faster but not picked: {faster.candidate.label}: {_headline(faster)}; it misses {misses}")
    elif near is not None:
        misses = "; ".join(f"{k.name} ({k.text})" for k in near.failed())
        line(f"nothing meets every constraint. Closest: {near.candidate.label}: {_headline(near)}; it misses {misses}"
             + (" (a prediction: --measure measures it)" if near.predicted_fail else ""))
    else:
        line("no candidate is decided by a measurement yet; add --measure to run the few cases that decide them")
    if report is not None and report.max_context:
        for label, n in report.max_context.items():
            line(f"  {label} meets every other constraint up to context {n:,}" if n
                 else f"  {label} misses even at the smallest context tried")
    line("")
    print_rows(fmt, list_columns(), records, title="candidates at context "
               f"{c.context:,} (front: on the Pareto front of quality x speed x memory)", console=out)
    line("")
    line("Pareto front (quality x speed x memory): " + (", ".join(front) if front else "none measured yet"))
    for answer in answers:
        line("")
        line(f"run it ({answer.kind}): {answer.command}" if answer.command else f"run it ({answer.kind}):")
        for name, content in answer.files.items():
            line(f"  {name}:")
            for text in content.splitlines():
                line(f"    {text}")
        if answer.note:
            line(f"  {answer.note}")
    if report is not None:
        line("")
        line(f"--measure: ran {report.cases_run} case(s) in {report.wall_s:,.0f} s; an exhaustive sweep of the same "
             f"candidates needs {report.exhaustive_at_context} at context {c.context:,}, "
             f"{report.exhaustive_sweep} over contexts {', '.join(f'{n:,}' for n in report.sweep_contexts)}"
             + (f"; results: {report.results_path}" if report.results_path else ""))


def _compare_classes(candidates, c, this_class: str, predict, fmt: str) -> None:
    """--machine-class all: the same constraints answered per machine class, side by side."""
    from harness.recommend.judge import assess, class_budget, pick

    observations = [o for x in candidates for o in x.observations]
    classes = sorted({o.machine_class for o in observations if o.machine_class})
    if not classes:
        raise RecommendError("--machine-class all: no measurements name a machine class; give --results, fleet "
                             "datasets or pull community fits (`fitbench catalog pull`)")
    records = []
    for mc in classes:
        budget = class_budget(c, mc, this_class, observations)
        assessed = [assess(cand, c, mc, budget, predict if mc == this_class else None) for cand in candidates]
        judged = [a for a in assessed if a.figures and any(f.origin != "predicted" for f in a.figures.values())]
        chosen = pick(judged)
        obs = [o for o in observations if o.machine_class == mc and o.users == c.users]
        samples = sum(o.samples for o in obs)
        machines = max((o.machines or 0 for o in obs), default=0)
        records.append({
            "machine_class": mc + (" (this)" if mc == this_class else ""), "budget_bytes": budget,
            "candidates": len(judged), "passing": sum(a.verdict == "pass" for a in judged),
            "pick": chosen.candidate.label if chosen else None,
            "decode_tok_s": chosen.value("decode_tok_s") if chosen else None,
            "peak_bytes": chosen.value("peak_bytes") if chosen else None,
            "pick_samples": chosen.samples if chosen else None,
            "samples": samples, "machines": machines or None,
            "note": ("from one sample only" if chosen is not None and chosen.samples <= 1
                     else None if chosen else "nothing passes" if judged else "nothing measured"),
            "evidence": evidence(chosen) if chosen else None,
        })
    columns = [Column("machine_class", "machine class"), Column("budget_bytes", "budget MiB", mib, right=True),
               Column("candidates", right=True), Column("passing", right=True), Column("pick", wrap=True),
               Column("decode_tok_s", "tok/s", number("{:,.1f}"), right=True),
               Column("peak_bytes", "peak MiB", mib, right=True),
               Column("pick_samples", "pick samples", right=True), Column("samples", "all samples", right=True),
               Column("machines", right=True), Column("note", wrap=True), Column("evidence", wrap=True)]
    if fmt == "json":
        print_json({"constraints": c.describe(), "machine_classes": records})
        return
    print_rows(fmt, columns, records, title=f"recommend per machine class: {c.describe()}")
