"""The pipeline on tasks other than the embedded world, end to end through Prefect, MLflow and DVC:
a `dataset` task from small files with a programmatic reward and no gold scorer, and the
hh-smollm2 recipe's code path (chat template, HH data, MiniLM reward model, LoRA PPO) on a tiny
random Llama with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from components.files import read_jsonl, write_jsonl
from components.pipeline.layout import PATHS
from tests.conftest import REPO, SHARED_DATA, make_project

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TOPICS = ["the sea", "a garden", "the city at night", "an old friend", "winter", "a long walk", "music", "the moon",
          "a quiet library", "rain", "the mountains", "a small boat", "breakfast", "a red kite", "the station"]


def word_count_reward(prompt: str, response: str) -> float:
    """A programmatic reward: longer answers (in words) score higher, up to 12 words."""
    return min(len(response.split()), 12) / 12


def small_files(folder):
    prompts = [{"prompt": f"Write one line about {topic}:", "split": "eval" if i >= 12 else "train"}
               for i, topic in enumerate(TOPICS)]
    demos = [{"prompt": f"Write one line about {topic}:", "response": f" {topic} is calm and bright today."}
             for topic in TOPICS[:12]]
    pairs = [{"prompt": f"Write one line about {topic}:", "chosen": f" I love {topic} on a slow and sunny day.",
              "rejected": " no."} for topic in TOPICS[:12]]
    for name, rows in (("prompts", prompts), ("demos", demos), ("pairs", pairs)):
        write_jsonl(folder / f"{name}.jsonl", rows)
    return folder / "prompts.jsonl", folder / "demos.jsonl", folder / "pairs.jsonl"


def tiny_gpt2(folder):
    from components.models import lm

    texts = [f"Write one line about {topic}: {topic} is lovely and the day is long." for topic in TOPICS] * 4
    tokenizer = lm.train_tokenizer(texts, 300)
    lm.save_policy(lm.build_model(tokenizer, 1, 2, 32, 96), tokenizer, folder)
    return folder


def test_a_dataset_task_with_a_programmatic_reward_and_no_gold_scorer_runs_end_to_end(tmp_path, prefect_api):
    from components.config import load_config
    from flows.pipeline import rlhf_pipeline

    root = make_project(tmp_path / "project")
    prompts, demos, pairs = small_files(tmp_path)
    cfg = load_config(REPO / "params.yaml", {
        "task": {"name": "dataset", "prompts": str(prompts), "demonstrations": str(demos)},
        "base": {"pretrained": str(tiny_gpt2(tmp_path / "base")), "max_length": 96},
        "sft": {"n_demonstrations": 12, "min_words": 1, "epochs": 1, "batch_size": 4},
        "data": {"source": str(pairs), "format": "pairs"},
        "reward": {"function": "tests.test_task_pipeline:word_count_reward"},
        "sampling": {"max_new_tokens": 10, "batch_size": 16},
        "ppo": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "critic": "value_head"},
        "rl": {"probe_points": 1, "probe_prompts": 3},
        "eval": {"n_prompts": 3},
        "promotion": {"min_gold_win_rate": 0.0},
    })
    outcome = rlhf_pipeline(config=cfg, root=str(root))

    metrics = outcome["metrics"]
    assert not [key for key in metrics if "gold" in key]  # no gold scorer, no gold numbers
    assert {"eval/proxy_win_rate_vs_sft", "eval/kl_to_sft", "eval/proxy_reward_mean"} <= metrics.keys()
    completions = read_jsonl(root / PATHS["completions"])
    assert len(completions) == 6 and {row["prompt"] for row in completions} == {
        f"Write one line about {topic}:" for topic in TOPICS[12:]
    }
    for row in completions:  # the proxy is the programmatic reward of the answer
        assert row["proxy"] == pytest.approx(word_count_reward(row["prompt"], row["completion"]))
    assert json.loads((root / PATHS["reward"] / "reward_source.json").read_text())["kind"] == "function"
    assert [row["chosen"] for row in read_jsonl(root / PATHS["preferences"])][0].startswith(" I love")
    assert outcome["promotion"]["version"] >= 1


def test_the_hh_smollm2_recipe_runs_on_a_tiny_llama_with_smollm2s_tokenizer(tmp_path, prefect_api):
    from components.config import load_config
    from flows.pipeline import rlhf_pipeline
    from tests.tiny_llama import make_tiny_llama

    root = make_project(tmp_path / "project")
    cfg = load_config(REPO / "recipes" / "hh-smollm2.yaml", {
        "task": {"prompts": str(HH), "max_prompts": 12},
        "data": {"source": str(HH), "max_pairs": 32},
        "base": {"pretrained": str(make_tiny_llama(tmp_path / "tiny-llama"))},
        "sft": {"n_demonstrations": 10, "batch_size": 4},
        "reward": {"batch_size": 8, "max_length": 64},
        "sampling": {"max_new_tokens": 8},
        "rl": {"lora_r": 4, "probe_prompts": 4},
        "ppo": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1},
        "eval": {"n_prompts": 4},
        "promotion": {"min_gold_win_rate": 0.0},
    })
    outcome = rlhf_pipeline(config=cfg, root=str(root))

    metrics = outcome["metrics"]
    assert math.isfinite(metrics["eval/proxy_win_rate_vs_sft"]) and math.isfinite(metrics["eval/kl_to_sft"])
    prompts = read_jsonl(root / PATHS["prompts"])
    assert all(row["prompt"].startswith("<|im_start|>") and row["prompt"].endswith("<|im_start|>assistant\n")
               for row in prompts)
    pairs = read_jsonl(root / PATHS["preferences"])
    assert len(pairs) == 32 and all(row["prompt"].endswith("<|im_start|>assistant\n") for row in pairs)
    assert all(not row["chosen"].startswith(" ") for row in pairs)  # HH replies lose their leading space
    weights = load_file(root / PATHS["policy"] / "model.safetensors")
    assert not [name for name in weights if "lora" in name]  # adapters merged into a plain Llama
    assert json.loads((root / PATHS["reward"] / "reward_source.json").read_text()) == {"kind": "model", "text": True}
