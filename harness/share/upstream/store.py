"""Storage for the upstream service: tokens, bundles, rows, timelines, and the aggregates kept as they change.

One interface over two databases (db.py): SQLite, embedded, the default; and
PostgreSQL (``postgresql://...``) for a public deployment, where several
ingest processes may write at once.

Deduplication is by content at two levels: a bundle by its content hash
(primary key), and a row by its identity (bundle.row_identity: machine, run,
case, repetition, workflow turn and configuration), so the same run
contributed in two different bundles still counts once. A case's timeline is
filed under (run, machine, class, case). A bundle is stored in one
transaction: whole or not at all.

Aggregates are kept incrementally, in the same transaction as the rows that
change them: ``votes`` holds one vote per (key, token) (aggregate.vote, from
that token's rows of the key), ``fits`` the served entry of each key
(aggregate.fit_entry over the votes of tokens in good standing). An ingest
recomputes only the (key, token) pairs its rows touch and those keys; a token
approved, quarantined or revoked, or a contribution deleted, recomputes only
the keys it has votes in. So ``GET /v1/fits`` reads what it returns and
never parses a stored row.

Tokens (``token_state``): ``active`` (issued or approved by the operator: its
votes count), ``quarantined`` (self-service in open mode, and tokens of
databases older than this table: stored, never counted) or ``revoked``
(refused; its votes leave the aggregates). Each token has a storage quota,
charged with the decoded bundle size in the write transaction.

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
import zlib
from datetime import datetime, timezone
from pathlib import Path

from harness.fit import Thresholds
from harness.share.bundle import content_hash as bundle_hash
from harness.share.bundle import row_identity, timeline_cases
from harness.share.upstream import aggregate
from harness.share.upstream.db import open_database
from harness.share.upstream.verdict import budget_set, figures, judge

ARTIFACT_FIELDS = ("artifact_name", "artifact_size_bytes", "artifact_format", "artifact_quant", "artifact_arch",
                   "artifact_n_params", "artifact_n_layers", "artifact_n_heads", "artifact_n_kv_heads",
                   "artifact_head_dim", "artifact_context_length")
ROW_COLUMNS = ("row_key", "bundle_hash", "machine_id", "machine_class", "run_id", "case_key", "repetition", "status",
               "fit_class", "runtime", "runtime_version", "artifact_sha256", "artifact_name", "n_ctx",
               "prompt_tokens", "budget_set", "decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_bytes",
               "row_json", "key_id", "token_id", "started_at", "judged_peak", "workflow_kind")
VOTE_COLUMNS = ("row_key", "machine_id", "machine_class", "run_id", "case_key", "status", "fit_class",
                "runtime_version", "artifact_name", "prompt_tokens", "decode_tok_s", "ttft_s", "prefill_tok_s",
                "judged_peak", "started_at", "workflow_kind")
# a token is "in good standing" when active, or unknown to the tokens table (rows stored by function-level use)
COUNTS = "coalesce(s.status, 'active') = 'active'"

DEFAULT_QUOTA = 256 * 2**20
TOKEN_STATUSES = ("active", "quarantined", "revoked")
MAX_PAGE = 1000


class QuotaExceeded(Exception):
    """A token's storage quota would be exceeded: nothing of the bundle is stored."""


class BadRow(Exception):
    """A value the structure check let through that the database refuses (a missing required value)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def row_key(row: dict) -> str:
    ident = json.dumps(row_identity(row), sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()


def fit_key(row: dict) -> list:
    """One community fit: artifact x machine class x runtime x context, and for a workflow its session
    shape and turn (null: the session's case-level rows)."""
    return [row["artifact_sha256"], row["machine_class"], row["runtime"], row["n_ctx"], row.get("workflow_json"),
            row.get("turn")]


def key_id(key: list) -> str:
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:32]


def _like(text: str) -> str:
    """``text`` as a LIKE substring pattern, its wildcards taken literally (ESCAPE '!')."""
    return "%" + text.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


class Store:
    def __init__(self, path: Path | str, thresholds: Thresholds | None = None) -> None:
        self.path = str(path)
        self.thresholds = thresholds or Thresholds()  # the server's own: the client's are not trusted
        self.db = open_database(path)
        with self.db.write() as c:
            # tokens of a database older than token_state: quarantined (self-service then), quota charged
            c.q("INSERT INTO token_state (token_id, status, quota_bytes) SELECT token_id, 'quarantined', ? "
                "FROM tokens WHERE true ON CONFLICT (token_id) DO NOTHING", (DEFAULT_QUOTA,))
            stale = c.one("SELECT count(*) FROM rows WHERE key_id IS NULL AND budget_set = 0")[0]
        if stale:  # a database from before the incremental aggregates: filled in once
            self.rebuild()

    def close(self) -> None:
        self.db.close()

    # --- tokens ---
    def issue_token(self, name: str | None = None, quota_bytes: int = DEFAULT_QUOTA,
                    status: str = "quarantined") -> tuple[str, str]:
        """A new token; self-service ones (POST /v1/tokens) start quarantined, the operator's active."""
        if status not in TOKEN_STATUSES:
            raise ValueError(f"token status {status!r}")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.db.write() as c:
            c.q("INSERT INTO tokens VALUES (?, ?, ?)", (token_id, secret, now()))
            c.q("INSERT INTO token_state (token_id, name, status, quota_bytes) VALUES (?, ?, ?, ?)",
                (token_id, name, status, quota_bytes))
        return token_id, secret

    def token(self, token_id: str) -> dict | None:
        """secret, status, quota and use of a token; None when this server never issued it."""
        with self.db.read() as c:
            found = c.one("SELECT t.secret, coalesce(s.status, 'quarantined'), coalesce(s.quota_bytes, ?), "
                          "coalesce(s.used_bytes, 0), s.name, t.created_at, coalesce(s.refused, 0) FROM tokens t "
                          "LEFT JOIN token_state s USING (token_id) WHERE t.token_id = ?", (DEFAULT_QUOTA, token_id))
        if found is None:
            return None
        return dict(zip(("secret", "status", "quota_bytes", "used_bytes", "name", "created_at", "refused"), found))

    def secret_for(self, token_id: str) -> str | None:
        found = self.token(token_id)
        return None if found is None or found["status"] == "revoked" else found["secret"]

    def tokens(self) -> list[dict]:
        with self.db.read() as c:
            found = c.all(
                "SELECT t.token_id, s.name, coalesce(s.status, 'quarantined'), coalesce(s.quota_bytes, ?), "
                "coalesce(s.used_bytes, 0), t.created_at, (SELECT count(*) FROM bundles b "
                "WHERE b.token_id = t.token_id) FROM tokens t LEFT JOIN token_state s USING (token_id) "
                "ORDER BY t.created_at, t.token_id", (DEFAULT_QUOTA,))
        keys = ("token_id", "name", "status", "quota_bytes", "used_bytes", "created_at", "bundles")
        return [dict(zip(keys, row)) for row in found]

    def set_status(self, token_id: str, status: str) -> bool:
        """approve (active), quarantine or revoke a token, and recompute the keys it has votes in;
        False when there is no such token."""
        if status not in TOKEN_STATUSES:
            raise ValueError(f"token status {status!r}")
        with self.db.write() as c:
            if c.one("SELECT 1 FROM tokens WHERE token_id = ?", (token_id,)) is None:
                return False
            c.q("INSERT INTO token_state (token_id, status, quota_bytes) VALUES (?, ?, ?) "
                "ON CONFLICT (token_id) DO UPDATE SET status = excluded.status", (token_id, status, DEFAULT_QUOTA))
            keys = [k for (k,) in c.all("SELECT key_id FROM votes WHERE token_id = ?", (token_id,))]
            self.db.lock_keys(c, keys)
            for key in keys:
                self._refresh_fit(c, key)
        return True

    def record_refusal(self, token_id: str) -> None:
        """A bundle this token signed was refused as implausible: it counts against its track record."""
        with self.db.write() as c:
            c.q("UPDATE token_state SET refused = refused + 1 WHERE token_id = ?", (token_id,))

    def promote_if_earned(self, token_id: str, min_bundles: int, min_hours: float,
                          at: datetime | None = None) -> bool:
        """The track-record rule of open mode (app.py's docstring): a quarantined token becomes active once
        it has had at least ``min_bundles`` bundles accepted over at least ``min_hours`` hours, none
        refused, and where its votes share a key with at least 2 active tokens' (at least one key must),
        it agrees with them (aggregate.agrees). True when it was promoted now."""
        at = at or datetime.now(timezone.utc)
        with self.db.write() as c:
            state = c.one("SELECT status, refused FROM token_state WHERE token_id = ?", (token_id,))
            if state is None or state[0] != "quarantined" or state[1]:
                return False
            n, first = c.one("SELECT count(*), min(received_at) FROM bundles WHERE token_id = ?", (token_id,))
            if n < min_bundles or first is None or \
                    (at - datetime.fromisoformat(first)).total_seconds() < min_hours * 3600:
                return False
            overlaps = 0
            for key, mine in c.all("SELECT key_id, vote_json FROM votes WHERE token_id = ?", (token_id,)):
                others = [json.loads(v) for (v,) in c.all(
                    f"SELECT v.vote_json FROM votes v LEFT JOIN token_state s USING (token_id) WHERE v.key_id = ? "
                    f"AND v.token_id != ? AND {COUNTS}", (key, token_id))]
                if len(others) < 2:
                    continue
                if not aggregate.agrees(json.loads(mine), others):
                    return False
                overlaps += 1
            if not overlaps:
                return False
            c.q("UPDATE token_state SET status = 'active' WHERE token_id = ?", (token_id,))
            keys = [k for (k,) in c.all("SELECT key_id FROM votes WHERE token_id = ?", (token_id,))]
            self.db.lock_keys(c, keys)
            for key in keys:
                self._refresh_fit(c, key)
        return True

    # --- bundles ---
    def bundle_for_key(self, key: str) -> str | None:
        with self.db.read() as c:
            found = c.one("SELECT content_hash FROM idempotency WHERE key = ?", (key,))
        return found[0] if found else None

    def known(self, content_hash: str) -> dict | None:
        """The answer for a bundle already stored (a repeat skips the plausibility work), else None."""
        with self.db.read() as c:
            found = c.one("SELECT n_rows FROM bundles WHERE content_hash = ?", (content_hash,))
        return None if found is None else {"bundle": content_hash, "duplicate": True, "rows": found[0],
                                           "new_rows": 0, "duplicate_rows": found[0]}

    def submit(self, doc: dict, content_hash: str | None = None, idem_key: str | None = None,
               size: int = 0) -> dict:
        """Store a validated bundle (bundle.validate, then validate.check_bundle), each row with the
        server's verdict, and update the aggregates it touches; returns what happened. Repeats return
        the first answer's counts. ``size`` bytes are charged to the bundle's token (QuotaExceeded,
        nothing stored, when over its quota)."""
        rows, timeline = doc["rows"], doc["timeline"]
        content_hash = content_hash or bundle_hash(doc)
        token_id = doc.get("token_id") or "local"
        verdicts = judge(rows, self.thresholds)
        samples = {key: {name: [values[i] for i in idx] for name, values in timeline.items()}
                   for key, idx in timeline_cases(rows, timeline).items()}
        stored = [self._row_values(row, verdict, content_hash, token_id) for row, verdict in zip(rows, verdicts)]
        try:
            with self.db.write() as c:
                first = c.q("INSERT INTO bundles VALUES (?,?,?,?,?,?) ON CONFLICT (content_hash) DO NOTHING",
                            (content_hash, token_id, now(), len(rows), 0, size)).rowcount
                if not first:  # stored before (or by a concurrent ingest, which we waited for)
                    if idem_key:
                        c.q("INSERT INTO idempotency VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                            (idem_key, content_hash))
                    n = c.one("SELECT n_rows FROM bundles WHERE content_hash = ?", (content_hash,))[0]
                    return {"bundle": content_hash, "duplicate": True, "rows": n, "new_rows": 0, "duplicate_rows": n}
                if size and c.one("SELECT 1 FROM token_state WHERE token_id = ?", (token_id,)):
                    charged = c.q("UPDATE token_state SET used_bytes = used_bytes + ? WHERE token_id = ? "
                                  "AND used_bytes + ? <= quota_bytes", (size, token_id, size)).rowcount
                    if not charged:
                        used, quota = c.one("SELECT used_bytes, quota_bytes FROM token_state WHERE token_id = ?",
                                            (token_id,))
                        raise QuotaExceeded(f"token {token_id} has used {used:,} of its {quota:,} byte quota; "
                                            f"this bundle ({size:,} bytes) does not fit: ask the operator")
                keys = {v[ROW_COLUMNS.index("key_id")] for v in stored} - {None}
                self.db.lock_keys(c, keys)
                c.many(f"INSERT INTO rows ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))}) "
                       "ON CONFLICT (row_key) DO NOTHING", stored)
                # the rows this bundle added carry its hash; a row stored before keeps its first bundle's
                new = c.one("SELECT count(*) FROM rows WHERE bundle_hash = ?", (content_hash,))[0]
                touched = {k for (k,) in c.all("SELECT DISTINCT key_id FROM rows WHERE bundle_hash = ? "
                                               "AND key_id IS NOT NULL", (content_hash,))}
                c.many("INSERT INTO case_timelines VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                       [(run_id, machine_id or "", machine_class or "", case_key, content_hash,
                         zlib.compress(json.dumps(case_samples).encode(), 1))
                        for (run_id, machine_id, machine_class, case_key), case_samples in samples.items()])
                c.q("UPDATE bundles SET n_new_rows = ? WHERE content_hash = ?", (new, content_hash))
                if idem_key:
                    c.q("INSERT INTO idempotency VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (idem_key, content_hash))
                for key in sorted(touched):
                    self._refresh_vote(c, key, token_id)
                    self._refresh_fit(c, key)
        except self.db.client_errors as exc:  # a null, a NUL or a huge number the structure check let through
            raise BadRow(str(exc).strip()[:120]) from None
        return {"bundle": content_hash, "duplicate": False, "rows": len(rows), "new_rows": new,
                "duplicate_rows": len(rows) - new}

    @staticmethod
    def _row_values(row: dict, verdict: dict, content_hash: str, token_id: str) -> tuple:
        counted = not budget_set(row)  # a budget's answer ("does it fit in X") is not this machine's fit
        fig = figures(row) or {}
        values = {
            **{k: row.get(k) for k in ROW_COLUMNS}, "row_key": row_key(row), "bundle_hash": content_hash,
            "fit_class": verdict["fit_class"], "budget_set": int(not counted), "row_json": json.dumps(row, sort_keys=True),
            "key_id": key_id(fit_key(row)) if counted else None, "token_id": token_id,
            "started_at": aggregate.valid_time(row.get("started_at")), "judged_peak": fig.get("peak_rss_bytes"),
        }
        return tuple(values[k] for k in ROW_COLUMNS)

    # --- the incremental aggregates ---
    def _refresh_vote(self, c, key: str, token_id: str) -> None:
        """Recompute one token's vote in one key from its rows there (the token's rows only)."""
        found = c.all(f"SELECT {', '.join(VOTE_COLUMNS)} FROM rows WHERE key_id = ? AND token_id = ?",
                      (key, token_id))
        if not found:
            c.q("DELETE FROM votes WHERE key_id = ? AND token_id = ?", (key, token_id))
            return
        rows = [dict(zip(VOTE_COLUMNS, r)) for r in found]
        for r in rows:
            r["peak_rss_bytes"] = r.pop("judged_peak")
        one = json.loads(c.one("SELECT row_json FROM rows WHERE key_id = ? AND token_id = ? LIMIT 1",
                               (key, token_id))[0])
        doc = {**aggregate.vote(rows), "key": fit_key(one)}
        c.q("INSERT INTO votes VALUES (?, ?, ?) ON CONFLICT (key_id, token_id) DO UPDATE SET vote_json = "
            "excluded.vote_json", (key, token_id, json.dumps(doc)))

    def _refresh_fit(self, c, key: str) -> None:
        """Recompute one key's served entry from the votes of the tokens in good standing."""
        found = c.all(f"SELECT v.vote_json FROM votes v LEFT JOIN token_state s USING (token_id) "
                      f"WHERE v.key_id = ? AND {COUNTS} ORDER BY v.token_id", (key,))
        if not found:
            c.q("DELETE FROM fits WHERE key_id = ?", (key,))
            return
        votes = [json.loads(v) for (v,) in found]

        def artifact_of(row_id: str) -> dict | None:
            got = c.one("SELECT row_json FROM rows WHERE row_key = ?", (row_id,))
            row = json.loads(got[0]) if got else None
            return {k.removeprefix("artifact_"): row.get(k) for k in ARTIFACT_FIELDS} if row else None

        fit_k = votes[0]["key"]
        entry = aggregate.fit_entry(fit_k, votes, artifact_of)
        sha, machine_class, runtime, n_ctx, workflow, turn = fit_k
        c.q("INSERT INTO fits VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (key_id) DO UPDATE SET "
            "artifact_name = excluded.artifact_name, tokens = excluded.tokens, fit_json = excluded.fit_json",
            (key, sha, entry["artifact"].get("name"), machine_class, runtime, n_ctx, workflow or "",
             turn if turn is not None else -1, entry["tokens"], json.dumps(entry)))

    def rebuild(self) -> None:
        """Recompute every vote and fit from the stored rows (a database from before the incremental
        aggregates; a check that they agree). Rows lacking the derived columns get them from row_json."""
        with self.db.write() as c:
            for rk, rj, bh in c.all("SELECT row_key, row_json, bundle_hash FROM rows WHERE key_id IS NULL "
                                    "AND budget_set = 0"):
                row = json.loads(rj)
                fig = figures(row) or {}
                tok = c.one("SELECT token_id FROM bundles WHERE content_hash = ?", (bh,))
                c.q("UPDATE rows SET key_id = ?, token_id = ?, started_at = ?, judged_peak = ?, workflow_kind = ? "
                    "WHERE row_key = ?", (key_id(fit_key(row)), tok[0] if tok else "local",
                                          aggregate.valid_time(row.get("started_at")), fig.get("peak_rss_bytes"),
                                          row.get("workflow_kind"), rk))
            c.q("DELETE FROM votes")
            c.q("DELETE FROM fits")
            pairs = c.all("SELECT DISTINCT key_id, token_id FROM rows WHERE key_id IS NOT NULL")
            for key, token_id in pairs:
                self._refresh_vote(c, key, token_id)
            for key in sorted({k for k, _ in pairs}):
                self._refresh_fit(c, key)

    # --- removing contributions ---
    def delete_bundle(self, content_hash: str) -> dict | None:
        """Remove a bundle (its hash, or a prefix of at least 12 of its hex digits naming one bundle: what
        ``contribute`` prints) with its rows and timelines (a row it shares with a later bundle goes too: rows
        are stored once), refund its size to the token's quota, recompute the keys it touched."""
        if len(content_hash) < 12 or not all(ch in "0123456789abcdef" for ch in content_hash):
            return None
        with self.db.write() as c:
            found = c.all("SELECT content_hash, token_id, size_bytes FROM bundles WHERE content_hash LIKE ? "
                          "ORDER BY content_hash LIMIT 2", (content_hash + "%",))
            if len(found) != 1:
                return None
            return self._delete(c, found)

    def delete_token(self, token_id: str) -> dict | None:
        """Remove every bundle a token sent (the token itself stays: revoke it with set_status)."""
        with self.db.write() as c:
            found = c.all("SELECT content_hash, token_id, size_bytes FROM bundles WHERE token_id = ?", (token_id,))
            if not found and c.one("SELECT 1 FROM tokens WHERE token_id = ?", (token_id,)) is None:
                return None
            return self._delete(c, found)

    def _delete(self, c, bundles: list[tuple]) -> dict:
        pairs: set[tuple] = set()
        rows = 0
        for content_hash, token_id, size in bundles:
            pairs |= {tuple(p) for p in c.all("SELECT DISTINCT key_id, token_id FROM rows WHERE bundle_hash = ? "
                                                  "AND key_id IS NOT NULL", (content_hash,))}
            rows += c.q("DELETE FROM rows WHERE bundle_hash = ?", (content_hash,)).rowcount
            c.q("DELETE FROM case_timelines WHERE bundle_hash = ?", (content_hash,))
            c.q("DELETE FROM idempotency WHERE content_hash = ?", (content_hash,))
            c.q("DELETE FROM bundles WHERE content_hash = ?", (content_hash,))
            c.q("UPDATE token_state SET used_bytes = CASE WHEN used_bytes > ? THEN used_bytes - ? ELSE 0 END "
                "WHERE token_id = ?", (size, size, token_id))
        keys = sorted({k for k, _ in pairs})
        self.db.lock_keys(c, keys)
        for key, token_id in sorted(pairs):
            self._refresh_vote(c, key, token_id)
        for key in keys:
            self._refresh_fit(c, key)
        return {"bundles": len(bundles), "rows": rows, "keys": len(keys)}

    # --- reading ---
    def stats(self) -> dict:
        with self.db.read() as c:
            q = lambda sql: c.one(sql)[0]  # noqa: E731
            return {"bundles": q("SELECT count(*) FROM bundles"), "rows": q("SELECT count(*) FROM rows"),
                    "machines": q("SELECT count(DISTINCT machine_id) FROM rows"),
                    "tokens": q("SELECT count(*) FROM tokens"),
                    "timeline_cases": q("SELECT count(*) FROM case_timelines"),
                    "fits": q("SELECT count(*) FROM fits")}

    @staticmethod
    def _filters(artifact_sha256=None, artifact=None, machine_class=None, runtime=None) -> tuple[str, list]:
        sql, args = " WHERE 1 = 1", []
        for name, value in (("artifact_sha256", artifact_sha256), ("machine_class", machine_class),
                            ("runtime", runtime)):
            if value:
                sql += f" AND {name} = ?"
                args.append(value)
        if artifact:  # a name substring or a sha256 prefix, as a search box sends it
            sql += " AND (lower(artifact_name) LIKE ? ESCAPE '!' OR artifact_sha256 LIKE ? ESCAPE '!')"
            args += [_like(artifact), _like(artifact)[1:]]
        return sql, args

    def fits_page(self, machine_class: str | None = None, artifact_sha256: str | None = None,
                  runtime: str | None = None, artifact: str | None = None, limit: int = 100,
                  offset: int = 0) -> tuple[list[dict], int]:
        """A page of the served fits (ordered by artifact, class, runtime, context, workflow, turn) and
        the total matching: read from the ``fits`` table, one stored entry per key returned."""
        where, args = self._filters(artifact_sha256, artifact, machine_class, runtime)
        with self.db.read() as c:
            total = c.one("SELECT count(*) FROM fits" + where, args)[0]
            found = c.all("SELECT fit_json FROM fits" + where + " ORDER BY artifact_sha256, machine_class, runtime, "
                          "n_ctx, workflow, turn LIMIT ? OFFSET ?", [*args, min(limit, MAX_PAGE), offset])
        return [json.loads(f) for (f,) in found], total

    def fits(self, machine_class: str | None = None, artifact_sha256: str | None = None,
             runtime: str | None = None) -> list[dict]:
        """Every served fit (function-level use; the API pages with fits_page)."""
        out, offset = [], 0
        while True:
            page, total = self.fits_page(machine_class, artifact_sha256, runtime, limit=MAX_PAGE, offset=offset)
            out += page
            offset += len(page)
            if not page or offset >= total:
                return out

    def rows_page(self, artifact_sha256: str, machine_class: str, runtime: str, n_ctx: int, limit: int = 100,
                  offset: int = 0) -> tuple[list[dict], int]:
        """The stored rows of one key (every workflow and turn at that context), tokens in good standing
        only, with the server's verdict beside the one the client claimed."""
        where = ("FROM rows r LEFT JOIN token_state s USING (token_id) WHERE r.artifact_sha256 = ? AND "
                 f"r.machine_class = ? AND r.runtime = ? AND r.n_ctx = ? AND r.budget_set = 0 AND {COUNTS}")
        args = [artifact_sha256, machine_class, runtime, n_ctx]
        with self.db.read() as c:
            total = c.one("SELECT count(*) " + where, args)[0]
            # the page's keys first (from the rows_page index alone), then only those rows' text: sorting
            # every row_json of a million-row key to return a hundred cost seconds
            found = c.all("SELECT p.row_json, p.fit_class, p.bundle_hash, p.token_id FROM rows p WHERE p.row_key IN "
                          "(SELECT r.row_key " + where + " ORDER BY r.row_key LIMIT ? OFFSET ?) ORDER BY p.row_key",
                          [*args, min(limit, MAX_PAGE), offset])
        out = []
        for row_json, fit_class, bundle, token_id in found:
            row = json.loads(row_json)
            out.append({**row, "claimed_fit_class": row.get("fit_class"), "fit_class": fit_class,
                        "bundle": bundle, "token_id": token_id})
        return out, total

    def artifacts(self, q: str | None = None, limit: int = 20) -> list[dict]:
        """Artifacts with served fits whose name contains ``q`` or whose sha256 starts with it, with their
        machine classes and runtimes (for a search box); the name is the one most tokens used."""
        where, args = self._filters(artifact=q)
        with self.db.read() as c:
            shas = [s for (s,) in c.all("SELECT DISTINCT artifact_sha256 FROM fits" + where +
                                        " ORDER BY artifact_sha256 LIMIT ?", [*args, min(limit, MAX_PAGE)])]
            found = c.all("SELECT artifact_sha256, artifact_name, machine_class, runtime, tokens FROM fits WHERE "
                          f"artifact_sha256 IN ({', '.join('?' * len(shas))})", shas) if shas else []
        by_sha: dict[str, dict] = {s: {"artifact_sha256": s, "names": {}, "machine_classes": set(), "runtimes": set(),
                                       "keys": 0} for s in shas}
        for sha, name, machine_class, runtime, tokens in found:
            a = by_sha[sha]
            if name:
                a["names"][name] = a["names"].get(name, 0) + tokens
            a["machine_classes"].add(machine_class)
            a["runtimes"].add(runtime)
            a["keys"] += 1
        return [{"artifact_sha256": a["artifact_sha256"],
                 "artifact_name": min(a["names"], key=lambda n: (-a["names"][n], n)) if a["names"] else None,
                 "machine_classes": sorted(a["machine_classes"]), "runtimes": sorted(a["runtimes"]),
                 "keys": a["keys"]} for a in by_sha.values()]
