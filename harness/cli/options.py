"""Options and arguments several commands share, parsed into fitbench's own types.

Whatever the user typed wrong ends in a ``UsageError``: one line naming the option, exit 2.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import yaml

from harness.artifact import FORMAT_RUNTIMES  # noqa: F401  (re-exported for the commands)
from harness.errors import FitbenchError
from harness.fit import Thresholds, parse_size

EXIT_INTERRUPTED = 130


class UsageError(FitbenchError):
    """A bad option or argument that the command line itself finds: one line, exit 2."""


class LazyChoice(click.Choice):
    """A choice whose values come from a module the command imports only when it runs
    (``compare --by`` takes its columns from harness.analyse.compare, which imports DuckDB)."""

    def __init__(self, load) -> None:
        self._load = load
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        return tuple(self._load())

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ assigns it; the loader is the source
        pass


def format_option(default: str = "table"):
    from harness.cli.present import FORMATS

    return click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default=default, show_default=True,
                        help="table for people, markdown for issues, csv and json (raw values) for scripts")


THRESHOLD_OPTION = click.option(
    "--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
    help="override a fit threshold, e.g. --threshold min_decode_tok_s=20 (see `fitbench thresholds`)")


def size_option(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def threshold_options(base: Thresholds, items: tuple[str, ...]) -> Thresholds:
    values: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected NAME=VALUE")
            values[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--threshold {item!r}: write it as NAME=NUMBER, e.g. min_decode_tok_s=20") from None
    try:
        return base.merged(values)
    except ValueError as exc:
        raise UsageError(f"--threshold: {exc}") from None


def option_values(items: tuple[str, ...]) -> dict:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--option {item!r}: write it as NAME=VALUE, e.g. n_threads=4")
        try:
            values[name.strip()] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise UsageError(f"--option {item!r}: the value is not a number, word or YAML list") from None
    return values


def contexts_option(text: str) -> list[int]:
    from harness.scenario import parse_contexts

    try:
        return parse_contexts(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


COOLDOWN_OPTION = click.option(
    "--cooldown", type=click.FloatRange(min=0), metavar="SECONDS",
    help="idle this long before each case after the first (the scenario's cooldown_s), so heat and boost "
         "clocks do not carry over")


def scenario_overrides(command):
    """The options `run` and `fleet run` share to override what a scenario file says."""
    for option in reversed([
        click.option("--repetitions", "-r", type=click.IntRange(min=1), help="override the scenario's repetitions"),
        click.option("--contexts", "-c", help="override the scenario's contexts, e.g. 512,2048"),
        click.option("--gen-tokens", "-n", type=click.IntRange(min=2), help="override tokens generated per repetition"),
        click.option("--timeout", type=click.FloatRange(min=1), help="override seconds allowed per case"),
    ]):
        command = option(command)
    return command


def with_overrides(sc, repetitions: int | None, contexts: str | None, gen_tokens: int | None,
                   timeout: float | None, budget: str | None, thresholds: tuple[str, ...]):
    """The scenario with the command line's overrides applied (shared by run and fleet run)."""
    overrides: dict = {}
    if budget:
        overrides["budgets"] = [size_option("--budget", budget)]
    if thresholds:
        overrides["thresholds"] = threshold_options(sc.thresholds, thresholds)
    if repetitions:
        overrides["repetitions"] = repetitions
    if contexts:
        overrides["contexts"] = contexts_option(contexts)
    if gen_tokens:
        if sc.workflows:
            raise UsageError("--gen-tokens: this scenario runs a workflow, which sets its own reply_tokens; "
                             "change it there")
        overrides["gen_tokens"] = gen_tokens
    if timeout:
        overrides["timeout"] = timeout
    return replace(sc, **overrides)


def no_cases(scenario: Path) -> UsageError:
    return UsageError(f"{scenario}: the scenario expands to no cases; check contexts and prompt_tokens")


def read_result_files(patterns: tuple[str, ...] | list[str]) -> list[tuple[str, list[dict]]]:
    """(path, rows) per result file named by files, globs or folders (a timeline companion stands for its file)."""
    from harness.results import expand_result_files, read_results

    return [(str(path), read_results(path).to_pylist()) for path in expand_result_files(patterns)]


def sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
