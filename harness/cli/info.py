"""``fitbench runners|machine|thresholds|models``: what this install and this machine offer."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import format_option
from harness.cli.present import Column, make_console, print_json, print_rows

JSON_FLAG = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table (= --format json)")


@click.command()
@format_option()
def thresholds(fmt: str) -> None:
    """Show the fit thresholds, their defaults and meaning."""
    from harness.fit import THRESHOLD_HELP, Thresholds

    defaults = Thresholds()
    records = [{"name": name, "default": getattr(defaults, name), "meaning": text}
               for name, text in THRESHOLD_HELP.items()]
    # a quality target that is off has no default: "off" for people, null for scripts
    columns = [Column("name"), Column("default", label=lambda r: _threshold_text(r["default"]), right=True),
               Column("meaning", wrap=True)]
    print_rows(fmt, columns, records,
               title="fit thresholds (override in a scenario's thresholds: or with --threshold NAME=VALUE)")


def _threshold_text(value) -> str:
    return "off" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:g}"


def runner_rows() -> list[dict]:
    from runners.base import get_runner_class, registered_runners

    rows = []
    for name in sorted(registered_runners()):
        try:
            cls = get_runner_class(name)
            avail = cls.available()
            rows.append({"runtime": name, "formats": sorted(cls.formats), "available": avail.available,
                         "version": avail.version, "devices": avail.devices, "reason": avail.reason,
                         "install": avail.install, "notes": avail.notes})
        except Exception as exc:  # a broken third-party runner must not hide the others
            rows.append({"runtime": name, "formats": [], "available": False, "version": None, "devices": [],
                         "reason": f"runner failed to load: {exc}", "install": None, "notes": None})
    return rows


def _runner_note(r: dict) -> str:
    return (r["notes"] or "") if r["available"] else f"{r['reason']}; {r['install'] or ''}".strip("; ")


@click.command()
@format_option()
@JSON_FLAG
def runners(fmt: str, as_json: bool) -> None:
    """List runtimes: installed or not, versions, devices, and how to install the missing ones."""
    rows = runner_rows()
    if as_json or fmt == "json":
        print_json(rows)  # the records as they are (lists stay lists), as scripts have read them so far
        return
    columns = [Column("runtime"), Column("formats", show=",".join),
               Column("available", show=lambda a: "yes" if a else "no", style=lambda a: "green" if a else "red"),
               Column("version"), Column("devices", show=lambda d: ",".join(d) or "-"),
               Column("note", "notes / how to install / why not", get=_runner_note, wrap=True)]
    print_rows(fmt, columns, rows, title="fitbench runners")


def _machine_value(key: str, value) -> str:
    if key == "ram_bytes":
        return f"{value / 2**30:.1f} GiB"
    if key == "gpus":
        return ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB, driver {g['driver']})"
                         for g in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


@click.command()
@format_option()
@JSON_FLAG
def machine(fmt: str, as_json: bool) -> None:
    """Show this machine's fingerprint, id and class as recorded in results."""
    from harness.measure import machine as machine_mod

    data = machine_mod.fingerprint().to_dict()
    if as_json or fmt == "json":
        print_json(data)  # one object, as results record it
        return
    records = [{"field": key, "value": value} for key, value in data.items()]
    columns = [Column("field"), Column("value", label=lambda r: _machine_value(r["field"], r["value"]), wrap=True)]
    print_rows(fmt, columns, records, title="this machine")


@click.group()
def models() -> None:
    """Sample artifacts for every runtime, made locally from the bundled GGUF."""


@models.command("prepare-sample")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="where the sample GGUF is and the artifacts go")
@click.option("--only", help="comma-separated steps to make (default: all)")
@click.option("--force", is_flag=True, help="remake artifacts that already exist")
@click.option("--skip-missing", is_flag=True,
              help="pass over steps whose converter is not installed instead of failing (what `make` uses)")
def models_prepare_sample(models_dir: Path, only: str | None, force: bool, skip_missing: bool) -> None:
    """Make the HF safetensors, ONNX and MLX variants of the sample model (cached, idempotent)."""
    from harness import samples

    err = make_console(stderr=True)
    wanted = [s.strip() for s in only.split(",") if s.strip()] if only else None
    made = samples.prepare(models_dir, wanted, force, progress=lambda msg: err.print(msg, markup=False),
                           skip_missing=skip_missing)  # a SampleError is a FitbenchError: one line, exit 2
    for name, path in made.items():
        click.echo(f"{name}\t{path}")
