"""Every RL method on the accelerator (issue 13): `rollout.on_accelerator` puts policy, reference
and reward model on the device the supervised trainers use and runs the method's forward passes
under their mixed-precision autocast, the weights staying float32. On a CPU, bf16 autocast forced
with mixed_precision="bf16" exercises the plumbing that `auto` selects on a GPU with bf16 (a
CPU with AMX: only for the trainers before the RL stage)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState

from components.models.training import (
    check_finite, cpu_float32, device_description, make_accelerator, placement, resolve_precision,
)
from components.rl import METHODS, RLInputs
from components.rl.best_of_n import BestOfNConfig
from components.rl.grpo import GRPOConfig
from components.rl.nlpo import NLPOConfig
from components.rl.online_dpo import OnlineDPOConfig
from components.rl.p3o import P3OConfig
from components.rl.ppo import PPOConfig
from components.rl.rest import RestConfig
from components.rl.rloo import RLOOConfig
from components.rl.rollout import on_accelerator
from components.sections import SamplingConfig

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate fixes the precision of a process's first Accelerator; these tests build bf16 ones
    (ReST's and best-of-n's fine-tuning) where other tests build fp32 ones."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_auto_means_bf16_where_the_device_has_bf16_matrix_units(monkeypatch):
    assert resolve_precision("no") == "no" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto") == "no" and device_description().endswith("AMX bf16 no")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert device_description() == f"cpu AVX2, cores {os.cpu_count()}, threads 1, AMX bf16 no"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto") == "bf16" and device_description().endswith("AMX bf16 yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_precision("auto") == "no" and device_description() == "cuda NVIDIA H200, bf16 no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto") == "bf16" and device_description() == "cuda NVIDIA H200, bf16 yes"


def test_auto_keeps_the_rl_stage_of_a_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with cpu_float32():
        assert resolve_precision("auto") == "no" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with cpu_float32():
        assert resolve_precision("auto") == "bf16"


def test_stages_of_one_process_train_in_their_own_sections_precisions():
    """accelerate refuses a second precision in a process; make_accelerator resets it between
    stages and keeps the distributed state."""
    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
    assert PartialState._shared_state  # never reset


def test_placement_is_the_trainers_device_with_bf16_autocast_when_asked():
    device, dtype = placement("bf16")
    assert device == make_accelerator("bf16").device and dtype == torch.bfloat16
    assert placement("no") == (device, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU")
def test_auto_places_on_the_cpu_in_its_precision():
    dtype = torch.bfloat16 if torch.cpu._is_amx_tile_supported() else torch.float32
    assert placement("auto") == (torch.device("cpu"), dtype)


def _head_dtypes(model, head: str) -> set[torch.dtype]:
    """The dtypes of `model.head`'s outputs in the forward passes to come (copies of the model
    made later record into the same set: PPO's critic, NLPO's mask policy)."""
    seen: set[torch.dtype] = set()
    getattr(model, head).register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    return seen


# one or two iterations of each method that samples; ReST and best-of-n fine-tune in the
# precision of their own (trainer) section, the others take `mixed_precision` as given
RUNS = {
    "ppo": PPOConfig(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3),
    "ppo-value-head": PPOConfig(steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1, critic="value_head"),
    "p3o_v1": P3OConfig(steps=1, batch_size=4, minibatch_size=2, update_epochs=1),
    "grpo": GRPOConfig(steps=1, batch_size=2, group_size=2, minibatch_size=2),
    "rloo": RLOOConfig(steps=1, batch_size=2, k=2, minibatch_size=None),
    "online_dpo": OnlineDPOConfig(steps=2, batch_size=4),
    "nlpo": NLPOConfig(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, mask_update_every=1),
    "rest": RestConfig(
        grow_steps=1, improve_steps=1, thresholds=[-100.0], n_prompts=2, n_samples=2, with_demonstrations=False,
        batch_size=2, checkpoint_every=0, mixed_precision="bf16",
    ),
    "best_of_n": BestOfNConfig(n=2, n_prompts=2, epochs=1, batch_size=2, checkpoint_every=0, mixed_precision="bf16"),
}
WITHOUT_REFERENCE = {"rest", "best_of_n"}  # they train without a KL term


@pytest.mark.parametrize("run_name", RUNS)
def test_every_sampling_method_runs_its_forward_passes_in_bf16_on_fp32_weights(
    run_name, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    cfg = RUNS[run_name]
    method = METHODS[run_name.removesuffix("-value-head")]
    policy = tiny_policy()
    reference, before = copy.deepcopy(policy), copy.deepcopy(policy)
    computed = {
        "policy": _head_dtypes(policy, "lm_head"),
        "reference": _head_dtypes(reference, "lm_head"),
        "reward model": _head_dtypes(tiny_reward.model, "score"),
    }
    run = RLInputs(
        policy, reference, tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        checkpoint_dir=tmp_path,
    )
    forced = None if hasattr(cfg, "mixed_precision") else "bf16"  # None: the section's own, bf16
    with on_accelerator(run, forced):
        trained, _ = method.train(run)

    if run_name in WITHOUT_REFERENCE:
        assert not computed.pop("reference")
    for name, dtypes in computed.items():
        assert dtypes == {torch.bfloat16}, name
    device = placement("bf16")[0]
    for model in (trained, reference, tiny_reward.model):
        assert {(p.device, p.dtype) for p in model.parameters()} == {(device, torch.float32)}
    check_finite(trained, run_name)
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), before.parameters()))
