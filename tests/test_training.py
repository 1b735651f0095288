"""The training loop: the same loss curve however a batch is split (2 gloo processes, gradient
accumulation), and a run killed with SIGKILL resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.models.training import NonFiniteError, check_finite, micro_batches, step_batches, train_loop
from components.sections import TrainerConfig

SCRIPT = Path(__file__).with_name("train_script.py")
BIN = Path(sys.executable).parent


def train(out: Path, *options: str, processes: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), str(out), *options]
    if processes > 1:
        # --multi_gpu starts the processes through torchrun; without CUDA the loop joins them over gloo
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
                   str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def curve(out: Path) -> list[float]:
    return [loss for _, loss in sorted(json.loads((out / "curve.json").read_text()).items(), key=lambda kv: int(kv[0]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = train(out)
    assert result.returncode == 0, result.stderr
    return out


def test_two_gloo_processes_give_the_loss_curve_of_one(reference, tmp_path):
    result = train(tmp_path, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = curve(reference), curve(tmp_path)
    assert len(one) == len(two) == 12
    assert two == pytest.approx(one, rel=1e-5)
    assert one[-1] < one[0] - 0.5  # it trained


def test_gradient_accumulation_gives_the_loss_curve_of_one_batch(reference, tmp_path):
    result = train(tmp_path, "--accumulation", "2")
    assert result.returncode == 0, result.stderr
    assert curve(tmp_path) == pytest.approx(curve(reference), rel=1e-5)


def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(reference, tmp_path):
    killed = train(tmp_path, "--checkpoint-every", "2", "--kill-at", "7")
    assert killed.returncode == -9
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-00000006"]
    resumed = train(tmp_path, "--checkpoint-every", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(json.loads((tmp_path / "curve.json").read_text()), key=int) == [str(s) for s in range(7, 13)]
    final, uninterrupted = load_file(tmp_path / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(final[name], weight, rtol=0, atol=1e-6)
    # the epoch means average every step of the epoch, those before the kill too (running sums checkpointed)
    metrics, expected = json.loads((tmp_path / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text())
    assert metrics.keys() == expected.keys() and metrics == pytest.approx(expected, rel=1e-6)


class Diverging:
    """An objective whose loss turns NaN at its second optimizer step."""

    n_examples = 8
    lengths = [1] * n_examples

    def __init__(self):
        self.calls = 0

    def n_terms(self, indices: list[int]) -> int:
        return len(indices)

    def loss(self, model, indices: list[int]):
        self.calls += 1
        loss = model(torch.ones(len(indices), 2)).sum()
        return (loss * float("nan") if self.calls > 1 else loss), {}


def test_a_non_finite_loss_stops_training_with_a_clear_error(tmp_path):
    cfg = TrainerConfig(epochs=2, batch_size=4, mixed_precision="no", checkpoint_every=1)
    with pytest.raises(NonFiniteError, match="step 2: .*'loss': nan.*no model saved"):
        train_loop(torch.nn.Linear(2, 1), Diverging(), cfg, seed=0, checkpoint_dir=tmp_path)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-00000001"]  # the broken step is not checkpointed


def test_a_non_finite_weight_is_named():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="weight bias is not finite; no model saved"):
        check_finite(model, "reward")


def test_step_batches_are_a_seeded_permutation_without_a_partial_last_batch():
    batches = step_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4]
    assert len(set(batches[0] + batches[1])) == 8
    assert batches == step_batches(10, 4, seed=3, epoch=0)
    assert batches != step_batches(10, 4, seed=3, epoch=1)
    assert step_batches(3, 8, seed=0, epoch=0)[0] != []  # a dataset smaller than a batch is one step


def test_micro_batches_split_a_process_share_and_refuse_empty_ones():
    assert micro_batches([0, 1, 2, 3, 4, 5, 6, 7], process=1, n_processes=2, accumulation=2) == [[1, 3], [5, 7]]
    with pytest.raises(ValueError, match="cannot feed 2 processes x 4"):
        micro_batches([0, 1, 2, 3], process=0, n_processes=2, accumulation=4)
