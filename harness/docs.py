"""The reference pages in docs/ that are made from the code, so they cannot drift from it.

    python -m harness.docs            # (re)write them: what `make docs` runs
    python -m harness.docs --check    # exit 1 naming every page that differs from the code

- docs/results-columns.md: ``RESULT_COLUMNS`` and ``TIMELINE_COLUMNS`` of harness/results.py;
- docs/scenario-fields.md: ``SCENARIO_FIELDS`` and ``MODEL_ENTRY_FIELDS`` of harness/scenario.py,
  with the ``quality:`` and ``workflow:`` fields from their own modules;
- docs/fit-thresholds.md: the ``Thresholds`` defaults and ``THRESHOLD_HELP`` of harness/fit.py;
- docs/shared-columns.md: the allow-list of harness/share/allowlist.py, what ``fitbench contribute``
  sends and how each column is treated.

Each page is a pure function of the code (no dates, no paths of this machine), so the
committed page and a fresh one are byte-identical until the code changes;
tests/test_docs.py holds them to that.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Callable

from harness.errors import FitbenchError

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "run `make docs` (python -m harness.docs) and commit the result"


class DocsError(FitbenchError):
    """The code cannot be documented as it stands (e.g. a threshold without help)."""


def _header(source: str) -> str:
    return (f"<!-- Generated from {source} by `python -m harness.docs` (`make docs`). "
            "Do not edit: change the code and regenerate. -->\n")


def _cell(text: object) -> str:
    """One Markdown table cell: pipes escaped, on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- results columns ------------------------------------------------------------------

# "(schema 1.1)" or "(schema 1.3; more words)" in a column's description
_SINCE = re.compile(r"\s*\(schema (\d+\.\d+)(\)|;\s*)")
_TYPE_NAMES = {"string": "string", "int64": "int64", "double": "float64", "bool": "bool"}


def _type_name(pa_type: object) -> str:
    text = str(pa_type)
    if text.startswith("timestamp"):
        return "timestamp (UTC)" if "UTC" in text else "timestamp"
    return _TYPE_NAMES.get(text, text)


def _column_rows(columns: list) -> list[list[object]]:
    rows = []
    for col in columns:
        doc = col.doc
        since = getattr(col, "since", None)  # a Column may carry it; else the doc's "(schema X.Y)"
        found = _SINCE.search(doc)
        if found:
            since = since or found.group(1)
            rest = " (" if found.group(2) != ")" else ""  # keep the words after the semicolon in parentheses
            doc = (doc[:found.start()] + rest + doc[found.end():]).strip()
        rows.append([f"`{col.name}`", _type_name(col.type), doc, since or ""])
    return rows


def results_columns() -> str:
    from harness import results

    return "".join([
        _header("harness/results.py"),
        f"# Result columns (schema {results.SCHEMA_VERSION})\n\n",
        "Every column is nullable; the schema only grows by nullable columns (a minor version), and "
        "`schema_version` is in every row and in the file metadata. Each column's description is "
        "also stored in the Parquet field metadata (`doc`). *Since*: the schema version that added "
        "the column, where its description says so. How the files are named, written and read: "
        "[results.md](results.md).\n\n",
        f"## `<scenario>-<run id>.parquet`: one row per case repetition ({len(results.RESULT_COLUMNS)} columns)\n\n",
        "A case that failed before any repetition finished has one row with `repetition` null; a "
        "workflow case also has one row per turn (`turn` set).\n\n",
        _table(["column", "type", "meaning", "since"], _column_rows(results.RESULT_COLUMNS)),
        f"\n`status` is one of: {', '.join(f'`{s}`' for s in results.STATUSES)}.\n\n",
        f"## `<scenario>-<run id>.timeline.parquet`: the raw sampler samples ({len(results.TIMELINE_COLUMNS)} "
        "columns)\n\n",
        "One row per sample, keyed by `run_id` and `case_key`; counters are cumulative from the "
        "start of the case.\n\n",
        _table(["column", "type", "meaning", "since"], _column_rows(results.TIMELINE_COLUMNS)),
    ])


# ---- scenario fields ------------------------------------------------------------------

def _dataclass_defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _yaml_value(value: object) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def scenario_fields() -> str:
    from harness import scenario, workflow
    from harness.quality import spec

    top = [[f"`{f.name}`", f.type, f.default, f.help] for f in scenario.SCENARIO_FIELDS]
    model = [[f"`{f.name}`", f.type, f.default, f.help] for f in scenario.MODEL_ENTRY_FIELDS]
    quality_defaults = _dataclass_defaults(spec.QualitySpec)
    quality = [[f"`{name}`", _yaml_value(quality_defaults[name]) if name in quality_defaults else "see meaning", text]
               for name, text in spec.QUALITY_FIELDS.items()]
    # The parser's defaults; a field without one (kind, turns, questions, document_tokens) is required.
    flow_defaults = {**workflow.DEFAULTS, "reuse_cache": _dataclass_defaults(workflow.Workflow)["reuse_cache"]}
    flow = []
    for name in dict.fromkeys(n for kind in workflow.KINDS for n in workflow.FIELDS[kind]):
        kinds = [k for k in workflow.KINDS if name in workflow.FIELDS[k]]
        default = _yaml_value(flow_defaults[name]) if name in flow_defaults else "required"
        flow.append([f"`{name}`", ", ".join(kinds), default, workflow.FIELDS[kinds[0]][name]])
    return "".join([
        _header("harness/scenario.py, harness/quality/spec.py and harness/workflow.py"),
        "# Scenario fields\n\n",
        "A scenario is a YAML mapping. An unknown field, a wrong type or a value out of range stops "
        "`fitbench run` before anything runs, with one line naming the file and the field (exit 2). "
        "How scenarios are written and run: [running.md](running.md).\n\n",
        "## Top level\n\n",
        _table(["field", "type", "default", "meaning"], top),
        "\n## An entry of `models:`\n\n",
        _table(["field", "type", "default", "meaning"], model),
        "\nRunner options are listed per runtime in [runtimes.md](runtimes.md).\n\n",
        "## `quality:`\n\n",
        "See [quality.md](quality.md); the quality targets (`max_kl`, `max_ppl_ratio`, `min_pass_rate`) "
        "are fit thresholds ([fit-thresholds.md](fit-thresholds.md)).\n\n",
        _table(["field", "default", "meaning"], quality),
        "\n## `workflow:`\n\n",
        "See [workflows.md](workflows.md). `kind` is `chat` or `document`; each kind takes only its own "
        "fields.\n\n",
        _table(["field", "kinds", "default", "meaning"], flow),
    ])


# ---- fit thresholds -------------------------------------------------------------------

def _threshold_default(name: str, value: object) -> str:
    if value is None:
        return "off"
    if isinstance(value, int) and name.endswith("_bytes"):
        return f"{value:,} ({value / 2**20:g} MiB)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def fit_thresholds() -> str:
    from harness import fit

    defaults = fit.Thresholds()
    names = [f.name for f in fields(fit.Thresholds)]
    missing = [n for n in names if n not in fit.THRESHOLD_HELP]
    extra = [n for n in fit.THRESHOLD_HELP if n not in names]
    if missing or extra:
        raise DocsError(f"harness/fit.py: THRESHOLD_HELP and Thresholds disagree (no help: {missing}, "
                        f"no field: {extra})")
    rows = [[f"`{n}`", _threshold_default(n, getattr(defaults, n)), fit.THRESHOLD_HELP[n]] for n in names]
    order = " > ".join(reversed(fit.ORDER))
    return "".join([
        _header("harness/fit.py"),
        "# Fit thresholds\n\n",
        "Set them in a scenario's `thresholds:` mapping or with `--threshold NAME=VALUE` "
        "(`fitbench run`, `fitbench fit`, `fitbench fleet run`); `fitbench thresholds` prints this "
        "table. Every row records the thresholds it was judged with (`thresholds_json`). How they "
        f"decide a fit class, worst first ({order}): [fit.md](fit.md).\n\n",
        _table(["threshold", "default", "meaning"], rows),
    ])


# ---- shared columns -------------------------------------------------------------------

def shared_columns() -> str:
    from harness import results
    from harness.share import allowlist as al

    unlisted = al.unlisted([c.name for c in results.RESULT_COLUMNS])
    if unlisted:
        raise DocsError(f"harness/share/allowlist.py: result column(s) {', '.join(unlisted)} are on neither "
                        "SHARED_RESULT_COLUMNS nor NOT_SHARED; decide whether they leave the machine")
    order = [c.name for c in results.RESULT_COLUMNS]
    sent = [[f"`{s.column}`", s.treatment, s.why] for s in sorted(al.SHARED_RESULT_COLUMNS.values(),
                                                                   key=lambda s: order.index(s.column))]
    kept = [[f"`{name}`", why] for name, why in al.NOT_SHARED.items()]
    timeline = [[f"`{s.column}`", s.treatment, s.why] for s in al.SHARED_TIMELINE_COLUMNS.values()]
    treatments = (al.__doc__ or "").split("Treatments of text")[1]
    return "".join([
        _header("harness/share/allowlist.py"),
        "# Shared columns: what `fitbench contribute` sends\n\n",
        "Only the columns below leave your machine, each by its treatment; a column that is not "
        "listed (a new one included) is never sent. `fitbench contribute --dry-run` prints every "
        "column a bundle would carry with its value in the first row. How sharing works: "
        "[sharing.md](sharing.md); every column's meaning: [results-columns.md](results-columns.md).\n\n",
        "## Treatments\n\nTreatments of text" + treatments.rstrip() + "\n\n",
        f"## Result columns sent ({len(sent)} of {len(order)})\n\n",
        _table(["column", "treatment", "why it is sent"], sent),
        f"\n## Result columns never sent ({len(kept)})\n\n",
        _table(["column", "why not"], kept),
        f"\n## Timeline columns sent ({len(timeline)} of {len(results.TIMELINE_COLUMNS) + 1})\n\n",
        "The timeline also carries `machine_class` per sample, so the samples of two machines of one "
        "fleet run are told apart.\n\n",
        _table(["column", "treatment", "why it is sent"], timeline),
    ])


PAGES: dict[str, Callable[[], str]] = {
    "docs/results-columns.md": results_columns,
    "docs/scenario-fields.md": scenario_fields,
    "docs/fit-thresholds.md": fit_thresholds,
    "docs/shared-columns.md": shared_columns,
}


def stale_pages(root: Path = ROOT) -> list[str]:
    """The generated pages whose committed text differs from what the code makes now."""
    stale = []
    for rel, render in PAGES.items():
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != render():
            stale.append(rel)
    return stale


def write_pages(root: Path = ROOT) -> list[str]:
    """Write every generated page; returns those that changed."""
    changed = []
    for rel, render in PAGES.items():
        path = root / rel
        text = render()
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        changed.append(rel)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_pages(args.root)
            for rel in stale:
                print(f"{rel} is out of date: {REGENERATE}", file=sys.stderr)
            return 1 if stale else 0
        for rel in write_pages(args.root):
            print(f"wrote {rel}")
    except (FitbenchError, OSError) as exc:
        print(f"harness.docs: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
