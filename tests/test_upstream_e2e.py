"""End to end on loopback: two real runs of the sample model, `fitbench upstream serve` in a subprocess,
`fitbench contribute` of both, a repeat, a tampered and an implausible bundle, then `fitbench catalog pull`."""

from __future__ import annotations

import glob
import io
import json
import subprocess
import tarfile
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from harness.catalog import load_catalog
from harness.results import timeline_path_for
from tests.test_cli import fitbench
from tests.upstream_helpers import upstream_subprocess

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def real_results(tmp_path_factory, sample_model) -> list[Path]:
    folder = tmp_path_factory.mktemp("runs")
    scenario = folder / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "tiny", "models": [{"artifact": str(sample_model), "runtime": "llama.cpp"}],
        "contexts": [256], "fill": 0.5, "gen_tokens": 8, "warmup": 1, "repetitions": 2, "timeout": 300}))
    paths = []
    for i in range(2):
        out = folder / f"run{i}"
        proc = fitbench("run", str(scenario), "-o", str(out))
        assert proc.returncode == 0, proc.stderr + proc.stdout
        [path] = [p for p in glob.glob(f"{out}/tiny-*.parquet") if not p.endswith(".timeline.parquet")]
        paths.append(Path(path))
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with upstream_subprocess(tmp_path_factory.mktemp("upstream") / "up.sqlite") as url:
        yield url


def contribute(*args: str, cfg: Path) -> subprocess.CompletedProcess:
    return fitbench("contribute", *args, env={"XDG_CONFIG_HOME": str(cfg)})


def test_contribute_real_runs_end_to_end(real_results, server, tmp_path):
    cfg = tmp_path / "cfg"
    first = contribute(str(real_results[0]), "--yes", "--to", server, cfg=cfg)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "2 new row(s), 0 already there" in first.stdout and "got a submitter token" in first.stderr
    assert json.loads((cfg / "fitbench" / "token").read_text())[server].startswith("fbt1.")
    second = contribute(str(real_results[1]), "--yes", "--to", server, cfg=cfg)
    assert second.returncode == 0 and "2 new row(s)" in second.stdout, second.stderr
    # a repeat adds nothing
    again = contribute(str(real_results[0]), "--yes", "--to", server, cfg=cfg)
    assert again.returncode == 0 and "already there (nothing added)" in again.stdout, again.stderr
    assert httpx.get(f"{server}/v1/stats").json()["rows"] == 4

    # a bundle written with --out, then edited: refused, with the reason
    bundle = tmp_path / "b.tar.gz"
    token = json.loads((cfg / "fitbench" / "token").read_text())[server]
    wrote = contribute(str(real_results[0]), "--yes", "--out", str(bundle), "--token", token, cfg=cfg)
    assert wrote.returncode == 0 and bundle.exists(), wrote.stderr
    tampered = tmp_path / "tampered.tar.gz"
    _edit_bundle(bundle, tampered, lambda doc: doc["rows"][0].update(decode_tok_s=doc["rows"][0]["decode_tok_s"] * 2))
    refused = contribute(str(tampered), "--yes", "--to", server, cfg=cfg)
    assert refused.returncode == 2 and "altered after it was signed" in refused.stderr, refused.stderr

    # a real file made implausible (decode 1M tok/s, times to match): refused by the roofline rule
    fake = _faster_copy(real_results[1], tmp_path / "fake", 1e6)
    implausible = contribute(str(fake), "--yes", "--to", server, cfg=cfg)
    assert implausible.returncode == 2 and "roofline" in implausible.stderr, implausible.stderr
    assert httpx.get(f"{server}/v1/stats").json()["rows"] == 4

    # community fits into a catalog that has a local measurement of the same case
    catalog = tmp_path / "catalog.yaml"
    assert fitbench("catalog", "update", str(real_results[0]), "--catalog", str(catalog)).returncode == 0
    pulled = fitbench("catalog", "pull", server, "--catalog", str(catalog))
    assert pulled.returncode == 0 and "1 added" in pulled.stdout, pulled.stderr
    cat = load_catalog(catalog)
    [community] = [f for f in cat.fits if f.get("origin") == "community"]
    [local] = [f for f in cat.fits if f.get("origin") != "community"]
    assert community["samples"] == 4 and community["machines"] == 1 and community["n_ctx"] == 256
    assert local["runs"] and local["options"] != "community"
    shown = fitbench("catalog", "show", "--catalog", str(catalog), "--machine-class", "all")
    assert shown.returncode == 0 and "community" in shown.stdout


def _edit_bundle(src: Path, dst: Path, edit) -> None:
    with tarfile.open(src) as tar:
        doc = json.loads(tar.extractfile("bundle.json").read())
    edit(doc)
    data = json.dumps(doc).encode()
    with tarfile.open(dst, "w:gz") as tar:
        info = tarfile.TarInfo("bundle.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _faster_copy(path: Path, folder: Path, decode: float) -> Path:
    """The same run with another decode speed, its e2e shortened to match (so only the roofline can tell)."""
    folder.mkdir()
    table = pq.read_table(path)
    rows = table.to_pylist()
    for row in rows:
        row["decode_tok_s"] = decode
        row["e2e_s"] = row["ttft_s"] + (row["gen_tokens"] - 1) / row["decode_tok_s"]
        row["run_id"] += "-fake"
    out = folder / path.name
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    timeline = pq.read_table(timeline_path_for(path)).to_pylist()
    for sample in timeline:
        sample["run_id"] += "-fake"
        if sample["phase"].startswith("rep"):
            sample["phase"] = "prompt"  # the fake repetitions are too short for their samples
    pq.write_table(pa.Table.from_pylist(timeline, schema=pq.read_schema(timeline_path_for(path))),
                   timeline_path_for(out))
    return out
