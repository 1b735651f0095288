"""Promotion: register the policy in the MLflow registry; alias `champion` only past the gate."""

from __future__ import annotations

import math

from components.pipeline import tracking
from components.sections import PromotionConfig

CHAMPION = "champion"


def gate(metrics: dict[str, float], cfg: PromotionConfig) -> list[str]:
    """Reasons the policy may not become champion; empty when it passes. The win-rate is the gold
    one, or the proxy one for a task without a gold scorer."""
    reasons = []
    name = "eval/gold_win_rate_vs_sft" if "eval/gold_win_rate_vs_sft" in metrics else "eval/proxy_win_rate_vs_sft"
    win_rate, kl = metrics.get(name, float("nan")), metrics.get("eval/kl_to_sft", float("nan"))
    if not win_rate >= cfg.min_gold_win_rate:
        reasons.append(f"{name} {win_rate:.3f} < {cfg.min_gold_win_rate}")
    if not (math.isfinite(kl) and kl <= cfg.max_kl):
        reasons.append(f"eval/kl_to_sft {kl:.3f} is not finite or exceeds {cfg.max_kl}")
    return reasons


def promote(model_uri: str, metrics: dict[str, float], cfg: PromotionConfig) -> dict:
    reasons = gate(metrics, cfg)
    passed = not reasons
    version = tracking.register(
        model_uri,
        cfg.model_name,
        alias=CHAMPION if passed else None,
        tags={"gate": "passed" if passed else "failed", "gate_reasons": "; ".join(reasons) or "-", **metrics},
    )
    return {"model_name": cfg.model_name, "version": version, "champion": passed, "reasons": reasons}
