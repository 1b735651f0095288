"""Promotion in the MLflow registry: every policy becomes `challenger`; `champion` moves only past the gate.

The gate has two parts: the evaluation thresholds against SFT (`gate`), and a head-to-head
against the current champion, both answering the same held-out prompts, scored by the task's gold
scorer (or the reward model for a task without one): the challenger's win-rate must exceed
`promotion.head_to_head_margin`; its 95% Wilson interval is recorded with it. With a judge
configured (`judge.base_url`), the same answers also go to the LLM judge in both orders: its
win-rate against the champion, 95% bootstrap interval and length-controlled win-rate are tags of
the version (`head_to_head.judge_*`) and metrics of its run (`eval/judge_win_rate_vs_champion`,
with the judgments as the table judge/vs_champion.json); it gates only when
`promotion.judge_margin` is set (the judge's win-rate must then exceed it too). The champion it
replaces keeps the alias `previous-champion`, which `rollback` restores.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.pipeline import tracking
from components.sections import PromotionConfig

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
KEY_METRICS = ("eval/gold_win_rate_vs_sft", "eval/proxy_win_rate_vs_sft", "eval/kl_to_sft")


class PromotionError(ValueError):
    """A promotion command cannot be carried out; the message says why."""


def gate(metrics: dict[str, float], cfg: PromotionConfig) -> list[str]:
    """Reasons the policy may not become champion against SFT; empty when it passes. The win-rate
    is the gold one, or the proxy one for a task without a gold scorer."""
    reasons = []
    name = "eval/gold_win_rate_vs_sft" if "eval/gold_win_rate_vs_sft" in metrics else "eval/proxy_win_rate_vs_sft"
    win_rate, kl = metrics.get(name, float("nan")), metrics.get("eval/kl_to_sft", float("nan"))
    if not win_rate >= cfg.min_gold_win_rate:
        reasons.append(f"{name} {win_rate:.3f} < {cfg.min_gold_win_rate}")
    if not (math.isfinite(kl) and kl <= cfg.max_kl):
        reasons.append(f"eval/kl_to_sft {kl:.3f} is not finite or exceeds {cfg.max_kl}")
    return reasons


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a win-rate measured on n prompts."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def head_to_head(
    cfg, root: str | Path, challenger_uri: str, champion_uri: str, run_id: str | None = None
) -> dict[str, float]:
    """Challenger against champion on the first `eval.n_prompts` held-out prompts, both sampled
    with the same seed: win-rate (ties one half), its 95% interval, and the prompts compared; with
    a judge configured, also the judge's verdict on the same answers (judge_win_rate, judge_ci_low,
    ..., components/pipeline/judging.py), its judgments logged to the challenger's run `run_id`."""
    import torch

    from components import evaluation, tasks
    from components.models import lm
    from components.pipeline.stages import load_reward, prompts_of

    prompts = prompts_of(str(root), "eval")[: cfg.eval.n_prompts]
    gold = tasks.make(cfg).gold
    reward = None if gold else load_reward(cfg, str(root), lm.load_policy(Path(root) / "models" / "sft")[1])
    scores, answers = [], []
    for uri in (challenger_uri, champion_uri):
        model, tokenizer = tracking.load_model(uri)
        torch.manual_seed(cfg.seed + 2)
        rollout = lm.sample(model, tokenizer, prompts, cfg.sampling.max_new_tokens, cfg.sampling.temperature,
                            cfg.sampling.top_p, engine=cfg.sampling.engine)
        answers.append(rollout.completions)
        if gold:
            scores.append([gold(p, c, e) for p, c, e in zip(prompts, rollout.completions, rollout.ended_with_eos)])
        else:
            scores.append(reward.scores(rollout).tolist())
    rate = evaluation.win_rate(*scores)
    low, high = wilson(rate, len(prompts))
    match = {"win_rate": rate, "ci_low": low, "ci_high": high, "prompts": float(len(prompts))}
    if cfg.judge.base_url:
        from components.judges import BudgetExceeded
        from components.pipeline import judging

        try:
            match |= judging.head_to_head(cfg, prompts, *answers, run_id)
        except BudgetExceeded as error:  # recorded; it fails the gate only when the judge gates
            match["judge_error"] = str(error)
    return match


def git_commit() -> str:
    """The commit of the checkout this code runs from, '-' outside git."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return done.stdout.strip() or "-"


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _tag(client: MlflowClient, name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _crown(client: MlflowClient, name: str, version: str) -> None:
    """`version` becomes champion; the champion it replaces becomes previous-champion."""
    current = _alias_version(client, name, CHAMPION)
    if current == version:
        return
    if current:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)


def _settle(cfg, root, version: str, model_uri: str, metrics: dict[str, float]) -> dict:
    """Judge `version` (the gate against SFT, then head-to-head against the current champion),
    record the decision as tags on it and crown it when it passes."""
    name, client = cfg.promotion.model_name, MlflowClient()
    reasons = gate(metrics, cfg.promotion)
    tags: dict = {}
    champion = _alias_version(client, name, CHAMPION)
    if champion and champion != version:
        run_id = client.get_model_version(name, version).run_id  # the challenger's run: the judge's records go there
        match = head_to_head(cfg, root, model_uri, f"models:/{name}/{champion}", run_id)
        tags = {f"head_to_head.{key}": value for key, value in match.items()} | {"head_to_head.champion": champion}
        if not match["win_rate"] > cfg.promotion.head_to_head_margin:
            reasons.append(
                f"head-to-head win-rate {match['win_rate']:.3f} (95% CI {match['ci_low']:.3f}-{match['ci_high']:.3f}) "
                f"against champion v{champion} is not above {cfg.promotion.head_to_head_margin}"
            )
        margin = cfg.promotion.judge_margin
        judged = {key: match.get(f"judge_{key}", float("nan")) for key in ("win_rate", "ci_low", "ci_high")}
        if margin is not None and cfg.judge.base_url and not judged["win_rate"] > margin:
            reasons.append(
                f"judge win-rate {judged['win_rate']:.3f} (95% CI {judged['ci_low']:.3f}-{judged['ci_high']:.3f}) "
                f"against champion v{champion} is not above promotion.judge_margin {margin}"
                + (f" ({match['judge_error']})" if "judge_error" in match else "")
            )
    tags |= {"gate": "passed" if not reasons else "failed", "gate_reasons": "; ".join(reasons) or "-"}
    _tag(client, name, version, tags)
    if not reasons:
        _crown(client, name, version)
    return {"model_name": name, "version": int(version), "champion": not reasons, "reasons": reasons, **tags}


def promote(model_uri: str, metrics: dict[str, float], cfg, root: str | Path, lineage: dict[str, str]) -> dict:
    """Register the policy as `challenger`, tagged with its metrics, the md5 of every dataset it
    consumed (`lineage`), the git commit and the configuration; crown it when the gate passes."""
    tags = {**metrics, **lineage, "git_commit": git_commit(), "config": json.dumps(cfg.model_dump(), sort_keys=True)}
    version = str(tracking.register(model_uri, cfg.promotion.model_name, alias=CHALLENGER, tags=tags))
    return _settle(cfg, root, version, model_uri, metrics)


def standing(cfg, policy_md5: str) -> dict | None:
    """What `promote` decided for the policy with content hash `policy_md5` registered under the
    configuration `cfg`, as it stands now (after a rollback or a newer champion, too), in the form
    `promote` returns; None when no version of `cfg.promotion.model_name` is that policy."""
    name, client = cfg.promotion.model_name, MlflowClient()
    config = json.dumps(cfg.model_dump(), sort_keys=True)
    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such registered model
        return None
    found = [v for v in found if v.tags.get("data.policy.md5") == policy_md5 and v.tags.get("config") == config]
    if not found:
        return None
    registered = max(found, key=lambda v: int(v.version))
    version, tags = str(registered.version), registered.tags
    champion = _alias_version(client, name, CHAMPION)
    reasons = [] if tags.get("gate_reasons", "-") == "-" else tags["gate_reasons"].split("; ")
    if not reasons and champion != version:
        reasons = [f"it passed the gate, but the champion is now {f'v{champion}' if champion else 'none'}"]
    return {"model_name": name, "version": int(version), "champion": champion == version, "reasons": reasons}


def promote_version(cfg, root: str | Path, version: str, force: bool = False, reason: str | None = None) -> dict:
    """`rlhf promote VERSION`: crown a registered version past the gate, or with `force` (and a
    reason, recorded as a tag) without it."""
    name, client = cfg.promotion.model_name, MlflowClient()
    if force and not reason:
        raise PromotionError("--force needs --reason, recorded on the version")
    try:
        found = client.get_model_version(name, version)
    except MlflowException:
        raise PromotionError(f"{name} has no version {version}") from None
    if not force:
        metrics = {key: float(value) for key, value in found.tags.items() if key.startswith("eval/")}
        return _settle(cfg, root, version, f"models:/{name}/{version}", metrics)
    _tag(client, name, version, {"forced": "true", "forced_reason": reason})
    _crown(client, name, version)
    return {"model_name": name, "version": int(version), "champion": True, "reasons": []}


def rollback(name: str) -> dict:
    """Champion back to `previous-champion` (that alias is then removed); returns both versions."""
    client = MlflowClient()
    previous, current = _alias_version(client, name, PREVIOUS), _alias_version(client, name, CHAMPION)
    if not previous:
        raise PromotionError(f"{name} has no previous-champion to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    if current:
        _tag(client, name, current, {"rolled_back": "true"})
    return {"model_name": name, "champion": int(previous), "demoted": int(current) if current else None}


def versions(name: str) -> list[dict]:
    """Every registered version, newest first: aliases, gate result and key metrics."""
    client = MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    rows = []
    for found in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version)):
        tags = found.tags
        rows.append({
            "version": int(found.version),
            "aliases": ",".join(sorted(a for a, v in aliases.items() if str(v) == str(found.version))) or "-",
            "gate": tags.get("gate", "-") + (" (forced)" if tags.get("forced") else ""),
            **{key.removeprefix("eval/"): tags.get(key, "-") for key in KEY_METRICS},
            "head_to_head": tags.get("head_to_head.win_rate", "-"),
        })
    return rows
