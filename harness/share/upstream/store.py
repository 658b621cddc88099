"""SQLite storage for the upstream service: tokens, bundles, rows, timelines, and the aggregates.

Deduplication is by content at two levels: a bundle by its content hash
(primary key), and a row by its identity (bundle.row_identity: machine, run,
case, repetition, workflow turn and configuration), so the same run
contributed in two different bundles still counts once. A case's timeline is
filed under (run, machine, class, case): the nodes of a fleet run share the
run id (table ``case_timelines``; the ``timelines`` table of earlier versions,
keyed without the class, is left as it was). One write transaction per bundle under one lock: a bundle is stored whole
or not at all, and concurrent submissions of the same bundle store it once.

Tokens (``token_state``): ``active`` (issued or approved by the operator: its
rows vote in the aggregates), ``quarantined`` (self-service in open mode, and
tokens of databases older than this table: stored, never aggregated) or
``revoked`` (refused, and its rows leave the aggregates). Each token has a
storage quota, charged with the decoded bundle size in the write transaction.

The ``fit_class`` column is the server's verdict (verdict.judge), not the
one the client sent (that stays in ``row_json``, as signed).

Function-level use, e.g. in a test of real runs::

    store = Store(":memory:")
    assert check_bundle(doc["rows"], doc["timeline"]) == []
    store.submit(doc)          # judged with harness.fit, stored
    store.fits()               # what GET /v1/fits answers
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import statistics
import threading
import zlib
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from harness.fit import ORDER, Thresholds
from harness.share.bundle import case_of, row_identity, timeline_cases
from harness.share.bundle import content_hash as bundle_hash
from harness.share.upstream.verdict import budget_set, figures, judge

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, secret TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS token_state (
    token_id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, quota_bytes INTEGER NOT NULL,
    used_bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bundles (
    content_hash TEXT PRIMARY KEY, token_id TEXT NOT NULL, received_at TEXT NOT NULL,
    n_rows INTEGER NOT NULL, n_new_rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, content_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row_key TEXT PRIMARY KEY, bundle_hash TEXT NOT NULL, machine_id TEXT NOT NULL, machine_class TEXT NOT NULL,
    run_id TEXT NOT NULL, case_key TEXT NOT NULL, repetition INTEGER, status TEXT NOT NULL, fit_class TEXT,
    runtime TEXT NOT NULL, runtime_version TEXT, artifact_sha256 TEXT NOT NULL, artifact_name TEXT NOT NULL,
    n_ctx INTEGER NOT NULL, prompt_tokens INTEGER, budget_set INTEGER NOT NULL,
    decode_tok_s REAL, ttft_s REAL, prefill_tok_s REAL, peak_rss_bytes INTEGER, row_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rows_group ON rows (artifact_sha256, machine_class, runtime, n_ctx);
CREATE TABLE IF NOT EXISTS case_timelines (
    run_id TEXT NOT NULL, machine_id TEXT NOT NULL, machine_class TEXT NOT NULL, case_key TEXT NOT NULL,
    bundle_hash TEXT NOT NULL, samples_z BLOB NOT NULL, PRIMARY KEY (run_id, machine_id, machine_class, case_key));
"""
ARTIFACT_FIELDS = ("artifact_name", "artifact_size_bytes", "artifact_format", "artifact_quant", "artifact_arch",
                   "artifact_n_params", "artifact_n_layers", "artifact_n_heads", "artifact_n_kv_heads",
                   "artifact_head_dim", "artifact_context_length")


DEFAULT_QUOTA = 256 * 2**20
TOKEN_STATUSES = ("active", "quarantined", "revoked")


class QuotaExceeded(Exception):
    """A token's storage quota would be exceeded: nothing of the bundle is stored."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def row_key(row: dict) -> str:
    ident = json.dumps(row_identity(row), sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()


class Store:
    def __init__(self, path: Path | str, thresholds: Thresholds | None = None) -> None:
        self.path = str(path)
        self.thresholds = thresholds or Thresholds()  # the server's own: the client's are not trusted
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            # tokens of a database older than token_state: quarantined (self-service then), quota charged
            self._db.execute("INSERT OR IGNORE INTO token_state (token_id, status, quota_bytes) "
                             "SELECT token_id, 'quarantined', ? FROM tokens", (DEFAULT_QUOTA,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- tokens ---
    def issue_token(self, name: str | None = None, quota_bytes: int = DEFAULT_QUOTA,
                    status: str = "quarantined") -> tuple[str, str]:
        """A new token; self-service ones (POST /v1/tokens) start quarantined, the operator's active."""
        if status not in TOKEN_STATUSES:
            raise ValueError(f"token status {status!r}")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO tokens VALUES (?, ?, ?)", (token_id, secret, now()))
            self._db.execute("INSERT INTO token_state VALUES (?, ?, ?, ?, 0)", (token_id, name, status, quota_bytes))
            self._db.execute("COMMIT")
        return token_id, secret

    def token(self, token_id: str) -> dict | None:
        """secret, status, quota and use of a token; None when this server never issued it."""
        with self._lock:
            found = self._db.execute(
                "SELECT t.secret, coalesce(s.status, 'quarantined'), coalesce(s.quota_bytes, ?), "
                "coalesce(s.used_bytes, 0), s.name, t.created_at FROM tokens t "
                "LEFT JOIN token_state s USING (token_id) WHERE t.token_id = ?", (DEFAULT_QUOTA, token_id)).fetchone()
        if found is None:
            return None
        return dict(zip(("secret", "status", "quota_bytes", "used_bytes", "name", "created_at"), found))

    def secret_for(self, token_id: str) -> str | None:
        found = self.token(token_id)
        return None if found is None or found["status"] == "revoked" else found["secret"]

    def tokens(self) -> list[dict]:
        with self._lock:
            found = self._db.execute(
                "SELECT t.token_id, s.name, coalesce(s.status, 'quarantined'), coalesce(s.quota_bytes, ?), "
                "coalesce(s.used_bytes, 0), t.created_at, (SELECT count(*) FROM bundles b "
                "WHERE b.token_id = t.token_id) FROM tokens t LEFT JOIN token_state s USING (token_id) "
                "ORDER BY t.created_at, t.token_id", (DEFAULT_QUOTA,)).fetchall()
        keys = ("token_id", "name", "status", "quota_bytes", "used_bytes", "created_at", "bundles")
        return [dict(zip(keys, row)) for row in found]

    def set_status(self, token_id: str, status: str) -> bool:
        """approve (active), quarantine or revoke a token; False when there is no such token."""
        if status not in TOKEN_STATUSES:
            raise ValueError(f"token status {status!r}")
        with self._lock:
            if self._db.execute("SELECT 1 FROM tokens WHERE token_id = ?", (token_id,)).fetchone() is None:
                return False
            self._db.execute("INSERT INTO token_state (token_id, status, quota_bytes) VALUES (?, ?, ?) "
                             "ON CONFLICT (token_id) DO UPDATE SET status = excluded.status",
                             (token_id, status, DEFAULT_QUOTA))
        return True

    # --- bundles ---
    def bundle_for_key(self, key: str) -> str | None:
        with self._lock:
            found = self._db.execute("SELECT content_hash FROM idempotency WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    def known(self, content_hash: str) -> dict | None:
        """The answer for a bundle already stored (a repeat skips the plausibility work), else None."""
        with self._lock:
            found = self._db.execute("SELECT n_rows FROM bundles WHERE content_hash = ?", (content_hash,)).fetchone()
        return None if found is None else {"bundle": content_hash, "duplicate": True, "rows": found[0],
                                           "new_rows": 0, "duplicate_rows": found[0]}

    def submit(self, doc: dict, content_hash: str | None = None, idem_key: str | None = None,
               size: int = 0) -> dict:
        """Store a validated bundle (bundle.validate, then validate.check_bundle), each row with the
        server's verdict; returns what happened. Repeats return the first answer's counts. ``size``
        bytes are charged to the bundle's token (QuotaExceeded, nothing stored, when over its quota)."""
        rows, timeline = doc["rows"], doc["timeline"]
        content_hash = content_hash or bundle_hash(doc)
        verdicts = judge(rows, self.thresholds)
        samples = {key: {name: [values[i] for i in idx] for name, values in timeline.items()}
                   for key, idx in timeline_cases(rows, timeline).items()}
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                known = db.execute("SELECT n_rows, n_new_rows FROM bundles WHERE content_hash = ?",
                                   (content_hash,)).fetchone()
                if known:
                    if idem_key:
                        db.execute("INSERT OR IGNORE INTO idempotency VALUES (?, ?)", (idem_key, content_hash))
                    db.execute("COMMIT")
                    return {"bundle": content_hash, "duplicate": True, "rows": known[0], "new_rows": 0,
                            "duplicate_rows": known[0]}
                token_id = doc.get("token_id") or "local"
                quota = db.execute("SELECT quota_bytes, used_bytes FROM token_state WHERE token_id = ?",
                                   (token_id,)).fetchone()
                if quota is not None and size:
                    if quota[1] + size > quota[0]:
                        raise QuotaExceeded(f"token {token_id} has used {quota[1]:,} of its {quota[0]:,} byte quota; "
                                            f"this bundle ({size:,} bytes) does not fit: ask the operator")
                    db.execute("UPDATE token_state SET used_bytes = used_bytes + ? WHERE token_id = ?",
                               (size, token_id))
                new = 0
                for row, verdict in zip(rows, verdicts):
                    cur = db.execute(
                        "INSERT OR IGNORE INTO rows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (row_key(row), content_hash, row["machine_id"], row["machine_class"], row["run_id"],
                         row["case_key"], row.get("repetition"), row["status"], verdict["fit_class"], row["runtime"],
                         row.get("runtime_version"), row["artifact_sha256"], row["artifact_name"], row["n_ctx"],
                         row.get("prompt_tokens"), int(budget_set(row)), row.get("decode_tok_s"), row.get("ttft_s"),
                         row.get("prefill_tok_s"), row.get("peak_rss_bytes"), json.dumps(row, sort_keys=True)))
                    new += cur.rowcount
                for (run_id, machine_id, machine_class, case_key), case_samples in samples.items():
                    blob = zlib.compress(json.dumps(case_samples).encode(), 1)
                    db.execute("INSERT OR IGNORE INTO case_timelines VALUES (?,?,?,?,?,?)",
                               (run_id, machine_id or "", machine_class or "", case_key, content_hash, blob))
                db.execute("INSERT INTO bundles VALUES (?,?,?,?,?)",
                           (content_hash, token_id, now(), len(rows), new))
                if idem_key:
                    db.execute("INSERT OR IGNORE INTO idempotency VALUES (?, ?)", (idem_key, content_hash))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return {"bundle": content_hash, "duplicate": False, "rows": len(rows), "new_rows": new,
                "duplicate_rows": len(rows) - new}

    def stats(self) -> dict:
        with self._lock:
            q = lambda sql: self._db.execute(sql).fetchone()[0]  # noqa: E731
            return {"bundles": q("SELECT count(*) FROM bundles"), "rows": q("SELECT count(*) FROM rows"),
                    "machines": q("SELECT count(DISTINCT machine_id) FROM rows"),
                    "tokens": q("SELECT count(*) FROM tokens"),
                    "timeline_cases": q("SELECT count(*) FROM case_timelines")}

    # --- aggregates ---
    def fits(self, machine_class: str | None = None, artifact_sha256: str | None = None,
             runtime: str | None = None) -> list[dict]:
        """Median and spread per artifact x machine class x runtime x context (and, for workflows, session
        shape and turn: a turn's figures are not the session's), over runs without a set budget."""
        # only rows of tokens in good standing vote (rows stored without a token: function-level use)
        sql = ("SELECT row_json, fit_class FROM rows WHERE budget_set = 0 AND bundle_hash NOT IN "
               "(SELECT b.content_hash FROM bundles b JOIN tokens t USING (token_id) LEFT JOIN token_state s "
               "USING (token_id) WHERE coalesce(s.status, 'quarantined') != 'active')")
        args: list = []
        for name, value in (("machine_class", machine_class), ("artifact_sha256", artifact_sha256),
                            ("runtime", runtime)):
            if value:
                sql += f" AND {name} = ?"
                args.append(value)
        with self._lock:
            # the stored verdict is the server's; the one in row_json is what the client claimed
            found = [{**json.loads(r[0]), "fit_class": r[1]} for r in self._db.execute(sql, args)]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in found:
            groups[fit_key(row)].append(row)
        return [_aggregate(key, rows) for key, rows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]


def fit_key(row: dict) -> tuple:
    """One community fit: artifact x machine class x runtime x context, and for a workflow its session
    shape and turn (null: the session's case-level rows)."""
    return (row["artifact_sha256"], row["machine_class"], row["runtime"], row["n_ctx"], row.get("workflow_json"),
            row.get("turn"))


def _spread(values: list) -> dict | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "min": values[0], "max": values[-1],
            "n": len(values)}


def _aggregate(key: tuple, rows: list[dict]) -> dict:
    sha, machine_class, runtime, n_ctx, workflow, turn = key
    measured = [f for f in map(figures, rows) if f is not None]  # ok rows only: a failure is no figure
    # One verdict per case (run x case key): the worst of its rows, as the harness does.
    cases: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("fit_class"):
            cases[case_of(r)].append(r["fit_class"])
    verdicts = Counter(max(v, key=ORDER.index) for v in cases.values())
    # The most common verdict; ties go to the worse one (a shared table should not flatter).
    fit_class = max(verdicts, key=lambda c: (verdicts[c], ORDER.index(c))) if verdicts else None
    first = max(rows, key=lambda r: str(r.get("started_at")))
    return {
        "artifact_sha256": sha, "machine_class": machine_class, "runtime": runtime, "n_ctx": n_ctx,
        "workflow_kind": first.get("workflow_kind"), "workflow": workflow, "turn": turn,
        "artifact": {k.removeprefix("artifact_"): first.get(k) for k in ARTIFACT_FIELDS},
        "samples": len(measured), "rows": len(rows), "cases": len(cases),
        "machines": len({r["machine_id"] for r in rows}), "runs": len({(r["machine_id"], r["run_id"]) for r in rows}),
        "runtime_versions": sorted({str(r.get("runtime_version")) for r in rows if r.get("runtime_version")}),
        "fit_class": fit_class, "fit_classes": dict(verdicts),
        **{name: _spread([f[name] for f in measured])
           for name in ("prompt_tokens", "decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_bytes")},
        "last_measured": str(first.get("started_at")),
    }
