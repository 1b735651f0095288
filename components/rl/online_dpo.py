"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
2402.04792, Algorithm 1).

Offline DPO (components/rl/dpo.py) learns from a fixed preference set sampled from another
policy, whose pairs drift off-policy as the policy moves. Online DPO labels the current policy's
own samples at every step. One iteration:

1. sample: two responses y^1, y^2 ~ pi_theta(.|x) to each of `batch_size` training prompts
   (the rollout engine, components/rl/rollout.py);
2. label: an annotator picks the chosen y_w and the rejected y_l of each pair:
   - `labeler: reward` (default): the reward source's normalised score minus the missing-EOS
     penalty, the higher chosen, as TRL's OnlineDPOTrainer does with a reward model;
   - `labeler: label`: the pipeline's labeler (`label.labeler`: the simulated annotators, an LLM
     judge as the paper's AI feedback, people), the RL stage's `RLInputs.labeler`;
   a tie (equal scores, identical responses, or a labeler's tie) is no preference and is left out;
3. update: one gradient step on the DPO loss of those pairs against the frozen reference
   (`dpo_loss` of components/trainers/dpo.py, Rafailov et al. 2023, eq. 7):

       L = -mean log sigmoid(beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)])

   or IPO's (`loss_type: ipo`, each log-ratio divided by its token count, as TRL's). A log-prob
   is the sum over the sampled response tokens, EOS included where one was sampled, at
   temperature 1 as TRL's trainer computes it: the sampling temperature shapes exploration, the
   loss is on pi itself.

Every pair is labelled on-policy and used for one step, as in the paper's Algorithm 1 (TRL the
same). Both models stay in eval mode: without dropout the policy equals the reference at the first
step, as in our DPO trainer. A run checkpoints every `checkpoint_every` iterations (policy,
optimizer, RNG) and a killed run resumes from the latest, as GRPO's does.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from components.data.records import Sample
from components.models import lm
from components.progress import Bar
from components.rl.base import RLInputs
from components.rl.rollout import LoopCheckpoints, eval_mode, generate, score, trainable_parameters
from components.sections import Section
from components.trainers import dpo


class OnlineDPOConfig(Section):
    """Online DPO (Guo et al. 2024): two samples per prompt from the current policy, labelled by
    the reward source or the pipeline's labeler, one DPO step on the pairs per iteration."""

    steps: int = Field(40, ge=1, description="sample-label-update iterations, one gradient step each")
    batch_size: int = Field(64, ge=1, description="prompts per iteration, two responses each")
    labeler: Literal["reward", "label"] = Field(
        "reward",
        description="who picks the chosen response: reward: the higher score of the reward source (TRL); label: the "
        "pipeline's labeler (label.labeler)",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023)"
    )
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference (tau of IPO)")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate of the policy (or its LoRA adapters)")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")


def reward_preferences(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (chosen, rejected) of each pair of responses to a prompt (rows 2i and 2i + 1) by their
    scores: the higher scored is chosen; a pair whose scores tie is left out."""
    first, second = scores.view(-1, 2).unbind(1)
    rows = torch.arange(len(first)) * 2
    decided = first != second
    first_wins = first > second
    chosen = torch.where(first_wins, rows, rows + 1)[decided]
    rejected = torch.where(first_wins, rows + 1, rows)[decided]
    return chosen, rejected


def labeler_preferences(
    labeler, batch: lm.Rollout, empty: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Rows (chosen, rejected) of the pairs `labeler` (components/labelers/) returns for the
    responses of `batch` (rows 2i and 2i + 1 answer the same prompt), its ties left out, and its
    statistics. Two identical responses are a tie the labeler is not asked about (a judge's or a
    person's verdict costs); an empty one is shown as `empty` (the EOS token's text), as
    lm.samples_to_label shows it."""
    samples = [Sample(p, c or empty, e) for p, c, e in zip(batch.prompts, batch.completions, batch.ended_with_eos)]
    row = {}
    for i in range(0, len(samples), 2):
        if samples[i].completion != samples[i + 1].completion:
            row.setdefault((samples[i].prompt, samples[i].completion), i)
            row.setdefault((samples[i + 1].prompt, samples[i + 1].completion), i + 1)
    if not row:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), {}
    pairs, stats = labeler.label([samples[i] for i in sorted(row.values())], seed)
    decided = [pair for pair in pairs if not pair.tie]
    chosen = torch.tensor([row[pair.prompt, pair.chosen] for pair in decided], dtype=torch.long)
    rejected = torch.tensor([row[pair.prompt, pair.rejected] for pair in decided], dtype=torch.long)
    return chosen, rejected, stats


def online_dpo_loss(
    policy, ref_policy, batch: lm.Rollout, chosen: torch.Tensor, rejected: torch.Tensor, beta: float, loss_type: str
) -> tuple[torch.Tensor, dict]:
    """The DPO loss (mean over pairs) of rows `chosen` preferred to rows `rejected` of `batch`,
    computed by our DPO trainer's functions on the sampled tokens: the rows laid out as
    [chosen; rejected], sequence log-probs of the policy (with gradient) and of the reference
    (`ref_policy`, or the LoRA policy with its adapter off), then `dpo_loss`. Stats: the trainer's
    accuracy, margin and implicit rewards, and kl, the mean of log pi(y|x) - log pi_ref(y|x) over
    the labelled responses (the k1 estimate of the sequence KL(pi || pi_ref))."""
    pairs = batch.select(torch.cat([chosen, rejected]))
    logprobs, lengths = dpo.sequence_logprobs(policy, pairs)
    ref_logprobs = dpo.reference_logprobs(policy, ref_policy, pairs).to(logprobs.device)
    (chosen_lp, rejected_lp), (ref_chosen, ref_rejected) = logprobs.chunk(2), ref_logprobs.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        chosen_lp, rejected_lp, ref_chosen, ref_rejected, beta, loss_type,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )
    stats = {
        "accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "margin": float((chosen_rewards - rejected_rewards).mean()),
        "chosen_reward": float(chosen_rewards.mean()),
        "rejected_reward": float(rejected_rewards.mean()),
        "kl": float((logprobs.detach() - ref_logprobs).mean()),
    }
    return losses.mean(), stats


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` online DPO iterations in place on the policy; returns the policy and the
    last metrics. The policy, optimizer and RNG states are checkpointed every
    `cfg.checkpoint_every` iterations (and after the last) in `run.checkpoint_dir`; a killed run
    resumes from the latest. `labeler: label` needs `run.labeler`."""
    cfg: OnlineDPOConfig = run.config
    policy, ref_policy, reward, tokenizer, prompts, sampling = (
        run.policy, run.reference, run.reward, run.tokenizer, run.prompts, run.sampling
    )
    if cfg.labeler == "label" and run.labeler is None:
        raise ValueError("online_dpo.labeler=label needs the pipeline's labeler (label.labeler), and none was given")
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    eval_mode(policy, ref_policy)
    parameters = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, eps=1e-5)
    checkpoints = LoopCheckpoints(
        run.checkpoint_dir, {"policy": policy}, optimizer, rng, cfg.checkpoint_every, cfg.steps
    )
    start, metrics = checkpoints.resume()
    for step in Bar(range(start, cfg.steps), desc="online dpo", total=cfg.steps, initial=start, unit="iteration"):
        # 1. two responses per prompt from the current policy
        batch_prompts = rng.sample(prompts, k=min(cfg.batch_size, len(prompts)))
        batch = generate(policy, tokenizer, batch_prompts, 2, sampling)
        scores = score(reward, batch, cfg.missing_eos_penalty)

        # 2. preferences; the labeler's seed comes from the checkpointed sampler: a resumed run asks
        # for the same labels, and iterations do not share one (a human session is kept per seed)
        if cfg.labeler == "reward":
            (chosen, rejected), label_stats = reward_preferences(scores), {}
        else:
            chosen, rejected, label_stats = labeler_preferences(
                run.labeler, batch, tokenizer.eos_token or lm.EOS, rng.getrandbits(31)
            )

        metrics = {
            "score_mean": float(scores.mean()),
            "pairs": len(chosen),
            "response_length": float(batch.response_mask.sum(1).float().mean()),
            "eos_rate": float(np.mean(batch.ended_with_eos)),
            **{f"label_{key}": float(value) for key, value in label_stats.items()},
        }
        # 3. one DPO step on the pairs (none when every pair tied)
        if len(chosen):
            loss, stats = online_dpo_loss(policy, ref_policy, batch, chosen, rejected, cfg.beta, cfg.loss_type)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            metrics.update(loss=loss.item(), score_gap=float((scores[chosen] - scores[rejected]).mean()), **stats)
        run.log(metrics, step)
        run.probe(step + 1, cfg.steps)
        checkpoints.done(step + 1, metrics)
    return policy, metrics
