// The fit explorer's one script. The page works without it; it adds live artifact suggestions
// (from /v1/artifacts) and applies a picked machine class or runtime at once. Community data is
// hostile: it is only ever set as textContent or a URL parameter, never parsed as HTML.
"use strict";

(function () {
  const search = document.getElementById("q");
  const list = document.getElementById("suggest");
  let timer = null;
  let asked = "";

  function show(found) {
    list.replaceChildren();
    for (const a of found) {
      const li = document.createElement("li");
      const link = document.createElement("a");
      link.href = "/?" + new URLSearchParams({ artifact_sha256: String(a.artifact_sha256) });
      link.className = "suggestion";
      link.textContent = String(a.artifact_name);
      const sha = document.createElement("code");
      sha.textContent = String(a.artifact_sha256).slice(0, 12);
      li.append(link, " ", sha);
      list.append(li);
    }
    list.hidden = found.length === 0;
  }

  async function suggest() {
    const q = search.value.trim();
    if (q.length < 2) { show([]); return; }
    asked = q;
    try {
      const resp = await fetch("/v1/artifacts?" + new URLSearchParams({ q: q, limit: "10" }),
                               { headers: { accept: "application/json" } });
      if (!resp.ok || asked !== q) return;
      const body = await resp.json();
      show(Array.isArray(body) ? body : (body.artifacts || []));
    } catch (err) {
      show([]);  // suggestions are a convenience: the form still searches
    }
  }

  if (search && list) {
    search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(suggest, 200);
    });
  }

  const pick = document.getElementById("pick");
  if (pick) {
    for (const select of pick.querySelectorAll("select")) {
      select.addEventListener("change", function () { pick.submit(); });
    }
  }
})();
