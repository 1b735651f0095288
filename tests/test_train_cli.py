"""`rlhf train`: one trainer on one file, killed with SIGKILL mid-training and run again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch
from safetensors.torch import load_file

from components.models import lm
from components.models.training import device_description
from components.pipeline.tracking import DEVICE_TAG
from components.files import write_jsonl
from components.world import generate_reviews

RLHF = str(Path(sys.executable).parent / "rlhf")
SETTINGS = ["--set", "dpo.epochs=3", "--set", "dpo.batch_size=4", "--set", "dpo.checkpoint_every=1",
            "--set", "dpo.lr=1e-3", "--set", "base.max_length=48"]


def command(tmp_path: Path, out: str) -> list[str]:
    return [RLHF, "train", "dpo", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "pairs.jsonl"),
            "--out", str(tmp_path / out), "--root", str(tmp_path), *SETTINGS]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_dpo_killed_mid_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    reviews = generate_reviews(120, 0.1, 0.3, seed=0)
    torch.manual_seed(0)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    lm.save_policy(lm.build_model(tokenizer, n_layer=2, n_head=2, n_embd=64, max_length=64), tokenizer, tmp_path / "model")
    good = [r for r in reviews if r.sentiment > 0]
    bad = [r for r in reviews if r.sentiment <= 0]
    write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": g.prompt(3), "chosen": g.completion(3), "rejected": b.completion(3)} for g, b in zip(good, bad)
    ][:40])

    reference = subprocess.run(command(tmp_path, "reference"), capture_output=True, text=True, env=environment())
    assert reference.returncode == 0, reference.stderr[-3000:]

    process = subprocess.Popen(command(tmp_path, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=environment())
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step-0000000[3-9]")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = subprocess.run(command(tmp_path, "killed"), capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, uninterrupted = load_file(tmp_path / "killed" / "model.safetensors"), load_file(
        tmp_path / "reference" / "model.safetensors"
    )
    assert final.keys() == uninterrupted.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(final[name], weight, rtol=0, atol=1e-6)
    assert "accuracy" in resumed.stdout and "model saved to" in resumed.stdout


def test_train_sft_names_a_bad_row_then_trains_on_the_fixed_file(tmp_path):
    reviews = generate_reviews(60, 0.1, 0.3, seed=1)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    lm.save_policy(lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64), tokenizer, tmp_path / "model")
    rows = [{"prompt": r.prompt(3), "response": r.completion(3)} for r in reviews[:16]]
    write_jsonl(tmp_path / "demos.jsonl", rows[:5] + [{"prompt": "Heat:", "answer": "wrong field"}] + rows[5:])
    args = [RLHF, "train", "sft", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "demos.jsonl"),
            "--out", str(tmp_path / "sft"), "--root", str(tmp_path), "--set", "sft.batch_size=4"]

    bad = subprocess.run(args, capture_output=True, text=True, env=environment())
    assert bad.returncode == 2 and bad.stderr.startswith("data error:") and len(bad.stderr.splitlines()) == 1
    assert f"{tmp_path / 'demos.jsonl'}, row 6, field 'response': missing field" in bad.stderr

    write_jsonl(tmp_path / "demos.jsonl", rows)
    good = subprocess.run(args, capture_output=True, text=True, env=environment())
    assert good.returncode == 0, good.stderr[-3000:]
    assert "demonstrations: 16.0000" in good.stdout
    model, _ = lm.load_policy(tmp_path / "sft")
    assert not (tmp_path / "sft" / "checkpoints").exists()


def test_train_reward_saves_a_scored_model_with_its_normalisation(tmp_path):
    reviews = generate_reviews(80, 0.1, 0.3, seed=2)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    lm.save_policy(lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64), tokenizer, tmp_path / "sft")
    good, bad = [r for r in reviews if r.sentiment > 0], [r for r in reviews if r.sentiment <= 0]
    write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": g.prompt(3), "chosen": g.completion(3), "rejected": b.completion(3), "margin": 1.0}
        for g, b in zip(good, bad)
    ][:24])
    result = subprocess.run(
        [RLHF, "train", "reward", "--model", str(tmp_path / "sft"), "--data", str(tmp_path / "pairs.jsonl"),
         "--out", str(tmp_path / "rm"), "--root", str(tmp_path), "--set", "reward.batch_size=4",
         "--set", "reward.use_margin=true", "--set", "base.max_length=64"],
        capture_output=True, text=True, env=environment(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_pairs: 22.0000" in result.stdout and "eval_accuracy" in result.stdout
    from components.trainers import reward_model

    model, tokenizer = reward_model.load_with_tokenizer(tmp_path / "rm")
    assert model.config.reward_std > 0 and model.config.pad_token_id == tokenizer.pad_token_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id])
    # the command ran on the one thread environment() asks for, whatever this process uses
    assert run.data.tags[DEVICE_TAG] == re.sub(r"threads \d+", "threads 1", device_description())
    assert run.data.metrics["train_pairs"] == 22
    scores = reward_model.score_texts(model, tokenizer, ["Heat: I watched"] * 2, [" a fine film.", " dull."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_train_checks_the_data_before_the_model_and_an_offline_hub_id_fails_at_once(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not a folder here, and the hub is offline
    first = subprocess.run([RLHF, "train", "sft", "--model", hub_id, "--data", str(bad), "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, env=environment(), cwd=tmp_path)
    assert first.returncode == 2 and "data error" in first.stderr and "row 2" in first.stderr and "'response'" in first.stderr
    assert len(first.stderr.splitlines()) == 1

    bad.write_text('{"prompt": "p", "response": "r"}\n')
    second = subprocess.run([RLHF, "train", "sft", "--model", hub_id, "--data", str(bad), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=environment(), cwd=tmp_path)
    assert second.returncode == 2 and second.stderr.startswith("model error:") and len(second.stderr.splitlines()) == 1
    # refused before any hub client call (which retried for 68 s before failing)
    assert hub_id in second.stderr and "offline (HF_HUB_OFFLINE=1)" in second.stderr
