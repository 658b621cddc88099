"""The two databases the upstream store runs on, behind one small interface: SQLite and PostgreSQL.

``open_database(target)`` gives a ``SQLiteDB`` for a file path (or
``:memory:``) and a ``PostgresDB`` for a ``postgresql://`` URL. Both offer
``write()`` (one transaction: everything in it is stored, or nothing) and
``read()`` (a connection for queries), each yielding a ``Conn`` whose ``q``
runs SQL written once, with ``?`` placeholders, on either.

How concurrent writers are kept apart:

* SQLite: one process holds one connection for writes, guarded by a lock,
  and each transaction starts ``BEGIN IMMEDIATE`` (a second process waits
  on the file lock, ``busy_timeout``). Reads use a connection per thread
  (WAL: a read never waits for a write, so ``/v1/fits`` is not held up by
  an ingest). The file is created 0600 and written with
  ``synchronous=FULL``: a bundle the server acknowledged survives power loss.
* PostgreSQL: a connection per thread, no in-process lock. Concurrent
  ingests (threads or processes on other machines) are kept apart by the
  database: unique keys with ``ON CONFLICT`` (a bundle or row sent twice is
  stored once: the second insert waits for the first transaction), row locks
  (``UPDATE`` of a token's quota) and ``lock_keys`` (transaction-scoped
  advisory locks on the aggregate keys a bundle touches, taken in sorted
  order, so the per-key aggregates are recomputed one writer at a time).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from pathlib import Path

from harness.errors import FitbenchError

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, secret TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS token_state (
    token_id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, quota_bytes BIGINT NOT NULL,
    used_bytes BIGINT NOT NULL DEFAULT 0, refused INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bundles (
    content_hash TEXT PRIMARY KEY, token_id TEXT NOT NULL, received_at TEXT NOT NULL,
    n_rows INTEGER NOT NULL, n_new_rows INTEGER NOT NULL, size_bytes BIGINT NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS bundles_token ON bundles (token_id);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, content_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row_key TEXT PRIMARY KEY, bundle_hash TEXT NOT NULL, machine_id TEXT NOT NULL, machine_class TEXT NOT NULL,
    run_id TEXT NOT NULL, case_key TEXT NOT NULL, repetition INTEGER, status TEXT NOT NULL, fit_class TEXT,
    runtime TEXT NOT NULL, runtime_version TEXT, artifact_sha256 TEXT NOT NULL, artifact_name TEXT NOT NULL,
    n_ctx INTEGER NOT NULL, prompt_tokens INTEGER, budget_set INTEGER NOT NULL,
    decode_tok_s DOUBLE PRECISION, ttft_s DOUBLE PRECISION, prefill_tok_s DOUBLE PRECISION,
    peak_rss_bytes BIGINT, row_json TEXT NOT NULL,
    key_id TEXT, token_id TEXT, started_at TEXT, judged_peak BIGINT, workflow_kind TEXT);
-- the rows of one key in page order, with what the page filter reads (budget_set, token_id): /v1/rows walks
-- this index alone and reads row_json only for the page it returns
CREATE INDEX IF NOT EXISTS rows_page ON rows (artifact_sha256, machine_class, runtime, n_ctx, budget_set, row_key,
    token_id);
DROP INDEX IF EXISTS rows_group;
CREATE INDEX IF NOT EXISTS rows_vote ON rows (key_id, token_id);
CREATE INDEX IF NOT EXISTS rows_bundle ON rows (bundle_hash);
CREATE TABLE IF NOT EXISTS case_timelines (
    run_id TEXT NOT NULL, machine_id TEXT NOT NULL, machine_class TEXT NOT NULL, case_key TEXT NOT NULL,
    bundle_hash TEXT NOT NULL, samples_z {BLOB} NOT NULL, PRIMARY KEY (run_id, machine_id, machine_class, case_key));
CREATE TABLE IF NOT EXISTS votes (
    key_id TEXT NOT NULL, token_id TEXT NOT NULL, vote_json TEXT NOT NULL, PRIMARY KEY (key_id, token_id));
CREATE INDEX IF NOT EXISTS votes_token ON votes (token_id);
CREATE TABLE IF NOT EXISTS fits (
    key_id TEXT PRIMARY KEY, artifact_sha256 TEXT NOT NULL, artifact_name TEXT, machine_class TEXT NOT NULL,
    runtime TEXT NOT NULL, n_ctx INTEGER NOT NULL, workflow TEXT NOT NULL, turn INTEGER NOT NULL,
    tokens INTEGER NOT NULL, fit_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS fits_order ON fits (artifact_sha256, machine_class, runtime, n_ctx, workflow, turn);
CREATE INDEX IF NOT EXISTS fits_class ON fits (machine_class);
"""
# columns added to ``rows`` and ``token_state``/``bundles`` since the first release (older files gain them)
ADDED_COLUMNS = {"rows": ("key_id TEXT", "token_id TEXT", "started_at TEXT", "judged_peak BIGINT",
                          "workflow_kind TEXT"),
                 "token_state": ("refused INTEGER NOT NULL DEFAULT 0",),
                 "bundles": ("size_bytes BIGINT NOT NULL DEFAULT 0",)}


class DatabaseError(FitbenchError):
    """The database cannot be opened or used (a bad URL, a missing driver, a server that is down)."""


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def open_database(target: str | Path):
    return PostgresDB(str(target)) if is_postgres(target) else SQLiteDB(target)


class Conn:
    """One connection inside ``read()``/``write()``: ``q(sql, args)`` returns a cursor, SQL uses ``?``."""

    def __init__(self, raw, postgres: bool) -> None:
        self.raw, self.postgres = raw, postgres

    def q(self, sql: str, args=()):
        if self.postgres:
            sql = sql.replace("?", "%s")
        return self.raw.execute(sql, tuple(args))

    def many(self, sql: str, rows) -> None:
        """One statement over many parameter rows (psycopg pipelines them: one round trip, not one each)."""
        if self.postgres:
            with self.raw.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        else:
            self.raw.executemany(sql, rows)

    def one(self, sql: str, args=()):
        return self.q(sql, args).fetchone()

    def all(self, sql: str, args=()) -> list:
        return self.q(sql, args).fetchall()


def _lock_id(key: str) -> int:
    """A signed 64-bit advisory-lock id for a key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class SQLiteDB:
    kind = "sqlite"
    # what a value the structure check let through can make the database refuse: the client's fault
    client_errors: tuple = (sqlite3.IntegrityError, OverflowError)

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.memory = self.path == ":memory:"
        if not self.memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # created owner-only: tokens' secrets and every contribution are in it
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
        self._writer = self._connect()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        with self._lock:
            self._writer.executescript(SCHEMA.replace("{BLOB}", "BLOB"))
            for table, columns in ADDED_COLUMNS.items():
                have = {r[1] for r in self._writer.execute(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in have:
                        self._writer.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an acknowledged bundle is on disk, power loss or not
        db.execute("PRAGMA busy_timeout=60000")  # a second ingest process waits for the file lock
        return db

    @contextlib.contextmanager
    def write(self):
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield Conn(self._writer, False)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    @contextlib.contextmanager
    def read(self):
        if self.memory:  # one in-memory database: the writer's connection, under its lock
            with self._lock:
                yield Conn(self._writer, False)
            return
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            self._readers.append(db)
        yield Conn(db, False)

    def lock_keys(self, conn: Conn, keys) -> None:
        """Nothing to do: BEGIN IMMEDIATE already makes this the only writer of the file."""

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        for db in self._readers:
            with contextlib.suppress(sqlite3.Error):
                db.close()


class PostgresDB:
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise DatabaseError("a postgresql:// store needs psycopg: pip install 'fitbench[upstream]'") from None
        self._psycopg = psycopg
        # NUL in a text (ValueError, refused by psycopg), a number beyond BIGINT, a missing required value
        self.client_errors = (psycopg.IntegrityError, psycopg.DataError, ValueError, OverflowError)
        self.url = url
        self._local = threading.local()
        self._all: list = []
        self._guard = threading.Lock()
        with self.write() as conn:
            conn.q("SELECT pg_advisory_xact_lock(?)", (_lock_id("fitbench schema"),))  # two servers starting
            for statement in SCHEMA.replace("{BLOB}", "BYTEA").split(";"):
                if statement.strip():
                    conn.q(statement)
            for table, columns in ADDED_COLUMNS.items():
                for column in columns:
                    conn.q(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}")

    def _conn(self):
        db = getattr(self._local, "db", None)
        if db is None or db.closed:
            try:
                db = self._psycopg.connect(self.url, autocommit=True)
            except self._psycopg.OperationalError as exc:
                raise DatabaseError(f"cannot connect to {redact(self.url)}: {str(exc).strip()[:200]}") from None
            self._local.db = db
            with self._guard:
                self._all.append(db)
        return db

    @contextlib.contextmanager
    def write(self):
        db = self._conn()
        with db.transaction():
            yield Conn(db, True)

    @contextlib.contextmanager
    def read(self):
        yield Conn(self._conn(), True)

    def lock_keys(self, conn: Conn, keys) -> None:
        """Row-level serialisation of the per-key aggregates across processes: held until commit."""
        for key in sorted(set(keys)):
            conn.q("SELECT pg_advisory_xact_lock(?)", (_lock_id(key),))

    def close(self) -> None:
        with self._guard:
            for db in self._all:
                with contextlib.suppress(Exception):
                    db.close()
            self._all.clear()


def redact(url: str) -> str:
    """A database URL without its password, for messages."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, cred = head.partition("//")
    return f"{scheme}//{cred.split(':')[0]}:***@{tail}"
