"""`make bench`: our trainers and rollout against TRL's and bare `generate`, one JSON line each.

    python -m benchmarks.run [--repeats N] [--hh-repeats N] [--only sft ... hh_sft ... scaling busy] [--threads N] [--quick]

Each line holds name, ours, peer, unit and ratio; a ratio above 1 means ours is better (ours/peer
for throughput, peer/ours for peak memory). Progress and each run's numbers go to stderr. The
tiny workload (`sft` ... `rollout`) runs first, then the realistic one (`hh_*`, SmolLM2-135M on
HH-RLHF), then the scaling table (DPO against sequence length, both models), then a demo stage
beside another job under our thread policy and torch's default (`busy`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from benchmarks import busy, dpo, measure, reward, rollout, sft
from benchmarks.workload import HH, SCALING, Sizes

# benchmark -> (throughput unit, rings): the sides of a ring run together in lockstep; a ring's
# lines, by name suffix, each compare an ours side with a peer side
TRAINERS = {
    "sft": (sft.UNIT, [{"": (sft.ours, sft.peer)}]),
    "reward": (reward.UNIT, [{"": (reward.ours, reward.peer)}]),
    # `dpo` compares each trainer's default (ours precomputes the reference log-probs, TRL does not)
    "dpo": (dpo.UNIT, [{"": (dpo.ours, dpo.peer), "_precomputed": (dpo.ours, dpo.peer_precomputed)}]),
}
HH_TRAINERS = {
    "hh_sft": TRAINERS["sft"],
    "hh_reward": TRAINERS["reward"],
    # like for like: both compute the reference on every step, or both precompute it. Two rings:
    # four 135M processes at once would need about 20 GB
    "hh_dpo": (dpo.UNIT, [{"": (dpo.ours_on_the_fly, dpo.peer)}, {"_precomputed": (dpo.ours, dpo.peer_precomputed)}]),
}
SCALING_LENGTHS = (128, 256, 512, 1024)
SCALING_MODELS = ("tiny", "smollm2")
SCALING_RINGS = [{"": (dpo.ours, dpo.peer_precomputed)}]  # like for like: both precompute the reference


STARTED = time.monotonic()


def starting(part: str) -> None:
    """On stderr, with the time so far: what the 20-minute budget goes to (README.md, How it is sized)."""
    print(f"{part} ... ({time.monotonic() - STARTED:.0f} s into the run)", file=sys.stderr, flush=True)


def sides_of(lines: dict) -> dict:
    """The distinct sides of a ring's lines, by name (ours, peer, peer_precomputed, ...)."""
    return {side.__name__: side for pair in lines.values() for side in pair}


def compare_trainers(name: str, unit: str, rings: list[dict], sizes: Sizes, repeats: int) -> list[dict]:
    rows = []
    for lines in rings:
        runs = measure.rounds(sides_of(lines), sizes, repeats)
        for suffix, (ours_side, peer_side) in lines.items():
            ours, peer = runs[ours_side.__name__], runs[peer_side.__name__]
            rates = measure.median_pair([(measure.rate(o), measure.rate(p)) for o, p in zip(ours, peer)])
            rows.append(measure.row(f"{name}{suffix}_throughput", *rates, unit))
            rows.append(
                measure.row(
                    f"{name}{suffix}_peak_memory", measure.peak_mib(ours), measure.peak_mib(peer), "MiB",
                    higher_is_better=False,
                )
            )
    return rows


def scaling(sizes: Sizes, lengths: tuple[int, ...], repeats: int) -> list[dict]:
    """DPO's throughput and peak memory against sequence length, for each model; a table on stderr."""
    rows, table = [], []
    for model in SCALING_MODELS:
        for length in lengths:
            name = f"scaling_dpo_{model}_{length}"
            starting(name)
            throughput, memory = compare_trainers(
                name, dpo.UNIT, SCALING_RINGS, replace(sizes, model=model, max_length=length), repeats
            )
            rows += [throughput, memory]
            table.append([model, length, *(row[k] for row in (throughput, memory) for k in ("ours", "peer", "ratio"))])
    header = ["model", "length", f"ours {dpo.UNIT}", f"TRL {dpo.UNIT}", "ratio", "ours MiB", "TRL MiB", "ratio"]
    print("DPO, reference log-probs precomputed on both sides:", file=sys.stderr)
    for cells in [header, *table]:
        print(" ".join(f"{c:>13.4g}" if isinstance(c, float) else f"{c:>13}" for c in cells), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    names = [*TRAINERS, "rollout", *HH_TRAINERS, "hh_rollout", "scaling", "busy"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="lockstep rounds; the median round is reported")
    parser.add_argument("--hh-repeats", type=int, default=1, help="lockstep rounds of the hh and scaling parts")
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument(
        "--threads", type=int, help="torch threads per process; 0: one per core; default 1 (tiny), 2 (hh and scaling)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1-3 steps, one round, short sequences")
    args = parser.parse_args(argv)
    threads = {} if args.threads is None else {"threads": args.threads}
    tiny, hh, scaled = Sizes(**threads), replace(HH, **threads), replace(SCALING, **threads)
    repeats, hh_repeats, lengths = args.repeats, args.hh_repeats, SCALING_LENGTHS
    if args.quick:
        tiny = replace(tiny, warmup_steps=1, timed_steps=2, rollout_new_tokens=8)
        short = dict(warmup_steps=0, timed_steps=1, max_length=64, rollout_batch=4, rollout_new_tokens=8)
        hh, scaled = replace(hh, batch_size=2, rollout_prompt_tokens=32, **short), replace(scaled, **short)
        repeats, hh_repeats, lengths = 1, 1, (64,)
    load = os.getloadavg()
    print(f"tiny: {tiny}, {repeats} repeats; hh: {hh}, {hh_repeats} repeats; load average {load}", file=sys.stderr)
    for name in args.only:
        starting(name)
        if name == "rollout":
            rows = rollout.compare(name, tiny, repeats)
        elif name == "hh_rollout":
            rows = rollout.compare(name, hh, hh_repeats)
        elif name == "scaling":
            rows = scaling(scaled, lengths, hh_repeats)
        elif name == "busy":
            rows = busy.compare()
        elif name in TRAINERS:
            rows = compare_trainers(name, *TRAINERS[name], tiny, repeats)
        else:
            rows = compare_trainers(name, *HH_TRAINERS[name], hh, hh_repeats)
        for result in rows:
            print(json.dumps(result), flush=True)
    print(f"make bench: {time.monotonic() - STARTED:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
