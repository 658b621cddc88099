"""Issue #17, a malicious upstream: the client reads it safely (https, capped answers, strict numbers, no markup).

A real hostile server on 127.0.0.1 (http.server in a thread) answers `fitbench catalog pull` with
Infinity medians, huge and endless bodies, markup, wrong types and paging loops; every command
ends with a one-line error or skips and counts, never a traceback.
"""

from __future__ import annotations

import gzip
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from harness.catalog import Catalog, load_catalog
from harness.share import client
from harness.share.community import merge_community
from tests.test_cli import assert_usage_error, fitbench

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKUP = ["[/]", "[bold red]x", "[link=file:///etc/passwd]y[/link]"]


def fit(**kw) -> dict:
    base = {"artifact_sha256": SHA, "artifact": {"name": "m.gguf"}, "machine_class": "cpu-x86_64-24GiB",
            "runtime": "llama.cpp", "n_ctx": 512, "fit_class": "fits", "samples": 4, "machines": 2,
            "decode_tok_s": {"median": 80.0, "p25": 79.0, "p75": 81.0},
            "peak_rss_bytes": {"median": 199229440, "mad": 1000, "n": 4, "outliers": 0, "min": 1, "max": 2}}
    return {**base, **kw}


def _json(fits, **extra) -> bytes:
    return json.dumps({"fits": fits, **extra}).encode()


# What the hostile server answers for GET /v1/fits?mode=... (the client keeps the query it was given).
def answer(mode: str, offset: int) -> tuple[bytes, dict]:
    if mode == "infinity":  # the crash of issue #17: an Infinity median
        body = _json([fit(n_ctx=1024)]).replace(b"199229440", b"Infinity")
        return body[:-1] + b', "x": NaN}', {}
    if mode == "1e999":
        return _json([fit(n_ctx=1024), fit()]).replace(b"80.0", b"1e999", 1), {}
    if mode == "bigint":
        return _json([fit(n_ctx=1024)]).replace(b"199229440", b"9" * 400), {}
    if mode == "wrong_types":
        bad = [fit(n_ctx="512"), fit(samples="many"), fit(runtime_versions={"a": 1}), fit(machines=-1),
               fit(decode_tok_s={"median": "fast"}), "not an object", None, 5, fit(turn=True), fit(n_ctx=2**40),
               fit(artifact_sha256="x" * 64), fit(fit_class="great"), fit(samples=True), fit(artifact=[1, 2])]
        return _json(bad + [fit(n_ctx=2048)]), {}
    if mode == "markup":
        return _json([fit(machine_class=m) for m in MARKUP] + [fit(runtime=m) for m in MARKUP]
                     + [fit(n_ctx=4096, artifact={"name": "[/]"}, runtime_versions=["[bold red]x"],
                            last_measured="[/]")]), {}
    if mode == "paging":  # three pages, then a next_offset that would loop back
        pages = {None: (_json([fit(n_ctx=512)], next_offset=1, total=3)),
                 1: _json([fit(n_ctx=1024)], next_offset=2), 2: _json([fit(n_ctx=2048)], next_offset=1)}
        return pages[offset], {}
    if mode == "not_fits":
        return b'{"fits": "no"}', {}
    if mode == "not_json":
        return b"<html>hello</html>", {}
    if mode == "deep":
        return b"[" * 100_000 + b"]" * 100_000, {}
    raise AssertionError(mode)


class Hostile(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        mode = query.get("machine_class", ["none"])[0]  # the test picks the attack with --machine-class
        offset = int(query["offset"][0]) if "offset" in query else None
        try:
            if mode == "endless":  # no Content-Length, a body that never ends
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"fits": [' + b" " * 2**20)
                for _ in range(64):
                    self.wfile.write(b" " * 2**20)
                return
            if mode == "declared":  # a Content-Length far past the cap
                self.send_response(200)
                self.send_header("content-length", str(50 * 2**30))
                self.end_headers()
                self.wfile.write(b"{}")
                return
            if mode == "bomb":  # 1 MiB gzip that inflates to 64 MiB
                body = gzip.compress(b'{"fits": [' + b" " * (64 * 2**20), compresslevel=9)
                self.send_response(200)
                self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            body, headers = answer(mode, offset)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on a body past its cap: what it should do


@pytest.fixture(scope="module")
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def pull(url: str, tmp_path: Path, mode: str, *extra: str):
    return fitbench("catalog", "pull", url, "--catalog", str(tmp_path / "catalog.yaml"), "--machine-class", mode,
                    "--retries", "1", *extra)


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stdout


@pytest.mark.parametrize("mode", ["infinity", "1e999", "bigint"])
def test_non_finite_numbers_are_skipped_not_crashed_on(hostile, tmp_path, mode):
    """Finding: an Infinity median crashed `catalog pull` with OverflowError."""
    out = _ok(pull(hostile, tmp_path, mode))
    cat = load_catalog(tmp_path / "catalog.yaml")
    assert all(f["n_ctx"] != 1024 for f in cat.fits)  # the entry holding it is skipped ...
    assert "1 malformed skipped" in out
    if mode == "1e999":
        assert [f["n_ctx"] for f in cat.fits] == [512]  # ... and the good one merged


def test_rows_of_the_wrong_kind_are_skipped_with_a_count(hostile, tmp_path):
    out = _ok(pull(hostile, tmp_path, "wrong_types"))
    assert "14 malformed skipped" in out and "1 added" in out
    assert [f["n_ctx"] for f in load_catalog(tmp_path / "catalog.yaml").fits] == [2048]


@pytest.mark.parametrize("mode, words", [
    ("endless", "larger than 32 MiB"), ("declared", "more than the 32 MiB"), ("bomb", "larger than 32 MiB"),
    ("not_json", "did not answer JSON"), ("not_fits", "no 'fits' list"), ("deep", "did not answer JSON"),
])
def test_oversized_or_foreign_answers_end_in_one_line(hostile, tmp_path, mode, words):
    """Finding: answers had no size cap."""
    (tmp_path / "catalog.yaml").write_text("fits: []\n")
    assert_usage_error(pull(hostile, tmp_path, mode), words)
    assert (tmp_path / "catalog.yaml").read_text() == "fits: []\n"  # nothing written


def test_next_offset_is_followed_and_a_loop_is_stopped(hostile, tmp_path):
    _ok(pull(hostile, tmp_path, "paging"))
    assert sorted(f["n_ctx"] for f in load_catalog(tmp_path / "catalog.yaml").fits) == [512, 1024, 2048]


def test_markup_from_upstream_is_refused_at_pull_and_shown_literally_by_show(hostile, tmp_path):
    """Finding: a machine_class of `[/]` made every later `catalog show` crash (rich markup)."""
    out = _ok(pull(hostile, tmp_path, "markup"))
    assert "6 malformed skipped" in out and "1 added" in out  # machine classes and runtimes of no published form
    cat = load_catalog(tmp_path / "catalog.yaml")
    [entry] = cat.fits
    assert entry["runtime_version"] == "[bold red]x"
    for fmt in ("table", "markdown", "csv", "json"):
        out = _ok(fitbench("catalog", "show", "--catalog", str(tmp_path / "catalog.yaml"), "--machine-class", "all",
                           "--format", fmt))
        assert "cpu-x86_64-24GiB" in out


def test_catalog_show_prints_markup_in_any_field_literally(tmp_path):
    """A catalog edited by hand (or pulled by an older fitbench) holding markup everywhere."""
    fits = [{"artifact": "a", "machine_class": m, "runtime": m, "options": m, "n_ctx": 512 + i, "fit_class": "fits",
             "fit_reason": m, "source": m, "runtime_version": m, "workflow": json.dumps({"kind": m, "turns": m})}
            for i, m in enumerate(MARKUP)]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"catalog_version": 1, "artifacts": {"a": {"name": "[/]"}},
                                                            "fits": fits}))
    for fmt in ("table", "markdown", "csv", "json"):
        proc = fitbench("catalog", "show", "--catalog", str(tmp_path / "catalog.yaml"), "--machine-class", "all",
                        "--format", fmt)
        out = _ok(proc)
        for m in ("[/]", "[bold red]x"):
            assert m in out, (fmt, out)
    for m in MARKUP:  # the same through the error path: a class that is not there names those that are
        proc = fitbench("catalog", "show", "--catalog", str(tmp_path / "catalog.yaml"), "--machine-class", m + "z")
        assert_usage_error(proc, "[/]", "[bold red]x")


def test_the_console_parses_markup_only_in_markup_strings():
    from rich.console import Console

    from harness.cli.present import DataConsole, Markup, fit_markup, markup

    console = DataConsole(record=True, width=200, color_system=None)
    for m in MARKUP:
        console.print(m)
        console.print(f"machine class {m}: ok", style="bold")
    console.print(markup("[bold]{x}[/] " + "done", x="[/]"), fit_markup("[bold red]x"), Markup("[red]ok[/]"))
    text = console.export_text()
    for m in MARKUP:
        assert m in text
    assert "[/] done [bold red]x ok" in text.replace("\\", "")
    assert isinstance(DataConsole(), Console)


@pytest.mark.parametrize("url", ["http://example.org", "http://10.0.0.5:8765", "http://[2001:db8::1]:8765",
                                 "http://127.0.0.1.example.org"])
def test_plain_http_to_another_host_is_refused(tmp_path, url):
    """Finding: a plain http:// URL was accepted for a remote host."""
    assert_usage_error(fitbench("catalog", "pull", url, "--catalog", str(tmp_path / "c.yaml")), "https", "--allow-http")
    from tests.upstream_helpers import write_results

    path = write_results(tmp_path)
    proc = fitbench("contribute", str(path), "--yes", "--to", url, env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert_usage_error(proc, "https", "--allow-http")
    assert not list(tmp_path.glob("contribute-*.tar.gz"))  # refused before anything was built to save or sent
    assert client.secure_url(url, allow_http=True) == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765", "http://127.9.9.9", "http://[::1]:8765",
                                 "http://localhost:8765", "https://upstream.example.org"])
def test_loopback_http_and_any_https_are_allowed(url):
    assert client.secure_url(url + "/v1/fits") == url


def test_merge_skips_non_finite_values_given_directly():
    cat = Catalog(Path("unused.yaml"))
    counts = merge_community(cat, {"fits": [fit(peak_rss_bytes={"median": float("inf")}), fit(n_ctx=1024)]}, "x")
    assert counts["skipped"] == 1 and counts["added"] == 1


def test_the_paged_robust_shape_and_unknown_fields_are_read():
    """/v1/fits as the robust aggregates serve it: votes, tokens, MAD, outliers apart, a key without a verdict."""
    robust = fit(votes=3, tokens=4, outlier_votes=1, fit_classes={"fits": 3}, rows_url="/v1/rows?x=1",
                 workflow_kind=None, turn=None, something_new={"nested": [1, 2]},
                 decode_tok_s={"median": 80.0, "mad": 1.5, "n": 3, "outliers": [1e6], "min": 78.0, "max": 82.0},
                 ttft_s={"median": None, "mad": None, "n": 0, "outliers": [0.001], "min": None, "max": None})
    cat = Catalog(Path("unused.yaml"))
    counts = merge_community(cat, {"fits": [robust, fit(n_ctx=1024, fit_class=None)], "total": 2,
                                   "next_offset": None}, "https://up.example")
    assert counts["added"] == 1 and counts["skipped"] == 0
    [entry] = cat.fits
    assert entry["decode_tok_s"] == 80.0 and entry["ttft_s"] is None
    assert entry["spread"]["decode_tok_s"] == [78.5, 81.5]  # median ± MAD where no quartiles are given
