"""Checks before anything runs: artifacts readable and intact, runtimes installed,
formats matched, output folder writable. Each problem is a one-line ScenarioError."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harness.artifact import ArtifactError, ArtifactInfo, inspect_artifact
from harness.errors import FitbenchError
from harness.scenario import Scenario, ScenarioError, validate_cases
from runners.base import get_runner_class


class OutputError(FitbenchError):
    """The output folder cannot be created or written."""


def check_scenario(s: Scenario, require_runtimes: bool = True) -> dict[Path, ArtifactInfo]:
    """``require_runtimes=False`` for a fleet driver, which runs nothing itself (its nodes must have them)."""
    validate_cases(s)
    artifacts: dict[Path, ArtifactInfo] = {}
    for i, model in enumerate(s.models):
        where = f"models[{i}]"
        if model.artifact not in artifacts:
            try:
                artifacts[model.artifact] = inspect_artifact(model.artifact)
            except ArtifactError as exc:
                hint = (" (run `make sample-models` to get the sample model)"
                        if "models/" in str(model.artifact) and not model.artifact.exists() else "")
                raise ScenarioError(s.source, f"{where}.artifact", f"{exc}{hint}") from None
        info = artifacts[model.artifact]
        runner = get_runner_class(model.runtime)
        if info.format not in runner.formats:
            raise ScenarioError(s.source, f"{where}.runtime",
                                f"runtime {model.runtime!r} cannot run {info.format} artifacts "
                                f"(it runs {', '.join(sorted(runner.formats))})")
        avail = runner.available() if require_runtimes else None
        if avail is not None and not avail.available:
            raise ScenarioError(s.source, f"{where}.runtime",
                                f"runtime {model.runtime!r} is not available: {avail.reason}; install with: {avail.install}")
        if info.context_length:
            too_long = sorted(c.n_ctx for c in s.cases() if c.n_ctx > info.context_length)
            if too_long:
                raise ScenarioError(s.source, "contexts",
                                    f"context {too_long[0]} is beyond what {info.name} was trained for ({info.context_length}); "
                                    "use contexts up to that")
    return artifacts


def check_output_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {path}: {exc.strerror}; choose another with -o") from None
    if not path.is_dir():
        raise OutputError(f"output path {path} is not a folder; choose another with -o")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".fitbench-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {path} is not writable ({exc.strerror}); choose another with -o") from None
    return path
