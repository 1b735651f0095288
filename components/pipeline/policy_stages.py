"""The RL and evaluation stages: the SFT policy trained with `rl.algorithm` over online rounds,
then compared with SFT on held-out prompts. See components/pipeline/stages.py for the others."""

from __future__ import annotations

import json
import math
import shutil

from components import evaluation, rl, tasks
from components.config import PipelineConfig
from components.files import read_jsonl, write_json, write_jsonl
from components.models import lm, lora
from components.models.training import check_finite
from components.judges import BudgetExceeded
from components.pipeline import judging, tracking
from components.pipeline.stages import (
    Outcome, StageError, checkpoints, labeler, load_reward, path, preference_pairs, prompts_of,
)
from components.rl import online
from components.trainers import sft


def _feedback(cfg: PipelineConfig, root: str) -> online.Feedback | None:
    """Where online rounds get fresh labels: the configured labeler (never the file of data.source)."""
    if cfg.rl.rounds == 1:
        return None
    chosen = labeler(cfg, root, cfg.label.labeler)
    if not chosen.needs_samples:
        raise StageError(f"rl.rounds={cfg.rl.rounds}: label.labeler '{cfg.label.labeler}' cannot label fresh samples")
    return online.Feedback(chosen, cfg.rl.round_prompts, cfg.collect.k, cfg.sampling, cfg.reward)


def _save_latest_reward(reward, root: str, rounds: int) -> None:
    """What evaluation scores the proxy reward with: the reward model as the last online round left
    it (weights and normalisation), or, after one round or with a fixed reward, a note saying that
    the reward stage's source is unchanged."""
    folder = path(root, "rl_reward")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    updated = rounds > 1 and reward.trainable
    if updated:
        reward.save_state(folder)
    write_json(folder / "rounds.json", {"rounds": rounds, "updated": updated})


def latest_reward(cfg: PipelineConfig, root: str, tokenizer):
    """The reward source the RL stage ended with (online rounds train the reward model further)."""
    reward = load_reward(cfg, root, tokenizer)
    folder = path(root, "rl_reward")
    if json.loads((folder / "rounds.json").read_text())["updated"]:
        reward.load_state(folder)
    return reward


def probe_due(step: int, since: int, total: int, points: int) -> bool:
    """Whether the frontier is measured at `step` of a round of `total`, the previous call having
    been at `since`: at the start (step 0), and at the first call on or after each of `points` steps
    evenly spaced over 1..`total` (ceil(total * i / points), the last included). A method may call at
    every step or only at logged ones (DPO's)."""
    return points > 0 and (step == 0 or any(since < math.ceil(total * i / points) <= step for i in range(1, points + 1)))


def reinforce(cfg: PipelineConfig, root: str, log) -> Outcome:
    """RL fine-tuning of the SFT policy with `rl.algorithm`, for `rl.rounds` online rounds
    (components/rl/online.py), LoRA adapters when `rl.lora_r` > 0.

    `rl.probe_points` times a round a frontier point (KL to SFT, proxy and gold reward on held-out
    prompts) goes to the trace that the KL-reward frontier plot draws.
    """
    folder = checkpoints(root, "rl")
    method = rl.METHODS[cfg.rl.algorithm]
    seed = cfg.seed + cfg.rl.seed_offset
    policy, tokenizer = lm.load_policy(path(root, "sft"))
    sft_policy, _ = lm.load_policy(path(root, "sft"))
    sft_policy.requires_grad_(False)
    reference = sft_policy
    if cfg.rl.lora_r:
        policy, reference = lora.add_lora(policy, cfg.rl, seed), None
    reward = load_reward(cfg, root, tokenizer)
    gold = tasks.make(cfg).gold
    probe_prompts = prompts_of(root, "eval")[: cfg.rl.probe_prompts]
    trace_file = folder / "trace.jsonl"

    def probe_for(round_: int, trained):
        previous = None

        def probe(step: int, total: int) -> None:
            nonlocal previous
            since, previous = step - 1 if previous is None else previous, step
            if probe_due(step, since, total, cfg.rl.probe_points):
                point = evaluation.frontier_point(
                    trained, sft_policy, reward, tokenizer, probe_prompts, cfg.sampling, cfg.seed, gold
                )
                with open(trace_file, "a") as handle:
                    handle.write(json.dumps({"round": round_, "step": round_ * online.ROUND_STEPS + step, **point}) + "\n")

        return probe

    section = getattr(cfg, method.section) if method.section else None
    inputs = rl.RLInputs(
        policy, reference, reward, tokenizer, prompts_of(root, "train"), preference_pairs(root),
        section, cfg.sampling, seed, log,
        max_length=min(cfg.base.max_length, lm.context_length(policy)),
        demonstrations=[sft.Demonstration(r["prompt"], r["response"]) for r in read_jsonl(path(root, "demonstrations"))],
        # built only for a method that labels its own samples (online_dpo.labeler=label): a labeler
        # may need what other runs lack (a gold scorer, a judge)
        labeler=labeler(cfg, root, cfg.label.labeler) if getattr(section, "labeler", None) == "label" else None,
    )
    try:
        policy, metrics = online.train_rounds(method, inputs, cfg.rl.rounds, _feedback(cfg, root), folder, probe_for)
    except ValueError as error:
        raise StageError(f"rl ({cfg.rl.algorithm}): {error}") from error
    trace = {}  # a step measured again after a resume keeps its last value
    for row in read_jsonl(trace_file) if trace_file.is_file() else []:
        trace[row["step"]] = {"algorithm": cfg.rl.algorithm, **row}
    write_jsonl(path(root, "trace"), [trace[step] for step in sorted(trace)])
    _save_latest_reward(reward, root, cfg.rl.rounds)
    policy = lora.merged(policy)
    check_finite(policy, f"rl ({cfg.rl.algorithm})")
    lm.save_policy(policy, tokenizer, path(root, "policy"))
    model_uri = tracking.log_transformers_model(policy, tokenizer, "text-generation", f"{cfg.rl.algorithm} policy")
    return Outcome(metrics, model_uri)


def evaluate(cfg: PipelineConfig, root: str, log) -> Outcome:
    policy, tokenizer = lm.load_policy(path(root, "policy"))
    sft_policy, _ = lm.load_policy(path(root, "sft"))
    reward = latest_reward(cfg, root, tokenizer)
    prompts = prompts_of(root, "eval")[: cfg.eval.n_prompts]
    metrics, rows = evaluation.evaluate(
        policy, sft_policy, reward, tokenizer, prompts, cfg.sampling, cfg.seed + 1, tasks.make(cfg).gold
    )
    if cfg.judge.base_url:  # the LLM judge's win-rate beside the reward's (components/pipeline/judging.py)
        try:
            metrics.update(judging.judge_rows(cfg, rows))
        except (BudgetExceeded, ValueError) as error:
            raise StageError(f"evaluate (judge): {error}") from error
    write_jsonl(path(root, "completions"), rows)
    write_json(path(root, "eval_metrics"), metrics)
    return Outcome(metrics)
