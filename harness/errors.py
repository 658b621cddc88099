"""The one base class of fitbench's expected failures.

Every module raises its own subclass (ScenarioError, ResultsError, ...) with a
one-line message that says what is wrong and what to do; the CLI's ``main``
catches ``FitbenchError`` once and prints it with exit code 2, so a user never
sees a traceback for bad input. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FitbenchError(Exception):
    """An expected failure with a message for the user; ``exit_code`` is what the CLI exits with."""

    exit_code = 2
