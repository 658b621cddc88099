"""bench/upstream_scale.py's bulk fill: the same stored rows, votes and fits as the upload-sized path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from harness.share.upstream.store import Store

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("upstream_scale", ROOT / "bench/upstream_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bulk_submissions_cover_every_bench_bundle_once_one_token_each():
    bench = load_bench()
    tokens, per_bundle, rows = 3, 10, 95  # 10 bench bundles, the last one short
    plain = list(bench.submissions(rows, tokens, per_bundle, None))
    bulk = list(bench.submissions(rows, tokens, per_bundle, 25))
    assert plain == [(b % tokens, [b]) for b in range(10)]
    assert sorted(b for _, group in bulk for b in group) == list(range(10))
    assert all(b % tokens == t for t, group in bulk for b in group)  # a bundle keeps its contributor
    assert max(len(group) for _, group in bulk) == 3 and len(bulk) < len(plain)


def stored(store: Store) -> tuple:
    # token ids are random per store: votes compared by the token's name, and a fit's JSON as values
    # (its votes are read in token id order, which may order its keys differently)
    with store.db.read() as c:
        return ([(k, name, json.loads(v)) for k, name, v in c.all(
                    "SELECT v.key_id, s.name, v.vote_json FROM votes v JOIN token_state s USING (token_id) "
                    "ORDER BY 1, 2")],
                [(k, json.loads(f)) for k, f in c.all("SELECT key_id, fit_json FROM fits ORDER BY 1")],
                c.all("SELECT row_key, row_json, fit_class, key_id FROM rows ORDER BY 1"))


def test_bulk_fill_stores_what_the_submit_path_stores(tmp_path):
    bench = load_bench()
    template = bench.template_row(tmp_path)
    got, paths = {}, {}
    for name, bulk in (("bulk", 300), ("submit", None)):
        store = Store(str(tmp_path / f"{name}.sqlite"))
        filled = bench.fill(store, template, 1000, 4, 50, bulk)
        got[name], paths[name] = stored(store), filled["fill_path"]
        store.close()
    votes, fits, rows = got["bulk"]
    assert len(rows) == 1000 and len(fits) == len(bench.CLASSES) * len(bench.CONTEXTS) and votes
    for mine, theirs in zip(got["bulk"], got["submit"]):
        assert mine == theirs
    assert paths["bulk"].startswith("bulk:") and paths["submit"].startswith("submit:")
