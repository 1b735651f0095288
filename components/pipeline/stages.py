"""The pipeline's stages as plain functions over a project root.

Each stage reads its inputs from the paths in `layout.PATHS`, writes its outputs there, and is
recorded as one MLflow run (params, content hashes of what it read and wrote, per-step metrics,
its model with the transformers flavor). `run_stage` is the single entry point: the Prefect tasks
call it, and so does `rlhf stage NAME`, which is what `dvc.yaml` runs. The RL and evaluation
stages are in components/pipeline/policy_stages.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import mlflow
import torch

from components import labelers, rewards, tasks, threads
from components.config import PipelineConfig
from components.data import validation
from components.data.records import PreferencePair, Sample
from components.files import content_hash, read_jsonl, write_json, write_jsonl
from components.models import lm
from components.models.training import NonFiniteError, device_description, no_logging
from components.pipeline import judging, tracking
from components.pipeline.layout import PATHS, STAGE_BY_NAME, Artifact, StageResult, stage_params
from components.tasks import chat
from components.trainers import reward_model, sft


class Outcome(NamedTuple):
    """What a stage implementation returns: summary metrics, the logged model, a report to publish."""

    metrics: dict
    model_uri: str | None = None
    report: str | None = None


class StageError(RuntimeError):
    """A stage could not run or its output failed a check; the message says what and where."""


def path(root: str, key: str) -> Path:
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


def prompts_of(root: str, split: str) -> list[str]:
    return [row["prompt"] for row in read_jsonl(path(root, "prompts")) if row["split"] == split]


def load_reward(cfg: PipelineConfig, root: str, tokenizer):
    """The reward source the reward stage wrote, with the task's references for reference metrics."""
    references = {row["prompt"]: row["reference"] for row in read_jsonl(path(root, "prompts")) if row.get("reference")}
    try:
        return rewards.load(path(root, "reward"), tokenizer, references)
    except ValueError as error:
        raise StageError(str(error)) from error


def build_task(cfg: PipelineConfig, root: str, log) -> Outcome:
    files = tasks.TaskFiles(path(root, "prompts"), path(root, "candidates"), path(root, "corpus"))
    try:
        return Outcome(tasks.make(cfg).build(files))
    except (ValueError, OSError) as error:
        raise StageError(f"task ({cfg.task.name}): {error}") from error


def pretrain(cfg: PipelineConfig, root: str, log) -> Outcome:
    base = cfg.base
    if base.pretrained:
        try:
            model, tokenizer = lm.load_policy(base.pretrained)
        except (OSError, ValueError) as error:
            raise StageError(
                f"base.pretrained: cannot load '{base.pretrained}' (offline: HF_HUB_OFFLINE=1 unless you set it to 0): {error}"
            ) from error
        metrics = {}
    else:
        documents = [row["text"] for row in read_jsonl(path(root, "corpus"))]
        tokenizer = lm.train_tokenizer(documents, base.vocab_size)
        model = lm.build_model(tokenizer, base.n_layer, base.n_head, base.n_embd, base.max_length, base.dropout)
        demos = [sft.Demonstration("", doc) for doc in documents]
        metrics = sft.train(model, tokenizer, demos, base.max_length, base, cfg.seed, log, checkpoints(root, "pretrain"))
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    if _helper_process():
        return Outcome(metrics)
    lm.save_policy(model, tokenizer, path(root, "base"))
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-generation", "Base language model"))


def supervised_fine_tune(cfg: PipelineConfig, root: str, log) -> Outcome:
    candidates = [sft.Demonstration(r["prompt"], r["response"], r.get("quality")) for r in read_jsonl(path(root, "candidates"))]
    random.Random(cfg.seed).shuffle(candidates)
    demos, dropped = sft.curate(
        candidates, cfg.sft.n_demonstrations, cfg.sft.min_words, cfg.sft.max_words, cfg.sft.min_quality
    )
    if not demos:
        raise StageError(f"sft: no demonstration left after curation ({dropped}); see the sft section's bounds")
    if not _helper_process():
        write_jsonl(path(root, "demonstrations"), [{"prompt": d.prompt, "response": d.response} for d in demos])
    model, tokenizer = lm.load_policy(path(root, "base"))
    metrics = sft.train(
        model, tokenizer, demos, min(cfg.base.max_length, lm.context_length(model)), cfg.sft, cfg.seed, log,
        checkpoints(root, "sft"), packing=cfg.sft.packing, chat_template=cfg.sft.chat_template,
        head_on_targets=cfg.sft.head_on_targets,
    )
    metrics.update({"demonstrations": len(demos), **{f"dropped_{k}": v for k, v in dropped.items()}})
    if _helper_process():
        return Outcome(metrics)
    lm.save_policy(model, tokenizer, path(root, "sft"))
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-generation", "SFT policy"))


def labeler(cfg: PipelineConfig, root: str, name: str | None = None) -> labelers.Labeler:
    """The labeler of the label stage (`data.source`, when set, is the file labeler) or `name`."""
    name = name or ("file" if cfg.data.source else cfg.label.labeler)
    context = labelers.LabelingContext(
        cfg, tasks.make(cfg).gold, path(root, "preferences").parent, judging.api_key(cfg.judge)
    )
    try:
        return labelers.make(name, context)
    except labelers.LabelingError as error:
        raise StageError(f"label: {error}") from error


def collect(cfg: PipelineConfig, root: str, log) -> Outcome:
    """K completions per sampled training prompt from the SFT policy (none when the labeler
    brings its own labels)."""
    if not labeler(cfg, root).needs_samples:
        write_jsonl(path(root, "samples"), [])
        return Outcome({"prompts": 0, "samples": 0})
    prompts = prompts_of(root, "train")
    chosen = random.Random(cfg.seed).sample(prompts, k=min(cfg.collect.n_prompts, len(prompts)))
    model, tokenizer = lm.load_policy(path(root, "sft"))
    repeated = [p for p in chosen for _ in range(cfg.collect.k)]
    samples = lm.samples_to_label(model, tokenizer, repeated, cfg.sampling, cfg.seed)
    write_jsonl(path(root, "samples"), [{**asdict(sample), "policy": "sft"} for sample in samples])
    eos_rate = sum(sample.ended_with_eos for sample in samples) / len(samples)
    return Outcome({"prompts": len(chosen), "samples": len(samples), "eos_rate": eos_rate})


def _rendered(cfg: PipelineConfig, pairs: list[PreferencePair], quarantine: Path) -> list[PreferencePair]:
    """Pairs from a file, in the policy's chat format when the task uses the chat template. The
    template adds characters: a prompt it pushes past `data.max_chars` joins the quarantine file
    with the reason, as ingest quarantines rows."""
    if not cfg.task.chat_template:
        return pairs
    render = chat.renderer(cfg)
    clean = lambda text: chat.clean_response(text, chat=True)  # noqa: E731
    kept, too_long = [], []
    for p in pairs:
        prompt = render(p.prompt)
        if len(prompt) > cfg.data.max_chars:
            reason = f"{len(prompt):,} characters once rendered with the chat template, more than data.max_chars"
            too_long.append({"file": str(quarantine.with_name("pairs.jsonl")), "row": None, "field": "prompt",
                             "reason": reason, "raw": p.to_row()})
        else:
            kept.append(PreferencePair(prompt, clean(p.chosen), clean(p.rejected), p.margin, p.tie, p.annotator,
                                       p.source, p.meta))
    if too_long:
        with open(quarantine, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n" for entry in too_long)
    return kept


def label(cfg: PipelineConfig, root: str, log) -> Outcome:
    chosen = labeler(cfg, root)
    samples = [Sample(r["prompt"], r["completion"], r["ended_with_eos"]) for r in read_jsonl(path(root, "samples"))]
    try:
        pairs, stats = chosen.label(samples, cfg.seed)
    except labelers.LabelingError as error:
        raise StageError(f"label: {error}") from error
    report = path(root, "preferences").parent / "report.json"
    if report.is_file() and not chosen.needs_samples:
        mlflow.log_artifact(str(report))
    quarantine = path(root, "preferences").parent / "quarantine.jsonl"
    if chosen.needs_samples:  # no ingest wrote it this run: start it afresh, not after a killed run's entries
        quarantine.unlink(missing_ok=True)
    pairs = _rendered(cfg, pairs, quarantine)
    if cfg.data.max_pairs and len(pairs) > cfg.data.max_pairs:
        kept = set(random.Random(cfg.seed).sample(range(len(pairs)), cfg.data.max_pairs))
        pairs = [pair for i, pair in enumerate(pairs) if i in kept]
    write_jsonl(path(root, "preferences"), [pair.to_row() for pair in pairs])
    return Outcome({**stats, "pairs_written": len(pairs)})


def _pair_tokens(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens (EOS included) of the longer of prompt + chosen and prompt + rejected, row by row;
    missing fields count as empty, the suite reports them."""

    def count(key: str) -> list[int]:
        texts = [f"{row.get('prompt') or ''}{row.get(key) or ''}" for row in rows]
        return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if rows else []

    return [max(chosen, rejected) for chosen, rejected in zip(count("chosen"), count("rejected"))]


def validate(cfg: PipelineConfig, root: str, log) -> Outcome:
    """The GX suite on the preference set, with token lengths measured by the policy's tokenizer."""
    source = path(root, "preferences")
    rows = read_jsonl(source)
    _, tokenizer = lm.load_policy(path(root, "sft"))
    docs = source.parent / "data_docs"
    report = validation.validate_preferences(
        rows, cfg.data.mostly, cfg.data.max_chars, str(source), docs, _pair_tokens(tokenizer, rows), cfg.base.max_length
    )
    validation.build_data_docs(docs)
    mlflow.log_artifacts(str(docs), "data_docs")
    write_json(path(root, "validation"), report.to_dict())
    if not report.success:
        raise StageError(report.summary())
    metrics = {"rows": report.n_rows, "failed_expectations": len(report.failures)}
    return Outcome(metrics, report=f"## Preference validation\n\n```\n{report.summary()}\n```")


def preference_pairs(root: str) -> list[PreferencePair]:
    return [PreferencePair.from_row(row) for row in read_jsonl(path(root, "preferences"))]


def train_reward_model(cfg: PipelineConfig, root: str, log) -> Outcome:
    """The reward source: a programmatic reward (`reward.function`), or a reward model trained on
    the preference set from the SFT policy or `reward.backbone`."""
    out = path(root, "reward")
    if not _helper_process():
        shutil.rmtree(out, ignore_errors=True)
    _, policy_tokenizer = lm.load_policy(path(root, "sft"))
    if cfg.reward.function:
        rewards.save_function_spec(out, cfg.reward.function)
        load_reward(cfg, root, policy_tokenizer)  # fails now, not in the rl stage, when it cannot load
        return Outcome({})
    pairs = [pair for pair in preference_pairs(root) if not pair.tie]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.reward.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    if cfg.reward.backbone:
        model, tokenizer = reward_model.load_with_tokenizer(cfg.reward.backbone, cfg.reward.max_length)
    else:
        model, tokenizer = reward_model.load(path(root, "sft")), policy_tokenizer
    metrics = reward_model.train(model, tokenizer, train_pairs, cfg.reward, cfg.seed, log, checkpoints(root, "reward"))
    metrics["eval_accuracy"] = reward_model.accuracy(model, tokenizer, eval_pairs)
    if _helper_process():
        return Outcome(metrics)
    rewards.RewardModel(model, tokenizer, text=bool(cfg.reward.backbone)).save(out)
    description = f"Reward model ({cfg.reward.loss} loss)"
    return Outcome(metrics, tracking.log_transformers_model(model, tokenizer, "text-classification", description))


def _implementations() -> dict[str, Callable[[PipelineConfig, str, Callable], Outcome]]:
    from components.pipeline import policy_stages

    return {
        "task": build_task,
        "pretrain": pretrain,
        "sft": supervised_fine_tune,
        "collect": collect,
        "label": label,
        "validate": validate,
        "reward": train_reward_model,
        "rl": policy_stages.reinforce,
        "evaluate": policy_stages.evaluate,
    }


def config_inputs(name: str, cfg: PipelineConfig) -> list[Artifact]:
    """Local files the configuration points a stage at (a preference set to ingest, a pretrained
    model folder, the task's files): inputs like the upstream outputs, so their content hash keys
    the cache too."""
    named = {
        "label": [("data.source", cfg.data.source), ("rlaif.constitution", cfg.rlaif.constitution),
                  ("rlaif.template", cfg.rlaif.template)],
        "evaluate": [("judge.template", cfg.judge.template)],
        "pretrain": [("base.pretrained", cfg.base.pretrained)],
        "reward": [("reward.backbone", cfg.reward.backbone)],
        "task": [(f"task.{key}", getattr(cfg.task, key)) for key in ("prompts", "eval_prompts", "demonstrations")],
    }.get(name, [])
    return [
        Artifact(name=setting, path=str(Path(value).resolve()), md5=content_hash(value))
        for setting, value in named
        if value and Path(value).exists()  # not a hub id or gguf: name, whose revision is their own business
    ]


def params_of(cfg: PipelineConfig, name: str) -> dict:
    """The slice of the configuration a stage reads (what dvc.yaml lists as its params)."""
    dumped = cfg.model_dump()
    return {key: dumped[key] for key in stage_params(cfg, name)}


HOLD_VARIABLE = "RLHF_TEST_HOLD_STAGE"  # set only by tests/test_faults.py


def _hold_for_a_fault_test(name: str, checkpoint_folder: Path) -> None:
    """For the kill -9 test only: with RLHF_TEST_HOLD_STAGE=NAME, stage NAME stops once it has
    written its outputs, before it records them and its MLflow run ends, touches
    `checkpoints/NAME/held` and waits there to be killed. A stage that runs for a fraction of a
    second could not otherwise be caught mid-stage reliably; this is the moment a kill does most
    harm to a stage that has no checkpoints (outputs on disk, the stage not finished)."""
    if os.environ.get(HOLD_VARIABLE) == name:
        (checkpoint_folder / "held").touch()
        time.sleep(3600)


def _helper_process() -> bool:
    """Under `accelerate launch` (components/pipeline/launch.py), a process other than the main
    one: it trains with the others, but records nothing and writes no output."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def _wait_for_every_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # initialised as the trainers' Accelerator is (components/models/training.py): the first one counts
        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def run_stage(name: str, cfg: PipelineConfig, root: str | Path, parent_run_id: str | None = None) -> StageResult | None:
    """Run one stage under `root`, recorded as an MLflow run; returns its outputs and metrics (None
    in the helper processes of a launched stage, which only train)."""
    stage, root = STAGE_BY_NAME[name], str(root)
    if _helper_process():
        _wait_for_every_process()  # the main process has prepared the checkpoint folder
        threads.use_free_cores(checkpoints(root, name))
        torch.manual_seed(cfg.seed)
        _implementations()[name](cfg, root, no_logging)
        return None
    inputs = config_inputs(name, cfg)
    for dep in stage.deps:
        try:
            inputs.append(Artifact.of(root, dep))
        except FileNotFoundError:
            raise StageError(f"stage '{name}' needs {PATHS[dep]} under {root}: run the stage that writes it first") from None
    tracking.configure(root, cfg.experiment)
    torch.manual_seed(cfg.seed)
    params = params_of(cfg, name)
    checkpoint_folder = _prepare_checkpoints(root, name, params, inputs)
    threads.use_free_cores(checkpoint_folder)  # beside other jobs, fewer threads than cores
    _wait_for_every_process()
    with tracking.stage_run(name, params, inputs, root, parent_run_id) as run:
        mlflow.set_tag(tracking.DEVICE_TAG, device_description())
        try:
            log = tracking.metric_logger("train", checkpoint_folder / tracking.METRICS_JOURNAL)
            outcome = _implementations()[name](cfg, root, log)
        except NonFiniteError as error:
            raise StageError(str(error)) from error
        _hold_for_a_fault_test(name, checkpoint_folder)
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
