"""The ``fitbench`` command line: the click group, and ``main`` with the one error boundary.

Commands live by group: ``run`` (run, fit), ``catalog`` (catalog, estimate), ``analyse``
(compare, report), ``recommend``, ``share`` (contribute, upstream), ``fleet``, ``info`` (runners,
machine, thresholds, models); ``present`` does all the printing.

Expected failures (bad scenario, missing artifact, runtime not installed, unwritable
output) are ``FitbenchError``s from the module that found them; ``main`` prints each as
one line ``fitbench: error: ...`` and exits with its ``exit_code`` (2). Only bugs in
fitbench itself show a traceback.
"""

from __future__ import annotations

import sys

import click

from harness.cli import analyse, bench, catalog, fleet, info, recommend, run, share
from harness.cli.options import EXIT_INTERRUPTED, UsageError
from harness.errors import FitbenchError

__all__ = ["cli", "main", "UsageError"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fitbench")
def cli() -> None:
    """fitbench: measure whether a local model really fits this machine.

    Runs real generations at configured context lengths in isolated
    processes, samples memory and paging while they run, and writes Parquet
    results with a versioned schema.
    """


for command in (run.run, run.fit, catalog.catalog, catalog.estimate_cmd, analyse.compare_cmd, analyse.report_cmd,
                share.contribute_cmd, share.upstream, fleet.fleet, info.thresholds, info.runners, info.machine,
                info.models):
    cli.add_command(command)
cli.add_command(bench.bench)  # llama-bench's interface (harness/cli/bench.py)
cli.add_command(recommend.recommend)  # the pick from measurements (harness/recommend/)


def one_line(text: str) -> str:
    """An error message as one line, whatever the module put in it."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("fitbench: aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:  # click's own usage errors: one line too, their exit code (2)
        click.echo(f"fitbench: error: {one_line(exc.format_message())} (see fitbench --help)", err=True)
        sys.exit(exc.exit_code)
    except FitbenchError as exc:
        click.echo(f"fitbench: error: {one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    if isinstance(code, int) and code:  # ctx.exit(n) in standalone_mode=False comes back as a value
        sys.exit(code)
