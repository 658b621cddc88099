"""``fitbench bench``: llama-bench's flags and output, fitbench's isolated, sampled measurements.

Results go to stdout only (``-o json > x.json`` is clean JSON); progress goes to stderr.
Every case also lands in a Parquet results file like any ``fitbench run``.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path

import click

from harness.benchsweep import BENCH_FIELDS, FLAGS, Sweep, bench_records, expand, parse_list
from harness.cli.options import COOLDOWN_OPTION, EXIT_INTERRUPTED, UsageError, sigterm_as_interrupt
from harness.cli.present import bench_columns, case_line, make_bench_printer, make_console, measurement_warnings, serving_answers
from harness.cli.run import keep_pandas_out
from harness.measure import machine as machine_mod
from harness.preflight import check_output_dir, check_scenario
from harness.results import ResultWriter
from harness.resume import RunLock
from harness.scenario import ScenarioError
from harness.suite import CaseResult, SuiteInterrupted, new_run_id, run_suite

OUTPUTS = ("md", "csv", "json", "jsonl", "table")


def _flag_options(command):
    """-t, -b, -ngl, -fa, -ctk, -ctv: comma lists that become runner options (click takes a
    multi-letter single-dash name like ``-ctk`` as a long option)."""
    long_names = {"-t": "--threads", "-b": "--batch-size", "-ngl": "--n-gpu-layers", "-fa": "--flash-attn",
                  "-ctk": "--cache-type-k", "-ctv": "--cache-type-v"}
    for flag in reversed(FLAGS):
        command = click.option(flag.flag, long_names[flag.flag], flag.field, metavar="LIST",
                               help=f"{flag.field} values to sweep (runtimes: {', '.join(sorted(flag.runtimes))})"
                               )(command)
    return command


@click.command("bench")
@click.option("-m", "--model", "models", multiple=True, required=True, metavar="PATH[,PATH...]",
              help="artifact(s): GGUF -> llama.cpp, ONNX folder -> onnxruntime, MLX folder -> mlx, HF folder -> "
                   "torch; repeat or comma-separate")
@click.option("-p", "--n-prompt", "n_prompt", default="512", show_default=True, metavar="LIST",
              help="prompt tokens; pp t/s is the prefill rate over the whole prompt (n_depth + n_prompt tokens)")
@click.option("-n", "--n-gen", "n_gen", default="128", show_default=True, metavar="LIST",
              help="tokens generated (at least 2); tg t/s is the decode rate after the first token")
@click.option("-d", "--n-depth", "n_depth", default="0", show_default=True, metavar="LIST",
              help="tokens of context before the prompt: the case's prompt is n_depth + n_prompt tokens")
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=16),
              help="context size; at least n_prompt + n_gen + n_depth (the default)")
@_flag_options
@click.option("-npl", "--parallel", "parallel", default="1", show_default=True, metavar="LIST",
              help="sessions at once on one loaded model, each with its own prompt and context (llama-batched-bench's "
                   "-npl); adds all-sessions tg t/s, p90 TTFT and the serving verdict (docs/concurrency.md)")
@click.option("--runtime", help="runner to use instead of the one the artifact's format implies")
@click.option("-r", "--repetitions", type=click.IntRange(min=1, max=10_000), default=5, show_default=True)
@click.option("-o", "--output", "output", type=click.Choice(OUTPUTS), default="md", show_default=True,
              help="stdout format: md, csv, json (llama-bench's field names), jsonl (a record per line as it comes)")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="folder for the Parquet results file")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="seconds per case")
@COOLDOWN_OPTION
def bench(models: tuple[str, ...], n_prompt: str, n_gen: str, n_depth: str, n_ctx: int | None, runtime: str | None,
          parallel: str, repetitions: int, output: str, output_dir: Path, timeout: float, cooldown: float | None,
          **flags: str | None) -> None:
    """Measure like llama-bench: every comma list sweeps, one isolated, sampled case per combination.

    Each case gives two tests: pp (prefill tok/s over the case's whole prompt, from an empty cache) and tg
    (decode tok/s), as mean ± stddev over the repetitions, plus peak memory, TTFT and the fit class.
    """
    keep_pandas_out()
    sweep = Sweep(
        models=[Path(m) for text in models for m in parse_list("-m", text, str)],
        n_prompt=parse_list("-p", n_prompt, minimum=0), n_gen=parse_list("-n", n_gen, minimum=2),
        n_depth=parse_list("-d", n_depth, minimum=0), n_ctx=n_ctx, runtime=runtime, repetitions=repetitions,
        timeout=timeout, parallel=parse_list("-npl", parallel, minimum=1),
        flags={f.field: parse_list(f.flag, flags[f.field], f.parse) for f in FLAGS if flags.get(f.field) is not None},
    )
    cases, scenarios = expand(sweep)
    artifacts: dict = {}
    for sc in scenarios:  # format, runtime installed, context within what the model was trained for
        try:
            artifacts.update(check_scenario(sc))
        except ScenarioError as exc:  # the scenario is the sweep's: name the flags, not a YAML field
            named = "-c/-p/-n/-d" if exc.where == "contexts" else "-m/--runtime"
            raise UsageError(f"{named}: {exc.message}") from None
    out = check_output_dir(output_dir)
    run_id = new_run_id()
    writer = ResultWriter(out / f"bench-{run_id}.parquet")
    err = make_console(stderr=True)
    mach = machine_mod.fingerprint()
    err.print(f"fitbench bench: {len(cases)} case(s) on {mach.machine_class}, results -> "
              f"{writer.results_path}")
    printer = make_bench_printer(output)
    printer.header(bench_columns(sweep.shown_fields(), output, BENCH_FIELDS))
    done: list[CaseResult] = []

    def on_case_end(result: CaseResult) -> None:
        done.append(result)
        err.print(case_line(result, len(cases)))
        for record in bench_records(cases[result.case.index], result.rows, str(writer.results_path)):
            printer.row(record)

    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    with RunLock(writer.results_path):
        try:
            run_suite([replace(bc.case, cooldown_s=cooldown or 0.0) for bc in cases], artifacts, mach, writer, run_id,
                      on_case_end=on_case_end, on_note=lambda text: err.print(text))
        except (SuiteInterrupted, KeyboardInterrupt):
            printer.footer()
            err.print(f"fitbench: interrupted after {len(done)} of {len(cases)} case(s); "
                      f"results so far are in {writer.results_path}")
            sys.exit(EXIT_INTERRUPTED)
    printer.footer()
    for line in measurement_warnings(done):
        err.print(line)
    for line in serving_answers(done):
        err.print(line)
    err.print(f"results: {writer.results_path}")
