"""The sections of the pipeline's typed configuration (components/config.py composes them).

Each section is documented here, field by field; an RL method's own section lives in the method's
module (components/rl/). Unknown keys and wrong types are errors.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def Registered(module: str, registry: str, kind: str):
    """A name that must be a key of `module.registry`, looked up when validated (the registries
    import the modules that import these sections, so not at import time)."""

    def registered(name: str) -> str:
        names = getattr(importlib.import_module(module), registry)
        if name not in names:
            raise ValueError(f"unknown {kind} '{name}': one of {', '.join(names)}")
        return name

    return Annotated[str, AfterValidator(registered)]


# Integers are counts, sizes and seeds: past this bound a value is a mistake (seed=1e38 crashed torch).
MAX_INT = 2**31 - 1


class Section(BaseModel):
    """Every section: unknown keys are errors, floats must be finite, a number is never a boolean
    (`steps=true`) and an integer stays within MAX_INT."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _real_numbers(cls, value, info):
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(get_args(annotation)) or {annotation}
        if kinds & {int, float} and isinstance(value, bool):
            raise ValueError(f"expected a number, got the boolean {value}")
        if int in kinds and isinstance(value, (int, float)) and abs(value) > MAX_INT:
            raise ValueError(f"{value:g} is beyond the largest accepted integer, {MAX_INT}")
        return value


class WorldConfig(Section):
    """The embedded review world: a generated corpus of movie reviews and its prompts."""

    n_reviews: int = Field(6000, ge=100, le=1_000_000, description="reviews in the corpus (train and held-out)")
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
        "auto", description="auto: bf16 autocast on a GPU that supports it or, outside the RL stage, a CPU with AMX; "
        "fp32 otherwise"
    )
    checkpoint_every: int = Field(
        50, ge=0, description="optimizer steps between checkpoints a killed run resumes from; 0: none"
    )
    log_every: int = Field(
        10, ge=1, description="optimizer steps between logged training metrics, the step's own (TRL's logging_steps; "
        "each log is a write to MLflow's database: ~9 ms on a CPU here); the last step is always logged"
    )
    group_by_length: bool = Field(
        True,
        description="batches of examples of similar length, less padding (transformers' group_by_length): "
        "megabatches of up to 50 batches of the epoch's seeded permutation, each sorted by length and cut into "
        "batches, the batches shuffled, the longest first",
    )
    padding_free: bool = Field(
        False,
        description="each batch's sequences end to end in one row without padding, positions restarting and attention "
        "kept within each (pairs: with prefix_sharing, each pair's prompt and responses): the same loss, no compute "
        "spent on padding (no effect with sft.packing). The attention then spans the whole row under a "
        "block-diagonal mask: worth it where the MLP and LM head dominate (SmolLM2 on 512-token HH-RLHF: SFT 2x), "
        "not for many short sequences on a small model (the demo's pretraining: 2.7x slower)",
    )

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
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="the embedded model's dropout (embeddings, attention, residuals), which the SFT policy and the "
        "reward model keep: 0, nanoGPT's for pretraining (GPT-2's 0.1 was 10% of a pretraining step's time here)",
    )
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "BaseModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self

    @field_validator("pretrained")
    @classmethod
    def _local_folder_exists(cls, pretrained: str | None) -> str | None:
        if pretrained and (pretrained.startswith((".", "/", "~")) or Path(pretrained).exists()):
            if not Path(pretrained).expanduser().is_dir():
                raise ValueError(f"no model folder at {pretrained}")
        return pretrained


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
    head_on_targets: bool = Field(
        False,
        description="run the LM head only where the loss needs it (the tokens that predict response tokens), a "
        "chunk of positions at a time: the same loss, with less compute and memory for a large vocabulary",
    )
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "SFTConfig":
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        return self


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
    engine: Literal["generate", "bucketed"] = Field(
        "bucketed",
        description="generate: transformers' model.generate; bucketed: the same distribution from "
        "components/models/sampler.py (the prefill in length buckets, finished rows dropped from the batch, the "
        "nucleus found by topk)",
    )


class CollectConfig(Section):
    """Sampling K completions per training prompt from the SFT policy, to be labelled."""

    n_prompts: int = Field(1024, ge=1)
    k: int = Field(4, ge=2, description="completions per prompt (InstructGPT uses 4 to 9)")


class AnnotatorConfig(Section):
    """Simulated annotators: Bradley-Terry noise on the gold score."""

    n_annotators: int = Field(5, ge=1)
    target_agreement: float = Field(
        0.726, gt=0.5, lt=1, description="share of pairs two annotators label alike (InstructGPT: 0.726)"
    )
    calibrate_to: Literal["inter_annotator", "gold"] = Field(
        "inter_annotator", description="gold: target_agreement is one label's agreement with the gold ordering"
    )


class DataConfig(Section):
    """Preference data: an external set to ingest (`rlhf data ingest`, or `source` in the pipeline)
    and how every preference set is read, checked and turned into pairs (components/data/preferences.py,
    components/validation.py)."""

    source: str | None = Field(
        None, description="a file or Hugging Face dataset id the pipeline ingests instead of simulated labels"
    )
    format: Literal["auto", "pairs", "ranked", "ratings", "hh"] = Field(
        "auto", description="record type of the source rows; auto detects it from each row's fields"
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
    max_pairs: int | None = Field(
        None, ge=1, description="the label stage keeps at most this many pairs (a seeded sample, order kept)"
    )
    hf_split: str = Field("train", description="split of a Hugging Face dataset id")
    hf_subset: str | None = Field(None, description="configuration name of a Hugging Face dataset id")
    hf_data_dir: str | None = Field(None, description="folder within a Hugging Face dataset, e.g. harmless-base")


class RewardConfig(TrainerConfig):
    """The reward the RL stage optimises: a reward model trained on the preference set (the SFT
    backbone or another one, with a scalar head), or a programmatic reward (components/rewards/)."""

    function: str | None = Field(
        None,
        description="instead of a trained reward model: 'module:callable' scoring (prompt, response) -> float, or "
        "a reference-based metric of the task's references: rouge_l, bleu, bertscore",
    )
    backbone: str | None = Field(
        None,
        description="model folder (or gguf:, or hub id online) the reward model starts from; None: the SFT policy. "
        "An encoder (e.g. MiniLM) scores the decoded text",
    )
    max_length: int = Field(512, ge=16, description="tokens an encoder backbone sees; a longer row keeps its end")

    epochs: int = Field(1, ge=1, description="one pass: fresh pairs help more than repeated ones")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="pairs held out for accuracy")
    loss: Literal["bradley_terry", "ranking", "plackett_luce"] = Field(
        "bradley_terry",
        description="bradley_terry: independent pairs; ranking: the examples are prompts, all of a prompt's labelled "
        "pairs in one batch and each completion scored once (InstructGPT); plackett_luce: the likelihood of each "
        "prompt's ranking (Copeland's, from its pairs)",
    )
    use_margin: bool = Field(False, description="subtract each pair's margin inside the Bradley-Terry loss (Llama 2)")
    prefix_sharing: bool = Field(
        True, description="bradley_terry on a causal backbone: each pair in one row, the shared prefix computed once "
        "(Wang and Hegde 2024); needs the sdpa or eager attention. False: one row per response"
    )


class LoRASettings(Section):
    """LoRA adapters (peft): only the adapters train, and the reference policy is the same
    weights with the adapters switched off (one copy in memory)."""

    lora_r: int = Field(0, ge=0, description="rank of LoRA adapters (peft); 0 trains every weight")
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(None, description="modules given adapters; None: peft's default")


class DPOConfig(TrainerConfig, LoRASettings):
    """Direct preference optimisation and its variants against a frozen reference policy."""

    loss_type: Literal["sigmoid", "ipo", "cdpo"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: Azar et al. 2023; cdpo: DPO with label smoothing"
    )
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint (tau of IPO)")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="cdpo: assumed probability that a label is flipped")
    ipo_token_mean: bool = Field(
        False, description="ipo: each log-ratio divided by its completion's token count (TRL's form); false: the "
        "sequence log-ratios of the paper's eq. 17"
    )
    prefix_sharing: bool = Field(
        True, description="each pair in one row, [prompt | chosen | rejected], the prompt computed once (Wang and Hegde "
        "2024); needs the sdpa or eager attention. False: two rows, [prompt | chosen] and [prompt | rejected]"
    )
    precompute_ref_logprobs: bool = Field(
        True, description="reference log-probs computed once before training and cached; False: on every step"
    )
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0)


class RLConfig(LoRASettings):
    """The RL fine-tuning stage: the method that turns the SFT policy into the policy, and the
    online rounds of fresh feedback (Christiano et al. 2017) around it. With `lora_r` > 0 the
    method trains LoRA adapters on the SFT policy (merged into the saved policy)."""

    algorithm: Registered("components.rl", "METHODS", "RL method") = Field(
        "ppo", description="a registered RL method (components/rl/__init__.py); each reads its own section"
    )
    rounds: int = Field(
        1, ge=1,
        description="after each round but the last, current-policy samples are labelled afresh (label.labeler), "
        "a trained reward model is updated on them and training continues",
    )
    round_prompts: int = Field(256, ge=1, description="prompts sampled (collect.k responses each) for fresh labels")
    probe_points: int = Field(
        6, ge=0,
        description="frontier measurements (KL to SFT, gold and proxy reward) per round, evenly spaced over the "
        "method's steps, plus one at the start; 0: none",
    )
    probe_prompts: int = Field(64, ge=1, description="held-out prompts each frontier measurement samples")
    seed_offset: int = Field(
        0, ge=0, description="added to seed in this stage alone: another RL run on the same upstream stages "
        "(rlhf compare --seeds N runs 0..N-1)"
    )



class TaskConfig(Section):
    """Where prompts, demonstrations and the gold scorer come from (components/tasks/)."""

    name: Registered("components.tasks", "TASKS", "task") = Field(
        "world",
        description="world: the embedded review world (its `world` section, with a gold scorer); dataset: the "
        "files or Hugging Face ids below",
    )
    prompts: str | None = Field(
        None,
        description="dataset: prompts (field prompt: text, an HH transcript or chat messages; optional split "
        "train/eval and reference); .jsonl, .json, .parquet, .csv (gzip too) or a hub id",
    )
    eval_prompts: str | None = Field(None, description="dataset: held-out prompts; None: eval_fraction of `prompts`")
    demonstrations: str | None = Field(
        None, description="dataset: SFT demonstrations (prompt and response, or HH/chat conversations)"
    )
    format: Literal["auto", "plain", "hh", "messages"] = Field(
        "auto", description="how prompts and demonstrations are written; auto: per row, from their fields"
    )
    fields: dict[str, str] = Field(default_factory=dict, description="source field -> task field, e.g. {question: prompt}")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="dataset: share of prompts held out when none are marked")
    max_prompts: int | None = Field(None, ge=1, description="dataset: keep at most this many train and eval prompts each")
    chat_template: bool = Field(
        False,
        description="render every prompt with the base model tokenizer's chat template (SFT, sampling, RL, "
        "evaluation and ingested pairs alike); responses end with its end-of-turn token",
    )
    hf_split: str = Field("train", description="split of a Hugging Face dataset id")


class LabelConfig(Section):
    """Who labels the collected samples (components/labelers/); `data.source`, when set, replaces
    the label stage's labeler by the file it names."""

    labeler: Registered("components.labelers", "LABELERS", "labeler") = Field("simulated", description="a registered labeler: simulated (needs a gold scorer), ...")


class EvalConfig(Section):
    """Evaluation on held-out prompts that no stage trained on."""

    n_prompts: int = Field(256, ge=1)


class PromotionConfig(Section):
    """MLflow registration and the gate for the `champion` alias."""

    model_name: str = Field(
        "rlhf-policy", pattern=r"^[^/:]*[^/:\s][^/:]*$", description="registered model name (MLflow: no '/' or ':')"
    )
    min_gold_win_rate: float = Field(
        0.6, ge=0, le=1, description="win-rate against SFT a champion needs: the gold one, or the proxy one for a "
        "task without a gold scorer",
    )
    max_kl: float = Field(50.0, gt=0, description="largest KL to the SFT policy a champion may have")
    head_to_head_margin: float = Field(
        0.5, ge=0, lt=1,
        description="win-rate the challenger needs against the current champion on the same held-out prompts (gold "
        "scorer, else the reward model; ties count one half) to take the champion alias; its 95% interval is recorded",
    )
    judge_margin: float | None = Field(
        None, ge=0, lt=1,
        description="with a judge configured (judge.base_url), the head-to-head also asks it, both orders, and records "
        "its win-rate against the champion with a 95% interval; None: recorded only; a number: that win-rate must "
        "also exceed it",
    )


class OrchestrationConfig(Section):
    """Running the pipeline from Prefect deployments (prefect.yaml, `make up`)."""

    schedule: str = Field("0 2 * * *", description="cron schedule of the rlhf-pipeline/scheduled deployment (UTC)")
    gpu_pool: str | None = Field(
        "rlhf-gpu",
        description="the work pool the GPU deployments are deployed on (prefect.yaml: rlhf-stage/pretrain-sft, "
        "rlhf-stage/reward and rlhf-stage/rl on rlhf-gpu): set, a deployed pipeline run (not `rlhf run`) runs pretrain, "
        "sft, reward and rl as subflow runs of those deployments; None: in-process",
    )
    gpu_processes: int = Field(
        1, ge=1, le=64,
        description="processes of the pretrain, sft and reward trainers: >1 runs each under `accelerate launch "
        "--multi_gpu --num_processes N` (one per GPU of the host; without CUDA, CPU processes over gloo); rl runs in one",
    )
    retries: int = Field(2, ge=0, description="retries of a stage that failed on a transient error (a lost worker, I/O)")


class HumanConfig(Section):
    """Human labeling in the Prefect UI (deployment rlhf-label/human, labeler `human`)."""

    mode: Literal["ranking", "ratings", "pairwise"] = Field(
        "ranking",
        description="ranking: order the K completions (InstructGPT); ratings: 1-5 each; pairwise: the better of the "
        "first two",
    )
    policy: Literal["sft", "champion", "policy"] = Field(
        "sft", description="who answers: the SFT policy, the registry's champion, or the current RL policy"
    )
    session_size: int = Field(8, ge=1, description="prompts a labeling session asks about")
    timeout_s: int = Field(
        3600, ge=1, description="seconds a paused item waits for an answer; on timeout the session keeps its labels"
    )
    folder: str = Field("data/human", description="sessions are written to FOLDER/SESSION/ under the project root")




class JudgeConfig(Section):
    """An LLM judge behind any OpenAI-compatible endpoint (components/judges/): GPT-4 online, or a
    local model served by `rlhf serve`. Evaluation adds judge win-rates when `base_url` is set; the
    `ai` labeler (RLAIF) asks the same judge. The API key is read from the environment variable
    `api_key_env` (or the Prefect Secret block `api_key_secret`) and is never logged or written."""

    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1; None: no judge")
    model: str = Field("gpt-4", description="model name sent to the endpoint")
    template: str = Field(
        "alpaca_eval",
        description="a built-in template (alpaca_eval, mt_bench: pairwise; mt_bench_single: pointwise 1-10 grades) or a "
        "file with the placeholders {instruction}, {output_a}, {output_b} (pairwise) or {output} (pointwise)",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    api_key_secret: str | None = Field(
        None, description="name of a Prefect Secret block holding the key, loaded when the variable is unset"
    )
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    timeout: float = Field(60.0, gt=0, description="seconds one request may take before it is retried")
    max_retries: int = Field(
        6, ge=0, description="retries of a request after 429, 5xx, timeouts and connection errors (exponential "
        "backoff with jitter, honouring Retry-After)",
    )
    max_malformed: int = Field(
        2, ge=0, description="times a malformed or unparsable answer is asked again before it is recorded as unparsable"
    )
    max_tokens: int | None = Field(None, ge=1, description="answer length; None: the template's own")
    temperature: float = Field(0.0, ge=0, le=2)
    logprobs: bool = Field(True, description="ask for top_logprobs and read the verdict from them when returned")
    budget_tokens: int | None = Field(
        None, ge=1, description="prompt + completion tokens the judge may spend in one evaluation or labeling; then "
        "it stops with an error (answers so far are cached, so a rerun with a larger budget resumes). Checked before "
        "each request: the requests already in flight may pass it",
    )
    cache_dir: str | None = Field(
        None, description="content-addressed cache of judgments; None: $RLHF_CACHE_DIR/judgments "
        "(default ~/.cache/rlhf-pipeline/judgments)",
    )
    bootstrap_resamples: int = Field(10000, ge=100, description="resamples of the win-rate's bootstrap interval")


class RLAIFConfig(Section):
    """The `ai` labeler (RLAIF, Bai et al. 2022; Lee et al. 2023): the judge compares two samples under a
    principle drawn from a constitution, in both orders."""

    constitution: str | None = Field(
        None, description="a YAML list (or `principles:` list) or a Markdown list of principles; None: the packaged "
        "components/labelers/constitution.yaml (helpful, honest, harmless)",
    )
    template: str = Field(
        "constitution", description="the judge template: built-in 'constitution' or a file with {instruction}, "
        "{output_a}, {output_b} and {principle}",
    )
    max_pairs_per_prompt: int | None = Field(
        None, ge=1, description="pairs judged per prompt, of the K(K-1)/2; None: all of them"
    )
