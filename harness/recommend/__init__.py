"""``fitbench recommend``: what to run on a machine, chosen from measurements.

- constraints.py  the user's constraints, parsed and checked (bad ones are one-line errors)
- candidates.py   what can be chosen: catalog, community fits, result files, artifacts on the command line,
                  each with the observations (measured, catalog, community) behind it
- judge.py        figures at the asked context with their source, the checks (decided in harness/fit.py),
                  the pick, the closest miss, the Pareto front and intelligence per GB
- measure.py      ``--measure``: the fewest cases that decide the undecided candidates
- serve.py        the ready-to-run command for the pick (llama-server, llama_cpp.server, Ollama, mlx_lm, ORT-genai)
"""
