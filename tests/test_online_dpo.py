"""Online DPO (Guo et al. 2024): the labelling against hand-made scores and a toy labeler, the loss
step against the DPO loss computed independently (token by token, one unpadded row at a time),
training on the tiny shared policy and reward model (the mean reward of the policy's samples
rises, labelled by the reward or by simulated annotators), a crashed run that resumes exactly,
LoRA, and the configuration that selects it."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from components.data.records import PreferencePair
from components.labelers.annotators import SimulatedAnnotators
from components.models import lm
from components.rl import METHODS, RLInputs, online_dpo
from components.rl.online_dpo import OnlineDPOConfig
from components.rl.rollout import generate, score
from components.sections import SamplingConfig
from tests.conftest import REPO
from tests.rl_checks import assert_same_weights, calibrate, crash_and_resume, mean_score

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------ labelling


def test_reward_preferences_choose_the_higher_score_and_drop_ties():
    # prompts 0..3 answered by rows (0, 1), (2, 3), (4, 5), (6, 7); prompt 2's scores tie
    scores = torch.tensor([0.5, -1.0, 0.2, 0.9, 1.0, 1.0, -0.3, -0.2])
    chosen, rejected = online_dpo.reward_preferences(scores)
    assert chosen.tolist() == [0, 3, 7] and rejected.tolist() == [1, 2, 6]


class LongerIsBetter:
    """A toy labeler: of two answers the longer is chosen; equally long ones are a tie."""

    needs_samples = True

    def __init__(self):
        self.shown = []

    def label(self, samples, seed):
        self.shown.append([s.completion for s in samples])
        by_prompt = {}
        for sample in samples:
            by_prompt.setdefault(sample.prompt, []).append(sample.completion)
        pairs = [
            PreferencePair(prompt, *sorted(answers, key=len, reverse=True), tie=len(answers[0]) == len(answers[1]))
            for prompt, answers in by_prompt.items()
        ]
        return pairs, {"pairs": len(pairs), "seed": seed}


def test_labeler_preferences_map_the_verdicts_to_rows_and_leave_out_ties(tiny_tokenizer):
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    # a: the second is longer; b: identical (never shown); c: equally long (the labeler's tie); d: empty vs text
    completions = [" good", " very good", " same", " same", " one", " two", "", " fine"]
    batch = lm.make_rollout(tiny_tokenizer, prompts, completions, [True] * 8)
    labeler = LongerIsBetter()
    chosen, rejected, stats = online_dpo.labeler_preferences(labeler, batch, "<e>", seed=5)
    assert chosen.tolist() == [1, 7] and rejected.tolist() == [0, 6]
    assert labeler.shown == [[" good", " very good", " one", " two", "<e>", " fine"]]
    assert stats == {"pairs": 3, "seed": 5}
    # every pair identical: nothing to ask
    same = lm.make_rollout(tiny_tokenizer, ["a", "a"], [" x", " x"], [True, True])
    chosen, rejected, stats = online_dpo.labeler_preferences(labeler, same, "<e>", seed=6)
    assert len(chosen) == len(rejected) == 0 and stats == {} and len(labeler.shown) == 1


# ------------------------------------------------------------------------------------ the loss


def sequence_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log pi(y|x) of one unpadded row, summed token by token."""
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt_ids) + t - 1, token] for t, token in enumerate(response_ids))


def independent_dpo_loss(policy, ref_policy, batch, chosen, rejected, beta, loss_type) -> torch.Tensor:
    """The DPO (Rafailov et al. 2023, eq. 7) or IPO (Azar et al. 2023, per-token log-ratios as TRL)
    loss of the pairs, from the rows' real tokens alone."""
    losses = []
    for c, r in zip(chosen.tolist(), rejected.tolist()):
        ratios, lengths = [], []
        for row in (c, r):
            prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()
            response = batch.response_ids[row][batch.response_mask[row].bool()].tolist()
            with torch.no_grad():
                ref = sequence_logprob(ref_policy, prompt, response)
            ratios.append(sequence_logprob(policy, prompt, response) - ref)
            lengths.append(len(response))
        if loss_type == "sigmoid":
            losses.append(-F.logsigmoid(beta * (ratios[0] - ratios[1])))
        else:
            losses.append((ratios[0] / lengths[0] - ratios[1] / lengths[1] - 1 / (2 * beta)) ** 2)
    return torch.stack(losses).mean()


def moved(policy, seed: int = 0):
    """A copy of `policy` with every weight nudged, so that the log-ratios to `policy` are not 0."""
    torch.manual_seed(seed)
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return other


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_loss_and_its_gradient_equal_the_dpo_loss_computed_independently(
    loss_type, tiny_policy, tiny_tokenizer, tiny_prompts
):
    ref_policy = tiny_policy()
    policy = moved(ref_policy)
    torch.manual_seed(3)
    batch = generate(policy, tiny_tokenizer, tiny_prompts[:3], 2, SAMPLING)
    chosen, rejected = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 4])

    loss, stats = online_dpo.online_dpo_loss(policy, ref_policy, batch, chosen, rejected, 0.5, loss_type)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    expected = independent_dpo_loss(policy, ref_policy, batch, chosen, rejected, 0.5, loss_type)
    expected_grads = torch.autograd.grad(expected, list(policy.parameters()))

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() != pytest.approx(math.log(2))
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward", "kl"} <= stats.keys()


def test_an_iteration_is_one_dpo_step_on_the_reward_labelled_pairs(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    """train() with one iteration against the same iteration done by hand: the same samples (same
    seeds), the pairs by the scores, the independent DPO loss, one clipped AdamW step."""
    cfg = OnlineDPOConfig(steps=1, batch_size=6, lr=1e-3, beta=0.2, missing_eos_penalty=0.5)
    initial = tiny_policy()
    ref_policy = moved(initial)  # a reference apart from the policy: the first loss is not log 2
    logged = []
    trained, metrics = online_dpo.train(RLInputs(
        copy.deepcopy(initial), ref_policy, tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=4,
        log=lambda m, step: logged.append(m),
    ))

    policy = copy.deepcopy(initial)
    torch.manual_seed(4)
    batch = generate(policy, tiny_tokenizer, random.Random(4).sample(tiny_prompts, k=6), 2, SAMPLING)
    scores = score(tiny_reward, batch, 0.5)
    chosen, rejected = online_dpo.reward_preferences(scores)
    loss = independent_dpo_loss(policy, ref_policy, batch, chosen, rejected, 0.2, "sigmoid")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, eps=1e-5)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(policy.parameters()), 1.0)
    optimizer.step()

    assert metrics == logged[0] and metrics["pairs"] == len(chosen) == 6
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["score_gap"] == pytest.approx(float((scores[chosen] - scores[rejected]).mean()))
    for (key, weight), expected in zip(trained.named_parameters(), policy.parameters()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------- end to end


def gold_of(reward, tokenizer):
    """A gold scorer for simulated annotators: the (calibrated) tiny reward model's normalised score."""

    def gold(prompt: str, completion: str, ended_with_eos: bool) -> float:
        return float(reward.normalised(lm.make_rollout(tokenizer, [prompt], [completion], [ended_with_eos]))[0])

    return gold


TRAINED = {
    labeler: OnlineDPOConfig(steps=60, batch_size=40, lr=1e-2, beta=0.1, missing_eos_penalty=0.0, labeler=labeler)
    for labeler in ("reward", "label")
}
# the least gain, in units of the initial policy's score std: seeds 0-3 gain 0.42-0.56 with the
# reward's labels, 0.21-0.49 with the simulated annotators' noisier ones (90% agreement)
GAIN = {"reward": 0.25, "label": 0.15}


@pytest.mark.parametrize("labeler", sorted(TRAINED))
def test_train_raises_the_reward_of_the_policy_samples(labeler, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    cfg = TRAINED[labeler]
    assert METHODS["online_dpo"].train is online_dpo.train and METHODS["online_dpo"].config is OnlineDPOConfig
    policy, reward = tiny_policy(), tiny_reward
    ref_policy = copy.deepcopy(policy)
    calibrate(reward, policy, tiny_tokenizer, tiny_prompts)
    annotators = SimulatedAnnotators(gold_of(reward, tiny_tokenizer), 5, 0.9) if labeler == "label" else None
    frozen = {n: p.clone() for n, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]}
    start = mean_score(policy, reward, tiny_tokenizer, tiny_prompts, 123)
    logged, probed = [], []
    trained, metrics = METHODS["online_dpo"].train(RLInputs(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append((step, m)), probe=lambda step, total: probed.append((step, total)),
        labeler=annotators,
    ))
    end = mean_score(trained, reward, tiny_tokenizer, tiny_prompts, 123)

    assert trained is policy and metrics == logged[-1][1]
    assert [step for step, _ in logged] == list(range(cfg.steps))
    assert probed == [(step, cfg.steps) for step in range(1, cfg.steps + 1)]
    expected = {"score_mean", "pairs", "loss", "accuracy", "margin", "kl", "score_gap", "response_length", "eos_rate"}
    if labeler == "label":
        expected |= {"label_tau", "label_agreement_with_gold"}
    assert all(expected <= m.keys() and all(math.isfinite(v) for v in m.values()) for _, m in logged)
    assert logged[0][1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first samples come from the reference itself
    # the labels agree with the reward: the chosen responses score higher on average
    assert sum(m["score_gap"] for _, m in logged) > 0
    assert end > start + GAIN[labeler]
    for n, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[n]), n


# ------------------------------------------------------------------------------ resume after a crash


def test_a_crashed_run_resumes_its_policy_optimizer_and_rng(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """Checkpoints every iteration, labels from a seeded labeler; a crash in iteration 2 of 3,
    then the same call again from the initial weights (a fresh process), ends with the weights and
    metrics of an uninterrupted run."""
    initial = tiny_policy()
    cfg = OnlineDPOConfig(steps=3, batch_size=4, lr=1e-3, labeler="label", checkpoint_every=1)
    annotators = SimulatedAnnotators(gold_of(tiny_reward, tiny_tokenizer), 5, 0.7)

    def run(folder, log):
        return METHODS["online_dpo"].train(RLInputs(
            copy.deepcopy(initial), copy.deepcopy(initial), tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg,
            SAMPLING, seed=0, log=log, checkpoint_dir=folder, labeler=annotators,
        ))

    (uninterrupted, whole_metrics), (resumed, metrics) = crash_and_resume(run, tmp_path, crash_step=2)
    assert metrics == pytest.approx(whole_metrics, abs=1e-5)
    assert_same_weights(resumed, uninterrupted)
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), initial.parameters()))


def test_lora_trains_only_the_adapters_against_the_base_as_reference(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    from components.models.lora import add_lora
    from components.sections import RLConfig

    policy = add_lora(tiny_policy(), RLConfig(lora_r=4), seed=0)
    before = {key: p.clone() for key, p in policy.named_parameters()}
    logged = []
    trained, _ = METHODS["online_dpo"].train(RLInputs(
        policy, None, tiny_reward, tiny_tokenizer, tiny_prompts, [], OnlineDPOConfig(steps=2, batch_size=8, lr=1e-2),
        SAMPLING, seed=0, log=lambda m, step: logged.append(m),
    ))
    changed = {key for key, p in trained.named_parameters() if not torch.equal(p, before[key])}
    assert changed and all("lora_" in key for key in changed)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logged[1]["kl"] != pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------ configuration


def test_the_rl_stage_accepts_the_method_and_reads_its_section_only():
    from components.config import ConfigError, load_config
    from components.pipeline.layout import stage_params

    cfg = load_config(REPO / "params.yaml", {"rl": {"algorithm": "online_dpo"}, "online_dpo": {"labeler": "label"}})
    assert cfg.online_dpo.labeler == "label"
    params = stage_params(cfg, "rl")
    assert "online_dpo" in params and not {"ppo", "p3o", "grpo", "rloo", "dpo", "rest"} & set(params)
    with pytest.raises(ConfigError):
        load_config(REPO / "params.yaml", {"online_dpo": {"labeler": "judge"}})


def test_labelling_by_the_pipelines_labeler_needs_one(tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    with pytest.raises(ValueError, match="label.labeler"):
        online_dpo.train(RLInputs(
            tiny_policy(), None, tiny_reward, tiny_tokenizer, tiny_prompts, [], OnlineDPOConfig(labeler="label"),
            SAMPLING, seed=0,
        ))
