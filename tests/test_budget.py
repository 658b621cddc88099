"""Memory budgets on the real model: spill under a tight budget, no_fit under a far too small one.

Needs a writable cgroup memory controller (v1 or v2), as on this project's
Linux machines when run as root; elsewhere these tests are skipped and the
budget is only a yardstick (covered by test_fit.py).
"""

from __future__ import annotations

import pytest

from harness.budget import create_budget
from harness.machine import fingerprint
from harness.preflight import check_scenario
from harness.results import ResultWriter, read_results
from harness.scenario import load_scenario
from tests.conftest import ROOT

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def cgroups():
    probe = create_budget(1 << 30)
    if probe is None:
        pytest.skip("no writable cgroup memory controller here: budgets can only be judged, not enforced")
    probe.close()


@pytest.fixture(scope="module")
def budget_run(cgroups, sample_model, tmp_path_factory):
    s = load_scenario(ROOT / "scenarios" / "budgets.yaml")
    writer = ResultWriter(tmp_path_factory.mktemp("budgets") / "b.parquet")
    from harness.suite import run_suite

    results = run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "budget-test")
    return results, read_results(writer.results_path).to_pandas()


def test_the_suite_completes_with_a_row_per_budget(budget_run):
    results, df = budget_run
    assert len(results) == 3
    assert df.groupby("case_index")["budget_method"].first().tolist() == ["none", "cgroup-v1", "cgroup-v1"] or \
        set(df["budget_method"]) <= {"none", "cgroup-v1", "cgroup-v2"}


def test_no_budget_fits(budget_run):
    _, df = budget_run
    free = df[df.case_index == 0]
    assert (free.status == "ok").all()
    # Memory is what a budget decides; the speed verdict depends on how busy this shared
    # machine is (a CI run once saw "slow" here), and speed is judged in test_fit.py.
    assert (free.fit_memory == "resident").all(), free[["fit_class", "fit_reason"]]
    assert set(free.fit_class) <= {"fits", "slow"}, free[["fit_class", "fit_reason"]]
    assert (free.read_bytes == 0).all()


def test_tight_budget_spills(budget_run):
    _, df = budget_run
    squeezed = df[df.case_index == 1]
    assert set(squeezed.fit_class) == {"spill"}, squeezed[["status", "fit_reason"]]
    ok = squeezed[squeezed.status == "ok"]
    if len(ok):  # it ran, reading its weights back: bytes read dwarf the artifact, decode collapses
        assert (ok.read_bytes >= ok.artifact_size_bytes).all()
        free = df[(df.case_index == 0)]
        assert ok.decode_tok_s.median() < 0.5 * free.decode_tok_s.median()


def test_far_too_small_budget_is_no_fit(budget_run):
    _, df = budget_run
    starved = df[df.case_index == 2]
    assert list(starved.status) == ["oom"] and list(starved.fit_class) == ["no_fit"]
    assert "budget" in starved.error.iloc[0]
