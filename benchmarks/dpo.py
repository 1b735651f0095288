"""DPO: `components.dpo.train` against `trl.DPOTrainer` (sigmoid loss, beta 0.1, full fine-tuning).

Work is counted in preference pairs. Each side keeps its default for the reference log-probs:
ours computes them once before training (`precompute_ref_logprobs=True`), TRL runs the frozen
reference model on every step (`precompute_ref_log_probs=False`). `peer_precomputed` is TRL with
precomputation switched on, `ours_on_the_fly` ours with it off: the like-for-like comparisons.
Precomputation happens before the first step, so it is outside the timed steps on both sides but
inside the peak-memory span. Both sides switch dropout off, their default.
"""

from __future__ import annotations

import copy

from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from benchmarks import sides, workload
from benchmarks.workload import SEED
from components.trainers import dpo
from components.sections import DPOConfig

UNIT = "pairs/s"


def _ours(sizes, precompute: bool):
    work = workload.build(sizes)
    policy = workload.causal_lm(work)
    cfg = sides.ours_config(DPOConfig, sizes, precompute_ref_logprobs=precompute)

    def job(clock):
        dpo.train(policy, work.tokenizer, work.pairs, sizes.max_length, cfg, SEED, sides.ours_clock(clock))

    return job, [float(sizes.batch_size)] * sizes.steps


def ours(sizes):
    return _ours(sizes, precompute=True)


def ours_on_the_fly(sizes):
    return _ours(sizes, precompute=False)


def _trl(sizes, precompute: bool):
    work = workload.build(sizes)
    policy = workload.causal_lm(work)
    rows = sides.preference_rows(work.pairs)
    args = sides.trl_config(TRLDPOConfig, sizes, precompute_ref_log_probs=precompute)

    def job(clock):
        # TRL would load the reference from the policy's hub id, which a model built here does not have;
        # precomputing uses the policy itself before training
        ref_model = None if precompute else copy.deepcopy(policy)
        trainer = DPOTrainer(
            policy, ref_model, args=args, train_dataset=sides.trl_dataset(rows, sizes), processing_class=work.tokenizer,
            callbacks=[sides.TRLClock(clock)],
        )
        sides.train_trl(trainer, sizes)

    return job, [float(sizes.batch_size)] * sizes.steps


def peer(sizes):
    return _trl(sizes, precompute=False)


def peer_precomputed(sizes):
    return _trl(sizes, precompute=True)
