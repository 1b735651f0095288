"""Reward model: `components.reward_model.train` against `trl.RewardTrainer` (Bradley-Terry loss).

Work is counted in preference pairs. Both sides train the same GPT-2 with a scalar head and the
model's own dropout (TRL would switch it off by default; ours keeps the model as configured),
chosen and rejected sequences of a batch in one forward pass.
"""

from __future__ import annotations

from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from benchmarks import sides, workload
from benchmarks.workload import SEED
from components.trainers import reward_model
from components.sections import RewardConfig

UNIT = "pairs/s"


def ours(sizes):
    work = workload.build(sizes)
    model = workload.reward_model(work)
    cfg = sides.ours_config(RewardConfig, sizes)

    def job(clock):
        reward_model.train(model, work.tokenizer, work.pairs, cfg, SEED, sides.ours_clock(clock))

    return job, [float(sizes.batch_size)] * sizes.steps


def peer(sizes):
    work = workload.build(sizes)
    model = workload.reward_model(work)
    rows = sides.preference_rows(work.pairs)
    args = sides.trl_config(TRLRewardConfig, sizes, disable_dropout=False)

    def job(clock):
        trainer = RewardTrainer(
            model, args=args, train_dataset=sides.trl_dataset(rows, sizes), processing_class=work.tokenizer,
            callbacks=[sides.TRLClock(clock)],
        )
        sides.train_trl(trainer, sizes)

    return job, [float(sizes.batch_size)] * sizes.steps
