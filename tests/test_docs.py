"""The README and docs/ against the code: generated pages current, links whole, commands real.

No runtime and no model needed: these read Markdown, import the CLI's click tree and the
schema/field tables, and render the generated pages in memory.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from harness import docs, fit
from harness.scenario import MODEL_ENTRY_FIELDS, MODEL_FIELDS, REQUIRED, SCENARIO_FIELDS, TOP_FIELDS, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- generated pages ------------------------------------------------------------------

@pytest.mark.parametrize("page", sorted(docs.PAGES))
def test_generated_page_matches_the_code(page):
    path = ROOT / page
    assert path.exists(), f"{page} is missing: {docs.REGENERATE}"
    assert path.read_text(encoding="utf-8") == docs.PAGES[page](), f"{page} differs from the code: {docs.REGENERATE}"


def test_check_names_a_stale_page_and_a_rewrite_fixes_it(tmp_path, capsys):
    assert docs.main(["--root", str(tmp_path)]) == 0  # writes every page into an empty tree
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0
    page = tmp_path / "docs" / "fit-thresholds.md"
    page.write_text(page.read_text() + "hand edit\n")
    capsys.readouterr()
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/fit-thresholds.md" in err and "make docs" in err
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0


def test_a_threshold_without_help_cannot_be_documented(monkeypatch):
    partial = {k: v for k, v in fit.THRESHOLD_HELP.items() if k != "max_ttft_s"}
    monkeypatch.setattr(fit, "THRESHOLD_HELP", partial)
    with pytest.raises(docs.DocsError, match="max_ttft_s"):
        docs.fit_thresholds()


def test_every_column_and_threshold_is_on_its_page():
    from harness.results import RESULT_COLUMNS, TIMELINE_COLUMNS

    columns = docs.results_columns()
    for col in [*RESULT_COLUMNS, *TIMELINE_COLUMNS]:
        assert f"| `{col.name}` |" in columns
    thresholds = docs.fit_thresholds()
    assert all(f"| `{name}` |" in thresholds for name in fit.THRESHOLD_HELP)
    assert "| `spill_read_min_bytes` | 16,777,216 (16 MiB) |" in thresholds


def test_schema_version_in_a_description_becomes_the_since_cell():
    class Col:
        def __init__(self, name, doc):
            self.name, self.type, self.doc = name, "int64", doc

    rows = docs._column_rows([Col("a", "x (schema 1.1)"), Col("b", "y (schema 1.3; more words)"), Col("c", "z")])
    assert rows == [["`a`", "int64", "x", "1.1"], ["`b`", "int64", "y (more words)", "1.3"], ["`c`", "int64", "z", ""]]


@pytest.mark.parametrize("page", sorted(docs.PAGES))
def test_a_pipe_in_a_description_stays_in_its_cell(page):
    cells = re.compile(r"(?<!\\)\|")
    widths = set()
    for line in docs.PAGES[page]().splitlines():
        if line.startswith("| ") or line.startswith("|---"):
            widths.add(len(cells.findall(line)))
        elif not line.strip():
            if len(widths) > 1:
                pytest.fail(f"{page}: a table has rows of different widths {sorted(widths)}")
            widths = set()
    assert len(widths) <= 1


# ---- the scenario field table against the parser ---------------------------------------

def test_scenario_field_table_names_what_the_parser_accepts():
    assert [f.name for f in SCENARIO_FIELDS] == list(TOP_FIELDS), \
        "harness/scenario.py: SCENARIO_FIELDS and TOP_FIELDS name different fields"
    assert {f.name for f in MODEL_ENTRY_FIELDS} == MODEL_FIELDS


def test_scenario_field_defaults_are_the_parsers(tiny_gguf):
    s = parse_scenario({"name": "t", "contexts": [512],
                        "models": [{"artifact": str(tiny_gguf), "runtime": "fake_runners:FakeRunner"}]})
    table = {f.name: f.default for f in SCENARIO_FIELDS}
    for name in ("gen_tokens", "warmup", "repetitions", "timeout", "sampler_interval_ms", "cooldown_s", "description"):
        assert getattr(s, name) == yaml.safe_load(table[name]), name
    assert s.fill == [yaml.safe_load(table["fill"])]
    assert table["prompt_tokens"] == "none" and s.prompt_tokens is None
    assert table["budget"] == "none" and s.budgets == [None]
    assert table["quality"] == "none" and s.quality is None
    assert table["workflow"] == "none" and s.workflows is None
    assert s.parallel == [yaml.safe_load(table["parallel"])]
    assert table["models"] == REQUIRED
    model = {f.name: f.default for f in MODEL_ENTRY_FIELDS}
    assert yaml.safe_load(model["options"]) == s.models[0].options
    assert model["artifact"] == model["runtime"] == REQUIRED


def test_quality_and_workflow_defaults_on_the_page_are_the_parsers():
    from harness.quality.spec import parse_quality
    from harness.workflow import parse_workflow

    page = docs.scenario_fields()
    spec = parse_quality({}, None, [])
    for name in ("tokens", "window", "top_k"):
        assert f"| `{name}` | {getattr(spec, name)} |" in page, name
    chat = parse_workflow({"kind": "chat", "turns": 2})
    doc = parse_workflow({"kind": "document", "questions": 2, "document_tokens": 100})
    for name, value in (("user_tokens", chat.user_tokens), ("reply_tokens", chat.reply_tokens),
                        ("question_tokens", doc.question_tokens), ("reuse_cache", "true" if chat.reuse_cache else "false")):
        assert re.search(rf"\| `{name}` \| [^|]+ \| {value} \|", page), name


# ---- the manual against the repository -------------------------------------------------

def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_manual_exists_and_the_readme_is_a_front_page():
    assert (ROOT / "docs").is_dir() and len(MANUAL) > 10
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: the manual belongs in docs/"
    text = "\n".join(lines)
    assert "<!-- quick-output -->" in text and "make quick" in text and "make test" in text


def _broken_links(path: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


REPO_PATH = re.compile(r"`((?:harness|runners|scenarios|bench|tests|docs)/[\w./-]*)`")


def _missing_paths(text: str, root: Path = ROOT) -> list[str]:
    return [p for p in REPO_PATH.findall(_prose(text)) if not (root / p.rstrip(".")).exists()]


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", text, re.M))
    for phony in re.findall(r"^\.PHONY:(.*)$", text, re.M):
        targets |= set(phony.split())
    return targets


def _code(text: str) -> list[str]:
    """Every code block line and every inline code span (whitespace collapsed)."""
    blocks = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
    return blocks + spans


def _unknown_make_targets(text: str) -> set[str]:
    named = {m for line in _code(text) for m in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", line)}
    return named - _make_targets()


def _cli_group() -> click.Group:
    import harness.cli as cli_module

    groups = [v for v in vars(cli_module).values() if isinstance(v, click.Group) and "run" in v.commands]
    assert groups, "harness.cli has no click group with a 'run' command"
    return groups[0]


def _invocations(text: str) -> list[str]:
    out = []
    for line in _code(text):
        line = re.sub(r"\s#.*$", "", line)  # a shell comment
        for m in re.finditer(r"(?:^|[\s/])fitbench ((?:[^|;&]|\\\|)*)", line):
            out.append(m.group(1))
    return out


def _unknown_options(text: str) -> list[str]:
    """``fitbench CMD ... --opt`` in code whose CMD has no such option."""
    root = _cli_group()
    wrong = []
    for invocation in _invocations(text):
        try:
            tokens = shlex.split(invocation)
        except ValueError:
            tokens = invocation.split()
        cmd, words = root, []
        for tok in tokens:
            if not isinstance(cmd, click.Group):
                break
            if tok not in cmd.commands:
                break
            cmd = cmd.commands[tok]
            words.append(tok)
        if isinstance(cmd, click.Group):
            continue  # "fitbench" in prose, or a group named with alternatives like update|show|pull
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
        for tok in tokens:
            opt = tok.strip("[]").split("=")[0]
            if re.fullmatch(r"--?[a-z][\w-]*", opt) and opt not in known:
                wrong.append(f"fitbench {' '.join(words)} {opt}")
    return sorted(set(wrong))


def _unknown_option_spans(text: str) -> list[str]:
    """Inline code that starts with a long option (`--min-context`, `--fill 0.9`) in option tables and
    prose: each must be an option of some fitbench command (other tools' flags are single-dash here)."""
    def walk(cmd: click.Command):
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from walk(sub)

    known = {o for cmd in walk(_cli_group()) for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    spans = re.findall(r"`(--[a-z][\w-]*)", _prose(text))
    return sorted({s for s in spans if s not in known})


@pytest.mark.parametrize("path", MANUAL, ids=_rel)
def test_option_names_in_prose_and_tables_exist(path):
    unknown = _unknown_option_spans(path.read_text(encoding="utf-8"))
    assert not unknown, f"{_rel(path)} names options no fitbench command has: {unknown}"


@pytest.mark.parametrize("path", MANUAL, ids=_rel)
def test_links_point_somewhere(path):
    broken = _broken_links(path)
    assert not broken, f"{_rel(path)}: broken links: {', '.join(broken)}"


@pytest.mark.parametrize("path", MANUAL, ids=_rel)
def test_named_repository_paths_exist(path):
    missing = _missing_paths(path.read_text(encoding="utf-8"))
    assert not missing, f"{_rel(path)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", MANUAL, ids=_rel)
def test_make_targets_named_exist(path):
    unknown = _unknown_make_targets(path.read_text(encoding="utf-8"))
    assert not unknown, f"{_rel(path)} names make targets the Makefile lacks: {sorted(unknown)}"


@pytest.mark.parametrize("path", MANUAL, ids=_rel)
def test_documented_fitbench_options_exist(path):
    wrong = _unknown_options(path.read_text(encoding="utf-8"))
    assert not wrong, f"{_rel(path)} documents options the CLI does not have: {wrong}"


def test_the_manual_checks_catch_what_they_are_for(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n[ok](other.md#real-heading) [gone](missing.md) [bad](other.md#nope) [here](#top)\n\n"
        "```sh\nfitbench run s.yaml --budget 1GiB -o out   # fine\nfitbench run s.yaml --no-such-option\n"
        "make nonesuch\n```\n\n"
        "Prose: `fitbench compare A B --by machine_class`, `fitbench catalog show --nope`, "
        "`fitbench catalog update|show|pull`, `make quick`, `harness/fit.py`, `harness/nonesuch.py`, "
        "`--min-context`, `--gone 3`.\n")
    text = page.read_text()
    assert _broken_links(page) == ["missing.md (no such file)", "other.md#nope (no such heading)"]
    assert _unknown_options(text) == ["fitbench catalog show --nope", "fitbench run --no-such-option"]
    assert _unknown_make_targets(text) == {"nonesuch"}
    assert _missing_paths(text) == ["harness/nonesuch.py"]
    assert _unknown_option_spans(text) == ["--gone"]


def test_every_make_prerequisite_variable_is_defined_before_its_rule():
    """make expands a rule's prerequisites as it reads the rule: a variable defined further down is
    empty there, and the prerequisite silently vanishes (`make test` once never extracted llama.cpp's
    sources, so the llama.cpp half of the estimate test skipped in every fresh clone)."""
    text = (ROOT / "Makefile").read_text()
    defined: set[str] = set()
    late = []
    for n, line in enumerate(text.splitlines(), 1):
        if m := re.match(r"^([A-Z][A-Z0-9_]*)\s*(?::=|\?=|=)", line):
            defined.add(m.group(1))
        elif (rule := re.match(r"^([^\t#=][^=]*?):(?!=)(.*)$", line)) and not line.startswith("."):
            used = set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", rule.group(1) + rule.group(2)))
            late += [f"line {n}: $({v})" for v in sorted(used - defined)]
    assert not late, f"prerequisites use variables defined only further down: {late}"
