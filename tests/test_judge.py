"""LLM judges against a real local HTTP server that fails as production endpoints do (429 with
Retry-After, 500, timeouts, truncated JSON, answers without a verdict), the verdict parsing, the
win-rate statistics against independent computations, and `rlhf judge` end to end."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest
from scipy import optimize

from components.evaluation.judge import length_controlled_win_rate, win_rate_summary
from components.judges import BudgetExceeded, Comparison, JudgeClient, PairResult, judge, summary_stats, templates
from components.sections import JudgeConfig
from tests.judge_server import RETRY_AFTER_S, TEMPLATE, ScriptedJudge, hashed_fault, prefer_longer

KEY = "sk-test-0123456789abcdef-never-written"


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text(TEMPLATE)
    return str(path)


def comparisons(n: int) -> list[Comparison]:
    return [Comparison(f"Describe item {i}.", "word " * (i % 4 + 1), "term " * (3 - i % 4 + 1) + "x") for i in range(n)]


def config(url: str, template: str, cache, **extra) -> JudgeConfig:
    settings = {"base_url": url, "model": "scripted", "template": template, "cache_dir": str(cache), "timeout": 1.0,
                "concurrency": 4}
    return JudgeConfig(**{**settings, **extra})


def test_faults_lose_no_judgment_and_a_second_run_asks_nothing(tmp_path, template_file):
    with ScriptedJudge(prefer_longer, hashed_fault, slow_s=2.0) as server:
        client = JudgeClient(config(server.url, template_file, tmp_path / "cache"), KEY)
        results = judge(client, comparisons(12))
        sent = list(server.requests)

        assert len(results) == 12 and all(set(r.answers) == {"12", "21"} for r in results)  # two verdicts a pair
        keys = {request["key"] for request in sent}
        assert len(keys) == 24  # one request body per pair and order
        faults = {k: hashed_fault(k, 0) for k in keys}
        hopeless = {k for k in keys if int(k[:8], 16) % 7 == 0}  # garbage on every attempt
        assert set(faults.values()) >= {"429", "500", "timeout", "truncated", "garbage"}  # every fault was met
        # every body answered on its second request, except the hopeless ones: asked max_malformed + 1 times
        assert len(sent) == 2 * (24 - len(hopeless)) + 3 * len(hopeless)
        stats = client.stats.as_dict()
        assert stats["calls"] == len(sent) and stats["judgments"] == 24 and stats["retries"] == len(sent) - 24
        assert stats["unparsable"] == len(hopeless)
        answers = [a for r in results for a in r.answers.values()]
        assert sum(a.verdict == templates.UNPARSABLE for a in answers) == len(hopeless)
        for result in results:
            if result.preferred != templates.UNPARSABLE:
                longer = "1" if len(result.comparison.output_1) >= len(result.comparison.output_2) else "2"
                assert result.preferred in (longer, "tie")
        for key in (k for k in keys if faults[k] == "429"):  # Retry-After honoured
            first, second = [r["time"] for r in sent if r["key"] == key][:2]
            assert second - first >= RETRY_AFTER_S * 0.95
        assert all(r["authorization"] == f"Bearer {KEY}" for r in sent)

        again = JudgeClient(config(server.url, template_file, tmp_path / "cache"), KEY)
        repeated = judge(again, comparisons(12))
        assert len(server.requests) == len(sent)  # nothing asked twice
        assert again.stats.as_dict()["cache_hits"] == 24 and again.stats.as_dict()["calls"] == 0
        assert [r.preferred for r in repeated] == [r.preferred for r in results]


def test_a_judge_that_always_answers_a_yields_only_ties(tmp_path, template_file):
    with ScriptedJudge(lambda messages: "A") as server:
        client = JudgeClient(config(server.url, template_file, tmp_path / "cache"), None)
        results = judge(client, comparisons(6))
    assert [r.preferred for r in results] == ["tie"] * 6
    stats = summary_stats(client, results)
    assert stats["position_consistency"] == 0.0 and stats["unparsable_share"] == 0.0
    summary = win_rate_summary(results, resamples=200)
    assert summary["win_rate"] == summary["ci_low"] == summary["ci_high"] == 0.5 and summary["ties"] == 6


def test_pointwise_grades_each_output_and_the_higher_grade_wins(tmp_path):
    def grade(messages):
        output = re.search(r"Answer\]\n(.*)\n\[The End", messages[-1]["content"], re.S).group(1)
        return f"Fine. Rating: [[{min(10, len(output.split()))}]]"

    with ScriptedJudge(grade) as server:
        client = JudgeClient(config(server.url, "mt_bench_single", tmp_path / "cache"), None)
        results = judge(client, comparisons(5))
    for result in results:
        words = [len(result.comparison.output_1.split()), len(result.comparison.output_2.split())]
        assert [result.answers[o].verdict for o in ("1", "2")] == [float(w) for w in words]
        assert result.preferred == ("1" if words[0] > words[1] else "2" if words[0] < words[1] else "tie")


def test_budget_stops_spending_and_a_larger_budget_resumes_from_the_cache(tmp_path, template_file):
    with ScriptedJudge(prefer_longer) as server:
        tight = JudgeClient(config(server.url, template_file, tmp_path / "cache", budget_tokens=300, concurrency=1), None)
        with pytest.raises(BudgetExceeded):
            judge(tight, comparisons(4))
        assert len(server.requests) == 3  # 105 tokens each: the budget is spent after the third
        loose = JudgeClient(config(server.url, template_file, tmp_path / "cache", concurrency=1), None)
        judge(loose, comparisons(4))
        assert loose.stats.cache_hits == 3 and len(server.requests) == 8


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), (" B.", "B"), ("Output (b)", "unparsable"), ("Assistant B wins. [[A]]", "A"), ("[[C]]", "tie"),
    ("It's a tie", "tie"), ("I'd say B, because...", "B"), ("no idea", "unparsable"), ("BA", "unparsable"),
])
def test_pairwise_verdict_from_text(text, verdict):
    assert templates.parse_pairwise(text)[0] == verdict


def test_pairwise_verdict_from_top_logprobs_at_the_answer_token():
    entry = {"token": "A", "logprob": -1.2, "top_logprobs": [
        {"token": "A", "logprob": -1.2}, {"token": " B", "logprob": -0.4}, {"token": "C", "logprob": -2.0}]}
    verdict, p_a = templates.parse_pairwise("A", [entry])
    assert verdict == "B" and p_a == pytest.approx(math.exp(-1.2) / (math.exp(-1.2) + math.exp(-0.4)))
    # tokens that do not spell the text: the text decides
    assert templates.parse_pairwise("A", [{**entry, "token": "X"}]) == ("A", None)


def test_a_one_token_answer_without_a_letter_is_the_forced_choice_among_its_alternatives():
    # what SmolLM2 does with max_tokens=1: it starts a sentence, the letters are among the alternatives
    entry = {"token": "###", "logprob": -2.2, "top_logprobs": [
        {"token": "###", "logprob": -2.2}, {"token": "The", "logprob": -2.4}, {"token": "A", "logprob": -2.7},
        {"token": " B", "logprob": -3.5}]}
    verdict, p_a = templates.parse_pairwise("###", [entry])
    assert verdict == "A" and p_a == pytest.approx(math.exp(-2.7) / (math.exp(-2.7) + math.exp(-3.5)))
    # no letter among the alternatives, a longer answer, or no logprobs: unparsable as before
    assert templates.parse_pairwise("###", [{**entry, "top_logprobs": entry["top_logprobs"][:2]}]) == ("unparsable", None)
    two_tokens = [{**entry, "token": "The"}, {**entry, "token": " first"}]
    assert templates.parse_pairwise("The first", two_tokens) == ("unparsable", None)
    assert templates.parse_pairwise("###") == ("unparsable", None)
    # a pointwise one-token answer with no digit: the expected grade over the digits offered
    grade = {"token": "R", "logprob": -1.0, "top_logprobs": [
        {"token": "R", "logprob": -1.0}, {"token": "1", "logprob": math.log(0.3)},
        {"token": "5", "logprob": math.log(0.1)}]}
    assert templates.parse_grade("R", [grade]) == pytest.approx((1 * 0.3 + 5 * 0.1) / 0.4)
    assert templates.parse_grade("R", [{**grade, "top_logprobs": grade["top_logprobs"][:1]}]) is None


def test_grades_from_text_and_from_logprobs():
    assert templates.parse_grade("Rating: [[7]]") == 7.0
    assert templates.parse_grade("I give it 10 out of 10") == 10.0
    assert templates.parse_grade("terrible") is None
    tokens = [{"token": "[[", "logprob": 0.0, "top_logprobs": []},
              {"token": "7", "logprob": math.log(0.6), "top_logprobs": [
                  {"token": "7", "logprob": math.log(0.6)}, {"token": "8", "logprob": math.log(0.2)},
                  {"token": "x", "logprob": math.log(0.1)}]},
              {"token": "]]", "logprob": 0.0, "top_logprobs": []}]
    assert templates.parse_grade("[[7]]", tokens) == pytest.approx((7 * 0.6 + 8 * 0.2) / 0.8)


def _results(preferences: list[float], lengths_1: list[int], lengths_2: list[int]) -> list[PairResult]:
    names = {1.0: "1", 0.0: "2", 0.5: "tie"}
    return [PairResult(Comparison("i", "x" * a, "y" * b), {}, names[p], None)
            for p, a, b in zip(preferences, lengths_1, lengths_2)]


def test_length_controlled_win_rate_matches_an_independent_maximum_likelihood_fit():
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 50, 300)
    lengths_2 = rng.integers(100, 200, 300)
    lengths_1 = (lengths_2 + diff).astype(int)
    x = np.tanh((lengths_1 - lengths_2) / np.std(lengths_1 - lengths_2))
    p_true = 1 / (1 + np.exp(-(0.3 + 1.5 * x)))
    preferences = np.where(rng.random(300) < p_true, 1.0, 0.0)
    preferences[:30] = 0.5

    def nll(params):
        logits = params[0] + params[1] * x
        return np.sum(preferences * np.logaddexp(0, -logits) + (1 - preferences) * np.logaddexp(0, logits))

    theta = optimize.minimize(nll, [0.0, 0.0], method="BFGS").x[0]
    lc = length_controlled_win_rate(preferences.tolist(), lengths_1.tolist(), lengths_2.tolist())
    assert lc == pytest.approx(1 / (1 + math.exp(-theta)), abs=1e-4)
    # a judge that only rewards length (theta = 0) and answers that are mostly longer: a high raw
    # win-rate, a length-controlled one near a half
    diff = rng.normal(40, 50, 2000)
    x = np.tanh(diff / diff.std())
    wins = np.where(rng.random(2000) < 1 / (1 + np.exp(-3 * x)), 1.0, 0.0)
    assert wins.mean() > 0.7
    assert length_controlled_win_rate(wins.tolist(), (200 + diff).tolist(), [200] * 2000) == pytest.approx(0.5, abs=0.06)


def test_win_rate_interval_is_the_bootstrap_of_the_mean_over_prompts():
    rng = np.random.default_rng(1)
    preferences = rng.choice([0.0, 0.5, 1.0], size=400, p=[0.3, 0.2, 0.5]).tolist()
    summary = win_rate_summary(_results(preferences, [10] * 400, [10] * 400), resamples=4000)
    mean, se = np.mean(preferences), np.std(preferences) / math.sqrt(400)
    assert summary["win_rate"] == pytest.approx(mean)
    assert summary["ci_low"] == pytest.approx(mean - 1.96 * se, abs=0.01)  # normal approximation, n = 400
    assert summary["ci_high"] == pytest.approx(mean + 1.96 * se, abs=0.01)
    assert summary["lc_win_rate"] == pytest.approx(mean)  # equal lengths: nothing to control for


def test_rlhf_judge_writes_judgments_and_summary_and_never_the_key(tmp_path, template_file, monkeypatch, capsys, caplog):
    import mlflow

    from flows.cli import main

    rows = [{"instruction": f"Name thing {i}.", "input": "context" if i % 2 else "", "output": "word " * (i + 1)}
            for i in range(6)]
    (tmp_path / "ours.json").write_text(json.dumps(rows))
    (tmp_path / "base.json").write_text(json.dumps([{**row, "output": "term " * (6 - i)} for i, row in enumerate(rows)]))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = tmp_path / "project"
    root.mkdir()
    caplog.set_level(logging.DEBUG)
    with ScriptedJudge(prefer_longer) as server:
        args = ["judge", "--outputs", str(tmp_path / "ours.json"), "--baseline", str(tmp_path / "base.json"),
                "--out", str(root / "judged"), "--root", str(root), "--set", f"judge.base_url={server.url}",
                "--set", f"judge.template={template_file}", "--set", f"judge.cache_dir={root / 'cache'}"]
        assert main(args) == 0
        assert all(r["authorization"] == f"Bearer {KEY}" for r in server.requests)
    printed = capsys.readouterr()
    lines = [json.loads(line) for line in (root / "judged" / "judgments.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and sorted((l["pair"], l["order"]) for l in lines) == [(p, o) for p in range(6) for o in ("12", "21")]
    assert all({"verdict", "raw", "prompt_tokens", "completion_tokens"} <= set(line) for line in lines)
    summary = json.loads((root / "judged" / "summary.json").read_text())
    expected = np.mean([1.0 if i + 1 > 6 - i else 0.0 for i in range(6)])  # longer wins: ours from item 3 on
    assert summary["win_rate"] == pytest.approx(expected)
    assert {"ci_low", "ci_high", "lc_win_rate", "ties", "unparsable", "calls", "cache_hits"} <= set(summary)
    assert summary["calls"] == 12 and summary["cache_hits"] == 0 and summary["unparsable"] == 0
    assert "win_rate" in printed.out

    # the key: in no file under the project, no MLflow param, tag or artifact, no output or log line
    assert KEY not in printed.out + printed.err + caplog.text
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["rlhf-pipeline"], output_format="list")[0]
    assert KEY not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert run.data.metrics["eval/judge_win_rate_vs_baseline"] == pytest.approx(expected)
    table = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/judge/vs_baseline.json"))
    assert len(table["data"]) == 12


@pytest.mark.parametrize("options, code, message", [
    ([], 2, "configuration error: judge.base_url is not set"),
    (["--set", "judge.base_url=http://127.0.0.1:9/v1", "--set", "judge.template=no-such-template"], 2,
     "configuration error: judge template 'no-such-template'"),
    (["--set", "judge.base_url=http://127.0.0.1:9/v1"], 2, "data error"),
])
def test_rlhf_judge_reports_bad_settings_in_one_line(tmp_path, capsys, options, code, message):
    from flows.cli import main

    args = ["judge", "--outputs", str(tmp_path / "missing.json"), "--baseline", str(tmp_path / "missing.json"),
            "--out", str(tmp_path / "out"), "--root", str(tmp_path), *options]
    assert main(args) == code
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and len(error.splitlines()) == 1
