"""The thread policy (components/threads.py): fewer threads beside processes that keep the cores
busy, the count a stage picked kept when it resumes, and a user's OMP_NUM_THREADS kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from components import threads

CORES = len(os.sched_getaffinity(0))


@pytest.fixture
def policy(monkeypatch):
    """The policy switched on (conftest sets OMP_NUM_THREADS for the other tests); torch's thread
    count restored afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def every_core_busy():
    """One process spinning on each core this process may use."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
        for core in sorted(os.sched_getaffinity(0))
    ]
    yield
    for spinner in spinners:
        spinner.kill()
        spinner.wait()


def test_beside_busy_cores_a_stage_takes_one_thread_and_keeps_it_when_resumed(policy, every_core_busy, tmp_path):
    assert threads.free_cores() == 1
    assert threads.use_free_cores(tmp_path) == 1 == torch.get_num_threads()
    assert json.loads((tmp_path / threads.RECORD).read_text()) == {"threads": 1}

    # a resumed stage reads the count back rather than sampling the load again
    (tmp_path / threads.RECORD).write_text(json.dumps({"threads": CORES + 1}))
    assert threads.use_free_cores(tmp_path) == CORES + 1 == torch.get_num_threads()


def test_a_set_omp_num_threads_is_kept(every_core_busy, tmp_path):
    torch.set_num_threads(CORES)
    assert os.environ["OMP_NUM_THREADS"]
    assert threads.use_free_cores(tmp_path) == CORES == torch.get_num_threads()
    assert not (tmp_path / threads.RECORD).exists()
