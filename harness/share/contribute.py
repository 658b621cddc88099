"""Build, sign and send contribution bundles (the client side of `fitbench contribute`).

Nothing leaves the machine but the columns on the published list
(harness/share/allowlist.py), each treated as the list says (harness/share/anonymise.py),
validated against the schema (harness/share/bundle.py) and, unless --yes, shown and
consented to. Uploads go through harness/share/client.py (https, capped answers,
retries on network errors, 5xx and 429 with backoff); the bundle's content hash is
sent as the Idempotency-Key, so a repeated or resumed upload is recognised by the
server and never adds rows twice.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from harness.results import (
    RESULT_COLUMNS,
    SCHEMA_VERSION,
    TIMELINE_COLUMNS,
    ResultsError,
    expand_result_files,
    read_results,
    timeline_path_for,
)
from harness.share import allowlist
from harness.share import bundle as bundle_mod
from harness.share.anonymise import Identity, Report, anonymise_row, anonymise_timeline, environment_identity, leaks
from harness.share.bundle import BUNDLE_VERSION, REQUIRED_ROW, BundleError, content_hash, json_value
from harness.share.client import Retry, UpstreamError, base_url, reason, request, secure_url
from harness.userconfig import ConfigError, config_dir

TOKEN_ENV = "FITBENCH_TOKEN"
UPSTREAM_ENV = "FITBENCH_UPSTREAM"
TOKEN_PREFIX = "fbt1"


class ContributeError(UpstreamError):
    """An expected failure (bad input, refused bundle, server unreachable): one line, exit 2."""


class UnknownToken(ContributeError):
    """The server does not know the token (e.g. its database was reset)."""


@dataclass
class Built:
    doc: dict
    sources: list[str]
    report: Report
    leaks: list[str] = field(default_factory=list)
    unmeasured: int = 0  # rows no machine measured (a fleet driver's lost or unplaced cases): not sent
    unshareable: int = 0  # rows whose required columns are not in their published form: not sent

    @property
    def content_hash(self) -> str:
        return content_hash(self.doc)


def _version() -> str:
    try:
        import importlib.metadata
        return importlib.metadata.version("fitbench")
    except Exception:
        return "0+source"


def resolve_inputs(items: list[str | Path]) -> list[Path]:
    """Command-line arguments -> the files to read: saved bundles (.tar.gz) as they are, everything
    else (result files, globs, folders, fleet datasets) through results.expand_result_files, so a
    glob that also matches the timeline companions names each result file once."""
    paths: list[Path] = []
    for item in items:
        if str(item).endswith(".tar.gz"):
            found = [Path(item)]
        else:
            try:
                found = expand_result_files([item])
            except ResultsError as exc:
                raise ContributeError(str(exc)) from None
        paths += [p for p in found if p not in paths]
    return paths


def build(inputs: list[str | Path], ident: Identity | None = None) -> Built:
    """Read results files (with their timelines) or saved bundles into one anonymised, validated bundle.
    ``inputs`` are resolved by ``resolve_inputs`` (files, globs, folders, bundles)."""
    ident = ident or environment_identity()
    try:
        ident.key()  # the install's salt: made (and kept) before anything is read
    except ConfigError as exc:
        raise ContributeError(str(exc)) from None
    report = Report()
    inputs = resolve_inputs(inputs)
    if len(inputs) == 1 and inputs[0].name.endswith(".tar.gz"):
        doc = _read_bundle(inputs[0])
        if doc.get("signature"):  # sent exactly as signed: an edit since then is caught by the server
            return Built(doc, [inputs[0].name], report, leaks(doc["rows"], ident))
    rows: list[dict] = []
    timeline: dict[str, list] = {}
    seen_rows: set[tuple] = set()
    seen_cases: set[tuple] = set()
    sources, unmeasured, unshareable = [], 0, 0
    for path in inputs:
        if path.name.endswith(".tar.gz"):
            doc = _read_bundle(path)
            file_rows, file_tl = doc["rows"], bundle_mod.with_owners(doc["rows"], doc["timeline"])
        else:
            file_rows, file_tl, left_out = _read_results(path, ident, report)
            unshareable += left_out
        # The same measurements given twice (a file and a bundle of it, or one file twice) are sent once:
        # rows by their identity, samples by their case (run, machine, case), whole cases at a time.
        for row in file_rows:
            if row.get("machine_id") is None:  # written by a fleet driver for a case no node reported on
                unmeasured += 1
                continue
            if (key := bundle_mod.row_identity(row)) not in seen_rows:
                seen_rows.add(key)
                rows.append(row)
        cases = bundle_mod.timeline_cases(file_rows, file_tl)
        keep = sorted(i for key, idx in cases.items() if key not in seen_cases for i in idx)
        seen_cases.update(cases)
        if keep:
            _extend_columns(timeline, {k: [v[i] for i in keep] for k, v in file_tl.items()},
                            len(timeline.get("t_s", [])))
        sources.append(path.name)
    doc = {"bundle_version": BUNDLE_VERSION, "schema_version": SCHEMA_VERSION, "rows": rows, "timeline": timeline,
           "created_at": datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0).isoformat(),
           "client": f"fitbench {_version()}"}
    if not rows:
        raise ContributeError(f"nothing to send: {', '.join(sources[:3])} hold(s) no rows a machine measured"
                              + (f" ({unshareable} left out: not in their published form)" if unshareable else ""))
    try:
        bundle_mod.validate(doc)
    except BundleError as exc:
        raise ContributeError(f"the bundle does not pass the schema check: {exc}") from None
    return Built(doc, sources, report, leaks(rows, ident), unmeasured, unshareable)


def _read_bundle(path: Path) -> dict:
    try:
        doc = bundle_mod.read_bundle_file(path)
        bundle_mod.validate(doc)
    except BundleError as exc:
        raise ContributeError(str(exc)) from None
    _check_allow_listed(doc, path)
    return doc


def _check_allow_listed(doc: dict, path: Path) -> None:
    """A saved bundle is sent only if it holds nothing the allow-list would not send (one written by an
    older fitbench may carry more columns, or run ids with their start second)."""
    extra = sorted({k for row in doc["rows"] for k in row} - set(allowlist.SHARED_RESULT_COLUMNS)
                   | {f"timeline.{k}" for k in doc["timeline"]} - {f"timeline.{k}" for k in
                                                                    allowlist.SHARED_TIMELINE_COLUMNS})
    old_ids = any(not allowlist.RUN_ID_FORM.match(str(r.get("run_id"))) for r in doc["rows"])
    if extra or old_ids:
        what = f"columns that are not shared ({', '.join(extra[:5])})" if extra else "run ids that are not re-derived"
        raise ContributeError(f"{path}: was written before the allow-list of shared columns and holds {what}; "
                              "build the bundle again from its results file")


def _read_results(path: Path, ident: Identity, report: Report) -> tuple[list[dict], dict[str, list], int]:
    """The file's rows and timeline as they may be sent, and how many rows were left out (a required column
    not in its published form). Rows and samples go through the same treatments, so their ids still match."""
    try:
        table = read_results(path)
    except ResultsError as exc:
        raise ContributeError(str(exc)) from None
    major = (table.schema.metadata or {}).get(b"fitbench.schema_version", b"").decode().split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise ContributeError(f"{path}: schema {major}.x cannot be contributed by this fitbench")
    rows, left_out = [], 0
    known = {c.name for c in RESULT_COLUMNS}  # columns of a newer fitbench are not ours to vouch for
    for raw in table.to_pylist():
        if (raw.get("parallel") or 1) > 1:
            continue  # the upstream keys fits by one session: N users at once would read as one user's fit
        raw = {k: json_value(v) for k, v in raw.items() if k in known}
        raw["schema_version"] = SCHEMA_VERSION  # older minor files are read as the current minor
        row = anonymise_row(raw, ident, report)
        if any(row.get(k) is None for k in REQUIRED_ROW if k != "machine_id" and raw.get(k) is not None):
            left_out += 1  # e.g. a machine class that names the host: the row cannot be sent without it
            continue
        rows.append(row)
    tl_path = timeline_path_for(path)
    timeline: dict[str, list] = {}
    if tl_path.exists():
        try:
            tl = pq.read_table(tl_path)
        except Exception as exc:
            raise ContributeError(f"{tl_path}: unreadable timeline ({str(exc).splitlines()[0][:120]})") from None
        for name in [c.name for c in TIMELINE_COLUMNS if c.name in tl.column_names]:
            timeline[name] = [json_value(v) for v in tl.column(name).to_pylist()]
        timeline = anonymise_timeline(timeline, ident, report)
        # samples of a case none of whose rows is in the file describe nothing that is sent
        cases = {(r.get("run_id"), r.get("case_key")) for r in rows}
        keep = [i for i, key in enumerate(zip(timeline.get("run_id", []), timeline.get("case_key", [])))
                if key in cases]
        if len(keep) < tl.num_rows:
            timeline = {name: [values[i] for i in keep] for name, values in timeline.items()}
        n = len(keep)
        timeline["schema_version"] = [SCHEMA_VERSION] * n
        # Samples carry their machine (re-hashed like the rows') and class; a file older than the machine_id
        # column holds one machine's samples (a fleet dataset's file is one node): its rows say whose.
        timeline.setdefault("machine_id", [None] * n)
        timeline = bundle_mod.with_owners(rows, timeline)
        if n and None in timeline["machine_id"]:
            raise ContributeError(f"{tl_path}: some samples name no machine and the rows of {path.name} come from "
                                  "several machines; contribute each machine's results file on its own")
    elif any(r.get("sampler_samples") for r in rows):
        raise ContributeError(f"{tl_path}: the timeline of {path.name} is missing; the server recomputes the "
                              "figures from it, so results without it cannot be contributed")
    return rows, timeline, left_out


def _extend_columns(into: dict[str, list], more: dict[str, list], have: int) -> None:
    n_more = len(next(iter(more.values()))) if more else 0
    for name in set(into) | set(more):
        into.setdefault(name, [None] * have).extend(more.get(name, [None] * n_more))


def summary(built: Built) -> list[str]:
    """Exactly what will be sent, in words, for the consent prompt."""
    rows = built.doc["rows"]
    count = lambda key: Counter(str(r.get(key)) for r in rows)  # noqa: E731
    arts = Counter(f"{r['artifact_name']} ({r['artifact_sha256'][:12]}…)" for r in rows)
    n_samples = len(built.doc["timeline"].get("t_s", []))
    lines = [
        f"bundle {built.content_hash[:16]}: {len(rows)} row(s) from {len(built.sources)} file(s) "
        f"({', '.join(built.sources[:5])}{'…' if len(built.sources) > 5 else ''}), {n_samples:,} timeline samples",
        "machine class: " + ", ".join(f"{k} ({v})" for k, v in count("machine_class").items()),
        "machine id (re-hashed for upstream): " + ", ".join(count("machine_id")),
        "runtimes: " + ", ".join(f"{r} {v}" for r, v in sorted({(r.get("runtime"), r.get("runtime_version"))
                                                                 for r in rows}, key=str)),
        "artifacts: " + ", ".join(f"{k} x{v}" for k, v in arts.items()),
        "statuses: " + ", ".join(f"{k} {v}" for k, v in count("status").items()),
        f"columns sent ({len(sent_columns(built))}, the published list: docs/shared-columns.md): "
        + ", ".join(sent_columns(built)),
        "stripped: " + "; ".join(built.report.lines()) + "; run ids and machine ids re-derived with this install's "
        "secret salt; start times rounded to the hour; OS kept as kernel major.minor; artifact paths kept as file "
        "names only",
    ]
    if built.report.columns_not_sent:
        lines.append("columns of the results not on the list, not sent: "
                     + ", ".join(sorted(built.report.columns_not_sent)))
    if built.unmeasured:
        lines.append(f"not sent: {built.unmeasured} row(s) no machine measured (fleet cases lost or never placed)")
    if built.unshareable:
        lines.append(f"not sent: {built.unshareable} row(s) whose status, machine class, runtime or artifact is "
                     "not in its published form (e.g. it names this host)")
    if built.leaks:
        lines.append("WARNING: still present after anonymising: " + ", ".join(built.leaks)
                     + " (set FITBENCH_REDACT or rename, or send anyway)")
    return lines


def sent_columns(built: Built) -> list[str]:
    """The columns the bundle's rows carry, in the schema's order: exactly what leaves the machine."""
    present = {k for row in built.doc["rows"] for k, v in row.items()}
    return [name for name in allowlist.SHARED_RESULT_COLUMNS if name in present]


def column_lines(built: Built, width: int = 100) -> list[str]:
    """Every column sent, its treatment and its value in the first row (the dry run's detail)."""
    first = built.doc["rows"][0]
    lines = []
    for name in sent_columns(built):
        value = json.dumps(first.get(name), ensure_ascii=False, default=str)
        value = value if len(value) <= width else value[:width - 1] + "…"
        lines.append(f"  {name} ({allowlist.SHARED_RESULT_COLUMNS[name].treatment}): {value}")
    timeline = built.doc["timeline"]
    if timeline:
        lines.append("  timeline: " + ", ".join(k for k in allowlist.SHARED_TIMELINE_COLUMNS if k in timeline))
    return lines


# --- tokens ---------------------------------------------------------------------------------------------------

def token_file() -> Path:
    return config_dir() / "token"


def parse_token(text: str) -> tuple[str, str]:
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        raise ContributeError(f"the token is not a fitbench token ({TOKEN_PREFIX}.<id>.<secret>); get one with "
                              "`fitbench contribute --to URL` (it asks the server) or from the server's operator")
    return parts[1], parts[2]


def stored_token(url: str) -> str | None:
    try:
        data = json.loads(token_file().read_text())
    except (OSError, ValueError):
        return None
    return data.get(base_url(url)) if isinstance(data, dict) else None


def store_token(url: str, token: str) -> None:
    path = token_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[base_url(url)] = token
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".token.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a secret: owner only
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    tmp.replace(path)


def get_token(url: str, given: str | None, retry: Retry, say: Callable[[str], None]) -> str:
    """--token, else $FITBENCH_TOKEN, else the one stored for this server, else ask the server for one."""
    token = given or os.environ.get(TOKEN_ENV) or stored_token(url)
    if token:
        parse_token(token)
        return token
    resp = request("POST", f"{base_url(url)}/v1/tokens", retry, on_retry=say)
    if resp.status_code != 201:
        raise ContributeError(f"{base_url(url)} refused to issue a token: HTTP {resp.status_code}: {reason(resp)}")
    token = _answer_object(resp, url).get("token")
    parse_token(token if isinstance(token, str) else "")
    store_token(url, token)
    say(f"got a submitter token from {base_url(url)}; stored in {token_file()}")
    return token


def upload(doc: dict, url: str, token: str, retry: Retry, say: Callable[[str], None]) -> dict:
    """Sign and send; returns the server's answer. A refused bundle raises with the server's reasons."""
    import gzip

    if doc.get("signature") and doc.get("token_id"):
        signed = doc  # signed when it was written; re-signing would launder any later edit
    else:
        signed = bundle_mod.sign(doc, *parse_token(token))
    body = gzip.compress(json.dumps(signed, allow_nan=False).encode(), compresslevel=6)
    token_id, secret = parse_token(token)
    if signed.get("token_id") != token_id:
        raise ContributeError(f"the bundle was signed with token {signed.get('token_id')}, not {token_id}: "
                              "send it with that token (--token)")
    # the body's own signature lets the server refuse a stranger before it decompresses anything
    from harness.share.upstream.ingest import SIGNATURE_HEADER, body_signature

    headers = {"content-type": "application/json", "content-encoding": "gzip",
               "idempotency-key": content_hash(signed), SIGNATURE_HEADER: f"{token_id}:{body_signature(secret, body)}"}
    resp = request("POST", f"{base_url(url)}/v1/bundles", retry, on_retry=say, content=body, headers=headers)
    if resp.status_code == 401 and "did not issue" in reason(resp):
        raise UnknownToken(f"{base_url(url)} does not know the token {signed['token_id']}: {reason(resp)}")
    if resp.status_code not in (200, 201):
        raise ContributeError(f"{base_url(url)} refused the bundle: HTTP {resp.status_code}: {reason(resp)}")
    return _answer_object(resp, url)


def _answer_object(resp, url: str) -> dict:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ContributeError(f"{base_url(url)} answered HTTP {resp.status_code} without a JSON object; "
                              "is it a fitbench upstream?")
    return data


def send(doc: dict, url: str, given: str | None, retry: Retry, say: Callable[[str], None],
         allow_http: bool = False) -> dict:
    """Upload with the token at hand; a stored token the server no longer knows is replaced once.
    Plain http goes only to this machine unless ``allow_http`` (client.secure_url)."""
    secure_url(url, allow_http)
    token = get_token(url, given, retry, say)
    try:
        return upload(doc, url, token, retry, say)
    except UnknownToken:
        if given or os.environ.get(TOKEN_ENV) or doc.get("signature"):
            raise  # a token the user chose, or a bundle signed with it: not ours to swap
        say("the stored token is unknown to this server; asking for a new one")
        forget_token(url)
        return upload(doc, url, get_token(url, None, retry, say), retry, say)


def forget_token(url: str) -> None:
    path = token_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.pop(base_url(url), None) is not None:
        path.write_text(json.dumps(data, indent=1))
