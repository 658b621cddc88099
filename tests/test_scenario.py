"""Scenario validation and expansion (no runtime needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.scenario import ScenarioError, load_scenario, parse_contexts, parse_scenario

ROOT = Path(__file__).resolve().parents[1]


def base(tiny_gguf: Path, **extra) -> dict:
    data = {
        "name": "t",
        "models": [{"artifact": str(tiny_gguf), "runtime": "fake_runners:FakeRunner"}],
        "contexts": [512, 2048],
    }
    data.update(extra)
    return data


def test_defaults_and_expansion(tiny_gguf):
    s = parse_scenario(base(tiny_gguf, fill=[0.25, 0.5], gen_tokens=16))
    assert (s.repetitions, s.warmup, s.timeout, s.sampler_interval_ms) == (5, 1, 600.0, 10.0)
    cases = s.cases()
    assert [(c.n_ctx, c.prompt_tokens) for c in cases] == [(512, 128), (512, 256), (2048, 512), (2048, 1024)]
    assert cases[1].label == "pp256+tg16 @ ctx512"
    assert len({c.key for c in cases}) == 4


def test_fill_leaves_room_for_generation(tiny_gguf):
    s = parse_scenario(base(tiny_gguf, contexts=[64], fill=0.95, gen_tokens=16))
    assert s.cases()[0].prompt_tokens == 64 - 16


def test_explicit_prompt_tokens_skip_what_does_not_fit(tiny_gguf):
    s = parse_scenario(base(tiny_gguf, prompt_tokens=[100, 1000], gen_tokens=32))
    assert [(c.n_ctx, c.prompt_tokens) for c in s.cases()] == [(512, 100), (2048, 100), (2048, 1000)]


def test_list_options_are_swept(tiny_gguf):
    data = base(tiny_gguf, contexts=[512])
    data["models"][0]["options"] = {"token_delay": [0.001, 0.002], "alloc_mb": 1}
    cases = parse_scenario(data).cases()
    assert [c.options for c in cases] == [{"alloc_mb": 1, "token_delay": 0.001}, {"alloc_mb": 1, "token_delay": 0.002}]


def test_case_key_is_stable_and_ignores_repetitions(tiny_gguf):
    a = parse_scenario(base(tiny_gguf, repetitions=3)).cases()[0]
    b = parse_scenario(base(tiny_gguf, repetitions=9)).cases()[0]
    assert a.key == b.key


@pytest.mark.parametrize(
    "mutate, where, words",
    [
        (lambda d: d.update(repetitons=3), "repetitons", "did you mean 'repetitions'"),
        (lambda d: d.update(contexts="big"), "contexts[0]", "must be an integer"),
        (lambda d: d.update(contexts=[8]), "contexts[0]", "at least 16"),
        (lambda d: d.update(gen_tokens=True), "gen_tokens", "must be an integer"),
        (lambda d: d.update(fill=1.5), "fill[0]", "at most 0.95"),
        (lambda d: d.update(fill=0.5, prompt_tokens=[4]), "prompt_tokens", "not both"),
        (lambda d: d.update(timeout="long"), "timeout", "must be a number"),
        (lambda d: d.pop("contexts"), "contexts", "missing"),
        (lambda d: d.update(models=[]), "models", "non-empty list"),
        (lambda d: d["models"][0].update(runtime="llamacpp"), "models[0].runtime", "unknown runtime 'llamacpp'"),
        (lambda d: d["models"][0].pop("artifact"), "models[0].artifact", "missing"),
        (lambda d: d["models"][0].update(quant="q4"), "models[0].quant", "unknown field"),
        (lambda d: d["models"][0].update(options={"nope": 1}), "models[0].options.nope", "unknown option 'nope'"),
        (lambda d: d["models"][0].update(options={"alloc_mb": "x"}), "models[0].options.alloc_mb", "must be an integer"),
        (lambda d: d["models"][0].update(options={"alloc_mb": []}), "models[0].options.alloc_mb", "sweeps nothing"),
    ],
)
def test_bad_scenarios_name_the_field(tiny_gguf, mutate, where, words):
    data = base(tiny_gguf)
    mutate(data)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(data, source="s.yaml")
    assert err.value.where == where
    assert words in str(err.value)
    assert str(err.value).startswith("s.yaml: ")
    assert "\n" not in str(err.value)


def test_malformed_yaml_reports_line(write_scenario):
    path = write_scenario("models: [\n  - artifact: x\ncontexts: [512\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert "malformed YAML" in str(err.value) and "line" in str(err.value)


def test_relative_artifacts_resolve_against_the_scenario_folder(tmp_path, tiny_gguf):
    sub = tmp_path / "scen"
    sub.mkdir()
    (sub / "s.yaml").write_text(f"models: [{{artifact: ../{tiny_gguf.name}, runtime: llama.cpp}}]\ncontexts: [512]\n")
    s = load_scenario(sub / "s.yaml")
    assert s.models[0].artifact == tiny_gguf.resolve()
    assert s.name == "s"


def test_shipped_scenarios_are_valid():
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        s = load_scenario(path)
        assert s.cases(), path


def test_quick_scenario_covers_the_promised_contexts():
    s = load_scenario(ROOT / "scenarios" / "quick.yaml")
    assert {512, 2048, 8192} <= set(s.contexts)


def test_parse_contexts():
    assert parse_contexts("512, 2048") == [512, 2048]
    with pytest.raises(ValueError):
        parse_contexts("512,big")
    with pytest.raises(ValueError):
        parse_contexts("4")


def test_budgets_sweep_and_label(tiny_gguf):
    s = parse_scenario(base(tiny_gguf, contexts=[512], budget=["none", "200MiB"]))
    cases = s.cases()
    assert [c.budget_bytes for c in cases] == [None, 200 * 2**20]
    assert cases[1].label.endswith("<= 200MiB") and cases[0].key != cases[1].key


def test_bad_budget(tiny_gguf):
    with pytest.raises(ScenarioError, match="memory size"):
        parse_scenario(base(tiny_gguf, budget="lots"))


def test_thresholds_in_scenario(tiny_gguf):
    s = parse_scenario(base(tiny_gguf, thresholds={"min_decode_tok_s": 25}))
    assert s.cases()[0].thresholds.min_decode_tok_s == 25
    with pytest.raises(ScenarioError, match="unknown threshold"):
        parse_scenario(base(tiny_gguf, thresholds={"fast": 1}))


def test_models_by_catalog_id(tmp_path, tiny_gguf, monkeypatch):
    (tmp_path / "cat.yaml").write_text(f"artifacts:\n  tiny-q4:\n    path: {tiny_gguf}\nfits: []\n")
    monkeypatch.setenv("FITBENCH_CATALOG", str(tmp_path / "cat.yaml"))
    data = base(tiny_gguf)
    data["models"][0]["artifact"] = "catalog:tiny-q4"
    assert parse_scenario(data).models[0].artifact == tiny_gguf
    data["models"][0]["artifact"] = "tiny-q4"
    assert parse_scenario(data).models[0].artifact == tiny_gguf
    data["models"][0]["artifact"] = "catalog:nope"
    with pytest.raises(ScenarioError, match="no artifact 'nope'.*known: tiny-q4"):
        parse_scenario(data)
