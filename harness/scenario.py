"""Scenario YAML -> validated dataclasses -> expanded cases.

A scenario names artifacts with their runtime and options, the configured
contexts to run, how full to fill each context, how many tokens to generate
and how often. Every mistake in the file is reported as one line naming the
file, the field and what to do (``ScenarioError``).

An option given as a list is swept: the cases are the cartesian product of
all swept options, like llama-bench's comma lists.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import FitbenchError
from harness.fit import Thresholds, parse_size
from harness.quality.spec import QualitySpec, QualitySpecError, parse_quality
from harness.workflow import Workflow, WorkflowError, parse_workflow, round_up
from runners.base import OptionError, UnknownRunner, get_runner_class, short_repr


@dataclass(frozen=True)
class FieldDoc:
    """One documented scenario field, as a user writes it in YAML (docs/scenario-fields.md is made from these)."""

    name: str
    type: str  # as written in YAML
    default: str  # as written in YAML; REQUIRED when the file must give it
    help: str


REQUIRED = "required"

# The reference of a scenario's top-level fields: the parser accepts exactly these names, and
# tests/test_docs.py fails when a default here differs from what the parser fills in.
SCENARIO_FIELDS: tuple[FieldDoc, ...] = (
    FieldDoc("name", "string", "the file name's stem", "short name used in result file names: up to 64 letters, "
             "digits, '-' or '_'"),
    FieldDoc("description", "string", "''", "free text"),
    FieldDoc("models", "list of model entries", REQUIRED, "what to measure: {artifact, runtime, options, label} each"),
    FieldDoc("contexts", "int or list of ints", REQUIRED, "configured context lengths (n_ctx), at least 16 each; "
             "optional with a workflow (each session then gets a context that holds it)"),
    FieldDoc("fill", "float or list of floats", "0.5", "fraction of each context the prompt fills, 0.0-0.95, "
             "capped so the generated tokens fit; not with prompt_tokens or workflow"),
    FieldDoc("prompt_tokens", "int or list of ints", "none", "explicit prompt lengths instead of fill; lengths "
             "that leave no room for gen_tokens in a context are skipped there"),
    FieldDoc("gen_tokens", "int", "32", "tokens generated per repetition, at least 2 (EOS does not stop generation)"),
    FieldDoc("warmup", "int", "1", "unrecorded warm-up generations per case, 0-100"),
    FieldDoc("repetitions", "int", "5", "recorded repetitions per case, 1-10000"),
    FieldDoc("timeout", "number (seconds)", "600", "time a case may take, load included; then it is killed "
             "(status timeout)"),
    FieldDoc("sampler_interval_ms", "number", "10", "interval of the memory sampler, milliseconds (at least 1); "
             "while the worker is timed, no denser than 100 ms"),
    FieldDoc("cooldown_s", "number (seconds)", "0", "idle time before each case after the first, so heat and "
             "boost clocks from one case do not carry into the next"),
    FieldDoc("budget", "size or list of sizes", "none", "memory the case may use, e.g. 8GiB; a list sweeps, "
             "'none' is no budget; enforced with a cgroup where one is writable"),
    FieldDoc("thresholds", "mapping", "the defaults", "fit thresholds to override, e.g. {min_decode_tok_s: 20} "
             "(docs/fit-thresholds.md)"),
    FieldDoc("quality", "mapping", "none", "quality probe: {text, tokens, window, top_k, reference, tasks}"),
    FieldDoc("parallel", "int or list of ints", "1", "sessions at once on one loaded model, 1-256, each with its "
             "own prompt and a context of n_ctx (docs/concurrency.md); a list sweeps, e.g. [1, 2, 4, 8]; "
             "not with workflow"),
    FieldDoc("workflow", "mapping or list of mappings", "none", "a multi-turn session instead of one prompt "
             "(chat or document); a list runs each; not with fill, prompt_tokens or gen_tokens"),
)

# The fields of one entry of ``models:``.
MODEL_ENTRY_FIELDS: tuple[FieldDoc, ...] = (
    FieldDoc("artifact", "path or catalog:ID", REQUIRED, "the model file or folder, relative to the scenario "
             "file (then the working directory), absolute, or an id from catalog.yaml"),
    FieldDoc("runtime", "string", REQUIRED, "runner name (llama.cpp, torch, onnxruntime, mlx; `fitbench runners`) "
             "or package.module:ClassName"),
    FieldDoc("options", "mapping", "{}", "runner options; a list value sweeps (every combination is a case)"),
    FieldDoc("label", "string", "the artifact's stem", "name of the model in output and result rows"),
)

# What the parser accepts is what is documented: one table, so the two cannot drift.
TOP_FIELDS = {f.name: f.help for f in SCENARIO_FIELDS}
# A workflow sets its own prompt and reply lengths.
NOT_WITH_WORKFLOW = ("fill", "prompt_tokens", "gen_tokens", "parallel")
MAX_PARALLEL = 256
MODEL_FIELDS = {f.name for f in MODEL_ENTRY_FIELDS}
MAX_FILL = 0.95


class ScenarioError(FitbenchError, ValueError):
    """A scenario file is wrong; the message says where and what to do."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source, self.where, self.message = source, where, message
        location = f"{source}: {where}: " if where else f"{source}: "
        super().__init__(location + message)


@dataclass(frozen=True)
class ModelSpec:
    artifact: Path
    runtime: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    name: str
    source: str
    models: list[ModelSpec]
    contexts: list[int]
    fill: list[float] | None = None
    prompt_tokens: list[int] | None = None
    gen_tokens: int = 32
    warmup: int = 1
    # 5, like llama-bench: with the decode CV of ~3% measured by `make bench` on a 2-core
    # box, 5 repetitions give a 95% CI of about ±3% (11 would be needed for ±2%).
    repetitions: int = 5
    timeout: float = 600.0
    sampler_interval_ms: float = 10.0
    cooldown_s: float = 0.0
    description: str = ""
    budgets: list[int | None] = field(default_factory=lambda: [None])
    thresholds: Thresholds = field(default_factory=Thresholds)
    quality: QualitySpec | None = None
    # Multi-turn sessions; with none given, ``contexts`` empty means each workflow's own session length.
    workflows: list[Workflow] | None = None
    parallel: list[int] = field(default_factory=lambda: [1])  # sessions at once, swept

    def cases(self) -> list[Case]:
        return expand_cases(self)


@dataclass(frozen=True)
class Case:
    """One configuration to measure; runs in its own process, ``repetitions`` times."""

    index: int
    scenario: str
    model_label: str
    artifact: Path
    runtime: str
    options: dict[str, Any]
    n_ctx: int
    prompt_tokens: int
    gen_tokens: int
    fill: float | None
    warmup: int
    repetitions: int
    timeout: float
    sampler_interval_ms: float
    budget_bytes: int | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    quality: QualitySpec | None = None
    workflow: Workflow | None = None  # a multi-turn session; prompt_tokens is then its final context
    cooldown_s: float = 0.0  # idle before this case when another ran before it (not part of its key)
    parallel: int = 1  # sessions at once on the loaded model, each with its own prompt and n_ctx

    @property
    def quality_group(self) -> str:
        """Cases that share artifact, runtime and options share one quality probe."""
        return json.dumps([str(self.artifact), self.runtime, self.options], sort_keys=True, default=str)

    @property
    def label(self) -> str:
        """llama-bench style: ``pp1024+tg32 @ ctx2048``, plus the budget when one is set;
        a workflow's shape instead of pp/tg, e.g. ``chat 10x(u200+r64) @ ctx3072``."""
        budget = f" <= {self.budget_bytes / 2**20:,.0f}MiB" if self.budget_bytes else ""
        shape = self.workflow.label if self.workflow else f"pp{self.prompt_tokens}+tg{self.gen_tokens}"
        if self.parallel > 1:
            shape = f"{self.parallel}x({shape})"
        return f"{shape} @ ctx{self.n_ctx}{budget}"

    @property
    def key(self) -> str:
        """Stable id of what is measured (not of how often): matches across runs and machines."""
        ident = {
            "artifact": self.artifact.name,
            "runtime": self.runtime,
            "options": self.options,
            "n_ctx": self.n_ctx,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
        }
        if self.budget_bytes is not None:
            ident["budget_bytes"] = self.budget_bytes
        if self.workflow is not None:
            ident["workflow"] = self.workflow.to_dict()
        if self.parallel > 1:  # single-session keys stay what they were
            ident["parallel"] = self.parallel
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_scenario(path: Path) -> Scenario:
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ScenarioError(source, "", "file not found; pass a scenario YAML such as scenarios/quick.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(source, "", f"cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(source, where, f"malformed YAML: {problem}") from None
    return parse_scenario(data, source=source, base_dir=path.parent)


def parse_scenario(data: Any, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(source, "", "a scenario must be a mapping with at least 'models' and 'contexts'")
    _reject_unknown(source, "", data, TOP_FIELDS)
    workflows = _workflows(source, data["workflow"]) if "workflow" in data else None
    if workflows is not None:
        for other in NOT_WITH_WORKFLOW:
            if other in data:
                raise ScenarioError(source, other, "a workflow sets its own prompt and reply lengths; remove "
                                                   f"'{other}' (use the workflow's token fields)")
    for required in ("models",) + (("contexts",) if workflows is None else ()):
        if required not in data:
            raise ScenarioError(source, required, f"missing; add '{required}:' ({TOP_FIELDS[required]})")

    # Without a name, the file's stem made safe for file names ("my scenario.yaml" -> my-scenario).
    name = data.get("name") or re.sub(r"[^A-Za-z0-9_-]+", "-", Path(source).stem).strip("-")[:64] or "scenario"
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
        raise ScenarioError(source, "name", f"must be up to 64 letters, digits, '-' or '_', got {short_repr(name)}")

    models_raw = data["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise ScenarioError(source, "models", "must be a non-empty list of {artifact, runtime, options}")
    models = [_parse_model(source, f"models[{i}]", m, base_dir) for i, m in enumerate(models_raw)]

    contexts = _int_list(source, "contexts", data["contexts"], minimum=16) if "contexts" in data else []
    fill = prompt_tokens = None
    if "fill" in data and "prompt_tokens" in data:
        raise ScenarioError(source, "prompt_tokens", "give either 'fill' or 'prompt_tokens', not both")
    if "prompt_tokens" in data:
        prompt_tokens = _int_list(source, "prompt_tokens", data["prompt_tokens"], minimum=1)
    else:
        fill = _fill_list(source, data.get("fill", 0.5))

    return Scenario(
        name=name,
        source=source,
        description=_typed(source, "description", data.get("description", ""), str),
        models=models,
        contexts=contexts,
        fill=fill,
        prompt_tokens=prompt_tokens,
        gen_tokens=_int(source, "gen_tokens", data.get("gen_tokens", 32), minimum=2),
        warmup=_int(source, "warmup", data.get("warmup", 1), minimum=0, maximum=100),
        repetitions=_int(source, "repetitions", data.get("repetitions", Scenario.repetitions), minimum=1, maximum=10_000),
        timeout=_number(source, "timeout", data.get("timeout", 600), minimum=1),
        sampler_interval_ms=_number(source, "sampler_interval_ms", data.get("sampler_interval_ms", 10), minimum=1),
        cooldown_s=_number(source, "cooldown_s", data.get("cooldown_s", 0), minimum=0),
        budgets=_budgets(source, data.get("budget")),
        thresholds=_thresholds(source, data.get("thresholds")),
        quality=_quality(source, data.get("quality"), base_dir, models),
        workflows=workflows,
        parallel=list(dict.fromkeys(_int_list(source, "parallel", data.get("parallel", 1), minimum=1,
                                              maximum=MAX_PARALLEL))),
    )


def _quality(source: str, raw: Any, base_dir: Path | None, models: list[ModelSpec]) -> QualitySpec | None:
    if raw is None:
        return None
    try:
        return parse_quality(raw, base_dir, models)
    except QualitySpecError as exc:
        raise ScenarioError(source, exc.where, exc.message) from None


def _model_options(s: Scenario):
    """(model, options) for every model and every combination of its swept (list) options."""
    for model in s.models:
        swept = {k: v for k, v in model.options.items() if isinstance(v, list)}
        fixed = {k: v for k, v in model.options.items() if not isinstance(v, list)}
        for combo in itertools.product(*swept.values()) if swept else [()]:
            yield model, {**fixed, **dict(zip(swept, combo))}


def expand_cases(s: Scenario) -> list[Case]:
    """Cartesian product in an order that keeps one artifact's cases together."""
    if s.workflows is not None:
        return _workflow_cases(s)
    cases: list[Case] = []
    for model, options in _model_options(s):
        for budget, n_ctx, parallel in itertools.product(s.budgets, s.contexts, s.parallel):
            for fill, n_prompt in _prompt_lengths(s, n_ctx):
                cases.append(Case(
                    index=len(cases), scenario=s.name, model_label=model.label,
                    artifact=model.artifact, runtime=model.runtime, options=options,
                    n_ctx=n_ctx, prompt_tokens=n_prompt, gen_tokens=s.gen_tokens, fill=fill,
                    warmup=s.warmup, repetitions=s.repetitions, timeout=s.timeout,
                    sampler_interval_ms=s.sampler_interval_ms, budget_bytes=budget, cooldown_s=s.cooldown_s,
                    thresholds=s.thresholds, quality=s.quality, parallel=parallel,
                ))
    return cases


def _workflow_cases(s: Scenario) -> list[Case]:
    """One case per (model, options, budget, workflow, context); no context given: the session's own length."""
    cases: list[Case] = []
    for model, options in _model_options(s):
        for budget, wf in itertools.product(s.budgets, s.workflows or []):
            for n_ctx in s.contexts or [round_up(wf.session_tokens)]:
                cases.append(Case(
                    index=len(cases), scenario=s.name, model_label=model.label,
                    artifact=model.artifact, runtime=model.runtime, options=options,
                    n_ctx=n_ctx, prompt_tokens=wf.context_before_reply()[-1], gen_tokens=wf.reply_tokens,
                    fill=None, warmup=s.warmup, repetitions=s.repetitions, timeout=s.timeout,
                    sampler_interval_ms=s.sampler_interval_ms, budget_bytes=budget, cooldown_s=s.cooldown_s,
                    thresholds=s.thresholds, workflow=wf,
                ))
    return cases


def _prompt_lengths(s: Scenario, n_ctx: int) -> list[tuple[float | None, int]]:
    room = n_ctx - s.gen_tokens  # the generated tokens need KV cells too
    if s.prompt_tokens is not None:
        return [(None, p) for p in s.prompt_tokens if p <= room]
    return [(f, max(1, min(room, round(f * n_ctx)))) for f in (s.fill or [])]


def validate_cases(s: Scenario) -> None:
    """Checks that need the expanded cases: something to run, contexts that hold the prompt
    (or, for a workflow, the whole session)."""
    if s.workflows is not None:
        for i, wf in enumerate(s.workflows):
            short = [n for n in s.contexts if n < wf.session_tokens]
            if short:
                where = "workflow" if len(s.workflows) == 1 else f"workflow[{i}]"
                raise ScenarioError(s.source, where,
                                    f"context {short[0]:,} cannot hold the {wf.label} session ({wf.session_tokens:,} "
                                    f"tokens with every reply); use contexts of at least {wf.session_tokens:,} "
                                    "or a shorter session")
        return
    if s.prompt_tokens is not None:
        for n_ctx in s.contexts:
            if not _prompt_lengths(s, n_ctx):
                raise ScenarioError(s.source, "prompt_tokens",
                                    f"no prompt length fits context {n_ctx} with gen_tokens {s.gen_tokens}; "
                                    "use a larger context or shorter prompts")
    if s.quality is not None and s.quality.tokens and max(s.contexts) < s.quality.window:
        raise ScenarioError(s.source, "quality.window",
                            f"window {s.quality.window} is larger than every context ({max(s.contexts)}); "
                            "the probe runs in a case whose n_ctx holds one window: lower it or add a context")
    for n_ctx in s.contexts:
        if n_ctx <= s.gen_tokens:
            raise ScenarioError(s.source, "contexts", f"context {n_ctx} cannot hold gen_tokens {s.gen_tokens}")


def _parse_model(source: str, where: str, raw: Any, base_dir: Path | None) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ScenarioError(source, where, "must be a mapping with 'artifact' and 'runtime'")
    _reject_unknown(source, where, raw, {k: "" for k in MODEL_FIELDS})
    for required in ("artifact", "runtime"):
        if required not in raw:
            raise ScenarioError(source, f"{where}.{required}", "missing")
    artifact_raw = _typed(source, f"{where}.artifact", raw["artifact"], str)
    runtime = _typed(source, f"{where}.runtime", raw["runtime"], str)
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise ScenarioError(source, f"{where}.options", "must be a mapping of option: value")
    try:
        artifact = resolve_artifact(artifact_raw, base_dir)
    except LookupError as exc:
        raise ScenarioError(source, f"{where}.artifact", str(exc)) from None
    try:
        runner_cls = get_runner_class(runtime)
    except UnknownRunner as exc:
        raise ScenarioError(source, f"{where}.runtime", str(exc)) from None
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise ScenarioError(source, f"{where}.options.{key}", "an empty list sweeps nothing; give values")
        for v in values:
            try:
                runner_cls.validate_options({key: v})
            except OptionError as exc:
                raise ScenarioError(source, f"{where}.options.{key}", str(exc)) from None
    label = raw.get("label") or artifact.stem
    return ModelSpec(artifact=artifact, runtime=runtime, label=_typed(source, f"{where}.label", label, str),
                     options=options)


def resolve_artifact(raw: str, base_dir: Path | None) -> Path:
    """``catalog:ID`` (or a bare catalog id) through the catalog; absolute paths as given;
    relative ones against the scenario's folder, then the cwd."""
    if raw.startswith("catalog:") or ("/" not in raw and "." not in raw):
        from harness.catalog import CatalogError, default_catalog_path, load_catalog

        artifact_id = raw.removeprefix("catalog:")
        try:
            cat = load_catalog(default_catalog_path(base_dir))
        except CatalogError as exc:
            raise LookupError(str(exc)) from None
        found = cat.resolve(artifact_id)
        if found is not None:
            return found
        if raw.startswith("catalog:"):
            known = ", ".join(sorted(cat.artifacts)) or "none"
            raise LookupError(f"no artifact {artifact_id!r} with a path in {cat.path} (known: {known})")
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    if base_dir is not None and (base_dir / path).exists():
        return (base_dir / path).resolve()
    return path.resolve()


def _reject_unknown(source: str, where: str, raw: dict, known: dict) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(sorted(known))}"
            raise ScenarioError(source, f"{where}.{key}" if where else str(key), f"unknown field; {hint}")


def _typed(source: str, where: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise ScenarioError(source, where, f"must be a {kind.__name__}, got {short_repr(value)}")
    return value


# Upper bounds keep absurd inputs (a typo, or a hostile file) from becoming absurd work.
MAX_INT = 1 << 24  # 16M tokens of context is beyond any model today
MAX_NUMBER = 7 * 24 * 3600.0


def _int(source: str, where: str, value: Any, minimum: int, maximum: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(source, where, f"must be an integer, got {short_repr(value)}")
    if value < minimum:
        raise ScenarioError(source, where, f"must be at least {minimum}, got {value}")
    if value > maximum:
        raise ScenarioError(source, where, f"must be at most {maximum:,}, got {short_repr(value)}")
    return value


def _number(source: str, where: str, value: Any, minimum: float, maximum: float = MAX_NUMBER) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(source, where, f"must be a number, got {short_repr(value)}")
    if not minimum <= value <= maximum:  # also rejects NaN
        raise ScenarioError(source, where, f"must be between {minimum:g} and {maximum:g}, got {short_repr(value)}")
    return float(value)


def _int_list(source: str, where: str, value: Any, minimum: int, maximum: int = MAX_INT) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ScenarioError(source, where, "must not be empty")
    return [_int(source, f"{where}[{i}]", v, minimum, maximum) for i, v in enumerate(values)]


def _fill_list(source: str, value: Any) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ScenarioError(source, "fill", "must not be empty")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_FILL:
            raise ScenarioError(source, f"fill[{i}]",
                                f"must be at most {MAX_FILL} (generated tokens need room), got {short_repr(v)}")
        f = _number(source, f"fill[{i}]", v, minimum=0.0, maximum=MAX_FILL)
        out.append(f)
    return out


def _budgets(source: str, value: Any) -> list[int | None]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ScenarioError(source, "budget", "an empty list budgets nothing; give sizes like 8GiB or 'none'")
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip().lower() == "none"):
            out.append(None)
            continue
        try:
            out.append(parse_size(v))
        except ValueError as exc:
            raise ScenarioError(source, f"budget[{i}]" if isinstance(value, list) else "budget", str(exc)) from None
    return out


def _workflows(source: str, value: Any) -> list[Workflow]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ScenarioError(source, "workflow", "an empty list runs nothing; give {kind: chat, turns: 10, ...}")
    out = []
    for i, raw in enumerate(values):
        where = f"workflow[{i}]" if isinstance(value, list) else "workflow"
        try:
            out.append(parse_workflow(raw))
        except WorkflowError as exc:
            raise ScenarioError(source, f"{where}.{exc.field}" if exc.field else where, exc.message) from None
    return out


def _thresholds(source: str, value: Any) -> Thresholds:
    if value is None:
        return Thresholds()
    if not isinstance(value, dict):
        raise ScenarioError(source, "thresholds", "must be a mapping like {min_decode_tok_s: 20}")
    try:
        return Thresholds().merged(value)
    except ValueError as exc:
        raise ScenarioError(source, "thresholds", str(exc)) from None


def parse_contexts(text: str) -> list[int]:
    """``--contexts 512,2048`` from the command line."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--contexts must be comma-separated integers like 512,2048, got {text!r}") from None
    if not values or min(values) < 16:
        raise ValueError(f"--contexts needs integers of at least 16, got {text!r}")
    return values
