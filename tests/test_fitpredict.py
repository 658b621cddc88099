"""Predicted max-fit search: the model from calibration points, the predicted verdicts, and the
confirmation by full runs (no runtime: full runs are a function of the context)."""

from __future__ import annotations

import pytest

from harness.fit import Thresholds, predicted_verdict, rank
from harness.fitpredict import (
    Answer,
    Model,
    Point,
    calibration_plan,
    confirm,
    expected_runs,
    grid,
    predicted_boundaries,
)

MiB = 2**20


def truth(n_ctx: int, filled: int) -> float:
    """A llama.cpp-like peak: 200 MiB, nothing per configured token, 12 KiB per filled token."""
    return 200 * MiB + 0 * n_ctx + 12 * 1024 * filled


def test_model_recovers_bytes_per_configured_and_filled_token():
    def peak(n, f):
        return 150 * MiB + 1000 * n + 9000 * f

    points = [Point(n, f, peak(n, f), ttft_s=1e-3 * f + 1e-7 * f * f, decode_tok_s=1 / (0.01 + 1e-6 * (f + 4)))
              for n, f in calibration_plan(512, 8192)]
    m = Model.from_points(points, gen_tokens=8)
    assert m.b == pytest.approx(1000) and m.c == pytest.approx(9000)
    assert m.peak(8192, 7372) == pytest.approx(peak(8192, 7372))
    assert m.ttft(7000) == pytest.approx(1e-3 * 7000 + 1e-7 * 7000**2)
    assert m.decode(4000) == pytest.approx(1 / (0.01 + 1e-6 * 4000))


def test_calibration_plan_is_short_and_separates_the_two_slopes():
    plan = calibration_plan(512, 8192)
    assert plan == [(2048, 512), (2048, 1536), (1024, 512)]
    assert calibration_plan(512, 1024) == [(1024, 256), (1024, 768), (512, 256)]
    assert grid(512, 2000, 256) == [512, 768, 1024, 1280, 1536, 1792, 2000]


def test_predicted_verdict_is_the_row_verdict():
    t = Thresholds()
    assert predicted_verdict(100 * MiB, 1.0, 50.0, 250 * MiB, t).fit_class == "fits"
    assert predicted_verdict(240 * MiB, 1.0, 50.0, 250 * MiB, t).fit_class == "tight"
    assert predicted_verdict(260 * MiB, 1.0, 50.0, 250 * MiB, t).fit_class == "spill"
    assert predicted_verdict(100 * MiB, 12.0, 50.0, 250 * MiB, t).fit_class == "slow"
    assert rank("fits") < rank("tight") < rank("slow") < rank("spill") < rank(None)


def classes_by(limits: dict[str, int]):
    """fits below limits['tight'], then tight, slow, ... by context."""
    def cls(n):
        out = "fits"
        for name in ("tight", "slow", "spill", "no_fit"):
            if name in limits and n >= limits[name]:
                out = name
        return out
    return cls


def run_confirm(predicted_limits, true_limits, lo=512, hi=8192, step=256):
    contexts = grid(lo, hi, step)
    predicted = {n: classes_by(predicted_limits)(n) for n in contexts}
    true = classes_by(true_limits)
    calls = []

    def full(n):
        calls.append(n)
        return Point(n, int(0.9 * n), truth(n, int(0.9 * n)), fit_class=true(n))

    answer = Answer(limit=hi)
    confirm(predicted, full, answer)
    return answer, calls, contexts, predicted


def test_a_right_prediction_costs_two_full_runs_per_boundary():
    answer, calls, contexts, predicted = run_confirm({"tight": 3000, "spill": 4000}, {"tight": 3000, "spill": 4000})
    by = {b.cls: b for b in answer.boundaries}
    assert by["fits"].n_ctx == 2816 and by["fits"].occurs and by["fits"].how == "full run"
    assert by["tight"].n_ctx == 3840 and by["tight"].occurs
    assert not by["slow"].occurs and by["slow"].n_ctx == 3840  # never slow: tight turns straight to spill
    assert by["spill"].n_ctx == 8192 and by["spill"].occurs
    assert sorted(set(calls)) == expected_runs(predicted) and len(calls) == len(set(calls))
    assert len(calls) < len(contexts) / 4
    assert answer.max_fit == 2816 and "tight up to 3,840" in answer.summary()


@pytest.mark.parametrize("off", [-1500, -256, 256, 2000])
def test_a_wrong_prediction_costs_runs_never_the_answer(off):
    answer, calls, contexts, _ = run_confirm({"tight": 3000 + off, "no_fit": 6000 + off}, {"tight": 3000, "no_fit": 6000})
    by = {b.cls: b for b in answer.boundaries}
    assert by["fits"].n_ctx == 2816 and by["tight"].n_ctx == 5888 and by["spill"].n_ctx == 5888
    assert not by["spill"].occurs
    assert len(calls) == len(set(calls)) < len(contexts) / 2


def test_nothing_fits():
    answer, calls, _, _ = run_confirm({"no_fit": 1}, {"no_fit": 1})
    assert answer.max_fit is None and calls == [512]
    assert all(b.n_ctx is None for b in answer.boundaries)
    assert "does not fit" in answer.summary()


def test_fits_to_the_trained_maximum():
    answer, calls, _, _ = run_confirm({}, {})
    assert answer.max_fit == 8192 and calls == [8192]
    assert "trained maximum" in answer.summary()


def test_prediction_only_names_the_predicted_boundaries():
    contexts = grid(512, 8192, 256)
    predicted = {n: classes_by({"tight": 3000, "spill": 4000})(n) for n in contexts}
    answer = Answer(limit=8192)
    confirm(predicted, lambda n: pytest.fail("no full run without confirmation"), answer, classes=())
    assert [(b.cls, b.n_ctx, b.how) for b in answer.boundaries][:2] == [("fits", 2816, "prediction"),
                                                                        ("tight", 3840, "prediction")]
    assert predicted_boundaries(predicted)["spill"] == 8192


def test_confirming_the_max_fit_only_leaves_the_others_predicted_but_consistent():
    contexts = grid(512, 8192, 256)
    predicted = {n: classes_by({"tight": 2000, "spill": 2600})(n) for n in contexts}
    true = classes_by({"tight": 3000, "spill": 4000})
    calls = []

    def full(n):
        calls.append(n)
        return Point(n, int(0.9 * n), 0.0, fit_class=true(n))

    answer = Answer(limit=8192)
    confirm(predicted, full, answer, classes=("fits",))
    by = {b.cls: b for b in answer.boundaries}
    assert by["fits"].n_ctx == 2816 and by["fits"].how == "full run"
    # tight was predicted to end at 2560, below the confirmed max fit: it cannot end before 2816
    assert by["tight"].n_ctx == 2816 and by["tight"].how == "full run" and not by["tight"].occurs
    assert by["spill"].how == "prediction" and by["spill"].n_ctx == 8192 and by["spill"].occurs
    assert len(calls) == len(set(calls)) <= 6  # gallops up from the low guess, then bisects


# -- the command, end to end with a runner that writes KV as it prefills -------------------------------

def _grid_neighbour(n: int, step: int = 256) -> int:
    return (n // step + 1) * step


def summary_boundaries(text: str) -> dict[str, int]:
    import re

    flat = " ".join(text.split())  # rich may wrap long lines
    out = {}
    m = re.search(r"max fit context ([\d,]+) tokens", flat)
    if m:
        out["fits"] = int(m.group(1).replace(",", ""))
    for cls, n in re.findall(r"(tight|slow|spill) up to ([\d,]+)", flat):
        out[cls] = int(n.replace(",", ""))
    return out


def test_fit_command_predicts_then_confirms_the_boundaries(tmp_path):
    import pandas as pd

    from tests.conftest import write_tiny_gguf
    from tests.test_cli import fitbench

    art = write_tiny_gguf(tmp_path / "t.gguf", context_length=4096)
    result = fitbench("fit", str(art), "--runtime", "fake_runners:FakeKvRunner", "--option", "kv_kib_per_token=32",
                      "--budget", "96MiB", "-n", "4", "--confirm", "all", "-o", str(tmp_path / "out"),
                      env={"FITBENCH_ENFORCE_BUDGET": "0"})
    assert result.returncode == 0, result.stderr
    assert "calibration 3/3" in result.stderr and " left " in result.stderr  # progress with time left, on stderr
    found = summary_boundaries(result.stdout)
    assert {"fits", "tight", "spill"} <= set(found), result.stdout
    [path] = [p for p in (tmp_path / "out").glob("*.parquet") if not p.name.endswith(".timeline.parquet")]
    df = pd.read_parquet(path)
    full = df[df["fill"].notna()]
    by_ctx = full.groupby("n_ctx")["fit_class"].first()
    # the printed boundaries are measured: fits there, and the next context of the grid is worse
    assert by_ctx[found["fits"]] == "fits" and by_ctx[_grid_neighbour(found["fits"])] != "fits"
    assert by_ctx[found["tight"]] == "tight"
    assert len(df[df["fill"].isna()]["case_key"].unique()) == 3  # three short calibration cases
    assert full["n_ctx"].nunique() < len(grid(512, 4096, 256)) / 2  # far fewer full runs than contexts predicted
    assert "full run" in result.stdout and "predicted" in result.stdout


@pytest.mark.model
def test_fit_on_the_sample_model_under_a_budget(tmp_path, sample_model):
    """The real model under 250 MiB: three calibration cases, a handful of full runs, and the printed
    max fit context measured fits while the next context of the grid does not. Speed thresholds are
    off: the boundaries are memory's, whatever the load on the machine."""
    import pandas as pd

    from tests.test_cli import fitbench

    result = fitbench("fit", str(sample_model), "--budget", "250MiB", "--max-context", "2048", "-n", "4",
                      "--threshold", "min_decode_tok_s=0", "--threshold", "max_ttft_s=1e9", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    found = summary_boundaries(result.stdout)
    assert "fits" in found, result.stdout
    [path] = [p for p in (tmp_path / "out").glob("*.parquet") if not p.name.endswith(".timeline.parquet")]
    df = pd.read_parquet(path)
    full = df[df["fill"].notna()]
    by_ctx = full.groupby("n_ctx")["fit_class"].first()
    assert by_ctx[found["fits"]] == "fits"
    if found["fits"] < 2048:
        assert by_ctx[_grid_neighbour(found["fits"])] != "fits"
    assert full["n_ctx"].nunique() < len(grid(512, 2048, 256))
    assert set(df[df["fill"].isna()]["budget_requested_bytes"].isna()) == {True}  # calibration ran unconstrained
