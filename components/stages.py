"""The pipeline's stages as plain functions over a project root.

Each stage reads its inputs from the paths in `layout.PATHS`, writes its outputs there, and is
recorded as one MLflow run (params, content hashes of what it read and wrote, per-step metrics,
its model with the transformers flavor). `run_stage` is the single entry point: the Prefect tasks
call it, and so does `rlhf stage NAME`, which is what `dvc.yaml` runs.
"""

from __future__ import annotations

import collections
import copy
import random
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import mlflow
import torch

from components import (
    annotators, evaluation, gold, lm, ppo, preferences, reward_model, sft, tracking, validation, world,
)
from components.config import PipelineConfig
from components.layout import (
    PATHS, STAGE_BY_NAME, Artifact, StageResult, content_hash, read_jsonl, write_json, write_jsonl,
)


class Outcome(NamedTuple):
    """What a stage implementation returns: summary metrics, the logged model, a report to publish."""

    metrics: dict
    model_uri: str | None = None
    report: str | None = None


class StageError(RuntimeError):
    """A stage could not run or its output failed a check; the message says what and where."""


def _path(root: str, key: str) -> Path:
    return Path(root) / PATHS[key]


def _reviews(root: str) -> list[world.Review]:
    return [world.Review(**row) for row in read_jsonl(_path(root, "corpus"))]


def _prompts(root: str, split: str) -> list[str]:
    return [row["prompt"] for row in read_jsonl(_path(root, "prompts")) if row["split"] == split]


def build_world(cfg: PipelineConfig, root: str, log) -> Outcome:
    reviews = world.generate_reviews(
        cfg.world.n_reviews, cfg.world.eval_fraction, cfg.world.low_quality_fraction, cfg.seed
    )
    write_jsonl(_path(root, "corpus"), [asdict(r) for r in reviews])
    prompts: dict[str, str] = {}  # prompt -> split, first occurrence wins, order kept
    for review in reviews:
        prompts.setdefault(review.prompt(cfg.world.prompt_words), review.split)
    write_jsonl(_path(root, "prompts"), [{"prompt": p, "split": s} for p, s in prompts.items()])
    metrics = {
        "reviews": len(reviews),
        "train_prompts": sum(s == "train" for s in prompts.values()),
        "eval_prompts": sum(s == "eval" for s in prompts.values()),
        "low_quality_share": sum(r.low_quality for r in reviews) / len(reviews),
    }
    return Outcome(metrics)


def pretrain(cfg: PipelineConfig, root: str, log) -> Outcome:
    base = cfg.base
    if base.pretrained:
        try:
            model, tokenizer = lm.load_policy(base.pretrained)
        except OSError as error:
            raise StageError(
                f"base.pretrained: cannot load '{base.pretrained}' (offline: HF_HUB_OFFLINE=1 unless you set it to 0): {error}"
            ) from error
        metrics = {}
    else:
        documents = [r.document for r in _reviews(root) if r.split == "train"]
        tokenizer = lm.train_tokenizer(documents, base.vocab_size)
        model = lm.build_model(tokenizer, base.n_layer, base.n_head, base.n_embd, base.max_length)
        demos = [sft.Demonstration("", doc) for doc in documents]
        metrics = sft.train(model, tokenizer, demos, base.max_length, base.epochs, base.batch_size, base.lr, cfg.seed, log)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    lm.save_policy(model, tokenizer, _path(root, "base"))
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-generation", "Base language model"))


def supervised_fine_tune(cfg: PipelineConfig, root: str, log) -> Outcome:
    k = cfg.world.prompt_words
    candidates = [
        sft.Demonstration(r.prompt(k), r.completion(k)) for r in _reviews(root) if r.split == "train"
    ]
    random.Random(cfg.seed).shuffle(candidates)
    demos, dropped = sft.curate(
        candidates, cfg.sft.n_demonstrations, cfg.sft.min_words, cfg.sft.max_words, cfg.sft.min_quality
    )
    write_jsonl(_path(root, "demonstrations"), [asdict(d) for d in demos])
    model, tokenizer = lm.load_policy(_path(root, "base"))
    metrics = sft.train(
        model, tokenizer, demos, cfg.base.max_length, cfg.sft.epochs, cfg.sft.batch_size, cfg.sft.lr, cfg.seed, log
    )
    metrics.update({"demonstrations": len(demos), **{f"dropped_{k}": v for k, v in dropped.items()}})
    lm.save_policy(model, tokenizer, _path(root, "sft"))
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-generation", "SFT policy"))


def collect(cfg: PipelineConfig, root: str, log) -> Outcome:
    prompts = _prompts(root, "train")
    chosen = random.Random(cfg.seed).sample(prompts, k=min(cfg.collect.n_prompts, len(prompts)))
    model, tokenizer = lm.load_policy(_path(root, "sft"))
    repeated = [p for p in chosen for _ in range(cfg.collect.k)]
    rows = lm.sample_many(model, tokenizer, repeated, cfg.sampling, cfg.seed)
    write_jsonl(
        _path(root, "samples"),
        [{"prompt": p, "completion": c, "ended_with_eos": e, "policy": "sft"} for p, c, e in rows],
    )
    return Outcome({"prompts": len(chosen), "samples": len(rows), "eos_rate": sum(e for _, _, e in rows) / len(rows)})


def label(cfg: PipelineConfig, root: str, log) -> Outcome:
    if cfg.data.source:
        return Outcome(ingest_preferences(cfg, root))
    by_prompt: dict[str, list[annotators.Sample]] = collections.defaultdict(list)
    for row in read_jsonl(_path(root, "samples")):
        score = gold.gold_reward(row["prompt"], row["completion"], row["ended_with_eos"])
        by_prompt[row["prompt"]].append(annotators.Sample(row["prompt"], row["completion"], score))
    labels, stats = annotators.label(
        by_prompt, cfg.annotators.n_annotators, cfg.annotators.target_agreement, cfg.seed
    )
    write_jsonl(_path(root, "preferences"), annotators.as_rows(labels))
    return Outcome(stats)


def ingest_preferences(cfg: PipelineConfig, root: str) -> dict:
    """An external preference set in place of the simulated labels, read and checked row by row."""
    out = _path(root, "preferences").parent
    try:
        result = preferences.ingest(cfg.data.source, out, cfg.data)
    except preferences.DataError as error:
        raise StageError(f"data.source: {error}") from error
    mlflow.log_dict(result.report, "ingest_report.json")
    if not result.ok:
        shown = "\n".join(entry.message() for entry in result.quarantine[:20])
        raise StageError(
            f"{cfg.data.source}: {result.report['quarantined_rows']} of {result.report['rows']} rows quarantined "
            f"(more than data.max_invalid_fraction={cfg.data.max_invalid_fraction}), see {out / 'quarantine.jsonl'}\n{shown}"
        )
    return preferences.report_metrics(result.report)


def _pair_tokens(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens (EOS included) of the longer of prompt + chosen and prompt + rejected, row by row;
    missing fields count as empty, the suite reports them."""

    def count(key: str) -> list[int]:
        texts = [f"{row.get('prompt') or ''}{row.get(key) or ''}" for row in rows]
        return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if rows else []

    return [max(chosen, rejected) for chosen, rejected in zip(count("chosen"), count("rejected"))]


def validate(cfg: PipelineConfig, root: str, log) -> Outcome:
    """The GX suite on the preference set, with token lengths measured by the policy's tokenizer."""
    source = _path(root, "preferences")
    rows = read_jsonl(source)
    _, tokenizer = lm.load_policy(_path(root, "sft"))
    docs = source.parent / "data_docs"
    report = validation.validate_preferences(
        rows, cfg.data.mostly, cfg.data.max_chars, str(source), docs, _pair_tokens(tokenizer, rows), cfg.base.max_length
    )
    validation.build_data_docs(docs)
    mlflow.log_artifacts(str(docs), "data_docs")
    write_json(_path(root, "validation"), report.to_dict())
    if not report.success:
        raise StageError(report.summary())
    metrics = {"rows": report.n_rows, "failed_expectations": len(report.failures)}
    return Outcome(metrics, report=f"## Preference validation\n\n```\n{report.summary()}\n```")


def train_reward_model(cfg: PipelineConfig, root: str, log) -> Outcome:
    pairs = [reward_model.Pair(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl(_path(root, "preferences"))]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.reward.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    _, tokenizer = lm.load_policy(_path(root, "sft"))
    model = reward_model.load(_path(root, "sft"))
    metrics = reward_model.train(
        model, tokenizer, train_pairs, cfg.reward.epochs, cfg.reward.batch_size, cfg.reward.lr, cfg.seed, log
    )
    metrics["eval_accuracy"] = reward_model.accuracy(model, tokenizer, eval_pairs)
    model.save_pretrained(str(_path(root, "reward")), safe_serialization=True)
    tokenizer.save_pretrained(str(_path(root, "reward")))
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-classification", "Reward model (Bradley-Terry)"))


def train_ppo(cfg: PipelineConfig, root: str, log) -> Outcome:
    policy, tokenizer = lm.load_policy(_path(root, "sft"))
    ref_policy = copy.deepcopy(policy)
    critic = reward_model.load(_path(root, "reward"))
    reward = reward_model.load(_path(root, "reward"))
    metrics = ppo.train(
        policy, ref_policy, critic, reward, tokenizer, _prompts(root, "train"), cfg.ppo, cfg.sampling, cfg.seed,
        log, gold_reward=gold.gold_reward,
    )
    lm.save_policy(policy, tokenizer, _path(root, "policy"))
    return Outcome(metrics, tracking.log_transformers_model(policy, tokenizer, "text-generation", "PPO policy"))


def evaluate(cfg: PipelineConfig, root: str, log) -> Outcome:
    policy, tokenizer = lm.load_policy(_path(root, "policy"))
    sft_policy, _ = lm.load_policy(_path(root, "sft"))
    reward = reward_model.load(_path(root, "reward"))
    prompts = _prompts(root, "eval")[: cfg.eval.n_prompts]
    metrics, rows = evaluation.evaluate(policy, sft_policy, reward, tokenizer, prompts, cfg.sampling, cfg.seed + 1)
    write_jsonl(_path(root, "completions"), rows)
    write_json(_path(root, "eval_metrics"), metrics)
    return Outcome(metrics)


IMPLEMENTATIONS: dict[str, Callable[[PipelineConfig, str, Callable], Outcome]] = {
    "world": build_world,
    "pretrain": pretrain,
    "sft": supervised_fine_tune,
    "collect": collect,
    "label": label,
    "validate": validate,
    "reward": train_reward_model,
    "ppo": train_ppo,
    "evaluate": evaluate,
}


def config_inputs(name: str, cfg: PipelineConfig) -> list[Artifact]:
    """Local files the configuration points a stage at (a preference set to ingest, a pretrained
    model folder): inputs like the upstream outputs, so their content hash keys the cache too."""
    setting, path = {"label": ("data.source", cfg.data.source), "pretrain": ("base.pretrained", cfg.base.pretrained)}.get(
        name, (None, None)
    )
    if not path or not Path(path).exists():
        return []  # none, or a hub id: its revision is the hub's business
    return [Artifact(name=setting, path=str(Path(path).resolve()), md5=content_hash(path))]


def stage_params(cfg: PipelineConfig, name: str) -> dict:
    """The slice of the configuration a stage reads (what dvc.yaml lists as its params)."""
    dumped = cfg.model_dump()
    return {key: dumped[key] for key in STAGE_BY_NAME[name].params}


def run_stage(name: str, cfg: PipelineConfig, root: str | Path, parent_run_id: str | None = None) -> StageResult:
    """Run one stage under `root`, recorded as an MLflow run; returns its outputs and metrics."""
    stage, root = STAGE_BY_NAME[name], str(root)
    inputs = config_inputs(name, cfg)
    for dep in stage.deps:
        try:
            inputs.append(Artifact.of(root, dep))
        except FileNotFoundError:
            raise StageError(f"stage '{name}' needs {PATHS[dep]} under {root}: run the stage that writes it first") from None
    tracking.configure(root, cfg.experiment)
    torch.manual_seed(cfg.seed)
    with tracking.stage_run(name, stage_params(cfg, name), inputs, parent_run_id) as run:
        outcome = IMPLEMENTATIONS[name](cfg, root, tracking.metric_logger("train"))
        outputs = [Artifact.of(root, key) for key in stage.outs + stage.metrics]
        mlflow.log_metrics({key: float(value) for key, value in outcome.metrics.items()})
        tracking.log_outputs(outputs)
    return StageResult(
        stage=name,
        outputs={a.name: a for a in outputs},
        metrics={k: float(v) for k, v in outcome.metrics.items()},
        run_id=run.info.run_id,
        model_uri=outcome.model_uri,
        report=outcome.report,
    )
