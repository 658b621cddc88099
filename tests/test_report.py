"""The report: plots present, numbers in it equal the results, PNGs valid, bad input is one line."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from harness.analyse.report import ReportError, build
from harness.measure.machine import fingerprint
from harness.preflight import check_scenario
from harness.results import ResultWriter
from harness.scenario import parse_scenario
from harness.suite import run_suite
from tests.test_cli import fitbench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory, ):
    from tests.conftest import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("report")
    art = write_tiny_gguf(tmp / "t.gguf")
    s = parse_scenario({
        "name": "rep", "models": [{"artifact": str(art), "runtime": "fake_runners:FakeRunner", "label": "fake",
                                   "options": {"token_delay": 0.01, "prefill_delay": 0.0005}}],
        "contexts": [128, 512, 1024], "fill": 0.5, "gen_tokens": 6, "warmup": 1, "repetitions": 3,
    })
    writer = ResultWriter(tmp / "rep.parquet")
    run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "report-test")
    return writer.results_path


def test_report_has_every_plot_and_the_right_numbers(results, tmp_path):
    out, png = tmp_path / "r.html", tmp_path / "png"
    plots = build([results], out, png)
    page = out.read_text()
    assert set(plots) == {"speed_vs_context", "memory_vs_context", "fit_matrix", "timeline"}
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    for name in plots:
        assert (png / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    df = pd.read_parquet(results)
    for n_ctx, g in df.groupby("n_ctx"):
        label = g["case_label"].iloc[0]
        row = re.search(rf"<td>{re.escape(label)}</td>(.*?)</tr>", page).group(1)
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
        # fit, status, TTFT, prefill, decode, peak, budget, energy per token, reps
        assert cells[0] == g["fit_class"].iloc[0] and cells[1] == "ok"
        assert cells[2] == f"{g['ttft_s'].median():.3f}"
        assert cells[4] == f"{g['decode_tok_s'].median():.1f}"
        assert cells[5] == f"{g['peak_rss_bytes'].max() / 2**20:.0f}"
        energy = g["energy_j_per_token"].median()
        assert cells[7] == ("–" if pd.isna(energy) else f"{energy:.3f}")
        assert cells[8] == "3"


def test_case_choice(results, tmp_path):
    build([results], tmp_path / "r.html", case="ctx512")
    assert "pp256+tg6 @ ctx512" in (tmp_path / "r.html").read_text()
    with pytest.raises(ReportError, match="matches no case"):
        build([results], tmp_path / "r.html", case="ctx999999")


def test_report_cli_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"\x00" * 100)
    proc = fitbench("report", str(junk), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 2 and "junk.parquet" in proc.stderr and proc.stderr.count("\n") == 1


def test_judged_only_budgets_stay_their_own_series(tmp_path):
    """scenarios/budgets.yaml without a writable cgroup: none, 200 MiB and 60 MiB judged only — three series."""
    from harness.analyse.report import load, per_case, series_label
    from tests.test_compare_groups import budgets_run

    cases = per_case(load([budgets_run(tmp_path / "b.parquet")])[0])
    assert sorted(cases["budget_mib"].fillna(0)) == [0, 60, 200]
    assert sorted(series_label(cases)) == ["m · llama.cpp", "m · llama.cpp ≤200 MiB", "m · llama.cpp ≤60 MiB"]


def test_report_reads_a_glob_with_timeline_companions(results, tmp_path):
    import shutil

    from harness.results import timeline_path_for

    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(results, folder / results.name)
    shutil.copy(timeline_path_for(results), folder / timeline_path_for(results).name)
    proc = fitbench("report", str(folder / "*.parquet"), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    assert "from 1 file(s): rep.parquet." in page  # the timeline is read with its results, not as a second file
    assert 'alt="sampler timeline"' in page  # its timeline was found and drawn
