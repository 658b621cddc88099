"""Catalog merge: idempotent, newer replaces older, malformed files are errors, nothing silently lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.catalog import CatalogError, load_catalog, query, save_catalog, update_catalog

MiB = 2**20


def row(run_id="r1", n_ctx=2048, fit="fits", started="2026-11-28 10:00:00", decode=50.0, peak=300 * MiB, **kw):
    base = {
        "run_id": run_id, "case_key": f"k{n_ctx}", "status": "ok", "fit_class": fit, "fit_reason": f"{fit} because",
        "artifact_sha256": "a" * 64, "artifact_name": "SmolLM2-135M-Instruct.Q4_1.gguf", "artifact_format": "gguf",
        "artifact_quant": "Q4_1", "artifact_arch": "llama", "artifact_size_bytes": 98 * MiB, "artifact_n_params": 134e6,
        "artifact_n_layers": 30, "artifact_n_kv_heads": 3, "artifact_n_heads": 9, "artifact_head_dim": 64,
        "artifact_context_length": 8192, "artifact_path": "/m/SmolLM2-135M-Instruct.Q4_1.gguf",
        "machine_class": "cpu-x86_64-24GiB", "runtime": "llama.cpp", "options_json": '{"n_threads": 2}',
        "n_ctx": n_ctx, "prompt_tokens": n_ctx // 2, "budget_bytes": 24 * 2**30, "ram_bytes": 24 * 2**30,
        "budget_method": "none", "peak_rss_bytes": peak, "decode_tok_s": decode, "ttft_s": 1.0,
        "runtime_version": "0.3.36", "started_at": started,
    }
    base.update(kw)
    return base


def test_update_is_idempotent_and_round_trips(tmp_path: Path):
    cat = load_catalog(tmp_path / "catalog.yaml")
    rows = [row(n_ctx=512), row(n_ctx=2048), row(n_ctx=2048, decode=52.0)]
    assert update_catalog(cat, [("a.parquet", rows)]) == {"added": 2, "updated": 0, "unchanged": 0, "skipped": 0}
    save_catalog(cat)
    again = load_catalog(tmp_path / "catalog.yaml")
    assert update_catalog(again, [("a.parquet", rows)])["unchanged"] == 2
    save_catalog(again)
    assert (tmp_path / "catalog.yaml").read_text() == _saved(cat, tmp_path)
    [art] = again.artifacts.values()
    assert art["sha256"] == "a" * 64 and art["n_kv_heads"] == 3 and art["head_dim"] == 64
    entry = next(f for f in again.fits if f["n_ctx"] == 2048)
    assert entry["decode_tok_s"] == 51.0 and entry["budget_bytes"] is None and entry["count"] == 1


def _saved(cat, tmp_path):
    other = tmp_path / "copy.yaml"
    cat.path, old = other, cat.path
    save_catalog(cat)
    cat.path = old
    return other.read_text()


def test_newer_replaces_older_keeping_the_count(tmp_path: Path):
    cat = load_catalog(tmp_path / "c.yaml")
    update_catalog(cat, [("a", [row("r1", fit="fits", started="2026-11-01 00:00:00")])])
    update_catalog(cat, [("b", [row("r2", fit="tight", started="2026-11-20 00:00:00")])])
    update_catalog(cat, [("c", [row("r0", fit="spill", started="2026-10-01 00:00:00")])])  # older: counted only
    [entry] = cat.fits
    assert entry["fit_class"] == "tight" and entry["count"] == 3 and entry["source"] == "b"
    assert entry["runs"] == ["r0", "r1", "r2"]


def test_budget_and_failures_are_kept_apart(tmp_path: Path):
    cat = load_catalog(tmp_path / "c.yaml")
    rows = [row("r1"), row("r2", budget_bytes=200 * MiB, budget_method="cgroup-v1", fit="spill"),
            {**row("r3", budget_bytes=60 * MiB, budget_method="cgroup-v1", fit="no_fit"), "status": "oom",
             "decode_tok_s": None}]
    counts = update_catalog(cat, [("x", rows)])
    assert counts["added"] == 3
    assert sorted(str(f["budget_bytes"]) for f in cat.fits) == sorted(["None", str(200 * MiB), str(60 * MiB)])


def test_rows_without_verdict_are_skipped_not_lost(tmp_path: Path):
    cat = load_catalog(tmp_path / "c.yaml")
    counts = update_catalog(cat, [("x", [row(fit=None), {**row("r9", fit=None), "status": "crashed"}])])
    assert counts["added"] == 0 and counts["skipped"] == 2


def test_query_by_context_and_budget(tmp_path: Path):
    cat = load_catalog(tmp_path / "c.yaml")
    update_catalog(cat, [("x", [row(n_ctx=512, peak=200 * MiB), row(n_ctx=2048, peak=300 * MiB),
                                row(n_ctx=8192, fit="slow", peak=500 * MiB)])])
    [at_1k] = query(cat, "cpu-x86_64-24GiB", context=1000)
    assert at_1k["n_ctx"] == 2048
    judged = {f["n_ctx"]: f["budget_verdict"] for f in query(cat, "cpu-x86_64-24GiB", budget_bytes=320 * MiB)}
    assert judged == {512: "fits", 2048: "tight", 8192: "spill"}  # 8192 was slow; over the budget it spills
    assert query(cat, "apple-m3-16GiB") == []
    # the margin is the Thresholds' headroom: with 40% asked, 200 of 320 MiB (37% left) is tight too
    wide = {f["n_ctx"]: f["budget_verdict"] for f in query(cat, budget_bytes=320 * MiB, headroom=0.4)}
    assert wide == {512: "tight", 2048: "tight", 8192: "spill"}


def test_the_budget_verdict_is_fit_memory_verdict_never_better_than_measured(tmp_path: Path):
    from harness.fit import memory_verdict

    cat = load_catalog(tmp_path / "c.yaml")
    update_catalog(cat, [("x", [row("r1", n_ctx=512, fit="no_fit", peak=100 * MiB),
                                row("r1", n_ctx=1024, fit="slow", peak=290 * MiB),
                                row("r1", n_ctx=2048, fit="fits", peak=None)])])
    judged = {f["n_ctx"]: f for f in query(cat, budget_bytes=320 * MiB)}
    assert judged[512]["budget_verdict"] == "no_fit"  # a case that did not load stays no_fit
    assert judged[1024]["budget_verdict"] == "slow"  # tight (9% left) is milder than the measured slow
    assert judged[1024]["budget_reason"] == memory_verdict(290 * MiB, 320 * MiB).reason
    assert judged[2048]["budget_verdict"] == "fits" and "budget_reason" not in judged[2048]  # no peak: not judged


@pytest.mark.parametrize("text, words", [
    ("artifacts: [\n", "malformed YAML at line"),
    ("- a\n- b\n", "a catalog is a mapping"),
    ("catalog_version: 7\n", "upgrade fitbench"),
    ("artifacts: {}\nfits: [{artifact: x, machine_class: c, runtime: r, n_ctx: 1}]\n", "not under 'artifacts'"),
    ("artifacts: {}\nfits: [{artifact: x}]\n", "lacks machine_class"),
    ("artifacts: {x: {}}\nfits: [{artifact: x, machine_class: c, runtime: r, n_ctx: 1, fit_class: huge}]\n",
     "fit_class 'huge'"),
    ("artifacts: {x: {}}\nfits: [{artifact: x, machine_class: c, runtime: r, n_ctx: lots, fit_class: fits}]\n",
     "n_ctx 'lots'"),
])
def test_malformed_catalogs_are_errors_and_never_overwritten(tmp_path: Path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=words):
        load_catalog(path)
    assert path.read_text() == text


def test_missing_catalog_is_empty(tmp_path: Path):
    cat = load_catalog(tmp_path / "none.yaml")
    assert cat.fits == [] and cat.artifacts == {}
    update_catalog(cat, [("x", [row()])])
    save_catalog(cat)
    data = yaml.safe_load((tmp_path / "none.yaml").read_text())
    assert data["catalog_version"] == 1 and len(data["fits"]) == 1


def test_a_workflow_is_its_own_fit_and_its_turn_rows_are_skipped(tmp_path: Path):
    cat = load_catalog(tmp_path / "catalog.yaml")
    spec = '{"kind": "chat", "reply_tokens": 32, "turns": 10, "user_tokens": 200}'
    session = [row(n_ctx=2048, case_key="w", workflow_json=spec, workflow_kind="chat", turn=t,
                   fit_class="tight" if t == 8 else "fits", fit_reason="x") for t in range(1, 11)]
    session.append(row(n_ctx=2048, case_key="w", workflow_json=spec, workflow_kind="chat", fit_class="tight",
                       fit_reason="turn 8: only 9% left"))
    counts = update_catalog(cat, [("a.parquet", [row(n_ctx=2048), *session])])
    assert counts["added"] == 2  # the single-turn case and the session, not the turns
    [wf] = [f for f in cat.fits if f.get("workflow")]
    assert wf["fit_class"] == "tight" and wf["fit_reason"] == "turn 8: only 9% left"
    save_catalog(cat)
    assert len(load_catalog(tmp_path / "catalog.yaml").fits) == 2
