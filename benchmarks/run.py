"""`make bench`: our trainers and rollout against TRL's and bare `generate`, one JSON line each.

    python -m benchmarks.run [--repeats N] [--only sft reward dpo rollout] [--threads N] [--quick]

Each line holds name, ours, peer, unit and ratio; a ratio above 1 means ours is better (ours/peer
for throughput, peer/ours for peak memory). Progress and each run's numbers go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from benchmarks import dpo, measure, reward, rollout, sft
from benchmarks.workload import Sizes

# benchmark -> (throughput unit, sides); "ours" is compared with every other side
TRAINERS = {
    "sft": (sft.UNIT, {"ours": sft.ours, "peer": sft.peer}),
    "reward": (reward.UNIT, {"ours": reward.ours, "peer": reward.peer}),
    "dpo": (dpo.UNIT, {"ours": dpo.ours, "peer": dpo.peer, "peer_precomputed": dpo.peer_precomputed}),
}


def compare_trainers(name: str, sizes: Sizes, repeats: int) -> list[dict]:
    unit, sides = TRAINERS[name]
    runs = measure.rounds(sides, sizes, repeats)
    rows = []
    for side in sides:
        if side == "ours":
            continue
        label = name if side == "peer" else f"{name}_{side.removeprefix('peer_')}"
        ours, peer = runs["ours"], runs[side]
        rates = measure.median_pair([(measure.rate(o), measure.rate(p)) for o, p in zip(ours, peer)])
        rows.append(measure.row(f"{label}_throughput", *rates, unit))
        rows.append(
            measure.row(
                f"{label}_peak_memory", measure.peak_mib(ours), measure.peak_mib(peer), "MiB", higher_is_better=False
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    names = [*TRAINERS, "rollout"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="lockstep rounds; the median round is reported")
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process; 0: one per core")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few steps, one round")
    args = parser.parse_args(argv)
    sizes = Sizes(threads=args.threads)
    if args.quick:
        sizes = replace(sizes, warmup_steps=1, timed_steps=2, rollout_new_tokens=8)
    repeats = 1 if args.quick else args.repeats
    print(f"{sizes}, {repeats} repeats, load average {os.getloadavg()}", file=sys.stderr, flush=True)
    for name in args.only:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows = rollout.compare(sizes, repeats) if name == "rollout" else compare_trainers(name, sizes, repeats)
        for result in rows:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
