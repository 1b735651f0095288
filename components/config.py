"""The one typed configuration of the pipeline.

`params.yaml` at the repository root holds it; the CLI reads it (with `--set a.b=c` overrides),
the Prefect flow takes it as its parameters, and `dvc.yaml` names its sections as stage params.
Every field is documented here and nowhere else. Unknown keys and wrong types are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported before any stage runs."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldConfig(Section):
    """The embedded review world: a generated corpus of movie reviews and its prompts."""

    n_reviews: int = Field(6000, ge=100, description="reviews in the corpus (train and held-out)")
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of films held out for evaluation only")
    low_quality_fraction: float = Field(0.3, ge=0, le=1, description="share of reviews with repetitions or rambling")
    prompt_words: int = Field(3, ge=1, le=8, description="words of the review opening kept in a prompt")


class BaseModelConfig(Section):
    """The base language model: built and pretrained on the world corpus, or loaded."""

    pretrained: str | None = Field(
        None, description="a local model folder or hub id to start from instead of the embedded model"
    )
    vocab_size: int = Field(2048, ge=300, description="byte-level BPE vocabulary trained on the corpus")
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(192, ge=16)
    max_length: int = Field(128, ge=32, description="context length in tokens")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)


class SFTConfig(Section):
    """Supervised fine-tuning on curated demonstrations (LIMA-style: few, clean, deduplicated)."""

    n_demonstrations: int = Field(1200, ge=10, description="demonstrations kept after curation")
    min_words: int = Field(10, ge=1, description="shortest response kept")
    max_words: int = Field(60, ge=1, description="longest response kept")
    min_quality: float = Field(0.4, description="gold quality (topic + fluency - repetition) a demonstration needs")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)


class SamplingConfig(Section):
    """How completions are sampled from a policy. No top-p/top-k truncation: PPO's log-probs and
    the KL estimates score tokens under the full distribution they were drawn from."""

    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1, description="prompts generated together")


class CollectConfig(Section):
    """Sampling K completions per training prompt from the SFT policy, to be labelled."""

    n_prompts: int = Field(1024, ge=1)
    k: int = Field(4, ge=2, description="completions per prompt (InstructGPT uses 4 to 9)")


class AnnotatorConfig(Section):
    """Simulated annotators: Bradley-Terry noise on the gold score."""

    n_annotators: int = Field(5, ge=1)
    target_agreement: float = Field(
        0.725, gt=0.5, lt=1, description="share of pairs where a label agrees with the gold ordering"
    )


class DataConfig(Section):
    """Preference data: an external set to ingest (`rlhf data ingest`, or `source` in the pipeline)
    and how every preference set is read, checked and turned into pairs (components/preferences.py,
    components/validation.py)."""

    source: str | None = Field(
        None, description="a file or Hugging Face dataset id the pipeline ingests instead of simulated labels"
    )
    format: Literal["auto", "pairs", "ranked", "ratings", "hh"] = Field(
        "auto", description="record type of the source rows; auto detects it from the fields of the first row"
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="source field -> record field, e.g. {question: prompt, good: chosen}"
    )
    max_chars: int = Field(
        20000, ge=1, description="longest text accepted in any field (HH-RLHF transcripts reach about 4,300)"
    )
    ties: Literal["drop", "keep"] = Field(
        "drop", description="equal ratings and split votes: dropped, or kept as pairs with tie=true and margin 0"
    )
    mostly: float = Field(1.0, gt=0, le=1, description="share of rows each dataset-level expectation must hold for")
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1, description="share of quarantined rows above which an ingest fails"
    )
    hf_split: str = Field("train", description="split of a Hugging Face dataset id")
    hf_subset: str | None = Field(None, description="configuration name of a Hugging Face dataset id")
    hf_data_dir: str | None = Field(None, description="folder within a Hugging Face dataset, e.g. harmless-base")


class RewardConfig(Section):
    """Reward model: the SFT backbone with a scalar head, pairwise Bradley-Terry loss."""

    epochs: int = Field(1, ge=1, description="one pass: fresh pairs help more than repeated ones")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="pairs held out for accuracy")


class PPOConfig(Section):
    """PPO against the reward model with a per-token KL penalty to the SFT reference."""

    steps: int = Field(30, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(64, ge=1, description="prompts per rollout")
    minibatch_size: int = Field(16, ge=1)
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    lr: float = Field(5e-5, gt=0)
    kl_coef: float = Field(0.1, ge=0, description="beta of the per-token KL penalty (its start when adaptive)")
    kl_target: float | None = Field(
        None, gt=0, description="sequence KL the adaptive controller steers beta towards; None keeps beta fixed"
    )
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon in samples (Ziegler et al. 2019)")
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    whiten_rewards: bool = False


class EvalConfig(Section):
    """Evaluation on held-out prompts that no stage trained on."""

    n_prompts: int = Field(256, ge=1)


class PromotionConfig(Section):
    """MLflow registration and the gate for the `champion` alias."""

    model_name: str = "rlhf-policy"
    min_gold_win_rate: float = Field(0.6, ge=0, le=1)
    max_kl: float = Field(50.0, gt=0, description="largest KL to the SFT policy a champion may have")


class PipelineConfig(Section):
    seed: int = 0
    experiment: str = "rlhf-pipeline"
    world: WorldConfig = WorldConfig()
    base: BaseModelConfig = BaseModelConfig()
    sft: SFTConfig = SFTConfig()
    sampling: SamplingConfig = SamplingConfig()
    collect: CollectConfig = CollectConfig()
    annotators: AnnotatorConfig = AnnotatorConfig()
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    promotion: PromotionConfig = PromotionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if self.base.n_embd % self.base.n_head:
            raise ValueError(f"base.n_embd ({self.base.n_embd}) must be a multiple of base.n_head ({self.base.n_head})")
        if self.ppo.batch_size % self.ppo.minibatch_size:
            raise ValueError("ppo.batch_size must be a multiple of ppo.minibatch_size")
        if self.sft.min_words > self.sft.max_words:
            raise ValueError("sft.min_words must not exceed sft.max_words")
        pretrained = self.base.pretrained
        if pretrained and (pretrained.startswith((".", "/", "~")) or Path(pretrained).exists()):
            if not Path(pretrained).expanduser().is_dir():
                raise ValueError(f"base.pretrained: no model folder at {pretrained}")
        return self


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
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
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
        reason = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{source}: {key}: {reason}")
    return "\n".join(lines)


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
