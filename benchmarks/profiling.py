"""Where a side spends its time: one run under cProfile and torch.profiler, in this process.

    python -m benchmarks.profiling sft ours      # or: reward peer, dpo peer_precomputed, hh_dpo ours_on_the_fly, ...

Prints the mean time of the timed steps, cProfile's functions by cumulative time over the whole
job (set-up inside the trainer and warm-up steps included) and torch.profiler's operators by
self CPU time. Both profilers slow the run down; compare shares, not seconds, with `make bench`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
from dataclasses import replace

from torch.profiler import ProfilerActivity, profile

from benchmarks.measure import StepClock
from benchmarks.run import HH_TRAINERS, TRAINERS, sides_of
from benchmarks.workload import HH, Sizes, use_threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=[*TRAINERS, *HH_TRAINERS])
    parser.add_argument("side", help="ours, peer, or another side the benchmark lists")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch threads; 0: one per core; default: as make bench")
    args = parser.parse_args(argv)
    hh = args.benchmark in HH_TRAINERS
    sizes, rings = (HH, HH_TRAINERS[args.benchmark][1]) if hh else (Sizes(), TRAINERS[args.benchmark][1])
    if args.threads is not None:
        sizes = replace(sizes, threads=args.threads)
    use_threads(sizes)
    sides = {name: side for lines in rings for name, side in sides_of(lines).items()}
    job, _ = sides[args.side](sizes)
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
