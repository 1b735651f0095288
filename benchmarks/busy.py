"""A stage beside another job: the demo's pretraining stage (`run_stage("pretrain")`, a small
world) with the library's thread policy (components/threads.py) against torch's default of one
thread per core, alone and beside a competitor: another process training a small GPT-2 with
torch's default threads, as a second demo or a notebook on the same machine would.

Each stage run is a fresh process, so the policy decides at its start as it does in the demo. The
four runs go: default alone, ours alone, then with the competitor running, default beside it,
ours beside it. Lines: `alone_pretrain_seconds` (what the policy costs on a free machine) and
`busy_pretrain_seconds` (what it saves beside a job), each a stage's wall-clock seconds, the
ratio default/ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from benchmarks import measure
from components.config import PipelineConfig

# the demo's model and pretraining on a tenth of its world: about 10 s alone on 2 cores
CONFIG = PipelineConfig.model_validate({"world": {"n_reviews": 600}})
# another job with torch's default threads: a small GPT-2 trained forever; "ready" once it computes
COMPETITOR = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel
model = GPT2LMHeadModel(GPT2Config(vocab_size=2000, n_positions=128, n_layer=4, n_head=4, n_embd=128))
optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
ids = torch.randint(0, 2000, (16, 83))
for step in range(10**9):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step == 0:
        print("ready", flush=True)
"""


def _task(root: str) -> None:
    from components.pipeline import stages

    stages.run_stage("task", CONFIG, root)


def _pretrain_seconds(root: str, policy: bool) -> float:
    """One pretraining stage in this fresh process: with the policy, or with OMP_NUM_THREADS set to
    one thread per core, torch's default, which the policy then keeps."""
    import torch

    from components.pipeline import stages

    cores = len(os.sched_getaffinity(0))
    if policy:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = str(cores)
        torch.set_num_threads(cores)
    start = time.perf_counter()
    stages.run_stage("pretrain", CONFIG, root)
    seconds = time.perf_counter() - start
    print(f"  pretrain, {'ours' if policy else 'default'}: {torch.get_num_threads()} threads, {seconds:.1f} s",
          file=sys.stderr)
    return seconds


def compare() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-busy-") as root:
        measure.in_fresh_process(_task, root)
        alone = [measure.in_fresh_process(_pretrain_seconds, root, policy) for policy in (False, True)]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.PIPE, text=True, env=env)
        try:
            competitor.stdout.readline()  # computing
            busy = [measure.in_fresh_process(_pretrain_seconds, root, policy) for policy in (False, True)]
        finally:
            competitor.kill()
            competitor.wait()
    return [
        measure.row("alone_pretrain_seconds", alone[1], alone[0], "s", higher_is_better=False),
        measure.row("busy_pretrain_seconds", busy[1], busy[0], "s", higher_is_better=False),
    ]
