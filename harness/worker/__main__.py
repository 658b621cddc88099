"""``python -m harness.worker``: the case worker, started by the parent (harness/spawn.py)."""

from harness.worker.main import main

main()
