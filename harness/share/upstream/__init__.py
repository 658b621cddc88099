"""The reference upstream service: accepts contribution bundles, serves aggregated community fits.

app.py (HTTP, FastAPI; the trust model), ingest.py (signature, bounded inflate and parse), store.py (tokens,
bundles, rows and the incremental aggregates), db.py (SQLite or PostgreSQL under the store), aggregate.py (one
vote per token, robust statistics), validate.py (plausibility rules), verdict.py (the server's verdict),
ratelimit.py (limits, client keys), page.py (the fit explorer page at /, with page.js and page.css).
Imported only by `fitbench upstream ...` and tests; needs the `upstream` extra.
"""
