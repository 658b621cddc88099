"""``python -m harness.cli``: the same as the ``fitbench`` command."""

from harness.cli import main

main()
