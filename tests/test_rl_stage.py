"""The RL stage: online rounds, the frontier trace, and a kill -9 in the middle of PPO, GRPO, RLOO, NLPO and
online DPO.

The upstream stages run once on the tiny configuration; `rlhf stage rl` then runs in a
subprocess, as `dvc repro` or a Prefect worker would run it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from components.data.records import PreferencePair
from components.files import read_jsonl
from components.models import lm
from components.rl import rollout
from components.pipeline.layout import PATHS
from tests.conftest import REPO, TINY

RLHF = str(Path(sys.executable).parent / "rlhf")
ROUNDS = ["--set", "rl.rounds=2", "--set", "ppo.steps=4", "--set", "ppo.checkpoint_every=1"]
# the kill -9 test's run of each method that checkpoints: two rounds of 4 iterations, a checkpoint each
KILLED = {
    "ppo": ROUNDS,
    **{
        name: ["--set", f"rl.algorithm={name}", "--set", "rl.rounds=2", "--set", f"{name}.steps=4",
               "--set", f"{name}.checkpoint_every=1", "--set", f"{name}.batch_size=4", *group]
        for name, group in {
            "grpo": ["--set", "grpo.group_size=2", "--set", "grpo.minibatch_size=4"],
            "rloo": ["--set", "rloo.k=2", "--set", "rloo.minibatch_size=8"],
            "online_dpo": [],
            "nlpo": ["--set", "nlpo.minibatch_size=2", "--set", "nlpo.ppo_epochs=1",
                     "--set", "nlpo.mask_update_every=2"],
        }.items()
    },
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A project with every stage before rl done, configured by its own params.yaml."""
    from components.config import load_config
    from components.pipeline.stages import run_stage

    root = tmp_path_factory.mktemp("rl") / "project"
    root.mkdir()
    cfg = load_config(REPO / "params.yaml", {**TINY, "rl": {"probe_points": 2, "probe_prompts": 8, "round_prompts": 8}})
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    for stage in ("task", "pretrain", "sft", "collect", "label", "validate", "reward"):
        run_stage(stage, cfg, root)
    return root


def rl_command(root: Path, *options: str) -> list[str]:
    return [RLHF, "stage", "rl", "--root", str(root), *options]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1"}


def rl_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    return client.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'rl'", order_by=["attributes.start_time"])


def history(root: Path, run, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def policy_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / PATHS["policy"] / "model.safetensors")


# PPO's run in `make test`; the others' (their own resume is in tests/test_grpo_rloo.py, test_nlpo.py) in
# `make test-slow`
@pytest.mark.parametrize("algorithm", [a if a == "ppo" else pytest.param(a, marks=pytest.mark.slow) for a in sorted(KILLED)])
def test_a_killed_method_resumes_mid_round_without_redoing_the_finished_round(upstream, tmp_path, algorithm):
    options = KILLED[algorithm]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(upstream, reference)
    shutil.copytree(upstream, killed)
    done = subprocess.run(rl_command(reference, *options), capture_output=True, text=True, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]

    # kill -9 once round 1 (the second) has checkpointed its second iteration
    process = subprocess.Popen(rl_command(killed, *options), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=environment())
    marker = killed / "checkpoints" / "rl" / "round-1" / "step-00000002"
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / PATHS["policy"]).exists()

    resumed = subprocess.run(rl_command(killed, *options), capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    final, uninterrupted = policy_weights(killed), policy_weights(reference)
    assert final.keys() == uninterrupted.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(final[name], weight, rtol=0, atol=1e-6)
    assert not (killed / "checkpoints" / "rl").exists()  # removed once the stage finished

    # the resumed run trained only what was left, yet its record holds every step, with the values of
    # the uninterrupted run; the killed run is marked FAILED when the next one starts
    (stale, last), (whole,) = rl_runs(killed), rl_runs(reference)
    assert stale.info.status == "FAILED" and last.info.status == "FINISHED"
    assert [step for step, _ in history(killed, last, "train/kl")] == [0, 1, 2, 3, 10_000, 10_001, 10_002, 10_003]
    for key in whole.data.metrics:
        assert history(killed, last, key) == history(reference, whole, key), key
    assert last.data.metrics == whole.data.metrics
    assert last.data.metrics["round1_pairs"] > 0  # fresh labels between the rounds

    trace = read_jsonl(killed / PATHS["trace"])
    assert [row["step"] for row in trace] == [0, 2, 4, 10_002, 10_004]
    assert trace == read_jsonl(reference / PATHS["trace"])
    assert {"kl_to_sft", "gold_reward", "proxy_reward", "algorithm"} <= trace[0].keys() and trace[0]["kl_to_sft"] == 0


TINY_METHODS = {
    "p3o_v1": {"p3o": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "update_epochs": 1}},
    "p3o_v2": {"p3o": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "update_epochs": 1}},
    "rest": {"rest": {"grow_steps": 1, "improve_steps": 2, "thresholds": [0.3, 0.6], "n_prompts": 4, "n_samples": 4,
                      "batch_size": 4}},
    "best_of_n": {"best_of_n": {"n": 4, "n_prompts": 8, "batch_size": 4, "epochs": 1}},
    "dpo": {"dpo": {"batch_size": 8, "lr": 1e-4}},
    "grpo": {"grpo": {"steps": 2, "batch_size": 4, "group_size": 2, "minibatch_size": 4}},
    "rloo": {"rloo": {"steps": 2, "batch_size": 4, "k": 2, "minibatch_size": 8}},
    "online_dpo": {"online_dpo": {"steps": 2, "batch_size": 4}},
}


@pytest.mark.parametrize("algorithm", sorted(TINY_METHODS))
def test_every_method_trains_the_policy_and_traces_the_frontier(upstream, tmp_path, algorithm):
    from components.config import load_config
    from components.pipeline.stages import run_stage

    root = tmp_path / "project"
    shutil.copytree(upstream, root)
    cfg = load_config(root / "params.yaml", {"rl": {"algorithm": algorithm}, **TINY_METHODS[algorithm]})
    result = run_stage("rl", cfg, root)

    assert result.metrics and all(math.isfinite(v) for v in result.metrics.values())
    trained, sft = policy_weights(root), load_file(root / PATHS["sft"] / "model.safetensors")
    assert any(not torch.equal(trained[name], sft[name]) for name in sft)
    trace = read_jsonl(root / PATHS["trace"])
    assert trace[0]["step"] == 0 and len(trace) >= 2 and {row["algorithm"] for row in trace} == {algorithm}
    assert len(trace) <= 1 + cfg.rl.probe_points  # the start and rl.probe_points, whichever steps a method probes


def test_the_frontier_is_measured_at_evenly_spaced_steps_however_often_a_method_asks():
    from components.pipeline.policy_stages import probe_due

    def measured(total: int, points: int, calls: list[int]) -> list[int]:
        return [step for since, step in zip([-1, *calls], calls) if probe_due(step, since, total, points)]

    every_step = list(range(0, 16))
    assert measured(15, 6, every_step) == [0, 3, 5, 8, 10, 13, 15]  # 15 // 6 = 2 would have measured 8 times
    assert measured(20, 6, list(range(0, 21))) == [0, 4, 7, 10, 14, 17, 20]
    assert measured(2, 6, [0, 1, 2]) == [0, 1, 2]
    # DPO's: called at logged steps only; a point is measured at the first call on or after it
    assert measured(25, 5, [0, 10, 12, 20, 25]) == [0, 10, 20, 25]
    assert measured(15, 0, every_step) == []


def reinforce_toy(run):
    """A toy RL method registered by the test: REINFORCE on the reward source, two steps."""
    optimizer = torch.optim.SGD([p for p in run.policy.parameters() if p.requires_grad], lr=1e-3)
    metrics = {}
    for step in range(2):
        experience = rollout.collect(run.policy, run.reference, run.reward, run.tokenizer, run.prompts[:4], 1,
                                     run.sampling, missing_eos_penalty=0.0)
        logprobs = lm.response_logprobs(run.policy.train(), experience.rollout, run.sampling.temperature)
        loss = -(experience.scores * (logprobs * experience.mask).sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"loss": loss.item(), "score_mean": float(experience.scores.mean())}
        run.log(metrics, step)
        run.probe(step + 1, 2)
    return run.policy.eval(), metrics


class LongerIsBetter:
    """A toy labeler registered by the test: of two answers, the longer is chosen."""

    needs_samples = True
    calls = 0

    def label(self, samples, seed):
        LongerIsBetter.calls += 1
        by_prompt = {}
        for sample in samples:
            by_prompt.setdefault(sample.prompt, []).append(sample.completion)
        pairs = [
            PreferencePair(prompt, *sorted(answers[:2], key=len, reverse=True), source="toy")
            for prompt, answers in by_prompt.items() if len(set(answers[:2])) == 2
        ]
        return pairs, {"pairs": len(pairs)}


@pytest.fixture
def toy_plugins():
    from components import labelers, rl

    rl.register("reinforce_toy", reinforce_toy)
    labelers.register("longer", lambda context: LongerIsBetter())
    yield
    del rl.METHODS["reinforce_toy"], labelers.LABELERS["longer"]


def test_a_method_and_a_labeler_registered_from_outside_run_the_rl_stage_and_an_online_round(
    upstream, tmp_path, toy_plugins
):
    from components.config import load_config
    from components.pipeline.layout import stage_params
    from components.pipeline.stages import run_stage

    root = tmp_path / "project"
    shutil.copytree(upstream, root)
    cfg = load_config(root / "params.yaml", {"rl": {"algorithm": "reinforce_toy", "rounds": 2}, "label": {"labeler": "longer"}})
    assert "ppo" not in stage_params(cfg, "rl")  # a method without a section reads none of the others
    result = run_stage("rl", cfg, root)

    assert LongerIsBetter.calls == 1  # the fresh labels between the two rounds
    assert result.metrics["round1_pairs"] > 0 and math.isfinite(result.metrics["loss"])
    trained, sft = policy_weights(root), load_file(root / PATHS["sft"] / "model.safetensors")
    assert any(not torch.equal(trained[name], sft[name]) for name in sft)
    assert [row["step"] for row in read_jsonl(root / PATHS["trace"])] == [0, 1, 2, 10_001, 10_002]


def test_online_dpo_labels_with_the_pipelines_labeler_that_the_stage_builds_for_it(upstream, tmp_path, toy_plugins):
    from components.config import load_config
    from components.pipeline.stages import run_stage

    root = tmp_path / "project"
    shutil.copytree(upstream, root)
    overrides = {"rl": {"algorithm": "online_dpo"}, "label": {"labeler": "longer"},
                 "online_dpo": {"steps": 2, "batch_size": 4, "labeler": "label"}}
    calls = LongerIsBetter.calls
    result = run_stage("rl", load_config(root / "params.yaml", overrides), root)

    assert LongerIsBetter.calls == calls + 2  # once an iteration
    assert result.metrics["label_pairs"] > 0 and math.isfinite(result.metrics["loss"])


def test_the_rl_stage_is_keyed_by_the_chosen_method_section_only(tiny_config):
    from components.pipeline.stages import params_of

    ppo = params_of(tiny_config, "rl")
    assert "ppo" in ppo and not {"p3o", "rest", "best_of_n", "dpo"} & set(ppo)
    changed = tiny_config.model_copy(update={"rest": tiny_config.rest.model_copy(update={"n_prompts": 3})})
    assert params_of(changed, "rl") == ppo  # a PPO stage does not rerun for a ReST setting
    p3o = tiny_config.model_copy(update={"rl": tiny_config.rl.model_copy(update={"algorithm": "p3o_v2"})})
    assert "p3o" in params_of(p3o, "rl") and "ppo" not in params_of(p3o, "rl")


def test_evaluation_scores_the_proxy_with_the_reward_model_of_the_last_round(upstream, tmp_path):
    """Between online rounds the reward model trains on fresh labels; evaluation's proxy rewards
    (and so eval/proxy_win_rate_vs_sft) come from that model, not from the reward stage's."""
    from components.config import load_config
    from components.pipeline.policy_stages import latest_reward
    from components.pipeline.stages import load_reward, run_stage

    root = tmp_path / "project"
    shutil.copytree(upstream, root)
    overrides = {"rl": {"rounds": 2, "probe_points": 0}, "ppo": {"steps": 2}, "eval": {"n_prompts": 8}}
    cfg = load_config(root / "params.yaml", overrides)
    run_stage("rl", cfg, root)
    run_stage("evaluate", cfg, root)

    # evaluation again, in this process, with each reward model: the same samples (same seed), scored
    from components import evaluation
    from components.pipeline.stages import prompts_of

    policy, tokenizer = lm.load_policy(root / PATHS["policy"])
    sft_policy, _ = lm.load_policy(root / PATHS["sft"])
    last_round, reward_stage = latest_reward(cfg, str(root), tokenizer), load_reward(cfg, str(root), tokenizer)
    prompts = prompts_of(str(root), "eval")[: cfg.eval.n_prompts]
    proxy = {}
    for name, reward in (("last round", last_round), ("reward stage", reward_stage)):
        _, rows = evaluation.evaluate(policy, sft_policy, reward, tokenizer, prompts, cfg.sampling, cfg.seed + 1)
        proxy[name] = [row["proxy"] for row in rows]
    assert [row["proxy"] for row in read_jsonl(root / PATHS["completions"])] == pytest.approx(proxy["last round"], abs=1e-6)
    assert proxy["last round"] != pytest.approx(proxy["reward stage"], abs=1e-3)

    cfg = load_config(root / "params.yaml", {**overrides, "rl": {"rounds": 1, "probe_points": 0}})
    run_stage("rl", cfg, root)  # one round: the reward stage's model, unchanged
    assert not (root / PATHS["rl_reward"] / "reward.safetensors").exists()
    assert latest_reward(cfg, str(root), tokenizer).model.config.reward_mean == reward_stage.model.config.reward_mean
