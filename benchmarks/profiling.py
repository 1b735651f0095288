"""Where a side spends its time: one run under cProfile and torch.profiler, in this process.

    python -m benchmarks.profiling sft ours      # or: reward peer, dpo peer_precomputed, ...

Prints the mean time of the timed steps, cProfile's functions by cumulative time over the whole
job (set-up inside the trainer and warm-up steps included) and torch.profiler's operators by
self CPU time. Both profilers slow the run down; compare shares, not seconds, with `make bench`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

from torch.profiler import ProfilerActivity, profile

from benchmarks.measure import StepClock
from benchmarks.run import TRAINERS
from benchmarks.workload import Sizes, use_threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=list(TRAINERS))
    parser.add_argument("side", help="ours, peer, or another side the benchmark lists")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: one per core")
    args = parser.parse_args(argv)
    sizes = Sizes(threads=args.threads)
    use_threads(sizes)
    job, _ = TRAINERS[args.benchmark][1][args.side](sizes)
    clock = StepClock()
    with profile(activities=[ProfilerActivity.CPU]) as torch_profile:
        profiler = cProfile.Profile()
        profiler.runcall(job, clock)
    timed = clock.seconds[sizes.warmup_steps :]
    print(f"{len(clock.seconds)} steps; timed steps {statistics.mean(timed):.3f} s on average (profiled)")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
    print(torch_profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
