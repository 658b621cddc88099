"""The fleet dataset: one folder per run, results partitioned by machine class, one file pair per node.

    OUT/<scenario>-<run id>/
        fleet.json                                  what ran: scenario, run id, classes, when
        machine_class=<class>/node-<node id>.parquet             the rows that node measured
        machine_class=<class>/node-<node id>.timeline.parquet    that node's raw sampler timelines

Every file is an ordinary fitbench results file (same schema, written
atomically after each case by ``ResultWriter``), so ``compare`` and
``report`` read the folder like any other results, and DuckDB/pyarrow read
it as a Hive-partitioned dataset. Resume works per machine class with the
local rules (``harness.resume``): finished cases are kept, half-finished,
interrupted or lost ones are dropped from their files and run again.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.results import ResultsError, ResultWriter, read_results, timeline_path_for
from harness.resume import done_case_keys
from harness.scenario import Case

MANIFEST = "fleet.json"
PARTITION = "machine_class"


def is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def result_files(root: Path) -> list[Path]:
    """The results files of a dataset (timelines excluded), in a stable order."""
    return sorted(p for p in root.glob(f"{PARTITION}=*/*.parquet") if not p.name.endswith(".timeline.parquet"))


def read_dataset(root: Path) -> pa.Table:
    """All rows of a fleet dataset as one table (for scripts: ``read_dataset(p).to_pandas()``)."""
    tables = [read_results(p) for p in result_files(root)]
    if not tables:
        raise ResultsError(f"{root} holds no results files yet")
    return pa.concat_tables(tables, promote_options="default")


def latest_dataset(output_dir: Path, scenario: str) -> Path | None:
    found = [p for p in output_dir.glob(f"{scenario}-*") if is_dataset(p)]
    return max(found, key=lambda p: (p / MANIFEST).stat().st_mtime) if found else None


class FleetDataset:
    """Writes the rows of a fleet run as each case comes back; one ResultWriter per (class, node)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.writers: dict[tuple[str, str], ResultWriter] = {}
        self.done: set[tuple[str, str]] = set()  # (machine class, case key) with final rows

    @classmethod
    def create(cls, output_dir: Path, scenario: str, run_id: str, info: dict[str, Any]) -> FleetDataset:
        root = output_dir / f"{scenario}-{run_id}"
        root.mkdir(parents=True, exist_ok=False)
        ds = cls(root, {"scenario": scenario, "run_id": run_id, "format": "fitbench-fleet-1",
                        "partitioning": PARTITION, "created": _now(), **info})
        ds.save_manifest()
        return ds

    @classmethod
    def resume(cls, root: Path, cases: list[Case], classes: list[str]) -> FleetDataset:
        """Reopen a dataset: keep each class's finished cases, drop the rest of ``classes`` (which will run
        again now) from the files; the rows of classes not in this run stay as they are."""
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ResultsError(f"{root / MANIFEST} cannot be read ({exc}); start a new fleet run without --resume") from None
        ds = cls(root, manifest)
        by_file = {path: read_results(path).to_pylist() for path in result_files(root)}
        by_class: dict[str, list[dict]] = {}
        for rows in by_file.values():
            for row in rows:
                by_class.setdefault(row.get("machine_class") or "", []).append(row)
        for machine_class, rows in by_class.items():
            ds.done |= {(machine_class, key) for key in done_case_keys(rows, cases)}
        for path, rows in by_file.items():
            keep = [r for r in rows if (r.get("machine_class") or "", r.get("case_key")) in ds.done
                    or (r.get("machine_class") or "") not in classes]
            writer = ResultWriter(path)
            writer.keep(keep, _kept_timeline(path, {r["case_key"] for r in keep}))
            writer.flush()
            ds.writers[(path.parent.name.removeprefix(f"{PARTITION}="), path.stem.removeprefix("node-"))] = writer
        ds.manifest["resumed"] = [*ds.manifest.get("resumed", []), _now()]
        ds.save_manifest()
        return ds

    def save_manifest(self) -> None:
        tmp = self.root / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str))
        tmp.replace(self.root / MANIFEST)

    def is_done(self, machine_class: str, case_key: str) -> bool:
        return (machine_class, case_key) in self.done

    def add(self, machine_class: str, node: str, rows: list[dict[str, Any]], timeline: dict[str, list]) -> bool:
        """Write one case's rows; False (and nothing written) when that case already has rows for the class."""
        key = (machine_class, rows[0]["case_key"]) if rows else None
        if key is None or key in self.done:
            return False
        writer = self.writers.get((machine_class, node))
        if writer is None:
            writer = self.writers[(machine_class, node)] = ResultWriter(self.path_for(machine_class, node))
        for row in rows:
            row["machine_class"] = machine_class
        writer.add_case(rows, timeline)
        self.done.add(key)
        return True

    def path_for(self, machine_class: str, node: str) -> Path:
        return self.root / f"{PARTITION}={machine_class}" / f"node-{node}.parquet"

    @property
    def files(self) -> list[Path]:
        return result_files(self.root)


def _kept_timeline(path: Path, keys: set[str]) -> pa.Table | None:
    tl_path = timeline_path_for(path)
    if not tl_path.exists() or not keys:
        return None
    try:
        tl = pq.read_table(tl_path)
        return tl.filter(pc.is_in(tl["case_key"], pa.array(sorted(keys), pa.string())))
    except (OSError, pa.ArrowException):
        return None  # a damaged timeline costs its plots, never the rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
