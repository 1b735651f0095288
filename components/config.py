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


class TrainerConfig(Section):
    """How a supervised trainer optimises (components/training.py): AdamW with linear warm-up and
    cosine decay to 10% of `lr`, the same on a CPU, one GPU or several (`accelerate launch`)."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1, description="examples per optimizer step, over all processes and accumulation steps")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step on each process")
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 otherwise"
    )
    checkpoint_every: int = Field(
        50, ge=0, description="optimizer steps between checkpoints a killed run resumes from; 0: none"
    )
    log_every: int = Field(1, ge=1, description="optimizer steps between logged training metrics")

    @model_validator(mode="after")
    def _divisible(self) -> "TrainerConfig":
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError("batch_size must be a multiple of gradient_accumulation_steps")
        return self


class BaseModelConfig(TrainerConfig):
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


class SFTConfig(TrainerConfig):
    """Supervised fine-tuning on curated demonstrations (LIMA-style: few, clean, deduplicated)."""

    n_demonstrations: int = Field(1200, ge=10, description="demonstrations kept after curation")
    min_words: int = Field(10, ge=1, description="shortest response kept")
    max_words: int = Field(60, ge=1, description="longest response kept")
    min_quality: float = Field(0.4, description="gold quality (topic + fluency - repetition) a demonstration needs")
    packing: bool = Field(
        False,
        description="pack demonstrations into full rows of base.max_length (attention stays within each one); "
        "batch_size then counts rows, not demonstrations",
    )
    chat_template: str | None = Field(
        None,
        description="None: prompt and response as plain text; 'tokenizer': the tokenizer's chat template; "
        "otherwise a Jinja chat template. The prompt is the user turn, the response the assistant turn",
    )
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)


class SamplingConfig(Section):
    """How completions are sampled from a policy (the rollout engine, components/rollout.py)."""

    max_new_tokens: int = Field(40, ge=1, description="longer responses are cut there and get no EOS")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(
        1.0, gt=0, le=1,
        description="nucleus sampling; below 1 the log-probs that PPO, P3O and the KL estimates use (the full "
        "distribution at the temperature) no longer describe the sampler exactly",
    )
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


class RewardConfig(TrainerConfig):
    """Reward model: the SFT backbone with a scalar head, pairwise Bradley-Terry loss."""

    epochs: int = Field(1, ge=1, description="one pass: fresh pairs help more than repeated ones")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="pairs held out for accuracy")
    loss: Literal["bradley_terry", "ranking", "plackett_luce"] = Field(
        "bradley_terry",
        description="bradley_terry: independent pairs; ranking: all pairs of a prompt's K completions in one batch "
        "(InstructGPT); plackett_luce: the likelihood of each prompt's full ranking",
    )
    use_margin: bool = Field(False, description="subtract each pair's margin inside the Bradley-Terry loss (Llama 2)")


class DPOConfig(TrainerConfig):
    """Direct preference optimisation and its variants against a frozen reference policy."""

    loss_type: Literal["sigmoid", "ipo", "cdpo"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: Azar et al. 2023; cdpo: DPO with label smoothing"
    )
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint (tau of IPO)")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="cdpo: assumed probability that a label is flipped")
    precompute_ref_logprobs: bool = Field(
        True, description="reference log-probs computed once before training and cached; False: on every step"
    )
    lora_r: int = Field(0, ge=0, description="rank of LoRA adapters (peft); 0 trains every weight")
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(None, description="modules given adapters; None: peft's default")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0)


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
    critic: Literal["separate", "value_head"] = Field(
        "separate",
        description="separate: a critic network initialised from the reward model (InstructGPT); value_head: a "
        "scalar head on the policy's own transformer",
    )
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")


class P3OConfig(Section):
    """Pairwise proximal policy optimisation (Wu et al. 2023): two responses per prompt, the
    policy gradient of their reward difference. Clipping V1 or V2 is chosen by rl.algorithm."""

    steps: int = Field(20, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(32, ge=1, description="prompts per rollout, two responses each")
    minibatch_size: int = Field(16, ge=1, description="prompt pairs per gradient step")
    update_epochs: int = Field(4, ge=1, description="passes over the replay buffer after each rollout")
    buffer_size: int = Field(
        64, ge=1, description="prompt pairs kept for replay, importance-weighted against the policy that sampled them"
    )
    lr: float = Field(5e-5, gt=0)
    kl_coef: float = Field(0.1, ge=0, description="beta of the KL penalty to the SFT reference in each response's reward")
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = Field(0.2, gt=0)
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")


class RestConfig(TrainerConfig):
    """ReST (Gulcehre et al. 2023): Grow samples from the current policy, each Improve step
    fine-tunes on the samples above a rising reward threshold."""

    grow_steps: int = Field(2, ge=1, description="Grow phases")
    improve_steps: int = Field(3, ge=1, description="Improve steps per Grow, each with a higher threshold")
    n_prompts: int = Field(256, ge=1, description="training prompts sampled in each Grow")
    n_samples: int = Field(8, ge=1, description="responses per prompt in each Grow")
    thresholds: list[float] = Field(
        [0.5, 0.7, 0.9], description="reward quantiles of the Grow set that the Improve steps keep samples above"
    )
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)


class BestOfNConfig(TrainerConfig):
    """Best-of-n: the response the reward model scores highest among n samples, at inference and
    as rejection-sampling fine-tuning (the policy is fine-tuned on best-of-n responses)."""

    n: int = Field(16, ge=2, description="samples per prompt")
    n_prompts: int = Field(512, ge=1, description="training prompts whose best-of-n responses are fine-tuned on")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)


class RLConfig(Section):
    """The RL fine-tuning stage: the method that turns the SFT policy into the policy, and the
    online rounds of fresh feedback (Christiano et al. 2017) around it."""

    algorithm: Literal["ppo", "p3o_v1", "p3o_v2", "rest", "best_of_n", "dpo"] = Field(
        "ppo", description="each method reads its own section (ppo, p3o, rest, best_of_n, dpo)"
    )
    rounds: int = Field(
        1, ge=1,
        description="after each round but the last, current-policy samples are labelled afresh (simulated "
        "annotators), the reward model is updated on them and training continues",
    )
    round_prompts: int = Field(256, ge=1, description="prompts sampled (collect.k responses each) for fresh labels")
    probe_points: int = Field(
        6, ge=0,
        description="frontier measurements (KL to SFT, gold and proxy reward) per round, evenly spaced over the "
        "method's steps, plus one at the start; 0: none",
    )
    probe_prompts: int = Field(64, ge=1, description="held-out prompts each frontier measurement samples")


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
    dpo: DPOConfig = DPOConfig()
    rl: RLConfig = RLConfig()
    p3o: P3OConfig = P3OConfig()
    rest: RestConfig = RestConfig()
    best_of_n: BestOfNConfig = BestOfNConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    promotion: PromotionConfig = PromotionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if self.base.n_embd % self.base.n_head:
            raise ValueError(f"base.n_embd ({self.base.n_embd}) must be a multiple of base.n_head ({self.base.n_head})")
        if self.ppo.batch_size % self.ppo.minibatch_size:
            raise ValueError("ppo.batch_size must be a multiple of ppo.minibatch_size")
        if sorted(self.rest.thresholds) != self.rest.thresholds or len(self.rest.thresholds) != self.rest.improve_steps:
            raise ValueError("rest.thresholds must rise and hold one quantile per Improve step (rest.improve_steps)")
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
