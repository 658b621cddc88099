"""The result schema and atomic writing."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.results import (
    RESULT_COLUMNS,
    RESULT_SCHEMA,
    SCHEMA_VERSION,
    TIMELINE_SCHEMA,
    ResultsError,
    ResultWriter,
    file_schema_version,
    read_results,
    to_table,
    write_atomic,
)


def test_schema_is_defined_once_with_docs_and_unique_names():
    names = [c.name for c in RESULT_COLUMNS]
    assert len(names) == len(set(names))
    assert all(c.doc for c in RESULT_COLUMNS)
    assert RESULT_SCHEMA.field("ttft_s").metadata[b"doc"]
    assert all(f.nullable for f in RESULT_SCHEMA)


def test_rows_get_schema_version_and_unknown_columns_fail():
    table = to_table([{"status": "ok", "ttft_s": 0.5}], RESULT_SCHEMA)
    assert table.column("schema_version").to_pylist() == [SCHEMA_VERSION]
    assert table.column("decode_tok_s").to_pylist() == [None]
    with pytest.raises(ValueError, match="ttft"):
        to_table([{"status": "ok", "ttft": 0.5}], RESULT_SCHEMA)


def test_writer_round_trip_and_metadata(tmp_path: Path):
    w = ResultWriter(tmp_path / "run.parquet")
    w.add_case([{"status": "ok", "case_key": "a", "repetition": 0}], {"t_s": [0.0, 0.01], "rss_bytes": [1, 2]})
    w.add_case([{"status": "timeout", "case_key": "b"}], {})
    assert file_schema_version(w.results_path) == SCHEMA_VERSION
    table = read_results(w.results_path)
    assert table.column("status").to_pylist() == ["ok", "timeout"]
    timeline = pq.read_table(w.timeline_path)
    assert timeline.schema.equals(TIMELINE_SCHEMA, check_metadata=False)
    assert timeline.column("rss_bytes").to_pylist() == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch):
    path = tmp_path / "r.parquet"
    write_atomic(to_table([{"status": "ok"}], RESULT_SCHEMA), path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        write_atomic(to_table([{"status": "ok"}, {"status": "ok"}], RESULT_SCHEMA), path)
    monkeypatch.undo()
    assert read_results(path).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]


def test_writer_turns_os_errors_into_results_errors(tmp_path: Path, monkeypatch):
    w = ResultWriter(tmp_path / "run.parquet")
    w.add_case([{"status": "ok"}], {})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(ResultsError, match="Read-only"):
        w.add_case([{"status": "ok"}], {})
    monkeypatch.undo()
    assert read_results(w.results_path).num_rows == 1


def test_read_refuses_foreign_and_newer_files(tmp_path: Path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(ResultsError, match="not written by fitbench"):
        read_results(plain)
    newer = tmp_path / "newer.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"fitbench.schema_version": b"99.0"}), newer)
    with pytest.raises(ResultsError, match="upgrade fitbench"):
        read_results(newer)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ResultsError, match="not a readable Parquet"):
        read_results(junk)
