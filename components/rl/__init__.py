"""RL methods by name: `rl.algorithm` picks one, the rl stage runs it (components/pipeline/).

Every method is one module with its configuration section and a `train(inputs: RLInputs)`
returning `(policy, metrics)` (components/rl/base.py). Adding a method is that module, its test,
one `register` line below and its section in params.yaml; a test or a plug-in can `register` one
at run time, without a section.
"""

from __future__ import annotations

from components.rl.base import RLInputs, RLMethod, TrainFn

METHODS: dict[str, RLMethod] = {}


def register(name: str, train: TrainFn, section: str | None = None, config: type | None = None) -> RLMethod:
    if name in METHODS:
        raise ValueError(f"RL method '{name}' is registered already")
    METHODS[name] = method = RLMethod(name, train, section, config)
    return method


from components.rl import best_of_n, dpo, grpo, nlpo, online_dpo, p3o, ppo, rest, rloo  # noqa: E402  (they import the base above)
from components.sections import DPOConfig  # noqa: E402

register("ppo", ppo.train, "ppo", ppo.PPOConfig)
register("p3o_v1", p3o.train_v1, "p3o", p3o.P3OConfig)
register("p3o_v2", p3o.train_v2, "p3o", p3o.P3OConfig)
register("rest", rest.train, "rest", rest.RestConfig)
register("best_of_n", best_of_n.train, "best_of_n", best_of_n.BestOfNConfig)
register("dpo", dpo.train, "dpo", DPOConfig)
register("grpo", grpo.train, "grpo", grpo.GRPOConfig)
register("rloo", rloo.train, "rloo", rloo.RLOOConfig)
register("nlpo", nlpo.train, "nlpo", nlpo.NLPOConfig)
register("online_dpo", online_dpo.train, "online_dpo", online_dpo.OnlineDPOConfig)

__all__ = ["METHODS", "RLInputs", "RLMethod", "register"]
