"""The fit explorer: the page `fitbench upstream serve` shows at ``/``.

Server-rendered HTML over the same answers the API gives (``/v1/artifacts``
and ``/v1/fits``), plus one small script (page.js: live artifact suggestions,
a picked machine class or runtime applies at once) and one stylesheet, both
served by the app itself. Community data is hostile: every value reaches the
page through ``html.escape`` here or ``textContent`` in the script, and the
Content-Security-Policy allows no inline script or style and nothing from
another origin, so even a missed escape could not run.

The numbers are formatted by ``fmt`` (and in the script by nothing: the
script never shows a figure), so a test can format the API's answer the same
way and compare it with what a browser shows.
"""

from __future__ import annotations

from html import escape
from importlib import resources
from typing import Callable
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
MAX_FITS = 500  # fits of one artifact x class x runtime on one page; the API pages through the rest

def _rate(v: float) -> str:
    return f"{v:,.1f} tok/s" if abs(v) < 100 else f"{v:,.0f} tok/s"


def _seconds(v: float) -> str:
    return f"{v * 1000:,.1f} ms" if abs(v) < 1 else f"{v:,.2f} s"


# (metric key in /v1/fits, column title, formatter of one value)
METRICS = (
    ("peak_rss_bytes", "Peak memory", lambda v: f"{v / 2**20:,.1f} MiB"),
    ("prefill_tok_s", "Prefill", _rate),
    ("decode_tok_s", "Decode", _rate),
    ("ttft_s", "TTFT", _seconds),
)
FORMAT = {key: f for key, _, f in METRICS}


def fmt(metric: str, value) -> str:
    """How the page shows one figure of ``metric`` (a test formats the API's numbers with this too)."""
    if value is None:
        return "–"
    return FORMAT[metric](value)


def spread_parts(metric: str, spread: dict | None) -> dict[str, str]:
    """The texts of one metric cell: median, ± MAD, min–max range, sample count, outliers left out."""
    if not spread or spread.get("median") is None:
        return {"median": "–"}
    parts = {"median": fmt(metric, spread["median"])}
    if spread.get("mad") is not None and (spread.get("n") or 0) > 1:  # one vote has no spread to show
        parts["mad"] = "± " + fmt(metric, spread["mad"])
    if spread.get("min") is not None and spread.get("max") is not None and spread["min"] != spread["max"]:
        parts["range"] = f"{fmt(metric, spread['min'])} – {fmt(metric, spread['max'])}"
    parts["n"] = f"n={spread.get('n', 0)}"
    if spread.get("outliers"):
        parts["outliers"] = f"{spread['outliers']} outlier(s) left out"
    return parts


def rows_link(fit: dict) -> str:
    """The fit's raw rows: the API's own ``rows_url`` when it is a path of this server, else built here."""
    given = fit.get("rows_url")
    if isinstance(given, str) and given.startswith("/v1/rows?"):
        return given
    return "/v1/rows?" + urlencode({k: fit.get(k) for k in ("artifact_sha256", "machine_class", "runtime", "n_ctx")})


# --- HTML ----------------------------------------------------------------------------------------------------

def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><link rel=\"stylesheet\" href=\"/assets/page.css\">"
            "<script src=\"/assets/page.js\" defer></script></head><body>"
            "<header><h1><a href=\"/\">fitbench community fits</a></h1>"
            "<p>Measured memory and speed per model, runtime, context and machine class, as contributed to this "
            "upstream and judged by it: medians over one vote per contributor token, outliers set apart.</p>"
            f"</header><main>{body}</main><footer><p>Data: <a href=\"/v1/fits\">/v1/fits</a> · "
            "<a href=\"/v1/artifacts\">/v1/artifacts</a> · <a href=\"/v1/stats\">/v1/stats</a></p></footer>"
            "</body></html>")


def _search_form(q: str) -> str:
    return ("<form id=\"search\" method=\"get\" action=\"/\" role=\"search\">"
            "<label for=\"q\">Artifact</label>"
            f"<input id=\"q\" name=\"q\" value=\"{_e(q)}\" maxlength=\"80\" autocomplete=\"off\" "
            "placeholder=\"name or sha256 prefix, e.g. SmolLM2\">"
            "<button type=\"submit\">Search</button><ul id=\"suggest\" hidden></ul></form>")


def _artifact_list(q: str, found: list[dict]) -> str:
    if not found:
        return f"<section id=\"artifacts\"><p class=\"empty\">No artifact matches {_e(repr(q))}.</p></section>"
    items = "".join(
        f"<li><a class=\"artifact\" href=\"/?{_e(urlencode({'artifact_sha256': a['artifact_sha256']}))}\">"
        f"<span class=\"name\">{_e(a.get('artifact_name'))}</span></a> "
        f"<code class=\"sha\">{_e(str(a['artifact_sha256'])[:16])}…</code> "
        f"<span class=\"where\">{_e(', '.join(map(str, a.get('machine_classes') or [])))} · "
        f"{_e(', '.join(map(str, a.get('runtimes') or [])))} · {_e(a.get('keys'))} fit(s)</span></li>"
        for a in found)
    return f"<section id=\"artifacts\"><h2>Artifacts matching {_e(repr(q))}</h2><ul>{items}</ul></section>"


def _select(name: str, label: str, options: list[str], chosen: str | None) -> str:
    opts = "".join(f"<option value=\"{_e(o)}\"{' selected' if o == chosen else ''}>{_e(o)}</option>" for o in options)
    return f"<label for=\"{name}\">{label}</label><select id=\"{name}\" name=\"{name}\">{opts}</select>"


def _metric_cell(metric: str, spread: dict | None) -> str:
    parts = spread_parts(metric, spread)
    value = "" if not spread or spread.get("median") is None else f" data-median=\"{_e(repr(spread['median']))}\""
    spans = "".join(f"<span class=\"{k}\">{_e(v)}</span>" for k, v in parts.items())
    return f"<td class=\"metric\" data-metric=\"{metric}\"{value}>{spans}</td>"


def _verdict_cell(fit: dict) -> str:
    votes = fit.get("fit_classes") or {}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(votes.items(), key=lambda kv: (-kv[1], str(kv[0]))))
    klass = fit.get("fit_class") or "none"
    return (f"<td class=\"verdict\"><span class=\"fit fit-{_e(klass if klass.isidentifier() else 'other')}\">"
            f"{_e(fit.get('fit_class') or '–')}</span><span class=\"votes\">{_e(detail)}</span></td>")


def _shape(fit: dict) -> str:
    if fit.get("workflow_kind") or fit.get("turn") is not None:
        turn = f" turn {fit['turn']}" if fit.get("turn") is not None else " session"
        return f"{fit.get('workflow_kind') or 'workflow'}{turn}"
    return "single prompt"


def _fits_table(fits: list[dict]) -> str:
    shapes = any(_shape(f) != "single prompt" for f in fits)  # a Case column only when sessions are mixed in
    head = "".join(f"<th scope=\"col\">{_e(title)}</th>" for _, title, _ in METRICS)
    body = []
    for fit in sorted(fits, key=lambda f: (f.get("n_ctx") or 0, str(f.get("workflow_kind")), f.get("turn") or 0)):
        counts = "".join(f"<td class=\"count\" data-count=\"{k}\">{_e(fit.get(k))}</td>"
                         for k in ("votes", "machines", "rows"))
        body.append(
            f"<tr class=\"fit-row\" data-n-ctx=\"{_e(fit.get('n_ctx'))}\">"
            f"<th scope=\"row\" class=\"ctx\">{_e(fit.get('n_ctx'))}</th>"
            + (f"<td class=\"shape\">{_e(_shape(fit))}</td>" if shapes else "")
            + _verdict_cell(fit) + "".join(_metric_cell(m, fit.get(m)) for m, _, _ in METRICS) + counts
            + f"<td><a class=\"rows-link\" href=\"{_e(rows_link(fit))}\">rows</a></td></tr>")
    return ("<table id=\"fits\"><thead><tr><th scope=\"col\">Context</th>"
            + ("<th scope=\"col\">Case</th>" if shapes else "")
            + f"<th scope=\"col\">Verdict</th>{head}<th scope=\"col\">Votes</th><th scope=\"col\">Machines</th>"
            "<th scope=\"col\">Rows</th><th scope=\"col\">Raw</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _artifact_view(art: dict, classes: list[str], runtimes: list[str], machine_class: str | None,
                   runtime: str | None, answer: dict | None) -> str:
    sha = art["artifact_sha256"]
    pick = (f"<form id=\"pick\" method=\"get\" action=\"/\"><input type=\"hidden\" name=\"artifact_sha256\" "
            f"value=\"{_e(sha)}\">" + _select("machine_class", "Machine class", classes, machine_class)
            + _select("runtime", "Runtime", runtimes, runtime) + "<button type=\"submit\">Show</button></form>")
    fits = (answer or {}).get("fits") or []
    first = fits[0].get("artifact") if fits else None
    facts = []
    if isinstance(first, dict):
        if first.get("size_bytes"):
            facts.append(f"{first['size_bytes'] / 2**20:,.1f} MiB")
        facts += [str(first[k]) for k in ("format", "quant", "arch") if first.get(k)]
    header = (f"<h2 id=\"artifact-name\">{_e(art.get('artifact_name'))}</h2>"
              f"<p class=\"facts\"><code id=\"artifact-sha\">{_e(sha)}</code> <span>{_e(' · '.join(facts))}</span></p>")
    if not fits:
        table = "<p class=\"empty\">No fits for this machine class and runtime.</p>"
    else:
        table = _fits_table(fits)
        if (answer or {}).get("next_offset") is not None:
            table += (f"<p class=\"more\">Showing {len(fits)} of {_e(answer.get('total'))} fits: the rest are in "
                      "<a href=\"/v1/fits\">/v1/fits</a> (limit and offset).</p>")
    note = ("<p class=\"legend\">Each figure: the median, ± the median absolute deviation and min – max when "
            "there is more than one vote, and how many votes it is over (n). A vote is one contributor token's "
            "median; machines and rows are counted, not voted. Rows: every stored row of the fit.</p>")
    return f"<section id=\"fit\">{header}{pick}{table}{note}</section>"


# --- routes --------------------------------------------------------------------------------------------------

def mount(app: FastAPI, charge: Callable[[Request], None], artifacts: Callable[[str, int], list[dict]],
          fits: Callable[..., dict]) -> None:
    """Add ``/`` and its two assets to ``app``. ``artifacts(q, limit)`` and ``fits(**filters)`` are the
    functions behind ``/v1/artifacts`` and ``/v1/fits``, so the page shows exactly what the API answers;
    ``charge(request)`` counts a page view against the caller's request limit."""

    assets = {name: (resources.files(__package__) / name).read_bytes() for name in ASSETS}

    @app.get("/assets/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in assets:
            return Response("not found", status_code=404, media_type="text/plain", headers=SECURITY_HEADERS)
        return Response(assets[name], media_type=ASSETS[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=300"})

    @app.get("/", include_in_schema=False)
    async def explorer(request: Request, q: str = "", artifact_sha256: str | None = None,
                       machine_class: str | None = None, runtime: str | None = None) -> HTMLResponse:
        charge(request)
        q = q.strip()[:80]
        body = _search_form(q)
        status = 200
        if artifact_sha256:
            found = await run_in_threadpool(artifacts, artifact_sha256[:64], 20)
            art = next((a for a in found if a["artifact_sha256"] == artifact_sha256), None)
            if art is None:
                status = 404
                body += f"<p class=\"empty\">No artifact {_e(artifact_sha256[:64])} on this upstream.</p>"
            else:
                classes = sorted(map(str, art.get("machine_classes") or []))
                runtimes = sorted(map(str, art.get("runtimes") or []))
                machine_class = machine_class if machine_class in classes else (classes[0] if classes else None)
                runtime = runtime if runtime in runtimes else (runtimes[0] if runtimes else None)
                answer = None
                if machine_class and runtime:
                    answer = await run_in_threadpool(lambda: fits(artifact_sha256=artifact_sha256,
                                                                  machine_class=machine_class, runtime=runtime,
                                                                  limit=MAX_FITS, offset=0))
                body += _artifact_view(art, classes, runtimes, machine_class, runtime, answer)
        elif q:
            body += _artifact_list(q, await run_in_threadpool(artifacts, q, 50))
        title = "fitbench community fits"
        return HTMLResponse(_page(title, body), status_code=status, headers=SECURITY_HEADERS)
