"""How sides are measured: in lockstep, one fresh process each, step by step.

Every side of a comparison (ours, TRL's) runs in its own freshly spawned process, so neither
inherits the other's allocator state, caches or lazily imported modules. The processes take turns
on the machine: side A runs its optimizer step i, hands over to side B, which runs its step i on
the same batch, and so on round the ring. Only one side computes at a time, and the two timings
of a step are seconds apart, so load from other processes on a shared machine falls on both
alike. The whole comparison is repeated, the side going first rotating; a side's throughput in a
repeat is the work of its timed steps over their time, and the repeat reported is the one whose
ratio of the two throughputs is the median.

Peak memory is the growth of a process's resident set from the moment the trainer is handed a
built model and raw data to the end of training (on Linux the kernel's high-water mark, reset
through `/proc/self/clear_refs`); on a GPU `torch.cuda.max_memory_allocated` over the same span.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import math
import multiprocessing
import queue
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from benchmarks import workload

MIB = 2**20
TURN_TIMEOUT_S = 900  # a side that waits longer for its turn gives up: a partner has died


class StepClock:
    """Wall and CPU seconds (all threads of the process) of each optimizer step; `tick` at its end."""

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.resume()

    def resume(self) -> None:
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def record(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.wall_start)
        self.cpu_seconds.append(time.process_time() - self.cpu_start)

    def tick(self) -> None:
        self.record()
        self.resume()


class TurnClock(StepClock):
    """A step clock that, after each step, hands the machine to the next side and waits its turn."""

    def __init__(self, mine, following):
        self.mine, self.following = mine, following
        super().__init__()

    def take_turn(self) -> None:
        if not self.mine.wait(TURN_TIMEOUT_S):
            raise TimeoutError("the side before this one in the ring stopped passing the turn")
        self.mine.clear()
        self.resume()

    def pass_turn(self) -> None:
        self.following.set()

    def tick(self) -> None:
        self.record()
        self.pass_turn()
        self.take_turn()


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory growth, in MiB, between `start()` and `peak_mib()`."""

    def start(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the VmHWM high-water mark to VmRSS
            self.base = _status_kib("VmRSS") * 1024
            self.high_water = lambda: _status_kib("VmHWM") * 1024
        except OSError:
            # ru_maxrss cannot be reset: a set-up peak above the RSS here would be counted
            self.base = _status_kib("VmRSS") * 1024 if Path("/proc/self/status").exists() else 0
            scale = 1 if sys.platform == "darwin" else 1024
            self.high_water = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def peak_mib(self) -> float:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else self.high_water()
        return (peak - self.base) / MIB


# A side: given the sizes, set up (not measured) and return the job to measure and the work of each
# optimizer step (tokens or pairs); the job trains, ticking the clock at the end of every optimizer step.
Job = Callable[[StepClock], None]
Prepare = Callable[[object], tuple[Job, list[float]]]


def _run_in_turn(prepare: Prepare, sizes, ready, mine, following, results, index: int) -> None:
    """One side in its own process: set up, wait for all sides, then train taking turns."""
    clock = TurnClock(mine, following)
    try:
        workload.use_threads(sizes)
        # a child's chatter (TRL prints its logs) goes to stderr: stdout carries only the result lines
        with contextlib.redirect_stdout(sys.stderr):
            job, work = prepare(sizes)
            memory = PeakMemory()
            memory.start()
            ready.wait(TURN_TIMEOUT_S)
            clock.take_turn()
            job(clock)
            peak_mib = memory.peak_mib()
        if len(clock.seconds) != len(work):
            raise RuntimeError(f"{len(clock.seconds)} optimizer steps ticked, {len(work)} expected")
        w = sizes.warmup_steps
        timed = {"seconds": clock.seconds[w:], "cpu_seconds": clock.cpu_seconds[w:], "work": work[w:]}
        results.put((index, {**timed, "peak_mib": peak_mib}))
    except BaseException:
        results.put((index, traceback.format_exc()))
    finally:
        clock.pass_turn()  # the ring goes on without this side


def lockstep(prepares: list[Prepare], sizes, first: int) -> list[dict]:
    """Run the sides in lockstep, each in a fresh process, side `first` starting; one result per side:
    the seconds, CPU seconds and work of each timed step, and the peak memory."""
    context = multiprocessing.get_context("spawn")
    n = len(prepares)
    ready, results = context.Barrier(n), context.Queue()
    turns = [context.Event() for _ in range(n)]
    turns[first].set()
    processes = [
        context.Process(
            target=_run_in_turn, args=(prepare, sizes, ready, turns[i], turns[(i + 1) % n], results, i), daemon=True
        )
        for i, prepare in enumerate(prepares)
    ]
    for process in processes:
        process.start()
    collected: dict[int, dict] = {}
    try:
        while len(collected) < n:
            try:
                index, result = results.get(timeout=5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise RuntimeError("a benchmark process died; see stderr") from None
                continue
            if isinstance(result, str):
                raise RuntimeError(f"side {index} failed:\n{result}")
            collected[index] = result
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    return [collected[i] for i in range(n)]


def in_fresh_process(fn: Callable, *args):
    """`fn(*args)` in a freshly spawned Python process; its result comes back pickled."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def rounds(prepares: dict[str, Prepare], sizes, repeats: int) -> dict[str, list[dict]]:
    """`repeats` lockstep runs of all sides, the first side rotating (AB, BA, ...)."""
    names = list(prepares)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name, result in zip(names, lockstep(list(prepares.values()), sizes, first=r % len(names))):
            runs[name].append(result)
        print(f"  round {r + 1}: " + " | ".join(f"{n} {summary(runs[n][-1])}" for n in names), file=sys.stderr)
    return runs


def summary(run: dict) -> str:
    work = sum(run["work"])
    return (
        f"{work / sum(run['seconds']):.4g}/s ({work / sum(run['cpu_seconds']):.4g} per CPU-s), "
        f"peak {run['peak_mib']:.1f} MiB"
    )


def rate(run: dict) -> float:
    """Work of the timed steps over their time."""
    return sum(run["work"]) / sum(run["seconds"])


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (ours, peer) pair, measured together, whose ratio is the median (the lower one of an even count)."""
    ranked = sorted(pairs, key=lambda pair: pair[0] / pair[1])
    return ranked[(len(ranked) - 1) // 2]


def peak_mib(runs: list[dict]) -> float:
    return statistics.median(run["peak_mib"] for run in runs)


def row(name: str, ours: float, peer: float, unit: str, higher_is_better: bool = True) -> dict:
    """One result line; `ratio` > 1 means ours is better (ours/peer for rates, peer/ours for costs)."""
    ratio = ours / peer if higher_is_better else peer / ours
    return {"name": name, "ours": _rounded(ours), "peer": _rounded(peer), "unit": unit, "ratio": round(ratio, 3)}


def _rounded(value: float) -> float:
    """Two decimals, more below 10 so that at least four significant digits remain (e.g. 0.1234 pairs/s)."""
    if value == 0:
        return value
    return round(value, max(2, 3 - math.floor(math.log10(abs(value)))))
