"""The printers and the console: whole lines in pipes, llama-bench-style formats, data never read as markup."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from harness.cli.present import PIPE_WIDTH, Column, fit_column, fit_markup, make_console, make_printer, mib, print_rows

LONG = "/tmp/" + "x" * 300 + "/catalog.yaml"

COLUMNS = [Column("name"), Column("size_bytes", "size MiB", mib, right=True), fit_column(),
           Column("tags", show=",".join)]
RECORDS = [{"name": "a|b [/]", "size_bytes": 3 * 2**20, "fit_class": "spill", "tags": ["x", "y"]},
           {"name": ":smile: [bold]", "size_bytes": None, "fit_class": "fits", "tags": []}]


@pytest.fixture
def stdout(monkeypatch, capsys):
    """What the printers wrote; pytest's captured stdout is no terminal, like a pipe or a CI log."""
    monkeypatch.setenv("COLUMNS", "40")  # what a narrow CI runner would say
    assert not sys.stdout.isatty()
    return lambda: capsys.readouterr().out


def test_not_a_terminal_lines_are_never_wrapped_or_cut(stdout):
    console = make_console()
    assert console.width == PIPE_WIDTH
    console.print(f"{LONG}: 1 added, 0 updated")
    assert stdout() == f"{LONG}: 1 added, 0 updated\n"


def test_markdown_is_llama_bench_pipes(stdout):
    print_rows("markdown", COLUMNS, RECORDS, title="t")
    lines = stdout().splitlines()
    assert lines[:4] == ["### t", "", "| name | size MiB | fit | tags |", "| --- | ---: | --- | --- |"]
    assert lines[4] == r"| a\|b [/] | 3 | spill | x,y |"  # a pipe in data does not open a column
    assert lines[5] == "| :smile: [bold] | - | fits |  |"


def test_csv_and_json_carry_raw_values(stdout):
    print_rows("csv", COLUMNS, RECORDS)
    rows = list(csv.reader(io.StringIO(stdout())))
    assert rows[0] == ["name", "size_bytes", "fit_class", "tags"]
    assert rows[1] == ["a|b [/]", str(3 * 2**20), "spill", "x,y"] and rows[2][1] == ""
    print_rows("json", COLUMNS, RECORDS)
    assert json.loads(stdout()) == RECORDS
    print_rows("json", COLUMNS, [])
    assert json.loads(stdout()) == []


def test_table_shows_data_as_text_never_as_markup(stdout):
    print_rows("table", COLUMNS, RECORDS, title="[/] title", caption="[bold] caption")
    out = stdout()
    for text in ("a|b [/]", ":smile: [bold]", "[/] title", "[bold] caption", "spill"):
        assert text in out
    assert "\x1b[" not in out  # a pipe gets no colour codes


def test_printer_interface_streams_rows(stdout):
    p = make_printer("markdown")
    p.header([Column("n", right=True)])
    p.row({"n": 1})
    assert stdout().endswith("| 1 |\n")  # a row is out as soon as it ends, like llama-bench
    p.row({"n": 2})
    p.footer("caption")
    assert stdout() == "| 2 |\n\ncaption\n"


def test_fit_markup_escapes_the_class():
    assert fit_markup("spill") == "[red]spill[/]"
    assert fit_markup(None) == "no verdict"
    assert fit_markup("[/]") == "\\[/]"
