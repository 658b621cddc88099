"""Parent side of the quality reference: score the reference artifact once, in its own worker.

The reference's top-k log-probs go to a cache file keyed by (reference
artifact sha256, runtime, options, text sha256, tokens, window, top_k), so a
second run (or a second scenario) with the same reference and text reuses
it. Every case's worker then reads that file and computes its KL.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.artifact import sha256_file
from harness.protocol import Done, Failed, WorkerSpec
from harness.quality.spec import QualitySpec, cache_dir
from harness.spawn import WorkerProcess

POLL_S = 0.2


@dataclass
class ReferenceResult:
    sha256: str | None
    cache_path: Path | None
    error: str | None = None
    computed: bool = False  # False when the cache already had it

    def worker_spec(self, spec: QualitySpec) -> dict:
        return spec.worker_spec(self.sha256, self.cache_path, self.error)


def artifact_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder artifact (HF, ONNX, MLX): its files' relative names and contents, sorted."""
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


def prepare_reference(spec: QualitySpec, timeout: float, sha_of: Callable[[Path], str] = artifact_sha256,
                      on_status: Callable[[str], None] = lambda text: None) -> ReferenceResult | None:
    """Make sure the reference cache exists; None when the scenario has no reference (or no text to score)."""
    ref = spec.reference
    if ref is None or not spec.tokens:
        return None
    if not ref.artifact.exists():
        return ReferenceResult(None, None, f"reference artifact {ref.artifact} not found")
    sha = sha_of(ref.artifact)
    path = cache_dir() / f"ref-{spec.cache_key(sha)}.npz"
    if path.exists():
        return ReferenceResult(sha, path)
    on_status(f"scoring the quality reference {ref.label} ({ref.runtime}) once: {spec.tokens} tokens")
    error = run_reference_worker(spec, sha, path, timeout)
    if error is None and not path.exists():
        error = "the reference worker finished without writing its cache"
    return ReferenceResult(sha, None if error else path, error, computed=error is None)


def run_reference_worker(spec: QualitySpec, sha: str, path: Path, timeout: float) -> str | None:
    """Run the reference in a worker process; returns an error message or None."""
    ref = spec.reference
    assert ref is not None
    log_fd, log_path = tempfile.mkstemp(prefix="fitbench-reference-", suffix=".log")
    os.close(log_fd)
    worker = WorkerProcess(Path(log_path))
    error: str | None = "the reference worker ended without reporting"
    graceful = False
    try:
        worker.start(WorkerSpec(mode="reference", runtime=ref.runtime, artifact=str(ref.artifact),
                                options=ref.options, n_ctx=spec.window, prompt_tokens=1, gen_tokens=2, warmup=0,
                                repetitions=0, quality=spec.worker_spec(sha, path)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = worker.poll(POLL_S)
            except EOFError:
                code = worker.join(5.0)
                error = f"the reference worker died (exit {code})"
                break
            if message is None:
                continue
            if isinstance(message, Failed):
                error = f"{message.status}: {message.error}"
                graceful = True
                break
            if isinstance(message, Done):
                error, graceful = None, True
                break
        else:
            error = f"scoring the reference took longer than {timeout:g} s"
    finally:
        worker.finish(graceful=graceful)
        if error:
            tail = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
            if tail:
                error += f" [log: {' | '.join(tail[-2:])[-300:]}]"
        Path(log_path).unlink(missing_ok=True)
    return None if error is None else f"reference {ref.label} ({ref.runtime}): {error}"
