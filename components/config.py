"""The one typed configuration of the pipeline.

`params.yaml` at the repository root holds it; the CLI reads it (with `--set a.b=c` overrides),
the Prefect flow takes it as its parameters, and `dvc.yaml` names its sections as stage params.
The sections are documented in components/sections.py, an RL method's own section in its module;
`PipelineConfig` holds the core sections and one section per registered RL method. Unknown keys
and wrong types are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, create_model

from components import rl
from components.sections import (
    AnnotatorConfig, BaseModelConfig, CollectConfig, DataConfig, DPOConfig, EvalConfig, HumanConfig, LabelConfig,
    JudgeConfig, OrchestrationConfig, PromotionConfig, RLAIFConfig,
    RewardConfig, RLConfig, SamplingConfig, Section, SFTConfig, TaskConfig, WorldConfig,
)


class ConfigError(ValueError):
    """A configuration problem, reported before any stage runs."""


class CoreConfig(Section):
    seed: int = Field(0, description="seed of every sampler, shuffle and initialisation")
    experiment: str = Field("rlhf-pipeline", description="MLflow experiment of the runs")
    task: TaskConfig = TaskConfig()
    world: WorldConfig = WorldConfig()
    base: BaseModelConfig = BaseModelConfig()
    sft: SFTConfig = SFTConfig()
    sampling: SamplingConfig = SamplingConfig()
    collect: CollectConfig = CollectConfig()
    label: LabelConfig = LabelConfig()
    annotators: AnnotatorConfig = AnnotatorConfig()
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    dpo: DPOConfig = DPOConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    promotion: PromotionConfig = PromotionConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    human: HumanConfig = HumanConfig()
    judge: JudgeConfig = JudgeConfig()
    rlaif: RLAIFConfig = RLAIFConfig()


# An RL method's section is a field of the configuration without this module naming the method.
PipelineConfig = create_model(
    "PipelineConfig",
    __base__=CoreConfig,
    __doc__="The pipeline's configuration: the core sections and each registered RL method's own section.",
    **{
        method.section: (method.config, method.config())
        for method in rl.METHODS.values()
        if method.section and method.section not in CoreConfig.model_fields
    },
)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["ppo.steps=10", "seed=3"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({' '.join(str(error).split())})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        reason = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {reason}")
    return "\n".join(lines)


def override(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """`cfg` with `--set`-style overrides applied (a deployment's form and `rlhf run` alike). Raises ConfigError."""
    if not overrides:
        return cfg
    try:
        return PipelineConfig.model_validate(_merge(cfg.model_dump(), parse_overrides(overrides)))
    except ValidationError as error:
        raise ConfigError(_explain(error, "overrides")) from None


def project_config(root: str | Path) -> PipelineConfig:
    """ROOT/params.yaml when present, else the defaults: what a deployment's form starts from."""
    path = Path(root) / "params.yaml"
    return load_config(path if path.is_file() else None)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def describe(model: type[Section] = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, description) of every configuration key, sections walked in order."""
    rows = []
    for name, field in (model or PipelineConfig).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            rows += describe(annotation, f"{prefix}{name}.")
        else:
            default = field.default_factory() if field.default_factory else field.default
            section = " ".join((model.__doc__ or "").split("\n\n")[0].split()) if model else ""
            rows.append((f"{prefix}{name}", _type_name(annotation), default, field.description or f"({section})"))
    return rows


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> PipelineConfig:
    """Read `path` (YAML, loaded safely), apply overrides, validate. Raises ConfigError."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        tree = _merge(tree, extra)
        source += " with --set"
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None
