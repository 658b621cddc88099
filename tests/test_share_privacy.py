"""Issue #17, privacy findings: what `fitbench contribute` sends is the allow-list, scrubbed, and nothing else.

The central test plants secrets (host name, user name, a home path with spaces, an e-mail, tokens,
mixed case) in EVERY text column of the result and timeline schemas (the columns are read from
harness/results.py, so a new text column is covered the day it is added) and searches the
serialized bundle for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from harness.results import RESULT_COLUMNS, TIMELINE_COLUMNS, ResultWriter
from harness.share import allowlist
from harness.share import bundle as bundle_mod
from harness.share.anonymise import Identity, Report, scrub_text, upstream_machine_id, upstream_run_id
from harness.share.contribute import ContributeError, build, column_lines, sent_columns
from tests.test_cli import assert_usage_error, fitbench
from tests.upstream_helpers import write_results

HOME = "/home/Alice Smith"
WORDS = ["Alice-Laptop", "asmith", "Alice Smith"]  # host, user, real name as this machine knows them
# What must never be found in a bundle, searched case-insensitively.
SECRETS = ["alice-laptop", "asmith", "alice smith", "secret project", "private stuff", "alice.smith@example.com",
           "ghp_Zx8kQ2vLmN4pR7sT1wY3bC5dF6gH9jK0aB", "AbCdEf0123456789GhIjKlMnOpQr", "intranet.corp", "10.1.2.3",
           "fbt1.tok3n.s3cr3tpart", "GPU-4a1b2c3d-aaaa-bbbb-cccc-0123456789ab"]
PLANTED = ("failed on ALICE-LAPTOP for AsMiTh (alice smith): /home/Alice Smith/Secret Project/model.gguf, "
           r"C:\Users\Alice Smith\Private Stuff\x.gguf, ~/Secret Project/y.gguf, \\alice-laptop\Private Stuff\z, "
           "mail Alice.Smith@Example.com, token ghp_Zx8kQ2vLmN4pR7sT1wY3bC5dF6gH9jK0aB key AbCdEf0123456789GhIjKlMnOpQr "
           "see https://intranet.corp/alice 10.1.2.3 fbt1.tok3n.s3cr3tpart GPU-4a1b2c3d-aaaa-bbbb-cccc-0123456789ab")
PLANTED_JSON = json.dumps({PLANTED: [PLANTED, {"path": PLANTED}], "n": 1})
TEXT_COLUMNS = [c.name for c in RESULT_COLUMNS if c.type == pa.string()]
TIMELINE_TEXT = [c.name for c in TIMELINE_COLUMNS if c.type == pa.string()]


@pytest.fixture
def identity(monkeypatch) -> Identity:
    monkeypatch.setenv("HOME", HOME)  # the home folder the scrubber cuts, spaces and capitals included
    return Identity(list(WORDS))


def _bundle_bytes(doc: dict, tmp_path: Path) -> bytes:
    """The bundle as sent (canonical JSON) and as saved (the .tar.gz's bundle.json), together."""
    path = bundle_mod.write_bundle_file(doc, tmp_path / "b.tar.gz")
    with tarfile.open(path, "r:gz") as tar:
        saved = tar.extractfile(bundle_mod.BUNDLE_MEMBER).read()
    return bundle_mod.canonical(doc) + b"\n" + saved + b"\n" + json.dumps(doc, ensure_ascii=False).encode()


def _planted_results(folder: Path) -> tuple[Path, list[str]]:
    """A results file whose rows each carry PLANTED (or PLANTED_JSON) in one text column, and a timeline
    whose samples carry it in each timeline text column. Returns the file and the planted columns."""
    base_path = write_results(folder / "base", reps=1)
    import pyarrow.parquet as pq

    from harness.results import read_results

    base = read_results(base_path).to_pylist()[0]
    tl = pq.read_table(base_path.with_name(base_path.name.replace(".parquet", ".timeline.parquet"))).to_pydict()
    rows = []
    for i, name in enumerate(TEXT_COLUMNS):
        for j, value in enumerate((PLANTED, PLANTED_JSON)):
            rows.append({**base, "repetition": 2 * i + j + 1, name: value})
    rows.append({**base, "repetition": 0})
    n = len(tl["t_s"])
    timeline = {k: list(v) for k, v in tl.items()}
    timeline["machine_id"] = [base["machine_id"]] * n
    for name in TIMELINE_TEXT:  # every timeline text column planted in some samples of the real case
        k = TIMELINE_TEXT.index(name)
        timeline.setdefault(name, [None] * n)
        for i in range(k, n, len(TIMELINE_TEXT) * 3):
            timeline[name][i] = PLANTED
    writer = ResultWriter(folder / "planted.parquet")
    writer.add_case(rows, timeline)
    return writer.results_path, TEXT_COLUMNS


def test_secrets_planted_in_every_text_column_never_reach_the_bundle(tmp_path, identity):
    """Findings: quality_error, runtime_extra_json, task_results_json, task_file, quality_text_id and
    fleet_node_id sent unscrubbed; case-sensitive redaction; paths with spaces kept their folders."""
    path, planted = _planted_results(tmp_path)
    built = build([path], identity)
    data = _bundle_bytes(built.doc, tmp_path).lower()
    found = [s for s in SECRETS if s.lower().encode() in data]
    assert found == [], f"planted secrets in the bundle: {found}"
    rows = built.doc["rows"]
    required_codes = [c for c in bundle_mod.REQUIRED_ROW if allowlist.SHARED_RESULT_COLUMNS[c].treatment == allowlist.CODE]
    # rows whose required code (status, machine class, runtime) was planted are left out and counted ...
    assert built.unshareable == 2 * len(required_codes)
    # ... every other planted row is sent, its planted column scrubbed, nulled or dropped, never as planted
    assert len(rows) == 2 * (len(planted) - len(required_codes)) + 1
    texts = [r.get(c) for r in rows for c, s in allowlist.SHARED_RESULT_COLUMNS.items() if s.treatment == allowlist.TEXT]
    assert any(t and "<email>" in t and "<secret>" in t and "<redacted>" in t and "model.gguf" in t for t in texts)
    for name in allowlist.NOT_SHARED:
        assert all(name not in r for r in rows), name
    assert {k for r in rows for k in r} <= set(allowlist.SHARED_RESULT_COLUMNS)
    assert set(built.doc["timeline"]) <= set(allowlist.SHARED_TIMELINE_COLUMNS)
    assert bundle_mod.validate(built.doc) == []
    assert built.leaks == []


def test_every_result_and_timeline_column_is_decided():
    """A new column is on the shared list or the not-shared list, with a reason: nothing leaves by default."""
    assert allowlist.unlisted([c.name for c in RESULT_COLUMNS]) == []
    assert not set(allowlist.SHARED_RESULT_COLUMNS) & set(allowlist.NOT_SHARED)
    assert {c.name for c in TIMELINE_COLUMNS} <= set(allowlist.SHARED_TIMELINE_COLUMNS)
    assert {"task_results_json", "task_file", "fleet_node_id"} <= set(allowlist.NOT_SHARED)
    for s in [*allowlist.SHARED_RESULT_COLUMNS.values(), *allowlist.SHARED_TIMELINE_COLUMNS.values()]:
        assert s.treatment in allowlist.TREATMENTS and s.why
        col = next((c for c in [*RESULT_COLUMNS, *TIMELINE_COLUMNS] if c.name == s.column), None)
        if col is not None and col.type == pa.string():
            assert s.treatment != allowlist.KEEP, f"{s.column}: a text column is never sent as it is"


def test_run_id_is_rederived_without_its_start_second(identity):
    """Finding: run_id carried the exact start second, undoing the hour rounding of started_at."""
    one, two = "20261128T101542Z-a1b2c3", "20261128T101543Z-a1b2c3"
    derived = upstream_run_id(one, identity)
    assert allowlist.RUN_ID_FORM.match(derived) and "101542" not in derived and "2026" not in derived
    assert upstream_run_id(one, identity) == derived != upstream_run_id(two, identity)  # stable, unique per run
    assert upstream_run_id(one, Identity(salt="f" * 64)) != derived  # keyed: another install gets another id


@pytest.mark.parametrize("text, kept, gone", [
    ("ran on ALICE-LAPTOP as AsMiTh", "ran on <redacted> as <redacted>", ["laptop", "smith"]),
    ("/home/Alice Smith/My Models/big model.gguf failed", "failed", ["alice", "my models"]),
    ("/HOME/ALICE SMITH/x.gguf", "x.gguf", ["alice"]),
    (r"C:\Users\Bob Jones\Secret Project\m.gguf missing", "m.gguf missing", ["bob", "secret"]),
    ("C:/Users/Bob Jones/Secret Project/m.gguf", "m.gguf", ["bob", "secret"]),
    ("~/Secret Project/m.gguf, ~bob/private dir/n.gguf", "m.gguf, n.gguf", ["secret", "private", "bob"]),
    (r"\\fileserver\Team Share\m.gguf", "m.gguf", ["fileserver", "team"]),
    ("write alice.smith@example.com", "write <email>", ["example"]),
    ("hf_AbCdEfGhIjKlMnOpQrSt1234 or sk-proj-abcdefghijklmnop12", "<secret> or <secret>", ["abcdef"]),
    ("ray at 192.168.1.20:6379 via http://head.internal:8265/x", "ray at <ip>:6379 via <url>", ["192", "internal"]),
])
def test_scrubber_cuts_paths_names_and_secrets_whatever_their_case(identity, text, kept, gone):
    """Findings: host/user redaction was case-sensitive; paths with spaces kept their folders."""
    out = scrub_text(text, identity, Report())
    assert kept in out, out
    for word in gone:
        assert word not in out.lower(), out


def test_model_names_and_hashes_survive_the_scrubber(identity):
    text = "SmolLM2-135M-Instruct.Q4_1.gguf llama.cpp 0.3.36 sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert scrub_text(text, identity, Report()) == text


def test_upstream_salt_is_a_random_per_install_secret_next_to_the_token(tmp_path, monkeypatch):
    """Finding: the upstream salt was a public constant, so anyone holding a shared results file could compute
    the upstream machine id."""
    local = "d6657c6bd240a6e3"
    ids = []
    for name in ("one", "two"):
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / name))
        first = upstream_machine_id(local)
        assert upstream_machine_id(local) == first  # stable on one install
        salt = tmp_path / name / "fitbench" / "upstream-salt"
        assert stat.S_IMODE(salt.stat().st_mode) == 0o600 and len(salt.read_text().strip()) == 64
        assert salt.parent == (tmp_path / name / "fitbench" / "token").parent  # where the token is kept
        ids.append(first)
    assert ids[0] != ids[1]
    public = hashlib.sha256(f"fitbench-upstream-v1|{local}".encode()).hexdigest()[:16]  # the old constant's id
    assert public not in ids


def test_a_salt_that_cannot_be_kept_stops_the_contribution(tmp_path, monkeypatch, identity):
    (tmp_path / "cfg").write_text("a file where the folder should be")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    with pytest.raises(ContributeError, match="XDG_CONFIG_HOME"):
        build([write_results(tmp_path)], Identity(list(WORDS)))


def test_fallback_machine_seed_is_not_derivable_from_the_row(tmp_path, monkeypatch):
    """Finding: without /etc/machine-id the machine id was a hash of cpu_model|ram|arch, all in the row."""
    from harness.measure import machine

    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError("no"))
                        if str(self).endswith("machine-id") else real_read(self, *a, **k))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(machine.sys, "platform", "linux")
    first, again = machine._machine_id(), machine._machine_id()
    assert first == again  # kept per install
    seed = tmp_path / "fitbench" / "machine-seed"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    m = machine.fingerprint()
    old = hashlib.sha256(f"fitbench-machine-v1|{m.cpu_model}|{m.ram_bytes}|{m.cpu_arch}".encode()).hexdigest()[:16]
    assert first != old


def test_dry_run_shows_exactly_the_allow_listed_columns(tmp_path, identity):
    """The dry run lists every column the bundle carries, and nothing the bundle does not."""
    path = write_results(tmp_path, fleet_node_id="a1" * 28, task_file="acme-evals.jsonl", scenario="acme-project")
    built = build([path], identity)
    shown = [line.split(" (")[0].strip() for line in column_lines(built) if not line.strip().startswith("timeline:")]
    assert shown == sent_columns(built)
    assert set(shown) == {k for r in built.doc["rows"] for k in r}
    proc = fitbench("contribute", str(path), "--dry-run", env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert proc.returncode == 0, proc.stderr
    listed = [line.split(" (")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  ")
              and not line.strip().startswith("timeline:")]
    assert listed and set(listed) <= set(allowlist.SHARED_RESULT_COLUMNS)
    assert "fleet_node_id" not in listed and "acme" not in proc.stdout.split("columns of the results")[0]
    assert "not sent: fleet_node_id" in proc.stdout.replace("not on the list, not sent: ", "not sent: ")
    assert "docs/shared-columns.md" in proc.stdout


def test_a_saved_bundle_from_before_the_allow_list_is_refused(tmp_path, identity):
    doc = build([write_results(tmp_path)], identity).doc
    old = {**doc, "rows": [{**r, "run_id": "20261128T000000Z-aaaaaa"} for r in doc["rows"]]}
    path = bundle_mod.write_bundle_file(old, tmp_path / "old.tar.gz")
    assert_usage_error(fitbench("contribute", str(path), "--dry-run", env={"XDG_CONFIG_HOME": str(tmp_path / "c")}),
                       "allow-list", "build the bundle again")
    extra = {**doc, "rows": [{**r, "fleet_node_id": "n1"} for r in doc["rows"]]}
    path = bundle_mod.write_bundle_file(extra, tmp_path / "extra.tar.gz")
    assert_usage_error(fitbench("contribute", str(path), "--dry-run", env={"XDG_CONFIG_HOME": str(tmp_path / "c")}),
                       "fleet_node_id")
    fine = bundle_mod.write_bundle_file(doc, tmp_path / "fine.tar.gz")
    assert build([fine], identity).doc["rows"] == doc["rows"]


def test_the_identity_found_here_is_redacted_in_any_case(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "Build-Box-7")
    monkeypatch.setattr(socket, "getfqdn", lambda: "build-box-7.lab.example")
    monkeypatch.setenv("USER", "cmorgan")
    monkeypatch.setenv("LOGNAME", "cmorgan")
    ident = Identity.here()
    out = scrub_text("BUILD-BOX-7 / CMorgan / build-box-7.LAB.example", ident, Report())
    assert "build" not in out.lower() and "morgan" not in out.lower(), out
    assert os.environ["USER"] == "cmorgan"
