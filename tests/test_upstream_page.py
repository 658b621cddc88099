"""The fit explorer page at `/` of `fitbench upstream serve`.

Server-side checks over crafted results (escaping, CSP, assets shipped as package data), then the
page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a real
`fitbench upstream serve` holding two real runs of the sample model: the numbers the browser shows
are those of `GET /v1/fits`, formatted by the page's own formatter, and a hostile artifact name
renders as text. In CI (CI=true) a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from harness.share.contribute import build
from harness.share.upstream import page as page_mod
from harness.share.upstream.app import Config, create_app
from tests.conftest import ROOT
from tests.test_cli import fitbench
from tests.test_upstream import new_token, send
from tests.upstream_helpers import MiB, upstream_subprocess, write_results

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# No slash: the anonymiser keeps only a path's last part, and this must reach the server whole.
HOSTILE = "<img src=x onerror=alert(document.domain)> & \"q\" <b>bold"
HOSTILE_SHA = "e" * 64


# --- server side: crafted results through the app ----------------------------------------------------------

@pytest.fixture
def client(tmp_path) -> TestClient:
    client = TestClient(create_app(Config(db=tmp_path / "up.sqlite", open_tokens=True)),
                        raise_server_exceptions=False)
    token = new_token(client)
    for i, (n_ctx, decode) in enumerate([(256, 90.0), (512, 80.0)]):
        doc = build([write_results(tmp_path / f"r{i}", run_id=f"20261128T00000{i}Z-aaaaaa", n_ctx=n_ctx,
                                   decode=decode)]).doc
        assert send(client, doc, token).status_code == 201
    hostile = build([write_results(tmp_path / "h", run_id="20261128T000009Z-bbbbbb", artifact_name=HOSTILE,
                                   artifact_path=HOSTILE, artifact_sha256=HOSTILE_SHA)]).doc
    assert hostile["rows"][0]["artifact_name"] == HOSTILE
    assert send(client, hostile, token).status_code == 201
    return client


def test_page_sends_a_strict_content_security_policy_and_its_two_assets(client):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    # one script, one stylesheet, both from this server; no inline script or style anywhere
    assert re.findall(r"<script[^>]*>", resp.text) == ['<script src="/assets/page.js" defer>']
    assert "style=" not in resp.text and "<style" not in resp.text and "http" not in resp.text.split("<main>")[0]
    for name, ctype in (("page.js", "text/javascript"), ("page.css", "text/css")):
        asset = client.get(f"/assets/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(ctype)
        assert asset.headers["content-security-policy"] == csp
    assert client.get("/assets/app.py").status_code == 404  # only the named assets, never a package file


def test_hostile_artifact_name_is_escaped_in_the_html(client):
    listed = client.get("/", params={"q": "onerror"})
    assert listed.status_code == 200
    assert "<img" not in listed.text and "<b>" not in listed.text
    assert "&lt;img src=x onerror=alert(document.domain)&gt; &amp; &quot;q&quot; &lt;b&gt;bold" in listed.text
    shown = client.get("/", params={"artifact_sha256": HOSTILE_SHA})
    assert shown.status_code == 200 and "<img" not in shown.text and 'id="fits"' in shown.text
    # a hostile query string comes back escaped too
    echoed = client.get("/", params={"q": '"><script>alert(1)</script>'})
    assert "<script>alert" not in echoed.text and "&quot;&gt;&lt;script&gt;" in echoed.text


def test_page_shows_the_fits_of_the_picked_class_and_runtime(client):
    sha = client.get("/v1/fits").json()["fits"][0]["artifact_sha256"]
    answer = client.get("/v1/fits", params={"artifact_sha256": sha, "machine_class": "cpu-x86_64-24GiB",
                                            "runtime": "llama.cpp"}).json()
    html = client.get("/", params={"artifact_sha256": sha, "machine_class": "cpu-x86_64-24GiB",
                                   "runtime": "llama.cpp"}).text
    assert sorted(f["n_ctx"] for f in answer["fits"]) == [256, 512]
    for fit in answer["fits"]:
        row = html.split(f'data-n-ctx="{fit["n_ctx"]}"')[1].split("</tr>")[0]
        for metric, _, _ in page_mod.METRICS:
            for part in page_mod.spread_parts(metric, fit[metric]).values():
                assert page_mod._e(part) in row, (metric, part)
        assert f'href="{page_mod._e(page_mod.rows_link(fit))}"' in row
    assert client.get("/", params={"artifact_sha256": "0" * 64}).status_code == 404


def test_page_formats_figures_and_their_spread():
    spread = {"median": 190 * MiB, "mad": 2 * MiB, "n": 3, "outliers": 1, "min": 180 * MiB, "max": 200 * MiB}
    assert page_mod.spread_parts("peak_rss_bytes", spread) == {
        "median": "190.0 MiB", "mad": "± 2.0 MiB", "range": "180.0 MiB – 200.0 MiB", "n": "n=3",
        "outliers": "1 outlier(s) left out"}
    # one vote: no spread to show; seconds past one, whole tok/s past a hundred
    assert page_mod.spread_parts("ttft_s", {"median": 0.0525, "mad": 0.0, "n": 1, "min": 0.0525, "max": 0.0525}) \
        == {"median": "52.5 ms", "n": "n=1"}
    assert page_mod.fmt("ttft_s", 18.9252) == "18.93 s" and page_mod.fmt("prefill_tok_s", 4123.4) == "4,123 tok/s"
    assert page_mod.fmt("decode_tok_s", 1.06) == "1.1 tok/s"
    assert page_mod.spread_parts("decode_tok_s", None) == {"median": "–"}
    # a rows_url that is not this server's rows path is not linked as it came
    assert page_mod.rows_link({"rows_url": "javascript:alert(1)", "artifact_sha256": "ab", "machine_class": "c",
                               "runtime": "llama.cpp", "n_ctx": 256}).startswith("/v1/rows?artifact_sha256=ab&")


def test_page_assets_are_package_data():
    """`pip install fitbench[upstream]` (not only an editable checkout) must ship page.js and page.css."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["harness.share.upstream"]
    for name in page_mod.ASSETS:
        assert (ROOT / "harness/share/upstream" / name).is_file()
        assert any(fnmatch(name, p) for p in patterns), (name, patterns)


# --- in a real browser, over real runs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright; never `playwright install` (no downloads)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package (pip install 'fitbench[test]')"
    if missing is None and not CHROMIUM.exists():
        missing = f"{CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the explorer page test needs {missing}: .ci/run installs it")
        pytest.skip(f"needs {missing}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_model):
    """A real `fitbench upstream serve` holding a real two-context run of the sample model and a
    crafted run of a hostile artifact name, both sent with `fitbench contribute`."""
    folder = tmp_path_factory.mktemp("page")
    scenario = folder / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "tiny", "models": [{"artifact": str(sample_model), "runtime": "llama.cpp"}],
        "contexts": [256, 512], "fill": 0.25, "gen_tokens": 4, "warmup": 0, "repetitions": 2, "timeout": 300}))
    run = fitbench("run", str(scenario), "-o", str(folder / "run"))
    assert run.returncode == 0, run.stderr + run.stdout
    [results] = [p for p in glob.glob(f"{folder}/run/tiny-*.parquet") if not p.endswith(".timeline.parquet")]
    hostile = write_results(folder / "hostile", artifact_name=HOSTILE, artifact_path=HOSTILE,
                            artifact_sha256=HOSTILE_SHA)
    env = {"XDG_CONFIG_HOME": str(folder / "cfg")}
    with upstream_subprocess(folder / "up.sqlite") as url:
        for path in (results, hostile):
            sent = fitbench("contribute", str(path), "--yes", "--to", url, env=env)
            assert sent.returncode == 0 and "new row(s)" in sent.stdout, sent.stderr + sent.stdout
        yield url


def _open(browser, url: str):
    """A fresh page that records script errors and every request it makes."""
    page = browser.new_page()
    page.errors, page.requests = [], []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("request", lambda req: page.requests.append(req.url))
    page.on("dialog", lambda dialog: (page.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(url)
    return page


@pytest.mark.model
def test_page_in_chromium_shows_the_numbers_of_v1_fits(browser, served):
    artifacts = httpx.get(f"{served}/v1/artifacts", params={"q": "SmolLM2"}).json()
    artifacts = artifacts if isinstance(artifacts, list) else artifacts["artifacts"]
    [art] = [a for a in artifacts if a["artifact_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"]
    [machine_class] = art["machine_classes"]
    page = _open(browser, f"{served}/")
    page.fill("#q", "SmolLM2")
    page.wait_for_selector("#suggest a.suggestion")  # the script's live suggestions, from /v1/artifacts
    assert page.locator("#suggest a.suggestion").first.text_content() == art["artifact_name"]
    with page.expect_navigation():
        page.press("#q", "Enter")
    with page.expect_navigation():
        page.locator("#artifacts a.artifact", has_text=art["artifact_name"]).click()
    assert page.text_content("#artifact-sha") == art["artifact_sha256"]
    # picking applies at once (the script submits the form)
    with page.expect_navigation():
        page.select_option("#machine_class", machine_class)
    with page.expect_navigation():
        page.select_option("#runtime", "llama.cpp")
    assert f"machine_class={machine_class}" in page.url and "runtime=llama.cpp" in page.url

    answer = httpx.get(f"{served}/v1/fits", params={"artifact_sha256": art["artifact_sha256"],
                                                    "machine_class": machine_class, "runtime": "llama.cpp"}).json()
    fits = {f["n_ctx"]: f for f in answer["fits"] if not f.get("workflow_kind") and f.get("turn") is None}
    assert sorted(fits) == [256, 512]
    shown = page.locator("#fits tbody tr.fit-row")
    assert shown.count() == len(answer["fits"])
    for i in range(shown.count()):
        row = shown.nth(i)
        fit = fits[int(row.get_attribute("data-n-ctx"))]
        assert row.locator(".verdict .fit").text_content() == fit["fit_class"]
        for metric, _, _ in page_mod.METRICS:
            cell = row.locator(f'td[data-metric="{metric}"]')
            expected = page_mod.spread_parts(metric, fit[metric])
            assert {k: cell.locator(f".{k}").text_content() for k in expected} == expected
            assert float(cell.get_attribute("data-median")) == fit[metric]["median"]
        assert fit["decode_tok_s"]["median"] > 0 and fit["peak_rss_bytes"]["median"] > 10 * MiB  # a real run
        for key in ("votes", "machines", "rows"):
            assert row.locator(f'td[data-count="{key}"]').text_content() == str(fit[key])
        link = row.locator("a.rows-link").get_attribute("href")
        assert link == fit["rows_url"]
        raw = httpx.get(f"{served}{link}").json()
        assert len(raw["rows"]) == fit["rows"] and all(r["n_ctx"] == fit["n_ctx"] for r in raw["rows"])
    assert not page.errors, page.errors
    assert all(u.startswith(served) for u in page.requests), page.requests  # nothing from another origin
    if shot := os.environ.get("FITBENCH_PAGE_SCREENSHOT"):  # for a person to look at the page
        page.screenshot(path=shot, full_page=True)
    page.close()


@pytest.mark.model
def test_page_in_chromium_renders_a_hostile_artifact_name_as_text(browser, served):
    page = _open(browser, f"{served}/")
    page.fill("#q", "onerror")
    page.wait_for_selector("#suggest a.suggestion")
    assert page.locator("#suggest a.suggestion").first.text_content() == HOSTILE
    with page.expect_navigation():
        page.press("#q", "Enter")
    assert page.locator("#artifacts a.artifact .name").first.text_content() == HOSTILE
    with page.expect_navigation():
        page.locator("#artifacts a.artifact").first.click()
    assert page.text_content("#artifact-name") == HOSTILE
    assert page.locator("img").count() == 0 and page.locator("main b").count() == 0
    assert page.title() == "fitbench community fits"
    assert not page.errors, page.errors
    page.close()
