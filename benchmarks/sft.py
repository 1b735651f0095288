"""SFT: `components.sft.train` against `trl.SFTTrainer`, loss on the response tokens only.

Work is counted in tokens: the non-padding tokens (prompt, response and EOS) of each step's batch.
TRL gets the demonstrations as a prompt/completion dataset; it appends the EOS to the completion
and masks the prompt out of the loss, as ours does.
"""

from __future__ import annotations

from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from benchmarks import sides, workload
from benchmarks.workload import SEED
from components.trainers import sft
from components.sections import SFTConfig

UNIT = "tokens/s"


def _tokens_per_step(work, sizes) -> list[float]:
    attention_mask = sft.lm_objective(work.tokenizer, work.demonstrations, sizes.max_length).attention_mask
    return [float(attention_mask[batch].sum()) for batch in sides.our_batches(sizes)]


def ours(sizes):
    work = workload.build(sizes)
    model = workload.causal_lm(work)
    cfg = sides.ours_config(SFTConfig, sizes)

    def job(clock):
        sft.train(
            model, work.tokenizer, work.demonstrations, sizes.max_length, cfg, SEED, sides.ours_clock(clock),
            head_on_targets=cfg.head_on_targets,
        )

    return job, _tokens_per_step(work, sizes)


def peer(sizes):
    work = workload.build(sizes)
    model = workload.causal_lm(work)
    rows = [{"prompt": d.prompt, "completion": d.response} for d in work.demonstrations]
    args = sides.trl_config(TRLSFTConfig, sizes)

    def job(clock):
        trainer = SFTTrainer(
            model, args=args, train_dataset=sides.trl_dataset(rows, sizes), processing_class=work.tokenizer,
            callbacks=[sides.TRLClock(clock)],
        )
        sides.train_trl(trainer, sizes)

    return job, _tokens_per_step(work, sizes)
