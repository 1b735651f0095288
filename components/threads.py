"""How many threads torch computes with: the cores other processes leave free.

torch's default, one thread per core, suits a machine of one's own. Beside another busy job it
is a trap: an OpenMP operator's threads meet at a barrier after every parallel loop, so when
another process holds one of the cores, every operator of a step waits for the thread the
scheduler put aside. A training step of small operators then runs many times slower than on one
thread (benchmarks/README.md, `busy_*`: on 2 cores beside one other torch job, a small GPT-2's
training loop ran 4.3x slower with two threads, 1.6x with one; alone, one thread is 1.5x slower).

So a stage counts the cores busy with other work when it starts and computes on the rest (at
least one). `OMP_NUM_THREADS`, when set, is the user's choice and is kept. A resumed stage uses
the count its first run picked: threads change how sums are split, so a different count would
round differently from the run it continues.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import torch

# how long the cores' load is sampled: long enough to see a busy core, short beside a stage
SAMPLE_SECONDS = 0.3
RECORD = "threads.json"


def free_cores(sample_seconds: float = SAMPLE_SECONDS) -> int:
    """Cores this process may use that other processes do not keep busy now (at least 1). This
    process idles while sampling, so the load seen is the others'."""
    cores = sorted(os.sched_getaffinity(0))
    load = psutil.cpu_percent(interval=sample_seconds, percpu=True)
    busy = sum(load[core] for core in cores if core < len(load)) / 100
    return max(1, len(cores) - round(busy))


def use_free_cores(checkpoint_folder: Path | None = None) -> int:
    """Set torch's thread count for a stage (module docstring) and return it; with a checkpoint
    folder, the count is recorded there, and a resumed stage reads it back."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    record = Path(checkpoint_folder) / RECORD if checkpoint_folder else None
    if record and record.exists():
        threads = json.loads(record.read_text())["threads"]
    else:
        threads = free_cores()
        if record:
            record.write_text(json.dumps({"threads": threads}))
    torch.set_num_threads(threads)
    return threads
