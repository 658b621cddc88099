"""The reference upstream service: accepts contribution bundles, serves aggregated community fits.

app.py (HTTP, FastAPI), store.py (SQLite), validate.py (plausibility rules), ratelimit.py.
Imported only by `fitbench upstream serve` and tests; needs the `upstream` extra.
"""
