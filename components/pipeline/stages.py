"""The pipeline's stages as plain functions over a project root.

Each stage reads its inputs from the paths in `layout.PATHS`, writes its outputs there, and is
recorded as one MLflow run (params, content hashes of what it read and wrote, per-step metrics,
its model with the transformers flavor). `run_stage` is the single entry point: the Prefect tasks
call it, and so does `rlhf stage NAME`, which is what `dvc.yaml` runs.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import mlflow
import torch

from components import evaluation, world
from components.data import preferences, validation
from components.labelers import annotators
from components.models import lm
from components.pipeline import tracking
from components.rl import best_of_n, p3o, ppo, rest
from components.trainers import dpo, reward_model, sft
from components.world import gold
from components.config import PipelineConfig
from components.files import content_hash, read_jsonl, write_json, write_jsonl
from components.pipeline.layout import PATHS, STAGE_BY_NAME, Artifact, StageResult


class Outcome(NamedTuple):
    """What a stage implementation returns: summary metrics, the logged model, a report to publish."""

    metrics: dict
    model_uri: str | None = None
    report: str | None = None


class StageError(RuntimeError):
    """A stage could not run or its output failed a check; the message says what and where."""


def _path(root: str, key: str) -> Path:
    return Path(root) / PATHS[key]


def checkpoints(root: str, stage: str) -> Path:
    """Where a stage's trainer keeps the checkpoints a killed run resumes from (see `run_stage`)."""
    return Path(root) / "checkpoints" / stage


def _prepare_checkpoints(root: str, stage: str, params: dict, inputs: list[Artifact]) -> Path:
    """Checkpoints left by a killed run of the same stage on the same configuration and inputs are
    kept for its trainer to resume from; any others are stale and removed."""
    folder = checkpoints(root, stage)
    key = json.dumps({"params": params, "inputs": {a.name: a.md5 for a in inputs}}, sort_keys=True, default=str)
    stamp = folder / "run.json"
    if folder.exists() and (not stamp.is_file() or stamp.read_text() != key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    return folder


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
        metrics = sft.train(model, tokenizer, demos, base.max_length, base, cfg.seed, log, checkpoints(root, "pretrain"))
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
        model, tokenizer, demos, cfg.base.max_length, cfg.sft, cfg.seed, log, checkpoints(root, "sft"),
        packing=cfg.sft.packing, chat_template=cfg.sft.chat_template,
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
    pairs, stats = annotators.label_samples(
        read_jsonl(_path(root, "samples")), cfg.annotators.n_annotators, cfg.annotators.target_agreement, cfg.seed
    )
    write_jsonl(_path(root, "preferences"), pairs)
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


def _pairs(rows: list[dict]) -> list[reward_model.Pair]:
    return [reward_model.Pair(r["prompt"], r["chosen"], r["rejected"], float(r.get("margin") or 0.0)) for r in rows]


def train_reward_model(cfg: PipelineConfig, root: str, log) -> Outcome:
    pairs = _pairs([row for row in read_jsonl(_path(root, "preferences")) if not row.get("tie")])
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.reward.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    _, tokenizer = lm.load_policy(_path(root, "sft"))
    model = reward_model.load(_path(root, "sft"))
    metrics = reward_model.train(model, tokenizer, train_pairs, cfg.reward, cfg.seed, log, checkpoints(root, "reward"))
    metrics["eval_accuracy"] = reward_model.accuracy(model, tokenizer, eval_pairs)
    model.save_pretrained(str(_path(root, "reward")), safe_serialization=True)
    tokenizer.save_pretrained(str(_path(root, "reward")))
    description = f"Reward model ({cfg.reward.loss} loss)"
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-classification", description))




def _probing(log, probe, total: int, first_step: int):
    """A `log` that also takes a frontier measurement after each logged step of a method whose
    steps are numbered from `first_step`."""

    def wrapped(metrics: dict, step: int) -> None:
        log(metrics, step)
        probe(step - first_step + 1, total)

    return wrapped


def _train_method(
    cfg: PipelineConfig, policy, sft_policy, reward, tokenizer, prompts, pairs, seed: int, log, probe, folder: Path
):
    """One round of the configured RL method on `policy`; returns the trained policy (the same
    object, except after DPO with LoRA, whose adapters are merged) and the method's last metrics."""
    algorithm, gold_reward = cfg.rl.algorithm, gold.gold_reward
    if algorithm == "ppo":
        if cfg.ppo.critic == "value_head":
            critic = ppo.ValueHead(policy.config.hidden_size)
        else:  # initialised from the reward model, as in InstructGPT
            critic = copy.deepcopy(reward).requires_grad_(True)
        return policy, ppo.train(
            policy, sft_policy, critic, reward, tokenizer, prompts, cfg.ppo, cfg.sampling, seed, log, gold_reward,
            checkpoint_dir=folder, probe=probe,
        )
    if algorithm in ("p3o_v1", "p3o_v2"):
        return policy, p3o.train(
            policy, sft_policy, reward, tokenizer, prompts, cfg.p3o, cfg.sampling, seed, algorithm.removeprefix("p3o_"),
            log, gold_reward, checkpoint_dir=folder, probe=probe,
        )
    if algorithm == "rest":
        total = cfg.rest.grow_steps * cfg.rest.improve_steps
        return policy, rest.train(
            policy, sft_policy, reward, tokenizer, prompts, cfg.rest, cfg.sampling, seed, _probing(log, probe, total, 0),
            gold_reward,
        )
    if algorithm == "best_of_n":
        return policy, best_of_n.train(
            policy, sft_policy, reward, tokenizer, prompts, cfg.best_of_n, cfg.sampling, seed,
            _probing(log, probe, 1, 0), gold_reward,
        )
    # dpo: on the labelled pairs (and each round's fresh ones); the reward model only scores the frontier
    train_pairs = _pairs([row for row in pairs if not row.get("tie")])
    total = cfg.dpo.epochs * max(1, len(train_pairs) // cfg.dpo.batch_size)
    return dpo.train(
        policy, tokenizer, train_pairs, min(cfg.base.max_length, lm.context_length(policy)), cfg.dpo, seed,
        _probing(log, probe, total, 1), folder,
    )


def _fresh_preferences(cfg: PipelineConfig, policy, tokenizer, prompts: list[str], round_: int) -> tuple[list[dict], dict]:
    """Samples of the current policy labelled afresh by the simulated annotators."""
    chosen = random.Random(cfg.seed + round_).sample(prompts, k=min(cfg.rl.round_prompts, len(prompts)))
    repeated = [p for p in chosen for _ in range(cfg.collect.k)]
    samples = lm.sample_many(policy, tokenizer, repeated, cfg.sampling, cfg.seed + round_)
    rows = [{"prompt": p, "completion": c, "ended_with_eos": e} for p, c, e in samples]
    return annotators.label_samples(rows, cfg.annotators.n_annotators, cfg.annotators.target_agreement, cfg.seed + round_)


def reinforce(cfg: PipelineConfig, root: str, log) -> Outcome:
    """RL fine-tuning of the SFT policy with `rl.algorithm`, for `rl.rounds` online rounds.

    Between rounds, samples of the current policy get fresh simulated labels, the reward model is
    trained further on them and DPO gets them as new pairs. Each finished round is saved, so a
    killed run resumes at the round it was in (PPO also within it, from its own checkpoints).
    `rl.probe_points` times a round a frontier point (KL to SFT, gold and proxy reward on held-out
    prompts) goes to the trace that the KL-reward frontier plot draws.
    """
    folder = checkpoints(root, "rl")
    policy, tokenizer = lm.load_policy(_path(root, "sft"))
    sft_policy, _ = lm.load_policy(_path(root, "sft"))
    sft_policy.requires_grad_(False)
    reward = reward_model.load(_path(root, "reward"))
    prompts, probe_prompts = _prompts(root, "train"), _prompts(root, "eval")[: cfg.rl.probe_prompts]
    pairs = read_jsonl(_path(root, "preferences"))
    trace_file = folder / "trace.jsonl"
    finished = sorted(folder.glob("after-round-*"))  # written whole, then renamed: complete or absent
    done, round_stats = 0, {}
    if finished:
        state = finished[-1]
        progress = json.loads((state / "round.json").read_text())
        done, round_stats = progress["done"], progress["stats"]
        policy, _ = lm.load_policy(state / "policy")
        reward = reward_model.load(state / "reward")
        pairs = read_jsonl(state / "pairs.jsonl")

    metrics: dict = {}
    for round_ in range(done, cfg.rl.rounds):
        steps_before = round_ * 10_000  # frontier and MLflow steps stay increasing across rounds

        def probe(step: int, total: int) -> None:
            if cfg.rl.probe_points and (step % max(1, total // cfg.rl.probe_points) == 0 or step == total):
                point = evaluation.frontier_point(policy, sft_policy, reward, tokenizer, probe_prompts, cfg.sampling, cfg.seed)
                with open(trace_file, "a") as handle:
                    handle.write(json.dumps({"round": round_, "step": steps_before + step, **point}) + "\n")

        if round_ == 0:
            probe(0, 1)
        policy, metrics = _train_method(
            cfg, policy, sft_policy, reward, tokenizer, prompts, pairs, cfg.seed + round_,
            lambda m, step: log(m, steps_before + step), probe, folder / f"round-{round_}",
        )
        if round_ + 1 < cfg.rl.rounds:
            fresh, stats = _fresh_preferences(cfg, policy, tokenizer, prompts, round_ + 1)
            pairs = pairs + fresh
            reward_model.train(reward.requires_grad_(True), tokenizer, _pairs(fresh), cfg.reward, cfg.seed + round_ + 1)
            round_stats.update({f"round{round_ + 1}_{key}": value for key, value in stats.items()})
            partial = folder / "partial-round"
            shutil.rmtree(partial, ignore_errors=True)
            lm.save_policy(policy, tokenizer, partial / "policy")
            reward.save_pretrained(str(partial / "reward"), safe_serialization=True)
            write_jsonl(partial / "pairs.jsonl", pairs)
            (partial / "round.json").write_text(json.dumps({"done": round_ + 1, "stats": round_stats}))
            os.replace(partial, folder / f"after-round-{round_:03d}")

    trace = {}  # a step measured again after a resume keeps its last value
    for row in read_jsonl(trace_file) if trace_file.is_file() else []:
        trace[row["step"]] = {"algorithm": cfg.rl.algorithm, **row}
    write_jsonl(_path(root, "trace"), [trace[step] for step in sorted(trace)])
    lm.save_policy(policy, tokenizer, _path(root, "policy"))
    description = f"{cfg.rl.algorithm} policy"
    model_uri = tracking.log_transformers_model(policy, tokenizer, "text-generation", description)
    return Outcome({**metrics, **round_stats}, model_uri)


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
    "rl": reinforce,
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
    params = stage_params(cfg, name)
    checkpoint_folder = _prepare_checkpoints(root, name, params, inputs)
    with tracking.stage_run(name, params, inputs, parent_run_id) as run:
        outcome = IMPLEMENTATIONS[name](cfg, root, tracking.metric_logger("train"))
        outputs = [Artifact.of(root, key) for key in stage.outs + stage.metrics]
        mlflow.log_metrics({key: float(value) for key, value in outcome.metrics.items()})
        tracking.log_outputs(outputs)
    shutil.rmtree(checkpoint_folder)
    return StageResult(
        stage=name,
        outputs={a.name: a for a in outputs},
        metrics={k: float(v) for k, v in outcome.metrics.items()},
        run_id=run.info.run_id,
        model_uri=outcome.model_uri,
        report=outcome.report,
    )
