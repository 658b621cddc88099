"""The candidates a recommendation chooses from, each with every observation behind it.

A candidate is one artifact in one runtime with one set of (non-default) options. Sources:

- artifacts on the command line: a GGUF file, a model folder, or a folder of them (the
  quants of one model side by side), expanded to each artifact inside;
- result files, globs and folders (fleet datasets included): ``measured`` observations,
  one per case, naming the file and the rows they came from;
- the catalog: local fits (``catalog``, with the result file and run count they were folded
  from) and pulled community fits (``community``, with their sample and machine counts).

The same artifact from several sources is one candidate (matched by file name and size).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.artifact import FORMAT_RUNTIMES, ArtifactError, ArtifactInfo, inspect_artifact
from harness.catalog import Catalog
from harness.fit import judged_peak, worst
from harness.recommend.constraints import RecommendError
from runners.base import OptionError, UnknownRunner, get_runner_class

NO_VERDICT = {"crashed", "runtime_error", "interrupted", "unavailable", "skipped", "lost"}
QUALITY_COLUMNS = ("quality_kl_mean", "quality_ppl_ratio", "task_pass_rate", "quality_ppl", "quality_top1_agree")
IGNORED_OPTIONS = {"n_threads", "n_threads_batch"}  # how many cores the measuring machine gave it


@dataclass
class Observation:
    """One measured case (or catalog/community entry) of a candidate at one context."""

    origin: str  # measured | catalog | community
    machine_class: str | None
    n_ctx: int
    where: str  # the file and rows, or the catalog entry, it comes from
    prompt_tokens: int | None = None
    users: int = 1
    peak_bytes: int | None = None
    decode_tok_s: float | None = None
    ttft_s: float | None = None
    fit_class: str | None = None
    fit_reason: str | None = None
    quality: dict[str, float] = field(default_factory=dict)
    samples: int = 1  # repetitions, runs or community samples behind the figures
    machines: int | None = None  # distinct machines behind them (None: unknown)
    ram_bytes: int | None = None  # memory of the machine that measured it


@dataclass
class Candidate:
    name: str
    runtime: str
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    info: ArtifactInfo | None = None
    size_bytes: int | None = None
    format: str | None = None
    quant: str | None = None
    context_length: int | None = None
    sources: set[str] = field(default_factory=set)
    observations: list[Observation] = field(default_factory=list)
    run_options: dict[str, Any] = field(default_factory=dict)  # --option values it runs with (threads included)

    @property
    def key(self) -> tuple:
        return (self.name, self.runtime, json.dumps(self.options, sort_keys=True))

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name} [{self.runtime}{' ' + opts if opts else ''}]"


# --- artifacts on the command line -----------------------------------------------------------------

def expand_artifacts(paths: list[Path]) -> list[ArtifactInfo]:
    """Files and model folders as they are; any other folder: the GGUF files and model folders in it."""
    found: list[ArtifactInfo] = []
    for path in paths:
        if not path.exists():
            raise RecommendError(f"{path}: not found; give a GGUF file, a model folder or a folder of them")
        try:
            found.append(inspect_artifact(path))
            continue
        except ArtifactError:
            if not path.is_dir():
                raise
        inside = []
        for child in sorted(path.iterdir()):
            if child.name.startswith(".") or not (child.suffix.lower() == ".gguf" or child.is_dir()):
                continue
            try:
                inside.append(inspect_artifact(child))
            except ArtifactError:
                continue  # a folder of other things (a cache, notes) next to the models
        if not inside:
            raise RecommendError(f"{path}: no GGUF files or model folders in it")
        found.extend(inside)
    return found


def runtimes_for(fmt: str, wanted: str | None) -> list[str]:
    """The runtime an artifact format runs in: the asked one if it reads the format, else the format's own."""
    if wanted is None:
        return [FORMAT_RUNTIMES[fmt]] if fmt in FORMAT_RUNTIMES else []
    try:
        return [wanted] if fmt in get_runner_class(wanted).formats else []
    except UnknownRunner:
        return []


# --- options: only what differs from the runtime's defaults names a candidate ------------------------

def plain_options(runtime: str, options: Any) -> dict[str, Any]:
    if isinstance(options, str):
        try:
            options = json.loads(options or "{}")
        except json.JSONDecodeError:
            return {}
    if not isinstance(options, dict):
        return {}
    try:
        defaults = get_runner_class(runtime).validate_options({})
    except (UnknownRunner, OptionError):
        defaults = {}
    return {k: v for k, v in options.items() if k not in IGNORED_OPTIONS and (k not in defaults or defaults[k] != v)}


class Pool:
    """Candidates by key, merged across sources."""

    def __init__(self, runtime: str | None, options: dict[str, Any] | None = None) -> None:
        self.runtime = runtime
        self.options = dict(options or {})
        self.by_key: dict[tuple, Candidate] = {}

    def get(self, name: str, runtime: str, options: dict, size: int | None) -> Candidate | None:
        if self.runtime is not None and runtime != self.runtime:
            return None
        probe = Candidate(name, runtime, options)
        cand = self.by_key.get(probe.key)
        if cand is None:
            cand = self.by_key[probe.key] = probe
        if cand.size_bytes is None:
            cand.size_bytes = size
        return cand

    def add_artifact(self, info: ArtifactInfo) -> None:
        for runtime in runtimes_for(info.format, self.runtime):
            given = runner_options(runtime, self.options)
            cand = self.get(info.name, runtime, plain_options(runtime, given), info.size_bytes)
            if cand is None:
                continue
            cand.run_options = given
            cand.path, cand.info, cand.format, cand.quant = info.path, info, info.format, info.quant
            cand.size_bytes, cand.context_length = info.size_bytes, info.context_length
            cand.sources.add("artifact")

    def add_rows(self, source: str, rows: list[dict]) -> None:
        """A results file's rows: one observation per case, naming the file and its rows."""
        cases: dict[tuple, list[tuple[int, dict]]] = {}
        for i, row in enumerate(rows):
            if row.get("turn") is not None or not row.get("runtime") or not row.get("artifact_name"):
                continue
            cases.setdefault((row.get("run_id"), row.get("case_key")), []).append((i, row))
        for numbered in cases.values():
            first = numbered[0][1]
            cand = self.get(first["artifact_name"], first["runtime"], plain_options(first["runtime"],
                            first.get("options_json")), first.get("artifact_size_bytes"))
            if cand is None:
                continue
            cand.sources.add("results")
            _fill_from_row(cand, first)
            obs = _observation(source, numbered)
            if obs is not None:
                cand.observations.append(obs)

    def add_catalog(self, cat: Catalog) -> None:
        for entry in cat.fits:
            if entry.get("turn") is not None or entry.get("workflow"):
                continue  # sessions answer a different question than one prompt at a context
            art = cat.artifacts.get(entry["artifact"], {})
            path = cat.resolve(entry["artifact"])
            name = path.name if path else art.get("name") or entry["artifact"]
            community = entry.get("origin") == "community"
            options = {} if community else plain_options(entry["runtime"], entry.get("options"))
            cand = self.get(name, entry["runtime"], options, art.get("size_bytes"))
            if cand is None:
                continue
            if path is not None and path.exists() and cand.path is None:
                cand.path = path
            cand.format = cand.format or art.get("format")
            cand.quant = cand.quant or art.get("quant")
            cand.context_length = cand.context_length or art.get("context_length")
            cand.sources.add("community" if community else "catalog")
            cand.observations.append(_catalog_observation(cat, entry, community))


def _fill_from_row(cand: Candidate, row: dict) -> None:
    cand.format = cand.format or row.get("artifact_format")
    cand.quant = cand.quant or row.get("artifact_quant")
    cand.context_length = cand.context_length or row.get("artifact_context_length")
    if cand.path is None and row.get("artifact_path") and Path(row["artifact_path"]).exists():
        cand.path = Path(row["artifact_path"])


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return float(statistics.median(values)) if values else None


def rows_text(indexes: list[int]) -> str:
    """0-based row numbers in the file: "row 3", "rows 3-5", "rows 0, 2"."""
    ordered = sorted(set(indexes))
    if len(ordered) == 1:
        return f"row {ordered[0]}"
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"rows {ordered[0]}-{ordered[-1]}"
    return "rows " + ", ".join(map(str, ordered))


def _observation(source: str, numbered: list[tuple[int, dict]]) -> Observation | None:
    rows = [r for _, r in numbered]
    first = rows[0]
    verdict = worst([r.get("fit_class") for r in rows])
    ok = [r for r in rows if r.get("status") == "ok"]
    if verdict is None and not ok:
        if all(r.get("status") in NO_VERDICT for r in rows):
            return None
    quality = {}
    for col in QUALITY_COLUMNS:
        value = next((r.get(col) for r in rows if r.get(col) is not None), None)
        if value is not None:
            quality[col] = float(value)
    peaks = [judged_peak(r) for r in rows]
    return Observation(
        origin="measured", machine_class=first.get("machine_class"), n_ctx=int(first.get("n_ctx") or 0),
        where=f"{source} {rows_text([i for i, _ in numbered])}", prompt_tokens=first.get("prompt_tokens"),
        users=int(first.get("parallel") or first.get("users") or 1),
        peak_bytes=max((p for p in peaks if p), default=None),
        decode_tok_s=_median([r.get("decode_tok_s") for r in ok]), ttft_s=_median([r.get("ttft_s") for r in ok]),
        fit_class=verdict,
        fit_reason=next((r.get("fit_reason") for r in rows if r.get("fit_class") == verdict), None),
        quality=quality, samples=max(1, len(ok)), machines=len({r.get("machine_id") for r in rows} - {None}) or None,
        ram_bytes=first.get("ram_bytes") or first.get("sys_mem_total_bytes"),
    )


def _catalog_observation(cat: Catalog, entry: dict, community: bool) -> Observation:
    quality = {col: float(entry[key]) for key, col in (("quality_kl", "quality_kl_mean"),
                                                       ("task_pass_rate", "task_pass_rate"),
                                                       ("quality_ppl", "quality_ppl"),
                                                       ("quality_top1", "quality_top1_agree"))
               if entry.get(key) is not None}
    if community:
        where = (f"community ({entry.get('source')}): {entry.get('samples', 0)} sample(s) from "
                 f"{entry.get('machines', 0)} machine(s)")
        samples, machines = int(entry.get("samples") or 0), int(entry.get("machines") or 0)
    else:
        count = int(entry.get("count") or 1)
        where = f"{cat.path.name}: from {entry.get('source')}, {count} run(s)"
        samples, machines = count, None
    return Observation(
        origin="community" if community else "catalog", machine_class=entry.get("machine_class"),
        n_ctx=int(entry["n_ctx"]), where=where, prompt_tokens=entry.get("prompt_tokens"),
        users=int(entry.get("users") or 1), peak_bytes=entry.get("peak_rss_bytes"),
        decode_tok_s=entry.get("decode_tok_s"), ttft_s=entry.get("ttft_s"), fit_class=entry.get("fit_class"),
        fit_reason=entry.get("fit_reason"), quality=quality, samples=samples, machines=machines,
    )


def runner_options(runtime: str, options: dict[str, Any]) -> dict[str, Any]:
    """The --option values this runtime's runner knows (others are for other runtimes), checked."""
    if not options:
        return {}
    try:
        cls = get_runner_class(runtime)
        known = {k: v for k, v in options.items() if k in cls.options}
        cls.validate_options(known)
    except (UnknownRunner, OptionError) as exc:
        raise RecommendError(f"--option: {exc}") from None
    return known


def gather(artifacts: list[Path], results: list[tuple[str, list[dict]]], catalog: Catalog | None,
           runtime: str | None, options: dict[str, Any] | None = None) -> list[Candidate]:
    """``options``: runner options (``--option``) for the artifacts on the command line, each given
    to the runtimes that know it."""
    pool = Pool(runtime, options)
    for info in expand_artifacts(artifacts):
        pool.add_artifact(info)
    for source, rows in results:
        pool.add_rows(source, rows)
    if catalog is not None:
        pool.add_catalog(catalog)
    return list(pool.by_key.values())
